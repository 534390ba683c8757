"""Tests for hetmerge.depth: minibatch CKA against the paper's formula, and the depth-alignment strategies
against brute force, hand-worked cases and literal transcriptions of algorithms.md §4.3/§4.5."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hetmerge.depth import (
    STRATEGIES,
    CKAAccumulator,
    align_depths,
    alignment_from_record,
    all_alignments,
    block_names,
    depth_alignment,
    get_strategy,
    head_alignment,
    head_tail_alignment,
    layer_cka,
    layer_code_score,
    layer_score,
    segment_score,
    stage_offsets,
    stage_similarity,
    to_global,
    to_local,
    uniform_alignment,
)
from hetmerge.depth.alignment import _dp
from hetmerge.models import build_model

# --- CKA ---------------------------------------------------------------------------------------------


def naive_hsic(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased HSIC₁ of one batch, written out as in the paper (no centring, explicit ones vectors)."""
    n = x.shape[0]
    k = x.reshape(n, -1) @ x.reshape(n, -1).T
    g = y.reshape(n, -1) @ y.reshape(n, -1).T
    np.fill_diagonal(k, 0)
    np.fill_diagonal(g, 0)
    one = np.ones(n)
    return float(
        (np.trace(k @ g) + (one @ k @ one) * (one @ g @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * (one @ k @ g @ one))
        / (n * (n - 3))
    )


def naive_cka(batches_x: list[list[np.ndarray]], batches_y: list[list[np.ndarray]]) -> np.ndarray:
    """Per-pair loop: every HSIC term averaged over batches, then CKA."""
    lx, ly = len(batches_x[0]), len(batches_y[0])
    out = np.zeros((lx, ly))
    for i in range(lx):
        for j in range(ly):
            xy = np.mean([naive_hsic(bx[i], by[j]) for bx, by in zip(batches_x, batches_y, strict=True)])
            xx = np.mean([naive_hsic(bx[i], bx[i]) for bx in batches_x])
            yy = np.mean([naive_hsic(by[j], by[j]) for by in batches_y])
            out[i, j] = xy / math.sqrt(xx * yy)
    return out


def random_features(seed: int, n: int = 12, shapes=((3, 2, 2), (5,), (4, 3))) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 4, generator=g, dtype=torch.float64)  # shared signal, so CKA values are far from 0
    return [
        (base @ torch.randn(4, math.prod(s), generator=g, dtype=torch.float64)).reshape(n, *s)
        + 0.5 * torch.randn(n, *s, generator=g, dtype=torch.float64)
        + 3.0  # a large mean, as after a ReLU
        for s in shapes
    ]


def cka_of(xs_batches, ys_batches) -> torch.Tensor:
    acc = CKAAccumulator()
    for xs, ys in zip(xs_batches, ys_batches, strict=True):
        acc.update(xs, ys)
    return acc.result()


def test_cka_matches_the_paper_formula_on_one_batch():
    xs, ys = random_features(0), random_features(1, shapes=((2, 3), (7,)))
    got = cka_of([xs], [ys])
    ref = naive_cka([[x.numpy() for x in xs]], [[y.numpy() for y in ys]])
    assert got.dtype == torch.float64 and got.shape == (3, 2)
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-10)


def test_vectorised_accumulator_equals_the_per_pair_loop_over_batches():
    xb = [random_features(s, n=n) for s, n in ((2, 4), (3, 9), (4, 6))]  # unequal batch sizes, n = 4 included
    yb = [random_features(s + 10, n=n, shapes=((6,), (2, 2))) for s, n in ((2, 4), (3, 9), (4, 6))]
    got = cka_of(xb, yb)
    ref = naive_cka([[x.numpy() for x in b] for b in xb], [[y.numpy() for y in b] for b in yb])
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-10)


def test_cka_of_a_representation_with_itself_is_one():
    xb = [random_features(s) for s in range(3)]
    got = cka_of(xb, xb)
    np.testing.assert_allclose(got.diagonal().numpy(), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.numpy(), got.T.numpy(), rtol=0, atol=1e-12)


