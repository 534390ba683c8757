"""Training-free heterogeneous model merging (algorithms.md §4): depth alignment, identity padding, zipping.

1. Layer similarity: minibatch linear CKA between every block of the deeper and the shallower model, on
   the merge slice. The pipeline computes it, with every strategy's alignment, once per model pair and seed
   (`hetmerge.depth.depth_alignment`) and passes it in `ctx.precomputed["alignment"]`; without it, the merge
   computes the same record itself.
2. Depth alignment per stage with a named strategy (`segment` = SMA, the paper's; `layer` = LMA as
   intended; `layer_code` = LMA as the original code computes it; baselines `head`, `uniform`,
   `head_tail`).
3. Identity padding: the shallower model gets the deeper one's depth, its blocks at the aligned positions.
   Spaces only the deeper model really has (inside identity blocks) are kept as single-model spaces.
4. Matching of the now equally deep models: zip (elastic when the widths differ: merged into the wider)
   or align, on activation similarity (λ = 1) or MuDSC's dual-space blend (λ < 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from hetmerge.depth import DepthAlignment, alignment_from_record, deepest_model, depth_alignment, pad_to_depth
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


def _check_record(record: Mapping[str, Any], deep: int, depths: list[list[int]]) -> None:
    """A precomputed alignment must be one of these models: same deeper model, same blocks per stage."""
    if record.get("kind") != "alignment":
        raise MergeError(f"method 'hetero': precomputed['alignment'] is a {record.get('kind')!r} record, no alignment")
    expected = {"deep_model": deep, "deep_blocks": depths[deep], "shallow_blocks": depths[1 - deep]}
    differ = [f"{k} {record.get(k)} (the models': {v})" for k, v in expected.items() if record.get(k) != v]
    if differ:
        raise MergeError(
            f"method 'hetero': the precomputed alignment is not of these models: {'; '.join(differ)}; compute it "
            "again for this pair"
        )


@register
class Hetero(MergeMethod):
    """Models of different depths: CKA depth alignment, identity padding of the shallower, then zip or align."""

    name = "hetero"
    paper = "Heterogeneous merging"
    Params = HeteroParams
    max_models = 2
    offers = ("alignment",)  # the merge has the deep model's depth: the plane through models A and B lacks it
    precomputed = ("alignment",)

    def __init__(self, params: HeteroParams) -> None:
        super().__init__(params)
        if params.strategy not in STRATEGIES:
            raise MergeError(f"method 'hetero': unknown strategy {params.strategy!r}; known: {sorted(STRATEGIES)}")

    def keeps_first_basis(self) -> bool:
        return False  # the shallower model is padded: its blocks move

    def _align(self, models: Sequence[MultiTaskNet], ctx: MergeContext) -> tuple[int, DepthAlignment]:
        """The deeper model's index and this strategy's alignment, from the precomputed record if given."""
        try:
            deep, depths = deepest_model(models)
        except ValueError as err:
            raise MergeError(f"method 'hetero': {err}") from None
        record = ctx.precomputed.get("alignment")
        if record is None:
            record = depth_alignment(models, ctx.require_batches("method 'hetero': CKA of the blocks")())
        else:
            _check_record(record, deep, depths)
        try:
            return deep, alignment_from_record(record, self.params.strategy)
        except ValueError as err:
            raise MergeError(f"method 'hetero', strategy {self.params.strategy!r}: {err}") from None

    def combine(self, models: Sequence[MultiTaskNet], ctx: MergeContext) -> MergedModel:
        deep, alignment = self._align(models, ctx)
        shallow = 1 - deep
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
            batches = ctx.require_batches("method 'hetero': activation statistics")
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
                "single_model_spaces": sorted(single),
                "sweeps": result.sweeps,
            }
        )
        return assemble(padded, result.merges, None, like)
