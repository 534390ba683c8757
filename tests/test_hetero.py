"""Heterogeneous merging end to end: depth alignment + identity padding + (elastic) zip, and width-only zips."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch

from hetmerge.api import merge
from hetmerge.depth import STRATEGIES, depth_alignment
from hetmerge.matching.transforms import SpaceMerge
from hetmerge.methods import MergeContext, MergeError, build_method
from hetmerge.models import build_model

SHAPE = (1, 8, 8)


def fresh(family, spec, heads, seed):
    torch.manual_seed(seed)
    return build_model(family, spec, SHAPE, heads).eval()


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(11)
    return [torch.randn(16, *SHAPE, generator=gen) for _ in range(2)]


def states_close(x, y):
    assert x.keys() == y.keys()
    for key in x:
        torch.testing.assert_close(x[key], y[key], atol=1e-6, rtol=1e-6, msg=key)


def test_equal_depths_and_widths_reduce_to_zipit(data):
    """With nothing to align or pad, the heterogeneous pipeline is exactly ZipIt! (same α, β)."""
    a = fresh("resnet", {"depth": 8, "width": 0.25}, {"A": 3}, 1)
    b = fresh("resnet", {"depth": 8, "width": 0.25}, {"B": 3}, 2)
    got = merge([a, b], "hetero", {"strategy": "segment", "alpha": 0.5, "beta": 1.0}, data=data)
    want = merge([a, b], "zipit", {"alpha": 0.5, "beta": 1.0}, data=data)
    states_close(got.trunk.state_dict(), want.trunk.state_dict())


@pytest.mark.parametrize("solver", ["zip", "align"])
def test_merging_a_model_with_itself_returns_it(data, randomize_bn, solver):
    """Weights tell twins apart even where activations cannot (dead units), so λ < 1 finds every twin."""
    a = randomize_bn(fresh("resnet", {"depth": 14, "width": 0.25}, {"A": 3}, 1), 3)
    merged = merge([a, copy.deepcopy(a)], "hetero", {"reset_bn": False, "solver": solver, "lam": 0.5}, data=data)
    x = torch.randn(4, *SHAPE)
    torch.testing.assert_close(merged(x)["A"], a(x)["A"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["segment", "layer", "layer_code", "head", "uniform", "head_tail"])
def test_resnet50_style_with_resnet26_style_end_to_end(data, strategy):
    """The papers' block counts ([8,8,8] ⊕ [4,4,4]) at a tiny width, in both orders."""
    deep = fresh("resnet", {"depth": 50, "width": 0.125}, {"A": 3}, 1)
    shallow = fresh("resnet", {"depth": 26, "width": 0.125}, {"B": 3}, 2)
    for models, deep_index in (([deep, shallow], 0), ([shallow, deep], 1)):
        ctx = MergeContext(torch.device("cpu"), lambda: iter(data))
        merged = build_method("hetero", {"strategy": strategy})(models, ctx)
        assert merged.trunk.describe()["spec"]["depth"] == 50
        assert set(merged(torch.randn(2, *SHAPE))) == {"A", "B"}
        notes = ctx.notes
        assert notes["deep_model"] == deep_index
        assert notes["deep_blocks"] == [8, 8, 8] and notes["shallow_blocks"] == [4, 4, 4]
        for stage in notes["positions"]:
            assert stage[0] == 0 and all(a < b for a, b in itertools.pairwise(stage)) and stage[-1] < 8
        assert len(notes["single_model_spaces"]) == 12  # one inner space per identity block


