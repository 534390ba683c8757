"""Training-free heterogeneous model merging (algorithms.md §4): depth alignment, identity padding, zipping.

1. Layer similarity: minibatch linear CKA between every block of the deeper and the shallower model, on
   the merge slice.
2. Depth alignment per stage with a named strategy (`segment` = SMA, the paper's; `layer` = LMA as
   intended; `layer_code` = LMA as the original code computes it; baselines `head`, `uniform`,
   `head_tail`).
3. Identity padding: the shallower model gets the deeper one's depth, its blocks at the aligned positions.
   Spaces only the deeper model really has (inside identity blocks) are kept as single-model spaces.
4. Matching of the now equally deep models: zip (elastic when the widths differ: merged into the wider)
   or align, on activation similarity (λ = 1) or MuDSC's dual-space blend (λ < 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from hetmerge.depth import align_depths, layer_cka, pad_to_depth
from hetmerge.depth.alignment import STRATEGIES
from hetmerge.matching.dual_space import dual_space_matching
from hetmerge.matching.solvers import make_solver
from hetmerge.matching.transforms import SpaceMerge
from hetmerge.merged import MergedModel
from hetmerge.methods.base import (
    MergeContext,
    MergeError,
    MergeMethod,
    MethodParams,
    register,
)
from hetmerge.methods.spacewise import assemble, target_architecture
from hetmerge.models import MultiTaskNet
from hetmerge.params import Range
from hetmerge.statistics import collect_statistics


@dataclass(frozen=True)
class HeteroParams(MethodParams):
    """`strategy` aligns depths; `solver`, `lam`, α, β match the padded models (as in `mudsc`).

    Defaults follow the heterogeneous-merging code: SMA, zip with α 0.5, β 1, activation similarity only.
    """

    strategy: str = "segment"
    solver: Literal["zip", "align"] = "zip"
    lam: Annotated[float, Range(0, 1)] = 1.0
    alpha: Annotated[float, Range(0, 1)] = 0.5
    beta: Annotated[float, Range(0, 1)] = 1.0
    max_sweeps: Annotated[int, Range(1)] = 100
    patience: Annotated[int, Range(1)] = 5


def _deepest(models: Sequence[MultiTaskNet]) -> tuple[int, list[list[int]]]:
    try:
        depths = [[len(stage) for stage in m.depth_stages()] for m in models]
    except NotImplementedError as err:
        raise MergeError(str(err)) from None
    for i, own in enumerate(depths):
        if all(len(own) == len(other) and all(a >= b for a, b in zip(own, other, strict=True)) for other in depths):
            return i, depths
    raise MergeError(f"method 'hetero': no model is at least as deep as the other in every stage: {depths}")


@register
class Hetero(MergeMethod):
    name = "hetero"
    Params = HeteroParams
    max_models = 2

    def __init__(self, params: HeteroParams) -> None:
        super().__init__(params)
        if params.strategy not in STRATEGIES:
            raise MergeError(f"method 'hetero': unknown strategy {params.strategy!r}; known: {sorted(STRATEGIES)}")

    def keeps_first_basis(self) -> bool:
        return False  # the shallower model is padded: its blocks move

    def combine(self, models: Sequence[MultiTaskNet], ctx: MergeContext) -> MergedModel:
        deep, depths = _deepest(models)
        shallow = 1 - deep
        batches = ctx.require_batches("method 'hetero' (CKA and activation statistics)")
        deep_blocks = [f"body.{b}" for stage in models[deep].depth_stages() for b in stage]
        shallow_blocks = [f"body.{b}" for stage in models[shallow].depth_stages() for b in stage]
        cka = layer_cka(models[deep], models[shallow], batches(), deep_blocks, shallow_blocks)
        alignment = align_depths(self.params.strategy, depths[deep], depths[shallow], cka)
        padded = list(models)
        try:
            padded[shallow], single = pad_to_depth(models[shallow], models[deep], alignment)
        except ValueError as err:
            raise MergeError(f"method 'hetero': {err}") from None
        padded = [m.to(ctx.device).eval() for m in padded]
        like = target_architecture(self.name, padded, self.params.solver)
        graphs = [m.space_graph() for m in padded]
        fixed = {name: SpaceMerge.single(deep, [g[name].width for g in graphs]) for name in single}
        activation = None
        if self.params.lam > 0:
            wanted = [s.name for s in graphs[0].spaces if s.name not in fixed]
            stats = collect_statistics(padded, batches(), wanted)
            activation = {name: s.correlation() for name, s in stats.items()}
        solver = make_solver(self.params.solver, self.params.alpha, self.params.beta)
        result = dual_space_matching(
            padded,
            activation,
            self.params.lam,
            solver,
            self.params.max_sweeps,
            self.params.patience,
            ctx.seed,
            fixed,
        )
        ctx.notes.update(
            {
                "deep_model": deep,
                "deep_blocks": list(alignment.deep_blocks),
                "shallow_blocks": list(alignment.shallow_blocks),
                "positions": [list(p) for p in alignment.positions],
                "alignment_score": alignment.score,
                "cka": [[round(float(v), 6) for v in row] for row in cka.to(torch.float64)],
                "single_model_spaces": sorted(single),
                "sweeps": result.sweeps,
            }
        )
        return assemble(padded, result.merges, None, like)
