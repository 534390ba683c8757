"""Shared machinery of methods that merge feature space by feature space (permute, weight matching, ZipIt!)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

from hetmerge.matching.solvers import Solver
from hetmerge.matching.transforms import SpaceMerge, apply_merges
from hetmerge.merged import MergedModel
from hetmerge.methods.average import union_heads_model
from hetmerge.methods.base import MergeError, require_same_architecture, require_same_structure
from hetmerge.models import MultiTaskNet
from hetmerge.progress import track
from hetmerge.spaces import FeatureSpace
from hetmerge.statistics import SpaceStats


def target_architecture(method: str, models: Sequence[MultiTaskNet], solver: str) -> int:
    """Index of the model whose architecture the merge takes: alignment needs one architecture, a zip
    merges different widths into the widest."""
    if solver == "align":
        require_same_architecture(method, models)
        return 0
    return require_same_structure(method, models)


def reject_groups(method: str, models: Sequence[MultiTaskNet], instead: str) -> None:
    """For methods without group matching: grouped spaces (heads, GroupNorm) would be torn apart."""
    grouped = [s.name for s in models[0].space_graph().spaces if s.groups > 1]
    if grouped:
        raise MergeError(f"method {method!r} cannot keep the groups of spaces {grouped} whole; use {instead}")


def match_activations(
    models: Sequence[MultiTaskNet],
    stats: Mapping[str, SpaceStats],
    solver: Solver,
    cut: int | None = None,
    fixed: Mapping[str, SpaceMerge] | None = None,
) -> dict[str, SpaceMerge]:
    """Merges of the spaces before `cut` from activation correlations, linked spaces solved together.

    Spaces in `fixed` (e.g. those only one model has, inside identity padding) keep the merge given there.
    """
    wanted = {s.name for s in spaces_before(models[0], cut)}
    merges = dict(fixed or {})
    for members in track(models[0].space_graph().matching_sets(), desc="activation matching", unit="space set"):
        if members[0].name not in wanted or members[0].name in merges:
            continue
        sims = [stats[s.name].correlation() for s in members]
        found = solver(sims, members, [stats[s.name].widths for s in members])
        merges.update({s.name: m for s, m in zip(members, found, strict=True)})
    return merges


def unit_index(model: MultiTaskNet, param: str) -> int | None:
    """Position in the body of the unit a tensor belongs to (None for heads)."""
    parts = param.split(".")
    if parts[0] != "body":
        return None
    return list(model.body._modules).index(parts[1])


def resolve_cut(model: MultiTaskNet, stop_after: str | None) -> int | None:
    """`stop_after` names the last body unit of the merged trunk; None merges the whole network."""
    if stop_after is None:
        return None
    units = list(model.body._modules)
    cuts = model.space_graph().cuts
    valid = [u for k, u in enumerate(units, start=1) if cuts[k] is not None and k < len(units)]
    if stop_after not in valid:
        raise MergeError(f"cannot stop merging after unit {stop_after!r}; valid units: {valid}")
    space = model.space_graph()[cuts[units.index(stop_after) + 1]]
    if space.unit_dim != 1:
        raise MergeError(f"partial merging hands over channel-first features only; {space.name!r} has token features")
    return units.index(stop_after) + 1


def spaces_before(model: MultiTaskNet, cut: int | None) -> list[FeatureSpace]:
    """Spaces produced (at least partly) by units before the cut; all spaces when cut is None."""
    spaces = list(model.space_graph().spaces)
    if cut is None:
        return spaces
    return [s for s in spaces if any((unit_index(model, r.param) or 0) < cut for r in s.producers)]


def assemble(
    models: Sequence[MultiTaskNet], merges: Mapping[str, SpaceMerge], cut: int | None, like: int = 0
) -> MergedModel:
    """Merged trunk (model `like`'s architecture) from the space merges; after a cut, each model continues."""
    target = union_heads_model(models, like)
    target.load_state_dict(apply_merges(models, merges, target))
    if cut is None:
        return MergedModel(target)
    handover = models[0].space_graph().cuts[cut]
    unmerge = [u.float() for u in merges[handover].unmerge]
    # copies: the branches' BatchNorm statistics are reset with the trunk, the caller's models stay as they are
    return MergedModel(target, [copy.deepcopy(m) for m in models], cut, unmerge)
