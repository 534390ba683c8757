"""Merge methods: registry errors, weight averaging, ensembles, model-count checks."""

from __future__ import annotations

import copy

import pytest
import torch

from hetmerge.batchnorm import reset_batchnorm
from hetmerge.merged import MergedModel
from hetmerge.methods import REGISTRY, MergeContext, MergeError, build_method
from hetmerge.params import ParameterError

SPEC = {"depth": 11, "width": 0.0625}


@pytest.fixture
def ctx(cpu, batches):
    return MergeContext(device=cpu, batches=batches)


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(ParameterError, match=r"'nope'.*available methods: \[") as info:
        build_method("nope")
    assert {"average", "ensemble"} <= set(REGISTRY)
    assert all(repr(name) in str(info.value) for name in REGISTRY)


def test_unknown_parameter_lists_the_known_ones():
    with pytest.raises(ParameterError, match=r"method 'average'.*\['reset_bnn'\].*known parameters: \['reset_bn'\]"):
        build_method("average", {"reset_bnn": True})


@pytest.mark.parametrize("value", ["yes", 1, None, [True]])
def test_wrong_parameter_type_names_the_parameter(value):
    with pytest.raises(ParameterError, match=r"method 'ensemble', parameter 'reset_bn'.*true/false"):
        build_method("ensemble", {"reset_bn": value})


def test_method_defaults():
    assert build_method("average").params.reset_bn is True
    assert build_method("ensemble").params.reset_bn is False
    assert build_method("average", {"reset_bn": False}).params.reset_bn is False


def test_average_of_a_model_with_itself_is_the_same_function(pair, ctx):
    a, _ = pair
    merged = build_method("average", {"reset_bn": False})([a, copy.deepcopy(a)], ctx)
    assert isinstance(merged, MergedModel) and not merged.training
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(merged(x)["A"], a(x)["A"])


def test_average_with_bn_reset_equals_the_model_after_bn_reset(pair, ctx, batches):
    a, _ = pair
    merged = build_method("average", {"reset_bn": True})([a, copy.deepcopy(a)], ctx)
    expected = copy.deepcopy(a)
    assert reset_batchnorm(expected, batches()) == 8
    expected.eval()
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(merged(x)["A"], expected(x)["A"], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(merged(x)["A"], a(x)["A"], atol=1e-3)  # the reset did change something
    bn = merged.trunk.body.conv0.norm
    torch.testing.assert_close(bn.running_mean, expected.body.conv0.norm.running_mean)


def test_average_of_two_models_is_the_elementwise_mean(pair, ctx):
    a, b = pair
    merged = build_method("average", {"reset_bn": False})([a, b], ctx)
    state = merged.trunk.state_dict()
    key = "body.conv3.conv.weight"
    torch.testing.assert_close(state[key], (a.state_dict()[key] + b.state_dict()[key]) / 2, atol=0, rtol=0)
    w_a, w_b = a.state_dict()[key][0, 0, 0, 0].item(), b.state_dict()[key][0, 0, 0, 0].item()
    assert state[key][0, 0, 0, 0].item() == pytest.approx((w_a + w_b) / 2)
    key = "body.conv2.norm.running_var"
    torch.testing.assert_close(state[key], (a.state_dict()[key] + b.state_dict()[key]) / 2)
    # Heads are owned by their task's models and copied unchanged.
    assert torch.equal(state["heads.A.weight"], a.heads.A.weight)
    assert torch.equal(state["heads.B.bias"], b.heads.B.bias)
    assert set(merged(torch.randn(2, 1, 8, 8))) == {"A", "B"}


def test_merging_does_not_change_the_sources(pair, ctx):
    a, b = pair
    before = [copy.deepcopy(m.state_dict()) for m in pair]
    build_method("average", {"reset_bn": True})([a, b], ctx)
    for model, state in zip(pair, before, strict=True):
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_ensemble_with_bn_reset_does_not_change_the_sources(pair, ctx):
    a, b = pair
    before = [copy.deepcopy(m.state_dict()) for m in pair]
    build_method("ensemble", {"reset_bn": True})([a, b], ctx)
    for model, state in zip(pair, before, strict=True):
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_average_rejects_different_architectures_naming_both(make_model, ctx):
    a = make_model("mlp", {"hidden": [16]}, {"A": 5})
    b = make_model("mlp", {"hidden": [8]}, {"B": 5})
    with pytest.raises(MergeError, match=r"'average'.*model 0.*'hidden': \[16\].*model 1.*'hidden': \[8\]"):
        build_method("average", {"reset_bn": False})([a, b], ctx)
    c = make_model("vgg", SPEC, {"B": 5})
    with pytest.raises(MergeError, match=r"'family': 'mlp'.*'family': 'vgg'"):
        build_method("average", {"reset_bn": False})([a, c], ctx)


def test_average_needs_data_for_bn_reset(pair, cpu):
    with pytest.raises(MergeError, match=r"reset_bn.*no data"):
        build_method("average", {"reset_bn": True})(list(pair), MergeContext(device=cpu))


def test_ensemble_answers_each_task_with_its_own_model(pair, ctx):
    a, b = pair
    merged = build_method("ensemble")(list(pair), ctx)
    x = torch.randn(6, 1, 8, 8)
    out = merged(x)
    assert set(out) == {"A", "B"} and merged.tasks == ("A", "B")
    assert torch.equal(out["A"], a(x)["A"])
    assert torch.equal(out["B"], b(x)["B"])


def test_ensemble_of_three_models(make_model, ctx):
    models = [make_model("mlp", {"hidden": [8]}, {t: 3}, seed=i).eval() for i, t in enumerate("ABC")]
    models.append(make_model("resnet", {"depth": 8, "width": 0.125}, {"A": 3}, seed=9).eval())
    x = torch.randn(4, 1, 8, 8)
    out = build_method("ensemble")(models, ctx)(x)
    assert set(out) == {"A", "B", "C"}
    torch.testing.assert_close(out["A"], (models[0](x)["A"] + models[3](x)["A"]) / 2)
    assert torch.equal(out["C"], models[2](x)["C"])


@pytest.mark.parametrize("method", ["average", "ensemble"])
def test_a_single_model_is_not_a_merge(method, pair, ctx):
    with pytest.raises(MergeError, match=f"'{method}' merges at least 2.*got 1"):
        build_method(method, {"reset_bn": False})([pair[0]], ctx)
