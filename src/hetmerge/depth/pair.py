"""The depth alignment of one model pair, computed once: the CKA between every block of the deeper and of the
shallower model on the merge slice, and every strategy's positions from it.

Every `hetero` merge of the pair (whatever its strategy, solver or λ) reads this record instead of running the
CKA pass again, and the alignment figure reads it too. The record is JSON-ready and survives a JSON round trip
exactly (float64 CKA values, integer positions), so a merge from the stored record equals one that computed it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from hetmerge.depth.alignment import STRATEGIES, DepthAlignment, align_depths
from hetmerge.depth.cka import layer_cka
from hetmerge.models.base import MultiTaskNet
from hetmerge.precompute import register_precompute

if TYPE_CHECKING:
    from hetmerge.methods.base import MergeContext


def deepest_model(models: Sequence[MultiTaskNet]) -> tuple[int, list[list[int]]]:
    """Index of the model at least as deep as every other in every stage, and each model's blocks per stage."""
    try:
        depths = [[len(stage) for stage in m.depth_stages()] for m in models]
    except NotImplementedError as err:
        raise ValueError(str(err)) from None
    for i, own in enumerate(depths):
        if all(len(own) == len(other) and all(a >= b for a, b in zip(own, other, strict=True)) for other in depths):
            return i, depths
    raise ValueError(f"no model is at least as deep as the other in every stage: {depths}")


def block_names(model: MultiTaskNet) -> list[str]:
    """The modules whose outputs the CKA compares: every block of every depth stage, in order."""
    return [f"body.{block}" for stage in model.depth_stages() for block in stage]


def all_alignments(
    similarity: torch.Tensor, deep_blocks: Sequence[int], shallow_blocks: Sequence[int]
) -> dict[str, dict[str, Any]]:
    """Every strategy's {"positions", "score"} from the global (Σ deep × Σ shallow) similarity; a strategy that
    cannot align these depths (e.g. `uniform`'s colliding positions) gets {"error": why} instead."""
    found: dict[str, dict[str, Any]] = {}
    for name in STRATEGIES:
        try:
            alignment = align_depths(name, deep_blocks, shallow_blocks, similarity)
        except ValueError as err:
            found[name] = {"error": str(err)}
        else:
            found[name] = {"positions": [list(p) for p in alignment.positions], "score": alignment.score}
    return found


def depth_alignment(models: Sequence[MultiTaskNet], batches: Iterable[torch.Tensor]) -> dict[str, Any]:
    """The alignment record of a model pair from one pass over `batches` (the merge slice's images).

    {"kind": "alignment", "deep_model": index of the deeper model, "deep_blocks"/"shallow_blocks": blocks per
    stage, "cka": deep blocks × shallow blocks (float64, unrounded), "strategies": `all_alignments`}.
    """
    if len(models) != 2:
        raise ValueError(f"depth alignment compares a pair of models, got {len(models)}")
    deep, depths = deepest_model(models)
    shallow = 1 - deep
    cka = layer_cka(models[deep], models[shallow], batches, block_names(models[deep]), block_names(models[shallow]))
    return {
        "kind": "alignment",
        "deep_model": deep,
        "deep_blocks": depths[deep],
        "shallow_blocks": depths[shallow],
        "cka": cka.tolist(),
        "strategies": all_alignments(cka, depths[deep], depths[shallow]),
    }


def alignment_from_record(record: Mapping[str, Any], strategy: str) -> DepthAlignment:
    """One strategy's alignment from a `depth_alignment` record (as returned, or loaded from its JSON)."""
    entry = record["strategies"].get(strategy)
    if entry is None:
        raise ValueError(f"the alignment record has no strategy {strategy!r}; it has {sorted(record['strategies'])}")
    if "error" in entry:
        raise ValueError(entry["error"])
    return DepthAlignment(
        strategy,
        tuple(int(b) for b in record["deep_blocks"]),
        tuple(int(b) for b in record["shallow_blocks"]),
        tuple(tuple(int(p) for p in stage) for stage in entry["positions"]),
        entry["score"],
    )


def alignment_input(models: Sequence[MultiTaskNet], ctx: MergeContext) -> dict[str, Any]:
    """The precomputed input "alignment": `depth_alignment` over the merge slice's images."""
    return depth_alignment(models, ctx.require_batches("the depth alignment")())


register_precompute("alignment", alignment_input)
