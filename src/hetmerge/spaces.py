"""Feature spaces: the one description of an architecture that every merge method works from.

A feature space is a set of units (channels, neurons) that several weight axes index in the same order:
the axes that *produce* it (a conv's output channels, its bias, the BatchNorm vectors after it, every
residual branch writing into the same stream) and the axes that *consume* it (the next layers' input
channels, the task heads). Permuting or merging a space means transforming all of those axes together,
which is what keeps a permuted network computing the same function.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

Role = Literal["weight", "stat"]


@dataclass(frozen=True)
class AxisRef:
    """One axis of one state-dict tensor that is indexed by the units of a space.

    `role="stat"` marks running statistics (BatchNorm mean/var): they are transformed with the space but
    carry no information about what a unit computes, so weight-based similarity ignores them.
    """

    param: str
    axis: int
    role: Role = "weight"


@dataclass(frozen=True)
class FeatureSpace:
    """A feature space of one model: its width, who writes it, who reads it, where to observe it.

    `observe` names the module whose forward output carries this space's activations, with units on
    dimension `unit_dim` (1 for the channels of an NCHW map or an NC matrix, -1 for (B, tokens, D)). `act`
    names the nonlinearity that produced them, whose input is the space's pre-activation (None: the observed
    tensor went through none, e.g. a residual stream or an attention head, so pre- and post-activation agree);
    see `hetmerge.observe` for the observation points.
    `groups` > 1 says units come in contiguous groups (attention heads, GroupNorm groups) that a merge
    must keep whole. Grouped spaces with the same `link` must pair their groups identically: an attention
    head's query/key space and its value/output space belong to one head and travel together.
    """

    name: str
    width: int
    producers: tuple[AxisRef, ...]
    consumers: tuple[AxisRef, ...]
    observe: str
    groups: int = 1
    unit_dim: int = 1
    link: str | None = None
    act: str | None = None

    def axes(self) -> tuple[AxisRef, ...]:
        return self.producers + self.consumers


@dataclass(frozen=True)
class SpaceGraph:
    """All feature spaces of a model, plus which space flows through each cut of its body.

    `cuts[k]` is the space of the tensor between body unit k-1 and unit k (None where that tensor is not a
    mergeable space, e.g. raw input pixels). Cuts are where a partially merged model may hand over to
    per-model tails.
    """

    spaces: tuple[FeatureSpace, ...]
    cuts: tuple[str | None, ...] = field(default=())

    def __post_init__(self) -> None:
        names = [s.name for s in self.spaces]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate feature-space names: {sorted(n for n in names if names.count(n) > 1)}")
        owner: dict[tuple[str, int], str] = {}
        for space in self.spaces:
            for ref in space.axes():
                key = (ref.param, ref.axis)
                if key in owner:
                    raise ValueError(
                        f"axis {ref.axis} of {ref.param!r} is claimed by spaces {owner[key]!r} and {space.name!r}"
                    )
                owner[key] = space.name

    def __getitem__(self, name: str) -> FeatureSpace:
        for space in self.spaces:
            if space.name == name:
                return space
        raise KeyError(f"no feature space {name!r}; known: {[s.name for s in self.spaces]}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.spaces)

    def matching_sets(self) -> tuple[tuple[FeatureSpace, ...], ...]:
        """Spaces that must be matched together: each linked family once (at its first member), others alone."""
        sets: dict[str, list[FeatureSpace]] = {}
        for space in self.spaces:
            sets.setdefault(space.link or f"\0{space.name}", []).append(space)
        return tuple(tuple(members) for members in sets.values())

    def axes_of(self, param: str) -> dict[int, tuple[FeatureSpace, AxisRef]]:
        """Map each axis of `param` that belongs to a space to that space."""
        found: dict[int, tuple[FeatureSpace, AxisRef]] = {}
        for space in self.spaces:
            for ref in space.axes():
                if ref.param == param:
                    found[ref.axis] = (space, ref)
        return found

    def check_against(self, state: Mapping[str, torch.Tensor]) -> None:
        """Fail loudly if the description and the actual tensors disagree (the git-re-basin#3 failure mode)."""
        for space in self.spaces:
            for ref in space.axes():
                if ref.param not in state:
                    raise ValueError(f"space {space.name!r} refers to missing tensor {ref.param!r}")
                size = state[ref.param].shape[ref.axis]
                if size != space.width:
                    raise ValueError(
                        f"space {space.name!r} has width {space.width} but axis {ref.axis} of "
                        f"{ref.param!r} has size {size}"
                    )
            if space.width % space.groups:
                raise ValueError(f"space {space.name!r}: width {space.width} not divisible by {space.groups} groups")
        for members in self.matching_sets():
            if len({m.groups for m in members}) > 1:
                raise ValueError(f"linked spaces {[m.name for m in members]} have different group counts")


def unit_axes(param: str, axes: Iterable[int], role: Role = "weight") -> tuple[AxisRef, ...]:
    return tuple(AxisRef(param, a, role) for a in axes)


def linear_producer(prefix: str, bias: bool = True) -> tuple[AxisRef, ...]:
    """Output axes of a Linear/Conv module called `prefix`."""
    refs = [AxisRef(f"{prefix}.weight", 0)]
    if bias:
        refs.append(AxisRef(f"{prefix}.bias", 0))
    return tuple(refs)


def norm_producer(prefix: str, running_stats: bool = True) -> tuple[AxisRef, ...]:
    """Per-unit vectors of a normalisation layer called `prefix`."""
    refs = [AxisRef(f"{prefix}.weight", 0), AxisRef(f"{prefix}.bias", 0)]
    if running_stats:
        refs += [AxisRef(f"{prefix}.running_mean", 0, "stat"), AxisRef(f"{prefix}.running_var", 0, "stat")]
    return tuple(refs)


def consumer(prefix: str) -> AxisRef:
    """Input axis of a Linear/Conv module called `prefix`."""
    return AxisRef(f"{prefix}.weight", 1)


def permute_state(
    state: Mapping[str, torch.Tensor], graph: SpaceGraph, perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Reorder every axis of every space by `perms[space]` (new unit j = old unit perm[j])."""
    out = dict(state)
    for space in graph.spaces:
        if space.name not in perms:
            continue
        perm = perms[space.name]
        for ref in space.axes():
            out[ref.param] = out[ref.param].index_select(ref.axis, perm)
    return out


def model_slices(widths: Sequence[int]) -> list[slice]:
    """Rows of each model when N models' units of one space are concatenated (widths d_1..d_N)."""
    bounds = list(itertools.accumulate(widths, initial=0))
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def random_permutations(graph: SpaceGraph, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A random function-preserving permutation of every space, for checking a description.

    Groups move as wholes and are shuffled inside; linked spaces share one order of their groups (a head's
    query/key and value/output units stay in the same head).
    """
    group_orders: dict[str, torch.Tensor] = {}
    perms = {}
    for space in graph.spaces:
        size = space.width // space.groups
        key = space.link or space.name
        if key not in group_orders:
            group_orders[key] = torch.randperm(space.groups, generator=generator)
        within = torch.stack([torch.randperm(size, generator=generator) for _ in range(space.groups)])
        perms[space.name] = (group_orders[key][:, None] * size + within).reshape(-1)
    return perms
