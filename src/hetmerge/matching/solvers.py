"""Turning a similarity matrix into a merge of one feature space: alignment (LAP) or zip, with group matching.

Every solver takes, for a set of spaces that must be matched together (see `SpaceGraph.matching_sets`),
one (Σd_i × Σd_i) similarity of the N models' concatenated units per space, and returns one `SpaceMerge`
per space. Grouped spaces (attention heads, GroupNorm groups) are matched in two levels, as in MuDSC
(algorithms.md §3.5): a LAP inside every pair of groups gives a group-to-group score, a LAP over those
scores pairs whole groups (summed over linked spaces, so a head's query/key and value/output units go to
the same merged head), and units are then aligned or zipped inside each paired group only. Merged groups
stay contiguous and in model 0's group order, so group boundaries survive the merge.

Each merge comes with MuDSC's merge value, the score a weight-space sweep must raise to be kept, defined as
in the reference code: for a zip (group zip too), the mean similarity of the merged pairs at the moment each
was merged (α-discounted once a member had merged); for an alignment (group alignment too), the mean
similarity of each model's units to the model-0 units they join, averaged over models 1…N−1.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from hetmerge.matching.assignment import align_to_first, best_permutation
from hetmerge.matching.greedy_zip import greedy_zip
from hetmerge.matching.transforms import SpaceMerge
from hetmerge.spaces import FeatureSpace, model_slices


@dataclass(frozen=True)
class Matching:
    """One space's merge and its merge value."""

    merge: SpaceMerge
    value: float


class Solver(abc.ABC):
    """Similarities of a set of spaces that are matched together → one merge per space.

    Matching runs on the CPU whatever device the similarities come from: the assignment is scipy's, and the
    greedy zip is a long chain of tiny sequential steps that a GPU would only slow down. The merges' matrices
    move to each weight's device where they are applied (`transforms`).
    """

    def scored(
        self, sims: Sequence[torch.Tensor], spaces: Sequence[FeatureSpace], widths: Sequence[Sequence[int]]
    ) -> list[Matching]:
        """The merges with their merge values (which the solver knows best, e.g. a zip's per-step values)."""
        return self.match([s.detach().cpu() for s in sims], spaces, widths)

    @abc.abstractmethod
    def match(
        self, sims: Sequence[torch.Tensor], spaces: Sequence[FeatureSpace], widths: Sequence[Sequence[int]]
    ) -> list[Matching]:
        """`scored` on CPU similarities."""

    def __call__(
        self, sims: Sequence[torch.Tensor], spaces: Sequence[FeatureSpace], widths: Sequence[Sequence[int]]
    ) -> list[SpaceMerge]:
        return [m.merge for m in self.scored(sims, spaces, widths)]


def alignment_value(similarity: torch.Tensor, merge: SpaceMerge) -> float:
    """Mean similarity between each merged unit's model-0 member and its model-i member, averaged over i ≥ 1.

    Pairs of two models other than model 0 do not count (MuDSC's `permute_weight`); 0 for a single model.
    """
    rows = model_slices([u.shape[0] for u in merge.unmerge])
    first = merge.unmerge[0].to(similarity)
    per_model = [
        ((first.T @ similarity[rows[0], rows[i]]) * merge.unmerge[i].to(similarity).T).sum(1).mean()
        for i in range(1, len(rows))
    ]
    return float(torch.stack(per_model).mean()) if per_model else 0.0


def _zip_value(values: torch.Tensor) -> float:
    """Mean similarity of a zip's merges when they were made; 0 when nothing was merged."""
    return float(values.mean()) if len(values) else 0.0


def _check_groups(spaces: Sequence[FeatureSpace], widths: Sequence[Sequence[int]]) -> int:
    groups = spaces[0].groups
    for space, w in zip(spaces, widths, strict=True):
        if len(set(w)) != 1:
            raise ValueError(f"group matching of space {space.name!r} needs equal widths, got {list(w)}")
        if w[0] % groups:
            raise ValueError(f"space {space.name!r}: width {w[0]} not divisible by {groups} groups")
    return groups


@dataclass(frozen=True)
class GroupPairing:
    """`partner[i][j]`: model i's group paired with model 0's group j; `within[s][i][j]`: the LAP inside it."""

    partner: list[torch.Tensor]
    within: list[list[torch.Tensor]]  # per space, per model: (g, size) unit permutations inside paired groups


