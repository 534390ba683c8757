"""Importance-weighted k-means of neurons (KF and KF-Gradient of the Neuron Interpolation paper, algorithms.md §5.5).

The objective is Σᵢ sᵢ‖pᵢ − c_{a(i)}‖² with centroids c = Σ s·p / Σ s over each cluster's members: the objective
Lloyd's two steps minimise, so the cost history never increases (the paper's code tracks Σ s·‖·‖, unsquared, which
the weighted mean does not minimise; assignments and farthest points are the same under either). Every step runs on
the Gram matrix K = PPᵀ of the (centred) points, in float64 against the cancellation in ‖p‖² − 2p·c + ‖c‖²: neurons
live in spaces of thousands of dimensions (samples × positions, or a layer's fan-in), so one n×n product up front makes
each Lloyd iteration O(n²) instead of O(n·k·d). Centroids stay weighted sums of points (a sparse membership matrix M,
C = MP), and only the returned centroids are formed in point space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KMeansResult:
    """assign[i]: point i's cluster (every cluster non-empty); centroids: (k, d) weighted means of the members;
    cost: Σ s‖p − c‖² of this clustering; history: that cost after each Lloyd update of the kept run."""

    assign: torch.Tensor
    centroids: torch.Tensor
    cost: float
    history: tuple[float, ...] = ()


CHUNK = 2**24  # float64 elements of points handled at once while forming the Gram matrix


def _gram(points: torch.Tensor, weights: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """K = (P − μ)(P − μ)ᵀ in float64, μ the points' weighted mean (centring tames the cancellation), with the
    `extra` rows (initial centroids) appended after the n points. Built over column slices, so the float64 copy
    never holds more than CHUNK elements: neurons' activations can have hundreds of thousands of dimensions."""
    rows = points if extra is None else torch.cat([points, extra])
    gram = torch.zeros(len(rows), len(rows), dtype=torch.float64, device=points.device)
    step = max(1, CHUNK // len(rows))
    for start in range(0, points.shape[1], step):
        part = rows[:, start : start + step].to(torch.float64)
        part = part - (weights @ part[: len(points)]) / weights.sum()
        gram += part @ part.T
    return gram


def _shares(assign: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """sᵢ / Σ_{cluster of i} s: point i's coefficient in its cluster's weighted mean."""
    totals = torch.zeros(k, dtype=weights.dtype, device=weights.device).index_add_(0, assign, weights)
    return weights / totals[assign]


def _membership(assign: torch.Tensor, shares: torch.Tensor, k: int) -> torch.Tensor:
    """Sparse (k, n) M with M[a(i), i] = shares[i], so that MP is the clusters' weighted means."""
    index = torch.stack([assign, torch.arange(len(assign), device=assign.device)])
    return torch.sparse_coo_tensor(index, shares, (k, len(assign)), check_invariants=False).coalesce()


def _distances(gram: torch.Tensor, assign: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """(n, k) squared distances of every point to every cluster's weighted mean, from the Gram matrix alone."""
    shares = _shares(assign, weights, k)
    cross = torch.sparse.mm(_membership(assign, shares, k), gram)  # (k, n): c_j · p_i
    own = cross[assign, torch.arange(len(assign), device=assign.device)]
    norms = torch.zeros(k, dtype=gram.dtype, device=gram.device).index_add_(0, assign, shares * own)
    return (gram.diagonal()[:, None] - 2 * cross.T + norms[None, :]).clamp_min_(0)


def _repair(nearest: torch.Tensor, score: torch.Tensor, k: int) -> torch.Tensor:
    """Give each empty cluster (in index order) the point of largest weight·distance that is not the last member of
    its cluster, in decreasing order of that score: the paper's repair, without ever emptying another cluster."""
    sizes = torch.bincount(nearest, minlength=k)
    empty = (sizes == 0).nonzero().squeeze(1)
    if not len(empty):
        return nearest
    order = torch.argsort(score, descending=True, stable=True)
    cluster = nearest[order]
    grouped = torch.argsort(cluster, stable=True)  # by cluster, best score first inside each
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty_like(cluster)
    rank[grouped] = torch.arange(len(cluster), device=cluster.device) - starts[cluster[grouped]]
    takers = order[rank < sizes[cluster] - 1][: len(empty)]
    repaired = nearest.clone()
    repaired[takers] = empty
    return repaired


def _farthest_points(gram: torch.Tensor, k: int, first: int) -> torch.Tensor:
    """Greedy farthest-point seeds: from `first`, repeatedly the point farthest from its nearest seed.

    Inherently sequential over the k seeds; each step is one O(n) pass over a Gram column.
    """
    diag = gram.diagonal()
    seeds = torch.empty(k, dtype=torch.long, device=gram.device)
    seeds[0] = first
    nearest = (diag - 2 * gram[:, first] + diag[first]).clamp_min(0)
    for j in range(1, k):
        seeds[j] = torch.argmax(nearest)
        nearest = torch.minimum(nearest, (diag - 2 * gram[:, seeds[j]] + diag[seeds[j]]).clamp_min(0))
    return seeds


def _lloyd(
    gram: torch.Tensor, weights: torch.Tensor, start: torch.Tensor, k: int, max_iter: int, patience: int, tol: float
) -> tuple[torch.Tensor, list[float]]:
    """Lloyd iterations from the (n, k) squared distances to the initial centroids → final members, cost history."""
    members = _repair(start.argmin(1), weights * start.min(1).values, k)
    history: list[float] = []
    for _ in range(max_iter):
        dist = _distances(gram, members, weights, k)
        history.append(float((weights * dist.gather(1, members[:, None]).squeeze(1)).sum()))
        stalled = len(history) > patience and history[-1] >= history[-1 - patience] * (1 - tol)
        if stalled or len(history) == max_iter:
            break
        best = dist.min(1)
        moved = _repair(best.indices, weights * best.values, k)
        if torch.equal(moved, members):
            break
        members = moved
    return members, history


def weighted_kmeans(
    points: torch.Tensor,
    weights: torch.Tensor,
    k: int,
    *,
    init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    max_iter: int = 100,
    patience: int = 3,
    min_improvement: float = 0.0,
    restarts: int = 1,
) -> KMeansResult:
    """Cluster the rows of `points` (n, d) into k clusters, weighting point i by weights[i] > 0.

    `init` (k, d) gives the starting centroids; otherwise farthest-point seeding from a random point drawn with
    `generator` (on its own device), once per restart, and the lowest-cost run is kept. A run stops at a fixed point,
    after `max_iter` updates, or when its cost has not fallen by the relative `min_improvement` over the last
    `patience` updates.
    """
    n = len(points)
    if points.ndim != 2 or weights.shape != (n,):
        raise ValueError(f"need points (n, d) and weights (n,), got {tuple(points.shape)} and {tuple(weights.shape)}")
    if not 1 <= k <= n:
        raise ValueError(f"cannot make {k} clusters of {n} points")
    if not bool((weights > 0).all()):
        raise ValueError("k-means weights must be positive")
    if init is not None and (init.shape != (k, points.shape[1]) or restarts != 1):
        raise ValueError(f"init must be ({k}, {points.shape[1]}) centroids with restarts=1, got {tuple(init.shape)}")
    if restarts < 1 or max_iter < 1 or patience < 1:
        raise ValueError("restarts, max_iter and patience must be positive")
    s = weights.to(torch.float64)
    gram = _gram(points, s, None if init is None else init.to(points))
    given = None
    if init is not None:  # distances to the given centroids, then the points' own Gram block
        given = (gram.diagonal()[:n, None] - 2 * gram[:n, n:] + gram.diagonal()[None, n:]).clamp_min(0)
        gram = gram[:n, :n]
    runs = []
    for _ in range(restarts):
        start = given
        if start is None:
            device = generator.device if generator is not None else points.device
            first = int(torch.randint(n, (1,), generator=generator, device=device))
            seeds = _farthest_points(gram, k, first)
            start = (gram.diagonal()[:, None] - 2 * gram[:, seeds] + gram.diagonal()[seeds][None, :]).clamp_min(0)
        runs.append(_lloyd(gram, s, start, k, max_iter, patience, min_improvement))
    members, history = min(runs, key=lambda run: run[1][-1])  # the first of equal costs
    shares = _shares(members, s, k).to(points.dtype)
    centroids = torch.sparse.mm(_membership(members, shares, k), points)
    return KMeansResult(assign=members, centroids=centroids, cost=history[-1], history=tuple(history))
