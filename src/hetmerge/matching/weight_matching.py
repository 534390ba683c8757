"""Git Re-Basin weight matching: align model B to model A from the weights alone.

Each space's permutation is re-solved by linear assignment on Σ over its axes of W_A · (W_B with every
*other* axis already permuted)ᵀ; spaces are swept in a random order until a sweep changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from hetmerge.matching.assignment import best_permutation
from hetmerge.progress import Progress
from hetmerge.spaces import SpaceGraph


def _unit_rows(w: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.movedim(w, axis, 0).reshape(w.shape[axis], -1)


def _permuted_except(
    w: torch.Tensor, name: str, skip_axis: int, graph: SpaceGraph, perms: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    for axis, (space, _) in graph.axes_of(name).items():
        if axis != skip_axis:
            w = w.index_select(axis, perms[space.name].to(w.device))
    return w


def weight_matching(
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    graph: SpaceGraph,
    max_iter: int = 100,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], int]:
    """Permutations of B's spaces onto A's (perm[k] = B unit for A unit k) and the number of sweeps run.

    Scores are accumulated on the weights' device; permutations are CPU index tensors.

    Tensors present in only one model (another task's head) and running statistics do not vote.
    """
    perms = {s.name: torch.arange(s.width) for s in graph.spaces}
    rng = np.random.default_rng(seed)
    voters = {
        s.name: [r for r in s.axes() if r.role == "weight" and r.param in state_a and r.param in state_b]
        for s in graph.spaces
    }
    device = next(iter(state_a.values())).device
    a64 = {k: v.double() for k, v in state_a.items() if v.is_floating_point()}
    b64 = {k: v.double() for k, v in state_b.items() if v.is_floating_point()}
    sweeps = 0
    with Progress("weight matching", unit="sweep") as progress:
        for sweeps in range(1, max_iter + 1):  # noqa: B007 (the count is returned)
            improved = False
            for index in rng.permutation(len(graph.spaces)):
                space = graph.spaces[index]
                score = torch.zeros(space.width, space.width, dtype=torch.float64, device=device)
                for ref in voters[space.name]:
                    rows_a = _unit_rows(a64[ref.param], ref.axis)
                    rows_b = _unit_rows(_permuted_except(b64[ref.param], ref.param, ref.axis, graph, perms), ref.axis)
                    score += rows_a @ rows_b.T
                old = perms[space.name]
                score = score.cpu()  # the assignment is solved on the CPU, where the permutations live
                new = best_permutation(score)
                eye = torch.arange(space.width)
                if score[eye, new].sum() > score[eye, old].sum() + 1e-12:
                    improved = True
                perms[space.name] = new
            progress.update()
            if not improved:
                break
    return perms, sweeps
