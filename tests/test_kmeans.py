"""Importance-weighted k-means (`hetmerge.matching.kmeans`): hand-computed cases, repair, restarts, properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetmerge.matching import kmeans
from hetmerge.matching.kmeans import weighted_kmeans


def _col(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)[:, None]


def test_one_dimensional_weighted_centroids():
    points, weights = _col(0, 1, 10, 12), torch.tensor([1.0, 3.0, 1.0, 1.0], dtype=torch.float64)
    for init in (None, _col(0, 12)):
        result = weighted_kmeans(points, weights, 2, init=init, generator=torch.Generator().manual_seed(0))
        a = result.assign.tolist()
        assert a[0] == a[1] != a[2] == a[3]
        centroids = sorted(result.centroids.squeeze(1).tolist())
        assert centroids == pytest.approx([0.75, 11.0])  # (0·1 + 1·3) / 4 and (10 + 12) / 2
        assert result.cost == pytest.approx(1 * 0.75**2 + 3 * 0.25**2 + 1 + 1)


def test_empty_cluster_takes_the_farthest_weighted_point():
    # From centroids 0, 100, 1: point 10 is nearest to 1 and cluster 1 is empty; of cluster 2's members
    # {1, 2, 10}, 10 has the largest weight·distance² (81), so it moves to cluster 1.
    result = weighted_kmeans(_col(0, 1, 2, 10), torch.ones(4, dtype=torch.float64), 3, init=_col(0, 100, 1))
    assert result.assign.tolist() == [0, 2, 2, 1]
    assert result.centroids.squeeze(1).tolist() == pytest.approx([0.0, 10.0, 1.5])


def test_repair_never_empties_another_cluster():
    # Clusters 1 and 2 start empty. The two largest weight·distance² (20: 2·25, 10: 1.5·25) are the only members of
    # cluster 0: taking both would empty it, so the second empty cluster takes point 1 (1·1) instead.
    points, weights = _col(0, 1, 10, 20), torch.tensor([1.0, 1.0, 1.5, 2.0], dtype=torch.float64)
    result = weighted_kmeans(points, weights, 4, init=_col(15, 1000, 2000, 0))
    assert result.assign.tolist() == [3, 2, 0, 1]
    assert result.cost == 0.0


def _blobs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, 3, generator=gen, dtype=torch.float64) * 4
    points = centres.repeat_interleave(10, 0) + torch.randn(60, 3, generator=gen, dtype=torch.float64)
    return points, torch.rand(60, generator=gen, dtype=torch.float64) + 0.1


def test_restarts_keep_the_lowest_cost():
    gen = torch.Generator().manual_seed(1)
    points, weights = torch.rand(60, 2, generator=gen, dtype=torch.float64), torch.ones(60, dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    singles = [weighted_kmeans(points, weights, 7, generator=gen).cost for _ in range(8)]
    assert len({round(c, 9) for c in singles}) > 1  # the seeds matter, so the choice is a real one
    best = weighted_kmeans(points, weights, 7, generator=torch.Generator().manual_seed(5), restarts=8)
    assert best.cost == pytest.approx(min(singles))


def test_seeded_runs_are_identical_and_seeds_differ():
    points, weights = _blobs(2)
    runs = [weighted_kmeans(points, weights, 9, generator=torch.Generator().manual_seed(s)) for s in (3, 3)]
    assert torch.equal(runs[0].assign, runs[1].assign) and torch.equal(runs[0].centroids, runs[1].centroids)
    others = [weighted_kmeans(points, weights, 9, generator=torch.Generator().manual_seed(s)).assign for s in range(6)]
    assert any(not torch.equal(o, others[0]) for o in others)


def test_the_gram_matrix_built_in_slices_gives_the_same_clustering(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    points, weights = torch.randn(40, 30, generator=gen), torch.rand(40, generator=gen) + 0.1
    whole = weighted_kmeans(points, weights, 6, generator=torch.Generator().manual_seed(0), restarts=2)
    monkeypatch.setattr(kmeans, "CHUNK", 45)  # one column per slice
    sliced = weighted_kmeans(points, weights, 6, generator=torch.Generator().manual_seed(0), restarts=2)
    assert torch.equal(whole.assign, sliced.assign) and sliced.cost == pytest.approx(whole.cost)
    assert sliced.centroids.dtype == torch.float32  # the points' own precision


def test_bad_inputs():
    points = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="cannot make 4 clusters of 3 points"):
        weighted_kmeans(points, torch.ones(3), 4)
    with pytest.raises(ValueError, match="positive"):
        weighted_kmeans(points, torch.tensor([1.0, 0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="restarts=1"):
        weighted_kmeans(points, torch.ones(3), 2, init=torch.zeros(2, 2), restarts=3)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 24),
    d=st.integers(1, 4),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_lloyd_properties(n, d, data, seed):
    k = data.draw(st.integers(1, n))
    gen = torch.Generator().manual_seed(seed)
    # a coarse grid makes duplicate points and exact ties likely
    points = torch.randint(-3, 4, (n, d), generator=gen).double() * data.draw(st.sampled_from([0.5, 1.0, 7.0]))
    weights = torch.rand(n, generator=gen, dtype=torch.float64) + 0.01
    result = weighted_kmeans(points, weights, k, generator=gen, max_iter=500, patience=500)
    history = torch.tensor(result.history)
    assert (history[1:] <= history[:-1] + 1e-9 * (1 + history[:-1])).all()  # Lloyd never raises the cost
    assert torch.bincount(result.assign, minlength=k).min() >= 1
    members = torch.nn.functional.one_hot(result.assign, k).double() * weights[:, None]
    assert torch.allclose(result.centroids, (members.T @ points) / members.sum(0)[:, None])
    dist = torch.cdist(points, result.centroids) ** 2
    own = dist.gather(1, result.assign[:, None]).squeeze(1)
    assert torch.allclose(own, dist.min(1).values, atol=1e-9)  # nearest centroid, up to ties
    assert result.cost == pytest.approx(float((weights * own).sum()), abs=1e-9)
