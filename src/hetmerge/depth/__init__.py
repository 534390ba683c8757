"""Depth heterogeneity: layer similarity (minibatch CKA) and the alignment of a shallow model's blocks to
a deeper model's positions, and the identity padding of the shallow model to the deep depth (algorithms.md §4).
`depth_alignment` computes a pair's CKA and every strategy's alignment once, as a JSON-ready record."""

from hetmerge.depth.alignment import (
    STRATEGIES,
    DepthAlignment,
    Positions,
    Strategy,
    align_depths,
    get_strategy,
    head_alignment,
    head_tail_alignment,
    layer_alignment,
    layer_code_alignment,
    layer_code_score,
    layer_score,
    segment_alignment,
    segment_score,
    stage_offsets,
    stage_similarity,
    to_global,
    to_local,
    uniform_alignment,
)
from hetmerge.depth.cka import CKAAccumulator, layer_cka
from hetmerge.depth.padding import pad_to_depth
from hetmerge.depth.pair import alignment_from_record, all_alignments, block_names, deepest_model, depth_alignment

__all__ = [
    "STRATEGIES",
    "CKAAccumulator",
    "DepthAlignment",
    "Positions",
    "Strategy",
    "align_depths",
    "alignment_from_record",
    "all_alignments",
    "block_names",
    "deepest_model",
    "depth_alignment",
    "get_strategy",
    "head_alignment",
    "head_tail_alignment",
    "layer_alignment",
    "layer_cka",
    "layer_code_alignment",
    "layer_code_score",
    "layer_score",
    "pad_to_depth",
    "segment_alignment",
    "segment_score",
    "stage_offsets",
    "stage_similarity",
    "to_global",
    "to_local",
    "uniform_alignment",
]