def pair_groups(sims: Sequence[torch.Tensor], widths: Sequence[Sequence[int]], groups: int) -> GroupPairing:
    """Two-level LAP of MuDSC's group matching, every model against model 0.

    The loop runs over pairs of groups (g² small LAPs per model and space), never over units.
    """
    n = len(widths[0])
    partner = [torch.arange(groups)]
    within: list[list[torch.Tensor]] = [[torch.arange(w[0] // groups).repeat(groups, 1)] for w in widths]
    for i in range(1, n):
        score = torch.zeros(groups, groups, dtype=torch.float64)
        inner = []
        for sim, w in zip(sims, widths, strict=True):
            size = w[0] // groups
            rows = model_slices(w)
            cross = sim[rows[0], rows[i]].reshape(groups, size, groups, size).transpose(1, 2)
            perms = torch.empty(groups, groups, size, dtype=torch.long)
            for j in range(groups):
                for k in range(groups):
                    perm = best_permutation(cross[j, k])
                    perms[j, k] = perm
                    score[j, k] += cross[j, k][torch.arange(size), perm].mean()
            inner.append(perms)
        pick = best_permutation(score)
        partner.append(pick)
        for s, perms in enumerate(inner):
            within[s].append(perms[torch.arange(groups), pick])
    return GroupPairing(partner, within)


class Align(Solver):
    """Every model permuted onto model 0 by linear assignment, then averaged (group-wise for grouped spaces)."""

    def match(
        self, sims: Sequence[torch.Tensor], spaces: Sequence[FeatureSpace], widths: Sequence[Sequence[int]]
    ) -> list[Matching]:
        if spaces[0].groups == 1:
            merges = [SpaceMerge.from_permutations(align_to_first(s, w)) for s, w in zip(sims, widths, strict=True)]
        else:
            groups = _check_groups(spaces, widths)
            pairing = pair_groups(sims, widths, groups)
            merges = []
            for s, w in enumerate(widths):
                size = w[0] // groups
                perms = [(pairing.partner[i][:, None] * size + pairing.within[s][i]).reshape(-1) for i in range(len(w))]
                merges.append(SpaceMerge.from_permutations(perms))
        return [Matching(m, alignment_value(s, m)) for s, m in zip(sims, merges, strict=True)]


align = Align()


@dataclass(frozen=True)
class Zip(Solver):
    """ZipIt!'s greedy zip (α, β as in §2.5), restricted to paired groups for grouped spaces."""

    alpha: float
    beta: float

    def match(
        self, sims: Sequence[torch.Tensor], spaces: Sequence[FeatureSpace], widths: Sequence[Sequence[int]]
    ) -> list[Matching]:
        if spaces[0].groups == 1:
            zips = [greedy_zip(s, w, self.alpha, self.beta) for s, w in zip(sims, widths, strict=True)]
            return [
                Matching(SpaceMerge.from_assignment(z.assignment, w), _zip_value(z.values))
                for z, w in zip(zips, widths, strict=True)
            ]
        groups = _check_groups(spaces, widths)
        pairing = pair_groups(sims, widths, groups)
        found = []
        for sim, w in zip(sims, widths, strict=True):
            n, d = len(w), w[0]
            size = d // groups
            assignment = torch.zeros(n * d, d, dtype=torch.float64)
            values = []
            for j in range(groups):
                # rows of the paired groups' units in the concatenated similarity, model by model
                rows = torch.cat([i * d + pairing.partner[i][j] * size + torch.arange(size) for i in range(n)])
                sub = sim[rows][:, rows]
                zipped = greedy_zip(sub, [size] * n, self.alpha, self.beta)
                assignment[rows[:, None], torch.arange(j * size, (j + 1) * size)] = zipped.assignment
                values.append(zipped.values)
            # the reference averages the merges of all groups alike
            found.append(Matching(SpaceMerge.from_assignment(assignment, w), _zip_value(torch.cat(values))))
        return found


def make_solver(kind: Literal["align", "zip"], alpha: float, beta: float) -> Solver:
    """The solver a method's `solver` parameter names (α, β only matter for zips)."""
    return align if kind == "align" else Zip(alpha, beta)
