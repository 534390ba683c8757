"""Weight-space similarity of the units of one feature space (MuDSC §3.4).

A unit is described by every weight it owns along the space's axes: its row of each producing tensor and
its column of each consuming tensor. The tensors' *other* axes belong to other spaces; where those are
already matched they are first expressed in the merged basis (the current estimate of the other
matchings, as in Git Re-Basin), so units of different models become comparable. The similarity is the
Pearson correlation of these concatenated vectors across all N models' units.
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
        for axis, (other, other_ref) in graph.axes_of(ref.param).items():
            if axis != ref.axis and other.name in merges:
                w = transform_axis(w, axis, merges[other.name], model, other_ref in other.producers)
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
    return (corr + corr.T) / 2