def test_cka_is_invariant_to_orthogonal_maps_isotropic_scaling_and_shifts():
    g = torch.Generator().manual_seed(5)
    xb = [random_features(s) for s in range(3)]
    yb = [random_features(s + 20, shapes=((6,), (3, 3))) for s in range(3)]

    def transform(f: torch.Tensor, scale: float) -> torch.Tensor:
        flat = f.reshape(f.shape[0], -1)
        q, _ = torch.linalg.qr(torch.randn(flat.shape[1], flat.shape[1], generator=g, dtype=torch.float64))
        return (scale * flat @ q + 2.5).reshape(f.shape)

    moved = [[transform(y, scale) for y, scale in zip(b, (7.3, 1e-3), strict=True)] for b in yb]
    np.testing.assert_allclose(cka_of(xb, moved).numpy(), cka_of(xb, yb).numpy(), rtol=0, atol=1e-10)


def test_constant_layer_gives_zero_not_nan():
    xs = random_features(0)
    dead = [torch.zeros(12, 5, dtype=torch.float64), xs[0]]
    got = cka_of([xs], [dead])
    assert torch.isfinite(got).all()
    assert (got[:, 0] == 0).all()


def test_cka_input_errors():
    xs = random_features(0, n=3)
    with pytest.raises(ValueError, match="at least 4"):
        CKAAccumulator().update(xs, xs)
    with pytest.raises(ValueError, match="12 and 8 samples"):
        CKAAccumulator().update(random_features(0), random_features(0, n=8))
    with pytest.raises(ValueError, match="no batches"):
        CKAAccumulator().result()
    acc = CKAAccumulator()
    acc.update(random_features(0), random_features(1))
    with pytest.raises(ValueError, match="layers after"):
        acc.update(random_features(0)[:2], random_features(1))


def mlp(seed: int, widths: list[int]) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


