"""Weight-space similarity of the units of one feature space (MuDSC §3.4).

A unit is described by every weight it owns along the space's axes: its row of each producing tensor
(incoming weights) and its column of each consuming tensor (outgoing weights). The tensors' *other* axes
belong to neighbouring spaces; where those are already matched they are first expressed in the merged
basis (the current estimate of the other matchings, as in Git Re-Basin), so units of different models
become comparable. The similarity is the Pearson correlation of these concatenated vectors across all N
models' units.

Every neighbour axis is contracted with model i's 0/1 membership U_i (d_i × m): consumer axes become W·U_i,
as in the final merge, and producer axes U_iᵀ·W, the final merge's direction (M_i·W) without its averaging
(M_i = diag(1/members)·U_iᵀ). Incoming and outgoing weights thus count alike; with M_i, a permutation's
outgoing weights would count 1/N. For permutations U_iᵀ = N·M_i, so this equals the reference code, which
uses `merge * N` on consumer axes and the 0/1 unmerge on producer axes (the reverse of its final merge);
for a space only one model has, U_iᵀ = M_i. For zips, U_iᵀ sums a merged unit's members where N·M_i would
weigh them by N/members.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hetmerge.matching.transforms import SpaceMerge, transform_axis
from hetmerge.spaces import FeatureSpace, SpaceGraph


def unit_vectors(
    state: Mapping[str, torch.Tensor],
    graph: SpaceGraph,
    space: FeatureSpace,
    merges: Mapping[str, SpaceMerge],
    model: int,
    params: Sequence[str],
) -> torch.Tensor:
    """(width × features) float64 rows: model `model`'s weights of every unit of `space`."""
    blocks = []
    for ref in space.axes():
        if ref.role != "weight" or ref.param not in params:
            continue
        w = state[ref.param].double()
        for axis, (other, _) in graph.axes_of(ref.param).items():
            if axis != ref.axis and other.name in merges:
                # U_iᵀ·W along a producer axis is the same contraction as W·U_i along a consumer axis
                w = transform_axis(w, axis, merges[other.name], model, producer=False)
        blocks.append(torch.movedim(w, ref.axis, 0).reshape(w.shape[ref.axis], -1))
    return torch.cat(blocks, dim=1)


def weight_correlation(
    states: Sequence[Mapping[str, torch.Tensor]],
    graphs: Sequence[SpaceGraph],
    name: str,
    merges: Mapping[str, SpaceMerge],
) -> torch.Tensor:
    """(Σd × Σd) correlation of the units of space `name` of all models, from their weights.

    Only tensors every model has take part (another task's head does not), and running statistics never do.
    Computed on the weights' device; returned on the CPU, where the solvers run and activation similarities are.
    """
    shared = [p for p in states[0] if all(p in s for s in states[1:])]
    rows = [unit_vectors(s, g, g[name], merges, i, shared) for i, (s, g) in enumerate(zip(states, graphs, strict=True))]
    lengths = {r.shape[1] for r in rows}
    if len(lengths) != 1:
        raise ValueError(
            f"space {name!r}: the models' weight vectors have lengths {sorted(lengths)}; weight similarity of "
            "different widths needs the neighbouring spaces matched first (start from activations)"
        )
    z = torch.cat(rows)
    z = z - z.mean(1, keepdim=True)
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    corr = z @ z.T
    return ((corr + corr.T) / 2).cpu()
