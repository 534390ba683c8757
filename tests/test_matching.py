"""Tests for the matching engine: greedy zip, assignment, weight matching, merge/unmerge, and the methods on it."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from benchmarks_loader import load_benchmark
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from hetmerge.api import merge
from hetmerge.batchnorm import reset_batchnorm
from hetmerge.evaluation import cost
from hetmerge.matching.assignment import align_to_first, best_permutation
from hetmerge.matching.greedy_zip import greedy_zip, min_beta, zip_budgets, zip_guaranteed, zip_possible
from hetmerge.matching.transforms import SpaceMerge
from hetmerge.matching.weight_matching import weight_matching
from hetmerge.merged import MergedModel, UnitMap
from hetmerge.methods import MergeContext, MergeError, build_method
from hetmerge.methods.spacewise import assemble
from hetmerge.methods.zipit import ZipBudgetWarning
from hetmerge.models import MultiTaskNet, build_model
from hetmerge.spaces import SpaceGraph, permute_state
from hetmerge.statistics import SpaceStats, collect_statistics

BENCH = load_benchmark("matching")  # the one reference loop of the greedy zip lives there
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------
# 1. Greedy zip against the textbook loop


@st.composite
def zip_problems(draw, max_models=3):
    n_models = draw(st.integers(2, max_models))
    if draw(st.booleans()):
        widths = [draw(st.integers(1, 12))] * n_models
    else:
        widths = draw(st.lists(st.integers(1, 12), min_size=n_models, max_size=n_models))
    n = sum(widths)
    alpha = draw(st.sampled_from([0.0, 0.3, 0.5, 1.0]))
    beta = draw(st.sampled_from([0.0, 0.125, 0.5, 1.0]))
    if draw(st.booleans()):  # symmetric, integer-valued: ties everywhere
        # all-negative values also tie with α-discounted ones (0.5 · −4 = −2)
        low, high = draw(st.sampled_from([(-2, 2), (-4, -1)]))
        values = draw(st.lists(st.integers(low, high), min_size=n * (n - 1) // 2, max_size=n * (n - 1) // 2))
        sims = np.zeros((n, n))
        sims[np.triu_indices(n, 1)] = values
        sims = sims + sims.T
    else:  # a correlation matrix of few samples, some units duplicated (exact ties)
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        z = rng.normal(size=(n, draw(st.integers(2, 6))))
        for _ in range(draw(st.integers(0, n // 2))):
            a, b = rng.integers(n, size=2)
            z[b] = z[a]
        c = np.corrcoef(z)
        sims = (c + c.T) / 2  # corrcoef is symmetric only up to rounding; the zip's input is symmetric
    return sims, widths, alpha, beta


def check_against_reference(sims, widths, alpha, beta):
    similarity = torch.from_numpy(sims)
    before = similarity.clone()
    try:
        reference = BENCH.reference_zip(sims, widths, alpha, beta)
    except BENCH.ZipExhausted:
        with pytest.raises(ValueError, match="no admissible pair"):
            greedy_zip(similarity, widths, alpha, beta)
        return
    result = greedy_zip(similarity, widths, alpha, beta)
    assert torch.equal(similarity, before)  # the input is not modified
    assert list(result.merges) == reference.merges
    assert result.values.shape == (len(result.merges),)
    if result.merges:  # the first merge is made at the largest off-diagonal similarity, undiscounted
        assert result.values[0] == similarity.masked_fill(torch.eye(len(similarity), dtype=torch.bool), -np.inf).max()
    assert result.assignment.shape == (sum(widths), max(widths))
    assert result.assignment.dtype == torch.float64
    assert torch.equal(result.assignment, torch.from_numpy(reference.assignment))


@settings(max_examples=400, deadline=None)
@given(zip_problems())
@example((np.zeros((6, 6)), [3, 3], 0.3, 0.125))  # every pair ties
@example((np.ones((7, 7)), [3, 4], 1.0, 1.0))
@example((np.zeros((9, 9)), [3, 3, 3], 0.0, 0.0))  # α ≤ 0 with 3 models: always exhausted
@example((np.eye(4) * 0 - 1, [2, 2], 0.5, 0.0))
def test_greedy_zip_equals_textbook_loop(problem):
    check_against_reference(*problem)


def test_greedy_zip_merges_and_raises_like_the_reference_on_exhaustion():
    sims = np.zeros((4, 4))
    sims[0, 1] = sims[1, 0] = 1.0  # the best pair is within model 0
    # β = 0: model 0's budget is 0, so the first same-model merge is made and then all of model 0 is masked
    result = greedy_zip(torch.from_numpy(sims), [2, 2], 0.0, 0.0)
    assert result.merges == ((0, 1), (2, 3))
    assert result.assignment.tolist() == [[1, 0], [1, 0], [0, 1], [0, 1]]
    with pytest.raises(ValueError, match="no admissible pair"):
        greedy_zip(torch.zeros(9, 9, dtype=torch.float64), [3, 3, 3], 0.0, 0.5)


def test_greedy_zip_rejects_or_follows_the_textbook_on_an_asymmetric_matrix():
    sims = np.array([[1.0, 0.5, 0.3, 1.0], [0.5, 1.0, 0.4, 0.5], [0.3, 0.4 + 1e-16, 1.0, 0.3], [1.0, 0.5, 0.3, 1.0]])
    assert sims[2, 1] > sims[1, 2]  # differs by one ulp, as np.corrcoef's output can
    try:
        result = greedy_zip(torch.from_numpy(sims), [2, 2], 0.0, 0.0)
    except ValueError:
        return
    assert list(result.merges) == BENCH.reference_zip(sims, [2, 2], 0.0, 0.0).merges


def test_greedy_zip_rejects_a_matrix_that_does_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        greedy_zip(torch.zeros(5, 5, dtype=torch.float64), [2, 2], 0.3, 0.1)
    with pytest.raises(ValueError, match="does not fit"):
        greedy_zip(torch.zeros(4, 3, dtype=torch.float64), [2, 2], 0.3, 0.1)


@pytest.mark.parametrize(("method", "params"), [("zipit", {"alpha": 0.0}), ("mudsc", {"alpha": 0.0, "lam": 0.5})])
def test_alpha_at_most_0_refuses_three_models(method, params):
    """α ≤ 0 never merges a merged unit again, so 3d units cannot shrink to d; two models are fine."""
    trio = [build_model("mlp", {"hidden": [4]}, (1, 1, 2), {"A": 1}) for _ in range(3)]
    with pytest.raises(MergeError, match="third model"):
        build_method(method, params)(trio, MergeContext(CPU))
    build_method(method, params).check(trio[:2])


def test_alpha_does_not_limit_alignment():
    trio = [build_model("mlp", {"hidden": [4]}, (1, 1, 2), {"A": 1}) for _ in range(3)]
    build_method("mudsc", {"alpha": 0.0, "solver": "align"}).check(trio)


def test_zip_budgets_follow_the_reference_formula():
    # algorithms.md §4.6: ResNet-26×8 with ResNet-26×4 at β = 1
    assert zip_budgets([512, 256], 1.0) == [170, 85]
    assert zip_budgets([16, 16], 0.125) == [1, 1]  # int((16·16 // 32) · 0.125 + 1e-4) = int(1.0001)
    assert zip_budgets([10, 10, 10], 0.5) == [3, 3, 3]  # to_remove 20: (200 // 30) · 0.5 = 3
    assert zip_budgets([3, 5], 0.0) == [0, 0]


@settings(max_examples=400, deadline=None)
@given(zip_problems(max_models=4), st.sampled_from([i / 16 for i in range(17)]))
@example((np.zeros((9, 9)), [3, 3, 3], 0.3, 0.0), 0.0)
@example((np.zeros((9, 9)), [3, 3, 3], 0.0, 0.0), 1.0)
def test_a_guaranteed_zip_finishes_and_an_impossible_one_never_does(problem, beta):
    """zip_guaranteed is sufficient for every similarity, zip_possible necessary; between them (β below the
    bound) the similarities decide, so no β bound can be both (test_the_beta_bound_is_tight_for_three_models)."""
    sims, widths, alpha, _ = problem
    try:
        greedy_zip(torch.from_numpy(sims), widths, alpha, beta)
    except ValueError as err:
        assert not zip_guaranteed(widths, alpha, beta), (widths, alpha, beta)
        assert "no admissible pair is left" in str(err)
    else:
        assert zip_possible(widths, alpha), (widths, alpha)


def triangle_trap(d: int, beta: float) -> torch.Tensor:
    """Similarities that make the greedy zip of three width-d models spend every same-model budget first and then
    pair the leftovers across models in a triangle (0+1, 0+2, 1+2): all pairs left share a spent model."""
    b = max(zip_budgets([d] * 3, beta)[0], 1)
    s = torch.zeros(3 * d, 3 * d, dtype=torch.float64)
    seeds = []
    for m in range(3):
        for j in range(b):  # the budget's same-model merges, first (0.9 beats everything else)
            s[m * d + 2 * j, m * d + 2 * j + 1] = 0.9
        seeds.append([[m * d + 2 * j, m * d + 2 * j + 1] for j in range(b)] + [[m * d + k] for k in range(2 * b, d)])
    half = (d - b) // 2
    pairs = [(0, k, 1, k) for k in range(half)] + [(0, half + k, 2, k) for k in range(half)]
    pairs += [(1, half + k, 2, half + k) for k in range(half)]
    if (d - b) % 2:  # the odd seeds left form one triple
        pairs += [(0, -1, 1, -1), (0, -1, 2, -1), (1, -1, 2, -1)]
    for m, i, n, k in pairs:
        s[torch.tensor(seeds[m][i])[:, None], torch.tensor(seeds[n][k])] = 0.5
    return s + s.T


@pytest.mark.parametrize("d", [2, 3, 4, 5, 8, 9, 16, 32])
@pytest.mark.parametrize("alpha", [1e-3, 0.3, 1.0])
def test_the_beta_bound_is_tight_for_three_models(d, alpha):
    """Below min_beta some similarity makes the zip of three models fail; from it on none does."""
    for beta in [i / 64 for i in range(65)]:
        if 2 * max(zip_budgets([d] * 3, beta)[0], 1) > d:  # budgets beyond half the width: nothing to trap
            assert zip_guaranteed([d] * 3, alpha, beta)
            continue
        try:
            greedy_zip(triangle_trap(d, beta), [d] * 3, alpha, beta)
            finished = True
        except ValueError:
            finished = False
        assert finished == zip_guaranteed([d] * 3, alpha, beta) == (beta >= min_beta([d] * 3, alpha)), (d, beta)


def test_min_beta_for_three_models_and_the_zip_error_names_it():
    """README's α 0.3, β 0.125 cannot guarantee three models: 0.6, 0.5, 0.524 and 0.5 do for widths 8 to 64
    (random correlations already finish at about 0.41, 0.31 and 0.2 for 8, 16 and 32: the bound is the worst case)."""
    assert [min_beta([d] * 3, 0.3) for d in (8, 16, 32, 64)] == [0.6, 0.5, 0.524, 0.5]
    assert min_beta([8, 8], 0.3) == min_beta([8, 8], 0.0) == 0.0  # two models always zip
    assert min_beta([8] * 3, 0.0) is None and not zip_possible([8] * 3, 0.0)  # α = 0: pairs only
    assert zip_possible([16, 4, 4], 0.0)  # unless the widest model holds half the units
    for d in (8, 16, 32, 64):
        needed = min_beta([d] * 3, 0.3)
        assert zip_guaranteed([d] * 3, 0.3, needed) and not zip_guaranteed([d] * 3, 0.3, needed - 0.01)
    with pytest.raises(ValueError) as info:
        greedy_zip(triangle_trap(8, 0.125), [8] * 3, 0.3, 0.125)
    assert str(info.value) == (
        "no admissible pair is left to merge after 14 of 16 merges of 3 models of widths [8, 8, 8]: β = 0.125 allows "
        "[1, 1, 1] same-model merges per model, and every pair left would merge units of a model whose budget is "
        "spent; β ≥ 0.6 always zips these widths"
    )
    with pytest.raises(ValueError, match=r"α = 0\.0 ≤ 0 never merges a merged unit again, so these widths need α > 0"):
        greedy_zip(torch.zeros(9, 9, dtype=torch.float64), [3, 3, 3], 0.0, 0.5)


def test_zipit_warns_where_beta_does_not_guarantee_the_zip():
    trio = [build_model("mlp", {"hidden": [16]}, (1, 1, 2), {"A": 1}) for _ in range(3)]
    with pytest.warns(ZipBudgetWarning, match=r"β = 0.125 does not guarantee .* widths \[16, 16, 16\].*β ≥ 0.5"):
        build_method("zipit", {"alpha": 0.3, "beta": 0.125}).check(trio)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_method("zipit", {"alpha": 0.3, "beta": 0.5}).check(trio)
        build_method("zipit", {"alpha": 0.3, "beta": 0.0}).check(trio[:2])


# ---------------------------------------------------------------------------------------------------------
# 2. A ZipIt! merge worked out by hand


def hand_mlp(fc0, b0, fc1, b1, head, head_bias) -> MultiTaskNet:
    model = build_model("mlp", {"hidden": [2, 2], "batch_norm": False}, (1, 1, 2), {"A": 1})
    state = {
        "body.fc0.linear.weight": fc0,
        "body.fc0.linear.bias": b0,
        "body.fc1.linear.weight": fc1,
        "body.fc1.linear.bias": b1,
        "heads.A.weight": head,
        "heads.A.bias": head_bias,
    }
    model.load_state_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in state.items()})
    return model.eval()


def test_hand_computed_zipit_merge():
    a = hand_mlp([[1, 2], [3, 4]], [0.5, -0.5], [[1, -1], [2, 0]], [0.1, 0.2], [[1, 2]], [0.5])
    b = hand_mlp([[5, 6], [7, 9]], [1, 2], [[0, 3], [-2, 1]], [0.3, 0.4], [[3, 4]], [1.5])
    # unit order A0 A1 B0 B1; the diagonal is 1, so these are their own correlations
    corr_fc0 = [[1, 0.1, 0.2, 0.9], [0.1, 1, 0.8, 0.3], [0.2, 0.8, 1, 0.1], [0.9, 0.3, 0.1, 1]]
    corr_fc1 = [[1, 0.95, 0.5, 0.4], [0.95, 1, 0.3, 0.6], [0.5, 0.3, 1, 0.2], [0.4, 0.6, 0.2, 1]]
    stats = {
        name: SpaceStats((2, 2), torch.zeros(4, dtype=torch.float64), torch.tensor(c, dtype=torch.float64), 10)
        for name, c in (("fc0", corr_fc0), ("fc1", corr_fc1))
    }
    # fc0: best pair A0–B1 (0.9); A0's column becomes 0.3·min → 0.03 for A1 and B0; then A1–B0 (0.8)
    zip0 = greedy_zip(stats["fc0"].correlation(), [2, 2], 0.3, 0.0)
    assert zip0.merges == ((0, 3), (1, 2))
    assert zip0.values.tolist() == [0.9, 0.8]
    # fc1: A0–A1 (0.95) within model A (budget 0 → masked after); then B0 (0.3·min(.5,.3) = .09 with the
    # merged unit), B1 (0.12) and B0–B1 (0.2): B0–B1
    zip1 = greedy_zip(stats["fc1"].correlation(), [2, 2], 0.3, 0.0)
    assert zip1.merges == ((0, 1), (2, 3))
    assert zip1.values.tolist() == [0.95, 0.2]

    sm0 = SpaceMerge.from_assignment(zip0.assignment, [2, 2])
    f64 = torch.float64
    assert torch.equal(sm0.merge[0], torch.tensor([[0.5, 0], [0, 0.5]], dtype=f64))
    assert torch.equal(sm0.merge[1], torch.tensor([[0, 0.5], [0.5, 0]], dtype=f64))
    assert torch.equal(sm0.unmerge[0], torch.tensor([[1, 0], [0, 1]], dtype=f64))
    assert torch.equal(sm0.unmerge[1], torch.tensor([[0, 1], [1, 0]], dtype=f64))
    sm1 = SpaceMerge.from_assignment(zip1.assignment, [2, 2])
    assert torch.equal(sm1.merge[0], torch.tensor([[0.5, 0.5], [0, 0]], dtype=f64))
    assert torch.equal(sm1.merge[1], torch.tensor([[0, 0], [0.5, 0.5]], dtype=f64))
    assert torch.equal(sm1.unmerge[0], torch.tensor([[1, 0], [1, 0]], dtype=f64))
    assert torch.equal(sm1.unmerge[1], torch.tensor([[0, 1], [0, 1]], dtype=f64))
    assert sm0.width == sm1.width == 2

    method = build_method("zipit", {"alpha": 0.3, "beta": 0.0, "reset_bn": False})
    merged = method([a, b], MergeContext(device=CPU, stats=stats))
    assert merged.trunk is not None and not merged.branches
    state = merged.trunk.state_dict()
    expected = {
        # merged unit 0 = mean(A0, B1), unit 1 = mean(A1, B0)
        "body.fc0.linear.weight": [[(1 + 7) / 2, (2 + 9) / 2], [(3 + 5) / 2, (4 + 6) / 2]],
        "body.fc0.linear.bias": [(0.5 + 2) / 2, (-0.5 + 1) / 2],
        # fc1 unit 0 = mean(A0, A1) reading fc0 in A's order; unit 1 = mean(B0, B1) with B's fc0 columns swapped
        "body.fc1.linear.weight": [[(1 + 2) / 2, (-1 + 0) / 2], [(3 + 1) / 2, (0 - 2) / 2]],
        "body.fc1.linear.bias": [(0.1 + 0.2) / 2, (0.3 + 0.4) / 2],
        # the head reads the sum of each merged unit's members, averaged over the two models
        "heads.A.weight": [[(1 + 2) / 2, (3 + 4) / 2]],
        "heads.A.bias": [(0.5 + 1.5) / 2],
    }
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], torch.tensor(value), rtol=0, atol=1e-6, msg=key)


# ---------------------------------------------------------------------------------------------------------
# 3. Equivalences on tiny models of every family

SHAPE = (1, 16, 16)
SPECS = {"mlp": {"hidden": [16, 16]}, "vgg": {"depth": 11, "width": 0.125}, "resnet": {"depth": 20, "width": 0.25}}
STOP = {"mlp": "fc0", "vgg": "conv3", "resnet": "s2b0"}
FAMILIES = sorted(SPECS)


def make_batches(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, *SHAPE, generator=g) for _ in range(3)]


@torch.no_grad()
def live_model(family: str, seed: int, data: list[torch.Tensor], heads: dict[str, int] | None = None) -> MultiTaskNet:
    """A random model whose units all vary on `data`: BN bias 0.5, BN statistics from `data`.

    Dead units have zero correlation with everything and are matched arbitrarily, which would make exact
    equivalences fail for reasons that have nothing to do with the code under test.
    """
    torch.manual_seed(seed)
    model = build_model(family, SPECS[family], SHAPE, heads or {"A": 3})
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.bias.fill_(0.5)
    reset_batchnorm(model, data)
    model.eval()
    for name, s in collect_statistics([model], data).items():
        assert s.cov.diagonal().min() > 1e-4, f"{family}: space {name} has a (nearly) dead unit"
    return model


def permuted_copy(model: MultiTaskNet, seed: int) -> MultiTaskNet:
    g = torch.Generator().manual_seed(seed)
    graph = model.space_graph()
    perms = {s.name: torch.randperm(s.width, generator=g) for s in graph.spaces}
    twin = copy.deepcopy(model)
    twin.load_state_dict(permute_state(model.state_dict(), graph, perms))
    return twin.eval()


@pytest.fixture(scope="module")
def data() -> list[torch.Tensor]:
    return make_batches(0)


@pytest.fixture(scope="module")
def models(data) -> dict[str, MultiTaskNet]:
    return {family: live_model(family, 1, data) for family in FAMILIES}


@torch.no_grad()
def outputs(model, data) -> dict[str, torch.Tensor]:
    return model(torch.cat(data))


def assert_same_function(merged, model, data, atol=1e-5):
    got, want = outputs(merged, data), outputs(model, data)
    assert sorted(got) == sorted(want)
    for task in want:
        torch.testing.assert_close(got[task], want[task], rtol=0, atol=atol)


@pytest.mark.parametrize("family", FAMILIES)
def test_permuted_copy_computes_the_same_function(family, models, data):
    """The space descriptions are right: permuting every space of a model keeps its function."""
    model = models[family]
    twin = permuted_copy(model, 7)
    assert any(not torch.equal(v, twin.state_dict()[k]) for k, v in model.state_dict().items())
    assert_same_function(twin, model, data)


SELF_MERGES = [
    ("average", {}),
    ("permute", {}),
    ("weight_matching", {}),
    ("zipit", {"alpha": 0.5, "beta": 0.0}),
    ("zipit", {"alpha": 0.0, "beta": 0.0}),
    ("zipit", {"alpha": 0.5, "beta": 0.0, "stop_after": "STOP"}),
    ("ensemble", {}),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("method", "params"), SELF_MERGES, ids=lambda v: str(v).replace(" ", ""))
def test_merging_a_model_with_itself_keeps_its_function(family, method, params, models, data):
    model = models[family]
    params = {**params, "reset_bn": False}
    if params.get("stop_after") == "STOP":
        params["stop_after"] = STOP[family]
    merged = merge([model, model], method, params, data=data)
    assert isinstance(merged, MergedModel)
    assert_same_function(merged, model, data)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["permute", "weight_matching"])
def test_alignment_recovers_a_permuted_copy(family, method, models, data):
    model = models[family]
    twin = permuted_copy(model, 3)
    merged = merge([model, twin], method, {"reset_bn": False}, data=data)
    assert_same_function(merged, model, data)
    # the merged weights are model 0's: each unit averaged with its true partner
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(merged.trunk.state_dict()[key], value, rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("method", "params"), [("permute", {}), ("weight_matching", {}), ("zipit", {"alpha": 1.0, "beta": 0.0})]
)
def test_three_model_merge_of_permuted_copies(family, method, params, models, data):
    """α = 1 keeps a merged pair's similarity to its third copy at 1, so triples form before anything else.

    β = 0 does not guarantee a zip of three models (the method warns), but copies never need a same-model merge.
    """
    model = models[family]
    trio = [model, permuted_copy(model, 11), permuted_copy(model, 12)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = merge(trio, method, {**params, "reset_bn": False}, data=data)
    assert [w.category for w in caught] == ([ZipBudgetWarning] if method == "zipit" else [])
    assert_same_function(merged, model, data)


@pytest.mark.parametrize("family", FAMILIES)
def test_partial_zip_structure(family, data):
    a = live_model(family, 21, data, {"A": 3})
    b = live_model(family, 22, data, {"B": 2})
    params = {"reset_bn": False, "stop_after": STOP[family]}
    partial = merge([a, b], "zipit", params, data=data)
    cut = list(a.body._modules).index(STOP[family]) + 1
    assert partial.trunk is not None
    assert partial.cut == cut
    assert len(partial.branches) == 2
    assert partial.tasks == ("A", "B")
    handover = a.space_graph()[a.space_graph().cuts[cut]]
    assert all(isinstance(u, UnitMap) for u in partial.unmerge)
    assert [tuple(u.weight.shape) for u in partial.unmerge] == [(handover.width, handover.width)] * 2
    x = torch.cat(data)
    with torch.no_grad():
        got = partial(x)
        h = partial.trunk.run_body(x, 0, cut)
        for branch, unmerge, task in zip(partial.branches, partial.unmerge, ("A", "B"), strict=True):
            answer = branch.forward_from(unmerge(h), cut)
            assert list(answer) == [task]
            torch.testing.assert_close(got[task], answer[task])
    full = merge([a, b], "zipit", {"reset_bn": False}, data=data)
    ensemble = merge([a, b], "ensemble", {}, data=data)
    costs = {name: cost(m, SHAPE) for name, m in (("full", full), ("partial", partial), ("ensemble", ensemble))}
    for measure in ("flops", "params"):
        assert costs["full"][measure] < costs["partial"][measure] < costs["ensemble"][measure], (measure, costs)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_permutations_equal_average(family, data):
    a, b = live_model(family, 31, data), live_model(family, 32, data, {"A": 3, "B": 2})
    merges = {s.name: SpaceMerge.from_permutations([torch.arange(s.width)] * 2) for s in a.space_graph().spaces}
    through_spaces = assemble([a, b], merges, None).trunk.state_dict()
    averaged = merge([a, b], "average", {"reset_bn": False}).trunk.state_dict()
    assert sorted(through_spaces) == sorted(averaged)
    for key, value in averaged.items():
        assert through_spaces[key].dtype == value.dtype
        torch.testing.assert_close(through_spaces[key], value, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize(("method", "params"), [("average", {}), ("permute", {}), ("zipit", {})])
def test_merging_leaves_the_source_models_unchanged(method, params, data):
    a, b = live_model("resnet", 41, data), live_model("resnet", 42, data)
    before = [copy.deepcopy(m.state_dict()) for m in (a, b)]
    merge([a, b], method, params, data=make_batches(5)[:2])  # reset_bn True, other data than the models'
    for m, state in zip((a, b), before, strict=True):
        for key, value in m.state_dict().items():
            assert torch.equal(value, state[key]), key


@pytest.mark.parametrize(("method", "params"), [("zipit", {"stop_after": "s2b0"}), ("ensemble", {"reset_bn": True})])
def test_branching_merges_leave_the_source_models_unchanged(method, params, data):
    a, b = live_model("resnet", 41, data), live_model("resnet", 42, data)
    before = [copy.deepcopy(m.state_dict()) for m in (a, b)]
    merge([a, b], method, params, data=make_batches(5)[:2])  # other data than the models' BN statistics
    for m, state in zip((a, b), before, strict=True):
        for key, value in m.state_dict().items():
            assert torch.equal(value, state[key]), key


# ---------------------------------------------------------------------------------------------------------
# 4. Bad input


def fresh(family: str, spec: dict, seed: int = 0) -> MultiTaskNet:
    torch.manual_seed(seed)
    return build_model(family, spec, SHAPE, {"A": 3})


@pytest.mark.parametrize("method", ["permute", "zipit", "weight_matching", "average"])
def test_different_architectures_raise_naming_both(method):
    r20 = fresh("resnet", {"depth": 20, "width": 0.25})
    r26 = fresh("resnet", {"depth": 26, "width": 0.25})
    with pytest.raises(MergeError) as info:
        merge([r20, r26], method, {"reset_bn": False})
    assert "'depth': 20" in str(info.value) and "'depth': 26" in str(info.value)
    vgg = fresh("vgg", SPECS["vgg"])
    with pytest.raises(MergeError) as info:
        merge([vgg, r20], method, {"reset_bn": False})
    assert "'vgg'" in str(info.value) and "'resnet'" in str(info.value)


def test_unknown_stop_after_lists_the_valid_units():
    model = fresh("resnet", SPECS["resnet"])
    with pytest.raises(MergeError, match="valid units") as info:
        merge([model, model], "zipit", {"stop_after": "s9b9"})
    message = str(info.value)
    assert "'s9b9'" in message
    for unit in ("stem", "s1b0", "s2b0", "s3b2"):
        assert f"'{unit}'" in message
    assert "'gap'" not in message.split("valid units")[1]


def test_permutation_alignment_needs_equal_widths():
    with pytest.raises(ValueError, match="equal widths"):
        align_to_first(torch.eye(7, dtype=torch.float64), [3, 4])


def test_statistics_for_other_widths_raise():
    model = fresh("mlp", {"hidden": [4, 4]})
    stats = {"fc0": SpaceStats((4, 3), torch.zeros(7), torch.eye(7), 1)}
    with pytest.raises(MergeError, match="fc0"):
        build_method("zipit", {"reset_bn": False})([model, model], MergeContext(device=CPU, stats=stats))


def test_zipit_without_data_says_so():
    model = fresh("mlp", {"hidden": [4, 4]})
    with pytest.raises(MergeError, match="no data"):
        merge([model, model], "zipit", {"reset_bn": False})


def test_best_permutation_on_a_known_matrix():
    score = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.2, 0.0], [0.0, 0.0, 0.5]], dtype=torch.float64)
    assert best_permutation(score).tolist() == [1, 0, 2]


# ---------------------------------------------------------------------------------------------------------
# 5. Weight matching


def _permute_other_axes(tensor, param, graph: SpaceGraph, skip: str, perms):
    for space in graph.spaces:
        if space.name == skip:
            continue
        for ref in space.axes():
            if ref.param == param:
                tensor = tensor.index_select(ref.axis, perms[space.name])
    return tensor


def space_scores(state_a, state_b, graph: SpaceGraph, perms) -> dict[str, torch.Tensor]:
    """S_p = Σ over p's weight axes of W_a · (W_b with every other space's axes permuted)ᵀ, written afresh."""
    scores = {}
    for space in graph.spaces:
        s = torch.zeros(space.width, space.width, dtype=torch.float64)
        for ref in space.axes():
            if ref.role != "weight" or ref.param not in state_a or ref.param not in state_b:
                continue
            wa = state_a[ref.param].double()
            wb = _permute_other_axes(state_b[ref.param].double(), ref.param, graph, space.name, perms)
            rows_a = wa.movedim(ref.axis, 0).reshape(space.width, -1)
            rows_b = wb.movedim(ref.axis, 0).reshape(space.width, -1)
            s += rows_a @ rows_b.T
        scores[space.name] = s
    return scores


def objective(state_a, state_b, graph: SpaceGraph, perms) -> float:
    """Σ over weight tensors touched by a space of ⟨W_a, permuted W_b⟩: what each sweep step increases."""
    permuted = permute_state(state_b, graph, perms)
    params = {r.param for s in graph.spaces for r in s.axes() if r.role == "weight"}
    return sum(float((state_a[p].double() * permuted[p].double()).sum()) for p in params)


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_matching_improves_the_objective_and_converges(family):
    a, b = fresh(family, SPECS[family], 1), fresh(family, SPECS[family], 2)
    graph = a.space_graph()
    sa, sb = a.state_dict(), b.state_dict()
    identity = {s.name: torch.arange(s.width) for s in graph.spaces}
    perms, sweeps = weight_matching(sa, sb, graph, max_iter=50, seed=0)
    assert 1 <= sweeps <= 50
    for s in graph.spaces:
        assert sorted(perms[s.name].tolist()) == list(range(s.width))
    assert objective(sa, sb, graph, perms) >= objective(sa, sb, graph, identity) - 1e-9
    scores = space_scores(sa, sb, graph, perms)
    at_identity = space_scores(sa, sb, graph, identity)
    eye = {s.name: torch.arange(s.width) for s in graph.spaces}

    def total(sc, pp):
        return sum(float(sc[n][eye[n], pp[n]].sum()) for n in sc)

    assert total(scores, perms) >= total(at_identity, identity) - 1e-9
    if sweeps < 50:  # converged: no space's LAP can improve on its permutation given the others
        for name, s in scores.items():
            best = best_permutation(s)
            assert float(s[eye[name], perms[name]].sum()) >= float(s[eye[name], best].sum()) - 1e-9, name


def test_weight_matching_stops_at_max_iter():
    a, b = fresh("resnet", SPECS["resnet"], 1), fresh("resnet", SPECS["resnet"], 2)
    _, sweeps = weight_matching(a.state_dict(), b.state_dict(), a.space_graph(), max_iter=1)
    assert sweeps == 1


def test_weight_matching_recovers_a_known_permutation():
    model = fresh("vgg", SPECS["vgg"], 5)
    twin = permuted_copy(model, 9)
    graph = model.space_graph()
    perms, sweeps = weight_matching(model.state_dict(), twin.state_dict(), graph)
    assert sweeps < 100
    aligned = permute_state(twin.state_dict(), graph, perms)
    for key, value in model.state_dict().items():
        assert torch.equal(aligned[key], value), key
