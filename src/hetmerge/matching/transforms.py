"""Applying merge/unmerge matrices to every weight axis that a feature space names.

For a space with merge matrices M_i (m × d_i) and unmerge matrices U_i (d_i × m), model i's tensors become
M_i·W along producer axes and W·U_i along consumer axes. M averages the members of each merged unit, so
tensors with a producer axis are *summed* over models; tensors that only consume (task heads) or touch no
space are *averaged* over the models that have them.

Matchings are solved on the CPU (LAP, greedy zip); their matrices move to each weight's device where they are
applied, so a merge runs wherever the models are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from hetmerge.models import MultiTaskNet
from hetmerge.spaces import SpaceGraph, model_slices


@dataclass(frozen=True)
class SpaceMerge:
    """How one feature space of N models maps into the merged model."""

    merge: tuple[torch.Tensor, ...]  # per model: (m, d_i)
    unmerge: tuple[torch.Tensor, ...]  # per model: (d_i, m)

    @property
    def width(self) -> int:
        return self.merge[0].shape[0]

    @classmethod
    def from_assignment(cls, assignment: torch.Tensor, widths: Sequence[int]) -> SpaceMerge:
        """From a 0/1 membership matrix P (Σd_i × m): U = P, M = (P / column sums)ᵀ, split per model."""
        sizes = assignment.sum(0, keepdim=True)
        if (sizes == 0).any():
            raise ValueError("a merged unit has no members")
        merge = (assignment / sizes).T
        rows = model_slices(widths)
        return cls(
            tuple(merge[:, r].contiguous() for r in rows),
            tuple(assignment[r].contiguous() for r in rows),
        )

    @classmethod
    def from_permutations(cls, perms: Sequence[torch.Tensor]) -> SpaceMerge:
        """Model i's unit perms[i][k] joins merged unit k (model 0 usually the identity); units are averaged."""
        n = len(perms)
        width = len(perms[0])
        # unmerge[i][perm[k], k] = 1: merged unit k reads model i's unit perm[k]
        unmerge = tuple(torch.eye(width, dtype=torch.float64)[:, p].contiguous() for p in perms)
        return cls(tuple((u.T / n).contiguous() for u in unmerge), unmerge)

    @classmethod
    def single(cls, owner: int, widths: Sequence[int]) -> SpaceMerge:
        """A space only model `owner` really has (e.g. inside identity padding): its units, as they are.

        The merged space has the widest model's width; units beyond the owner's are left empty (zero).
        """
        width = max(widths)
        eye = torch.eye(width, widths[owner], dtype=torch.float64)
        merge = tuple(eye if i == owner else torch.zeros(width, w, dtype=torch.float64) for i, w in enumerate(widths))
        return cls(merge, tuple(m.T.contiguous() for m in merge))


def _producer(w: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    return torch.movedim(torch.tensordot(matrix.to(w.device, w.dtype), w, dims=([1], [axis])), 0, axis)


def _consumer(w: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    return torch.movedim(torch.tensordot(w, matrix.to(w.device, w.dtype), dims=([axis], [0])), -1, axis)


def transform_axis(w: torch.Tensor, axis: int, merge: SpaceMerge, model: int, producer: bool) -> torch.Tensor:
    """One axis of model `model`'s tensor into the merged basis: M_i·W for producers, W·U_i for consumers."""
    if producer:
        return _producer(w, axis, merge.merge[model])
    return _consumer(w, axis, merge.unmerge[model])


def transform_state(
    state: Mapping[str, torch.Tensor], graph: SpaceGraph, merges: Mapping[str, SpaceMerge], model: int
) -> dict[str, tuple[torch.Tensor, bool, bool]]:
    """Model `model`'s tensors in the merged basis: name → (tensor, has producer axis, fully merged)."""
    out = {}
    for name, tensor in state.items():
        w = tensor.double() if tensor.is_floating_point() else tensor
        produced = False
        merged = True
        for axis, (space, ref) in graph.axes_of(name).items():
            if space.name not in merges:
                merged = False
                continue
            producer = ref in space.producers
            w = transform_axis(w, axis, merges[space.name], model, producer)
            produced |= producer
        out[name] = (w, produced, merged)
    return out


def apply_merges(
    models: Sequence[MultiTaskNet], merges: Mapping[str, SpaceMerge], target: MultiTaskNet
) -> dict[str, torch.Tensor]:
    """State dict for `target` (the merged architecture) from all models and the per-space merges.

    Tensors touching a space that is not merged (the unused trunk part of a partial zip) are copied from
    the first model that has them.
    """
    transformed = [transform_state(m.state_dict(), m.space_graph(), merges, i) for i, m in enumerate(models)]
    expected = target.state_dict()
    state = {}
    for key, ref in expected.items():
        owners = [t[key] for t in transformed if key in t]
        if not owners:
            raise ValueError(f"no source model has tensor {key!r}")
        tensor, produced, merged = owners[0]
        if not merged or not tensor.is_floating_point():
            value = tensor
        elif produced:
            value = torch.stack([o[0] for o in owners]).sum(0)
        else:
            value = torch.stack([o[0] for o in owners]).mean(0)
        if value.shape != ref.shape:
            raise ValueError(f"merged tensor {key!r} has shape {tuple(value.shape)}, target needs {tuple(ref.shape)}")
        state[key] = value.to(ref.dtype)
    return state