def test_identity_blocks_keep_the_deep_models_inner_units(data):
    """A space only the deep model has is merged as its own units, untouched by the padded model."""
    deep = fresh("resnet", {"depth": 14, "width": 0.25}, {"A": 3}, 1)
    shallow = fresh("resnet", {"depth": 8, "width": 0.25}, {"B": 3}, 2)
    ctx = MergeContext(torch.device("cpu"), lambda: iter(data))
    merged = build_method("hetero", {"strategy": "head", "reset_bn": False})([deep, shallow], ctx)
    assert ctx.notes["single_model_spaces"] == ["s1b1.inner", "s2b1.inner", "s3b1.inner"]
    # the inner space's producer (conv1) keeps the deep model's rows; only its input side is merged
    w_deep = deep.body.s1b1.conv1.weight
    w_merged = merged.trunk.body.s1b1.conv1.weight
    assert w_merged.shape == w_deep.shape
    assert not torch.allclose(w_merged, torch.zeros_like(w_merged))
    torch.testing.assert_close(merged.trunk.body.s1b1.bn1.weight, deep.body.s1b1.bn1.weight)


def test_single_model_merge_matrices():
    sm = SpaceMerge.single(1, [3, 2])
    assert sm.width == 3
    assert torch.equal(sm.merge[0], torch.zeros(3, 3, dtype=torch.float64))
    assert torch.equal(sm.merge[1], torch.eye(3, 2, dtype=torch.float64))
    assert torch.equal(sm.unmerge[1], torch.eye(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("method", ["zipit", "mudsc"])
def test_width_heterogeneous_zip_merges_into_the_wider_model(data, method):
    wide = fresh("resnet", {"depth": 8, "width": 0.5}, {"A": 3}, 1)
    narrow = fresh("resnet", {"depth": 8, "width": 0.25}, {"B": 3}, 2)
    params = {"alpha": 0.5, "beta": 1.0} if method == "zipit" else {"solver": "zip", "lam": 0.5}
    for models in ([wide, narrow], [narrow, wide]):
        merged = merge(models, method, params, data=data)
        assert merged.trunk.describe()["spec"]["width"] == 0.5
        assert set(merged(torch.randn(2, *SHAPE))) == {"A", "B"}


def test_depth_and_width_heterogeneity_together(data):
    deep_narrow = fresh("resnet", {"depth": 14, "width": 0.25}, {"A": 3}, 1)
    shallow_wide = fresh("resnet", {"depth": 8, "width": 0.5}, {"B": 3}, 2)
    for lam in (1.0, 0.5):
        merged = merge([deep_narrow, shallow_wide], "hetero", {"lam": lam}, data=data)
        spec = merged.trunk.describe()["spec"]
        assert (spec["depth"], spec["width"]) == (14, 0.5)
        assert torch.isfinite(merged(torch.randn(2, *SHAPE))["A"]).all()


def test_vgg_stages_variant_merges(data):
    big = [torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    v19 = build_model("vgg", {"depth": 19, "width": 0.0625, "variant": "stages"}, (1, 28, 28), {"A": 3})
    v13 = build_model("vgg", {"depth": 13, "width": 0.0625, "variant": "stages"}, (1, 28, 28), {"B": 3})
    ctx = MergeContext(torch.device("cpu"), lambda: iter(big))
    merged = build_method("hetero", {"solver": "align"})([v13, v19], ctx)
    assert ctx.notes["deep_blocks"] == [6, 6, 6] and ctx.notes["single_model_spaces"] == []
    assert merged.trunk.describe()["spec"]["depth"] == 19


def test_errors_name_the_problem(data):
    resnet = fresh("resnet", {"depth": 8, "width": 0.25}, {"A": 3}, 1)
    mlp = fresh("mlp", {"hidden": [8]}, {"B": 3}, 2)
    with pytest.raises(MergeError, match="depth stages"):
        merge([mlp, copy.deepcopy(mlp)], "hetero", data=data)
    with pytest.raises(MergeError, match="strategy"):
        build_method("hetero", {"strategy": "diagonal"})
    with pytest.raises(MergeError, match="differ at most in width"):
        merge([resnet, fresh("resnet", {"depth": 14, "width": 0.25}, {"B": 3}, 2)], "zipit", data=data)
    with pytest.raises(MergeError, match="merges exactly 2 models, but got 3"):
        merge([resnet] * 3, "hetero", data=data)


# Pairs of different depths, shallow model first in one of them: (models, params of the merge).
PAIRS = {
    "resnet": (
        lambda: [fresh("resnet", {"depth": d, "width": 0.125}, {t: 3}, d) for d, t in ((14, "B"), (32, "A"))],
        {},
    ),
    "vgg": (
        lambda: [
            build_model("vgg", {"depth": d, "width": 0.0625, "variant": "stages"}, (1, 28, 28), {t: 3})
            for d, t in ((19, "A"), (13, "B"))
        ],
        {"solver": "align", "lam": 0.5},
    ),
}


@pytest.fixture(scope="module", params=sorted(PAIRS))
def aligned_pair(request):
    """(models, params, data, the pair's alignment record as loaded from its JSON)."""
    torch.manual_seed(0)
    build, params = PAIRS[request.param]
    models = build()
    shape = models[0].input_shape
    gen = torch.Generator().manual_seed(11)
    data = [torch.randn(8, *shape, generator=gen) for _ in range(2)]
    record = json.loads(json.dumps(depth_alignment(models, iter(data))))
    return models, params, data, record


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_a_precomputed_alignment_gives_the_same_merge_bit_for_bit(aligned_pair, strategy):
    models, params, data, record = aligned_pair
    method = build_method("hetero", {**params, "strategy": strategy})
    own = MergeContext(torch.device("cpu"), lambda: iter(data))
    given = MergeContext(torch.device("cpu"), lambda: iter(data), precomputed={"alignment": record})
    want, got = method(models, own), method(models, given)
    assert want.state_dict().keys() == got.state_dict().keys()
    assert all(torch.equal(v, got.state_dict()[k]) for k, v in want.state_dict().items())
    assert got.trunk.describe() == want.trunk.describe()
    assert given.notes == own.notes
    assert given.notes["positions"] == record["strategies"][strategy]["positions"]


def test_the_precomputed_alignment_is_what_the_merge_uses(aligned_pair):
    """Another strategy's positions under this strategy's name: the merge follows the record, not a CKA pass."""
    models, params, _, record = aligned_pair
    found = record["strategies"]
    other = next(found[k] for k in ("head", "head_tail") if found[k]["positions"] != found["segment"]["positions"])
    doctored = {**record, "strategies": {**found, "segment": other}}
    ctx = MergeContext(torch.device("cpu"), precomputed={"alignment": doctored})  # no data: no CKA pass possible
    build_method("hetero", {**params, "strategy": "segment", "reset_bn": False, "lam": 0.0})(models, ctx)
    assert ctx.notes["positions"] == other["positions"] and ctx.notes["alignment_score"] == other["score"]


def test_a_precomputed_alignment_of_other_models_is_refused(aligned_pair):
    models, _, data, record = aligned_pair
    method = build_method("hetero")
    cases = [
        ({**record, "deep_model": 1 - record["deep_model"]}, r"deep_model \d \(the models': \d\); compute it again"),
        ({**record, "shallow_blocks": [1, 1, 1]}, r"not of these models: shallow_blocks \[1, 1, 1\] \(the models': \["),
        ({**record, "kind": "landscape"}, r"precomputed\['alignment'\] is a 'landscape' record"),
    ]
    for bad, match in cases:
        ctx = MergeContext(torch.device("cpu"), lambda: iter(data), precomputed={"alignment": bad})
        with pytest.raises(MergeError, match=match):
            method(models, ctx)


def test_a_strategy_the_record_could_not_align_is_refused_with_its_reason(aligned_pair):
    models, _, data, record = aligned_pair
    failed = {**record, "strategies": {**record["strategies"], "uniform": {"error": "colliding positions [0, 2, 2]"}}}
    ctx = MergeContext(torch.device("cpu"), lambda: iter(data), precomputed={"alignment": failed})
    with pytest.raises(MergeError, match=r"'hetero', strategy 'uniform': colliding positions \[0, 2, 2\]"):
        build_method("hetero", {"strategy": "uniform"})(models, ctx)
