"""MuDSC's dual-space matching: unit similarity λ·activation + (1 − λ)·weight, refined by sweeps.

λ is the share of the activation similarity (MuDSC's `fix_rate` is the weight share, 1 − λ). With λ > 0 the
matching starts from the activation similarity alone, as MuDSC does; with λ = 0 activations are never
used and every space starts unmatched. Then, while λ < 1, sweeps visit the sets of spaces in a seeded
random order and re-solve each from the blend, with the weight similarity recomputed under the current
matching of the neighbouring spaces. A sweep that does not raise the merge value (`solvers`, as the
reference code defines it) averaged over all spaces is undone (the first always counts); the loop stops
when a sweep changes nothing, after `patience` sweeps without progress, or after `max_sweeps`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hetmerge.matching.solvers import Matching, Solver
from hetmerge.matching.transforms import SpaceMerge
from hetmerge.matching.weight_similarity import weight_correlation
from hetmerge.models import MultiTaskNet
from hetmerge.progress import Progress


@dataclass(frozen=True)
class DualSpaceResult:
    merges: dict[str, SpaceMerge]
    sweeps: int  # weight-space sweeps run (0 when λ = 1)
    value: float  # mean merge value of the result over all matched spaces


def _same(a: SpaceMerge, b: SpaceMerge) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.unmerge, b.unmerge, strict=True))


def dual_space_matching(
    models: Sequence[MultiTaskNet],
    activation: Mapping[str, torch.Tensor] | None,
    lam: float,
    solver: Solver,
    max_sweeps: int = 100,
    patience: int = 5,
    seed: int = 0,
    fixed: Mapping[str, SpaceMerge] | None = None,
) -> DualSpaceResult:
    """Merges of every feature space of `models` from activation correlations (per space) and weights.

    Spaces in `fixed` keep the given merge (e.g. spaces only one model has, inside identity padding).
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"λ must lie in [0, 1], got {lam}")
    graphs = [m.space_graph() for m in models]
    states = [m.state_dict() for m in models]
    fixed = dict(fixed or {})
    sets = [m for m in graphs[0].matching_sets() if m[0].name not in fixed]
    widths = {s.name: tuple(g[s.name].width for g in graphs) for s in graphs[0].spaces}
    if lam > 0 and (activation is None or any(s.name not in activation for m in sets for s in m)):
        raise ValueError("dual-space matching with λ > 0 needs the activation correlation of every space")

    def solve(members: tuple, merges: Mapping[str, SpaceMerge]) -> list[Matching]:
        sims = []
        for space in members:
            if lam == 1:
                sims.append(activation[space.name])
                continue
            weight = weight_correlation(states, graphs, space.name, merges)
            sims.append(weight if lam == 0 else lam * activation[space.name] + (1 - lam) * weight)
        return solver.scored(sims, members, [widths[s.name] for s in members])

    merges: dict[str, SpaceMerge] = dict(fixed)
    values: dict[str, float] = {}  # per space, as the reference keeps one value per space
    if lam > 0:
        for members in sets:
            found = solver.scored([activation[s.name] for s in members], members, [widths[s.name] for s in members])
            merges.update({s.name: m.merge for s, m in zip(members, found, strict=True)})
            values.update({s.name: m.value for s, m in zip(members, found, strict=True)})
    if lam == 1:
        return DualSpaceResult(merges, 0, float(np.mean(list(values.values()))))
    rng = np.random.default_rng(seed)
    best, best_value = dict(merges), -np.inf  # the activation start was scored without weights: not comparable
    stale = sweeps = 0
    with Progress(f"dual-space matching (λ {lam:g})", unit="sweep") as progress:
        for sweeps in range(1, max_sweeps + 1):  # noqa: B007 (the count is returned)
            changed = False
            for k in rng.permutation(len(sets)):
                for space, new in zip(sets[k], solve(sets[k], merges), strict=True):
                    changed |= space.name not in merges or not _same(merges[space.name], new.merge)
                    merges[space.name] = new.merge
                    values[space.name] = new.value
            value = float(np.mean(list(values.values())))
            if value > best_value + 1e-12:
                best, best_value, stale = dict(merges), value, 0
            else:
                merges, stale = dict(best), stale + 1
            progress.update()
            if not changed or stale >= patience:
                break
    return DualSpaceResult(best, sweeps, best_value)