def test_layer_cka_hooks_the_named_modules():
    deep, shallow = mlp(0, [6, 8, 8, 8, 5]), mlp(1, [6, 7, 5])
    deep.train()
    shallow.eval()
    batches = [torch.randn(10, 6, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    names_d, names_s = ["1", "3", "5", "7"], ["1", "3"]
    got = layer_cka(deep, shallow, batches, names_d, names_s)
    assert deep.training and not shallow.training  # modes restored
    with torch.no_grad():
        ref = cka_of(
            [[deep[: int(n) + 1](x) for n in names_d] for x in batches],
            [[shallow[: int(n) + 1](x) for n in names_s] for x in batches],
        )
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=0, atol=1e-12)
    assert all(not m._forward_hooks for m in [*deep.modules(), *shallow.modules()])
    with pytest.raises(ValueError, match="at least 4"):
        layer_cka(deep, shallow, [torch.randn(3, 6)], names_d, names_s)


def test_layer_cka_on_resnets_feeds_the_alignment():
    def resnet(depth: int, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return build_model("resnet", {"depth": depth, "width": 0.25}, (3, 8, 8), {"A": 3}).eval()

    deep, shallow = resnet(26, 0), resnet(20, 1)
    blocks = lambda per_stage: [f"body.s{s}b{b}" for s in (1, 2, 3) for b in range(per_stage)]  # noqa: E731
    batches = [torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    sim = layer_cka(deep, shallow, batches, blocks(4), blocks(3))
    assert sim.shape == (12, 9) and torch.isfinite(sim).all()
    self_sim = layer_cka(deep, deep, batches, blocks(4), blocks(4))
    np.testing.assert_allclose(self_sim.diagonal().numpy(), 1.0, atol=1e-12)
    for name in STRATEGIES:
        result = align_depths(name, [4, 4, 4], [3, 3, 3], sim)
        assert all(p[0] == 0 and list(p) == sorted(set(p)) and p[-1] < 4 for p in result.positions)


# --- alignment: references ------------------------------------------------------------------------------


def pad_stage(c: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The (m × n) sub-matrix of §4.5 as a stage block: block 0's row and column in front."""
    return torch.nn.functional.pad(torch.as_tensor(np.asarray(c), dtype=torch.float64), (1, 0, 1, 0))


def doc_dp(c: np.ndarray, skip: str) -> list[int]:
    """§4.5 transcribed literally (0-based C, 1-based F, Python's negative indexing for C[l-1, k-2]).

    The backtrack tests equality with the expression of the skip branch, as described there.
    """
    m, n = c.shape
    f = np.zeros((n + 1, m + 1))
    for k in range(1, n + 1):
        f[k, k] = f[k - 1, k - 1] + c[k - 1, k - 1]

    def skip_term(k: int, l_: int) -> float:
        return {"segment": 0.0, "layer_code": c[l_ - 1, k - 2], "layer": c[l_ - 1, k - 1]}[skip]

    for k in range(1, n + 1):
        for l_ in range(k + 1, m + 1):
            f[k, l_] = max(f[k, l_ - 1] + skip_term(k, l_), f[k - 1, l_ - 1] + c[l_ - 1, k - 1])
    a = [0] * (n + 1)
    k, l_ = n, m
    while k >= 1:
        while l_ >= k + 1 and f[k, l_] == f[k, l_ - 1] + skip_term(k, l_):
            l_ -= 1
        a[k] = l_
        k -= 1
        l_ -= 1
    return [x - 1 for x in a[1:]]


SCORES = {"segment": segment_score, "layer": layer_score, "layer_code": layer_code_score}
SKIPS = {"segment": lambda k, n: None, "layer": lambda k, n: k, "layer_code": lambda k, n: k - 1 if k > 1 else n}


def brute_force(sim: torch.Tensor, name: str) -> tuple[float, tuple[int, ...]]:
    """Best objective value over every strictly increasing alignment, and the alignment the tie rule picks
    (the smallest last position, then the smallest second-to-last, ...)."""
    n_deep, n_shallow = sim.shape
    scored = [
        (SCORES[name](sim, (0, *rows)), (0, *rows)) for rows in itertools.combinations(range(1, n_deep), n_shallow - 1)
    ]
    best = max(s for s, _ in scored)
    return best, min((p for s, p in scored if s == best), key=lambda p: p[::-1])


# --- alignment: the dynamic programs -------------------------------------------------------------------

BAND = np.array([[max(0.0, 1 - 0.2 * abs(row - 3 * col)) for col in range(3)] for row in range(7)])


def test_band_example_of_section_4_5():
    """m = 7, n = 3 band: `align` spreads out to A = [0, 3, 6]; the code's `align2` head-aligns to [0, 1, 2]."""
    sim = pad_stage(BAND)
    assert doc_dp(BAND, "segment") == [0, 3, 6] and doc_dp(BAND, "layer_code") == [0, 1, 2]
    assert align_depths("segment", [8], [4], sim).positions == ((0, 1, 4, 7),)
    assert align_depths("layer_code", [8], [4], sim).positions == ((0, 1, 2, 3),)
    # the intended LMA puts each shallow block at the start of the deep run it is most similar to
    assert align_depths("layer", [8], [4], sim).positions == ((0, 1, 3, 6),)
    assert align_depths("segment", [8], [4], sim).score == pytest.approx(3.0)


def test_hand_made_optima():
    # per-column argmax rows (1, 1) collide; the best strictly increasing choice is rows (1, 2)
    c = np.array([[0.0, 0.0], [1.0, 0.9], [0.2, 0.05]])
    assert align_depths("segment", [4], [3], pad_stage(c)).positions == ((0, 2, 3),)
    # a planted diagonal path wins over larger isolated entries that cannot be combined
    c = np.array([[0.1, 0.0, 0.0], [0.9, 0.0, 0.0], [0.0, 0.8, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.7], [0.0, 0.0, 1.5]])
    c[0, 2] = 1.6  # column 2 at row 0 would leave no room for columns 0 and 1
    assert align_depths("segment", [7], [4], pad_stage(c)).positions == ((0, 2, 3, 6),)
    # layer: deep rows after a match count for that shallow block, so a long run of one column pulls it to
    # the run's start, while segment takes the run's single best row
    c = np.array([[0.6, 0.0], [0.6, 0.0], [0.6, 0.0], [0.7, 0.0], [0.0, 1.0]])
    assert align_depths("segment", [6], [3], pad_stage(c)).positions == ((0, 4, 5),)
    assert align_depths("layer", [6], [3], pad_stage(c)).positions == ((0, 1, 5),)
    assert layer_score(pad_stage(c), (0, 1, 5)) == pytest.approx(3.5)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 7).flatmap(
        lambda m: st.tuples(st.just(m), st.integers(1, m), st.integers(0, 2**32 - 1), st.booleans())
    )
)
def test_dps_reach_the_brute_force_optimum(case):
    """Every DP attains the maximum of its objective over all strictly increasing alignments, follows the
    documented tie rule, and equals the literal transcription of §4.5. Coarse values create exact ties."""
    m, n, seed, coarse = case
    rng = np.random.default_rng(seed)
    c = rng.integers(0, 3, (m, n)) / 2 if coarse else rng.uniform(-0.2, 1, (m, n))
    sim = pad_stage(c)
    for name in SCORES:
        rows, value = _dp(c.tolist(), lambda k, name=name: SKIPS[name](k, n))
        got = align_depths(name, [m + 1], [n + 1], sim)
        best, tie_pick = brute_force(sim, name)
        assert got.positions == ((0, *(r + 1 for r in rows)),)
        assert got.score == pytest.approx(best, abs=1e-12) and value == pytest.approx(best, abs=1e-12)
        assert got.positions[0] == tie_pick
        assert list(rows) == doc_dp(c, name)


def test_layer_and_layer_code_differ_and_agree():
    sim = pad_stage(BAND)
    assert align_depths("layer", [8], [4], sim).positions != align_depths("layer_code", [8], [4], sim).positions
    # with one shallow block to place, the wrapped column k − 1 is column k itself: the two coincide
    rng = np.random.default_rng(0)
    for _ in range(20):
        one = pad_stage(rng.uniform(0, 1, (6, 1)))
        layer, code = align_depths("layer", [7], [2], one), align_depths("layer_code", [7], [2], one)
        assert layer.positions == code.positions and layer.score == pytest.approx(code.score)


# --- alignment: baselines ------------------------------------------------------------------------------


def test_baselines_by_hand():
    assert head_alignment(8, 4) == (0, 1, 2, 3)
    assert uniform_alignment(8, 4) == (0, 3, 5, 7)  # stride 2 from the tail
    assert uniform_alignment(6, 4) == (0, 1, 3, 5)  # stride round(1.5) = 2, half up
    assert uniform_alignment(7, 3) == (0, 4, 6)  # stride round(2.33) = 2
    assert uniform_alignment(9, 6) == (0, 1, 2, 4, 6, 8)  # the stride runs out: block 1 stays at 1
    assert head_tail_alignment(8, 4) == (0, 1, 6, 7)  # blocks ⌊4/2⌋.. go to the tail
    assert head_tail_alignment(6, 3) == (0, 4, 5)
    assert head_tail_alignment(5, 2) == (0, 4)
    assert head_tail_alignment(4, 1) == (0,)
    with pytest.raises(ValueError, match="colliding"):
        uniform_alignment(15, 10)


def doc_baseline(name: str, l1: int, l2: int) -> tuple[int, ...]:
    """§4.3's index maps transcribed literally (blocks not in the map keep their index)."""
    if name == "uniform":
        skip = int(l1 / l2 + 0.5)
        layer_map = dict(zip(range(l2 - 1, 0, -1), range(l1 - 1, 0, -skip), strict=False))
    else:
        half = int(l2 / 2)
        layer_map = dict(zip(range(l2 - 1, half - 1, -1), range(l1 - 1, 0, -1), strict=False))
    return tuple(layer_map.get(b, b) for b in range(l2))


@pytest.mark.parametrize("name", ["uniform", "head_tail"])
def test_baselines_match_section_4_3(name):
    for l1 in range(1, 13):
        for l2 in range(2, l1 + 1):  # l2 = 1 is where head_tail deliberately keeps block 0 at 0
            ref = doc_baseline(name, l1, l2)
            if list(ref) != sorted(set(ref)):
                with pytest.raises(ValueError):
                    align_depths(name, [l1], [l2])
                continue
            assert align_depths(name, [l1], [l2]).positions == (ref,)


def test_baselines_need_no_similarity_and_score_with_one():
    assert align_depths("head", [8, 8], [4, 4]).score is None
    sim = torch.zeros(16, 8, dtype=torch.float64)
    sim[1, 1] = sim[2, 2] = sim[3, 3] = 1.0  # head positions of stage 0
    sim[8 + 7, 4 + 3] = 0.5
    assert align_depths("head", [8, 8], [4, 4], sim).score == pytest.approx(3.0)
    assert align_depths("uniform", [8, 8], [4, 4], sim).score == pytest.approx(0.5)


# --- alignment: stages ---------------------------------------------------------------------------------


def test_stage_offsets_and_index_conversion():
    blocks = [3, 5, 4]
    assert stage_offsets(blocks) == (0, 3, 8)
    for g in range(sum(blocks)):
        assert to_global(blocks, *to_local(blocks, g)) == g
    assert to_local(blocks, 8) == (2, 0) and to_global(blocks, 1, 4) == 7
    with pytest.raises(ValueError, match="outside"):
        to_local(blocks, 12)
    with pytest.raises(ValueError, match="no position"):
        to_global(blocks, 0, 3)


def test_stages_of_different_sizes_use_their_own_blocks():
    deep, shallow = [3, 6, 5], [2, 3, 5]
    sim = torch.full((14, 10), 0.9, dtype=torch.float64)  # off-stage regions are tempting decoys
    planted = {0: (0, 2), 1: (0, 2, 5), 2: (0, 1, 2, 3, 4)}
    for s, positions in planted.items():
        block = stage_similarity(sim, deep, shallow, s)
        block.zero_()
        for b, p in enumerate(positions):
            block[p, b] = 1.0
    result = align_depths("segment", deep, shallow, sim)
    assert result.positions == tuple(planted.values())
    assert result.score == pytest.approx(1 + 2 + 4)
    assert result.global_positions() == (0, 2, 3, 5, 8, 9, 10, 11, 12, 13)
    for name in STRATEGIES:
        got = align_depths(name, deep, shallow, sim)
        for s in range(3):
            alone = align_depths(name, [deep[s]], [shallow[s]], stage_similarity(sim, deep, shallow, s))
            assert got.positions[s] == alone.positions[0]


def test_reset_offsets_reproduces_the_reference_bug():
    deep, shallow = [6, 6, 6], [3, 3, 3]
    sim = torch.zeros(18, 9, dtype=torch.float64)
    plant = {0: (0, 1, 2), 1: (0, 3, 5), 2: (0, 4, 5)}
    for s, positions in plant.items():
        block = stage_similarity(sim, deep, shallow, s)
        for b, p in enumerate(positions):
            block[p, b] = 1.0
    assert align_depths("segment", deep, shallow, sim).positions == tuple(plant.values())
    buggy = align_depths("segment", deep, shallow, sim, reset_offsets=True)
    assert buggy.positions == ((0, 1, 2),) * 3  # stage 1's map everywhere
    assert buggy.score == pytest.approx(2.0)  # scored on each stage's own block


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_equal_depths_give_the_identity(name):
    blocks = [3, 4, 1, 2]
    sim = torch.rand(10, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = align_depths(name, blocks, blocks, sim)
    assert result.positions == tuple(tuple(range(b)) for b in blocks)
    assert result.global_positions() == tuple(range(10))
    assert all(type(p) is int for stage in result.positions for p in stage)


def test_input_errors():
    sim = torch.zeros(8, 8)
    with pytest.raises(ValueError, match=r"stage 1: .*5 blocks.*4.*deeper model first"):
        align_depths("segment", [4, 4], [3, 5], sim)
    with pytest.raises(ValueError, match=r"3 stages .* 2"):
        align_depths("head", [4, 4, 4], [2, 2])
    with pytest.raises(ValueError, match="unknown depth alignment 'sma'; valid: segment, layer, layer_code, head"):
        align_depths("sma", [4], [2])
    with pytest.raises(ValueError, match="valid:"):
        get_strategy("")
    with pytest.raises(ValueError, match="needs a layer similarity"):
        align_depths("segment", [4], [2])
    with pytest.raises(ValueError, match="does not fit"):
        align_depths("segment", [4, 4], [2, 2], torch.zeros(8, 5))
    with pytest.raises(ValueError, match="NaN"):
        align_depths("layer", [4], [2], torch.full((4, 2), math.nan))
    with pytest.raises(ValueError, match="at least one block"):
        align_depths("head", [4], [0])
    with pytest.raises(ValueError, match="not strictly increasing"):
        segment_score(torch.zeros(4, 3), (0, 2, 2))


# --- the alignment record of a pair ----------------------------------------------------------------------


def align_or_error(name: str, deep: list[int], shallow: list[int], sim: torch.Tensor) -> dict:
    try:
        found = align_depths(name, deep, shallow, sim)
    except ValueError as err:
        return {"error": str(err)}
    return {"positions": [list(p) for p in found.positions], "score": found.score}


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(1, 6).flatmap(lambda d: st.tuples(st.just(d), st.integers(1, d))), min_size=1, max_size=3),
    st.integers(0, 2**32 - 1),
)
def test_all_alignments_are_each_strategys_alignment_or_its_error(stages, seed):
    deep, shallow = [d for d, _ in stages], [b for _, b in stages]
    sim = torch.as_tensor(np.random.default_rng(seed).uniform(0, 1, (sum(deep), sum(shallow))))
    got = all_alignments(sim, deep, shallow)
    assert list(got) == list(STRATEGIES)
    for name, entry in got.items():
        assert entry == align_or_error(name, deep, shallow, sim)
        if "error" not in entry:
            assert alignment_from_record({"deep_blocks": deep, "shallow_blocks": shallow, "strategies": got}, name) == (
                align_depths(name, deep, shallow, sim)
            )


def test_a_strategy_that_cannot_align_is_recorded_not_raised():
    """10 into 15 blocks: uniform's stride collides, every other strategy still aligns."""
    sim = torch.rand(15, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = all_alignments(sim, [15], [10])
    assert set(got["uniform"]) == {"error"} and "colliding positions" in got["uniform"]["error"]
    assert all("positions" in entry for name, entry in got.items() if name != "uniform")
    record = {"deep_blocks": [15], "shallow_blocks": [10], "strategies": got}
    with pytest.raises(ValueError, match="colliding positions"):
        alignment_from_record(record, "uniform")
    with pytest.raises(ValueError, match=r"no strategy 'sma'; it has \['head', "):
        alignment_from_record(record, "sma")


def tiny_resnet(depth: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet", {"depth": depth, "width": 0.125}, (1, 8, 8), {"A": 3}).eval()


@pytest.mark.parametrize("deep_first", [True, False])
def test_depth_alignment_record_of_a_pair(deep_first):
    """The CKA of the deeper model's blocks against the shallower's, unrounded, and every strategy from it; the
    record survives JSON exactly."""
    deep, shallow = tiny_resnet(32, 0), tiny_resnet(14, 1)
    models = [deep, shallow] if deep_first else [shallow, deep]
    batches = [torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    record = depth_alignment(models, iter(batches))
    assert record["kind"] == "alignment" and record["deep_model"] == (0 if deep_first else 1)
    assert record["deep_blocks"] == [5, 5, 5] and record["shallow_blocks"] == [2, 2, 2]
    cka = layer_cka(deep, shallow, batches, block_names(deep), block_names(shallow))
    assert cka.dtype == torch.float64 and cka.shape == (15, 6)
    assert record["cka"] == cka.tolist()
    assert record["strategies"] == all_alignments(cka, [5, 5, 5], [2, 2, 2])
    assert json.loads(json.dumps(record)) == record


def test_depth_alignment_errors():
    resnet = tiny_resnet(14, 0)
    batches = [torch.randn(8, 1, 8, 8)]
    with pytest.raises(ValueError, match="a pair of models, got 3"):
        depth_alignment([resnet] * 3, iter(batches))
    mlp = build_model("mlp", {"hidden": [8]}, (1, 8, 8), {"A": 3})
    with pytest.raises(ValueError, match="defines no depth stages"):
        depth_alignment([resnet, mlp], iter(batches))
    five_stages = build_model("vgg", {"depth": 11, "width": 0.0625}, (1, 8, 8), {"A": 3})
    with pytest.raises(ValueError, match=r"no model is .* every stage: \[\[2, 2, 2\], \[1, 1, 2, 2, 2\]\]"):
        depth_alignment([resnet, five_stages], iter(batches))
