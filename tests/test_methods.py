"""Merge methods: registry errors, what a configured method declares to the pipeline, weight averaging,
ensembles, model-count checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hetmerge.batchnorm import reset_batchnorm
from hetmerge.merged import MergedModel
from hetmerge.methods import (
    ANALYSES,
    PRECOMPUTE,
    REGISTRY,
    Choice,
    MergeContext,
    MergeError,
    build_method,
    first_best,
    register,
)
from hetmerge.methods.average import Average
from hetmerge.params import ParameterError
from hetmerge.statistics import SpaceStats, collect_statistics

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


# Per configured method: the analyses it offers, in order.
ANALYSES_OF = [
    ("average", {}, ("landscape",)),
    ("permute", {}, ("landscape",)),
    ("weight_matching", {}, ("landscape",)),
    ("zipit", {}, ("landscape",)),
    ("zipit", {"stop_after": "conv3"}, ("partial_zip",)),
    ("mudsc", {"lam": 0.5}, ("landscape",)),
    ("mudsc", {"solver": "align", "lam": 0.0}, ("landscape",)),
    ("mudsc", {}, ("lambda_curve", "landscape")),
    ("hetero", {}, ("alignment",)),
    ("hetero", {"strategy": "layer", "lam": 0.5}, ("alignment",)),
    ("ensemble", {}, ()),
    ("otfusion", {}, ("landscape",)),
    ("hf", {}, ("landscape",)),
    ("kf", {}, ("landscape",)),
    ("kf_gradient", {}, ("landscape",)),
    ("last_layer_kd", {}, ("landscape",)),
    ("regmean", {}, ("landscape",)),
    ("regmean", {"align": "zipit"}, ("landscape",)),
    ("distill", {}, ("landscape",)),
    ("fs_merge", {}, ("landscape",)),
]


def test_every_method_declares_its_analyses():
    assert {name for name, _, _ in ANALYSES_OF} == set(REGISTRY)
    for name, params, expected in ANALYSES_OF:
        assert build_method(name, params).analyses() == expected, (name, params)
        assert set(expected) <= set(ANALYSES)


def test_only_a_method_that_chooses_a_parameter_declares_a_choice():
    choosing = {(name, str(params)) for name, params, _ in ANALYSES_OF if build_method(name, params).choice()}
    assert choosing == {("mudsc", "{}")}


def test_precomputed_inputs_and_prediction_scoring_are_declared():
    declared = {name: cls.precomputed for name, cls in REGISTRY.items() if cls.precomputed}
    assert declared == {"hetero": ("alignment",)}
    assert all(p in PRECOMPUTE for inputs in declared.values() for p in inputs)
    assert [name for name, cls in REGISTRY.items() if cls.scored_from_predictions] == ["ensemble"]


def test_registering_unknown_analyses_or_uncomputed_inputs_is_refused():
    class Offers(Average):
        name = "offers_a_table"
        offers = ("landscape", "table")

    class Reads(Average):
        name = "reads_a_forecast"
        precomputed = ("forecast",)

    with pytest.raises(ValueError, match=r"'offers_a_table' offers unknown analyses \['table'\]; known: \['partial"):
        register(Offers)
    with pytest.raises(ValueError, match=r"'reads_a_forecast' reads precomputed inputs \['forecast'\] that nothing"):
        register(Reads)
    assert not {"offers_a_table", "reads_a_forecast"} & set(REGISTRY)


def test_a_precomputed_input_the_method_does_not_read_is_refused(pair, cpu, batches):
    ctx = MergeContext(cpu, batches, precomputed={"alignment": {}, "forecast": 1})
    with pytest.raises(MergeError, match=r"'average' reads no precomputed input\(s\) \['alignment', 'forecast'\]; "):
        build_method("average")(list(pair), ctx)


@given(st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), min_size=1, max_size=8))
def test_first_best_is_the_first_of_the_highest_scores(scores):
    best = first_best(scores)
    assert scores[best] == max(scores) and all(s < scores[best] for s in scores[:best])


def test_first_best_refuses_nothing_and_nan():
    with pytest.raises(ValueError, match="no scores"):
        first_best([])
    with pytest.raises(ValueError, match=r"not finite: \[nan\]"):
        first_best([0.5, math.nan])


@given(
    st.dictionaries(st.sampled_from([0.1, 0.2, 0.3, 0.5, 0.9]), st.sampled_from([0.0, 0.5, 1.0]), min_size=1),
    st.dictionaries(st.sampled_from([0.0, 0.4, 1.0]), st.floats(0, 2)),
)
def test_choose_picks_among_the_grid_only(grid_scores, outside):
    """A figure's values outside the grid are scored too, but never chosen, however well they score."""
    choice = Choice("lam", tuple(grid_scores))
    chosen = choice.choose({**outside, **grid_scores})
    assert chosen in grid_scores and chosen == choice.grid[first_best(list(grid_scores.values()))]


def test_choose_needs_a_score_for_every_grid_value():
    with pytest.raises(ValueError, match=r"choosing 'lam': no merge-slice score for grid value\(s\) \[0.3\]"):
        Choice("lam", (0.1, 0.3)).choose({0.1: 0.5, 0.9: 0.7})


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
    with pytest.raises(MergeError, match=f"method '{method}' merges 2 or more models, but got 1"):
        build_method(method, {"reset_bn": False})([pair[0]], ctx)


# Per method: parameters under which it would merge two tiny MLPs (so only the checks under test stop it).
MLP_PARAMS = {
    "average": {},
    "ensemble": {},
    "permute": {},
    "weight_matching": {},
    "zipit": {},
    "mudsc": {"lam": 0.5, "max_sweeps": 2},
    "hetero": {},
    "otfusion": {},
    "hf": {},
    "kf": {"restarts": 1},
    "kf_gradient": {"epochs": 1, "head_epochs": 1},
    "last_layer_kd": {"epochs": 1},
    "regmean": {},
    "distill": {"epochs": 1},
    "fs_merge": {"epochs": 1, "rank": 2},
}


def test_every_method_is_covered_by_the_input_checks():
    assert set(MLP_PARAMS) == set(REGISTRY)


@pytest.mark.parametrize("method", sorted(MLP_PARAMS))
def test_a_head_name_with_two_class_counts_is_refused(method, make_model, ctx):
    """Heads are joined by name: head 'A' with 5 outputs in one model and 3 in another used to crash in stack."""
    a = make_model("mlp", {"hidden": [8]}, {"A": 5}, seed=1)
    b = make_model("mlp", {"hidden": [8]}, {"A": 3, "B": 2}, seed=2)
    with pytest.raises(MergeError, match=rf"'{method}': head 'A' has 5 classes in model 0 but 3 in model 1"):
        build_method(method, MLP_PARAMS[method])([a, b], ctx)


@pytest.mark.parametrize("method", sorted(MLP_PARAMS))
def test_models_of_different_input_shapes_are_refused(method, make_model, ctx):
    a = make_model("mlp", {"hidden": [8]}, {"A": 5}, input_shape=(1, 8, 8))
    b = make_model("mlp", {"hidden": [8]}, {"B": 5}, input_shape=(1, 28, 28))
    with pytest.raises(MergeError, match=rf"'{method}': model 0 takes inputs of shape \(1, 8, 8\) but model 1 takes "):
        build_method(method, MLP_PARAMS[method])([a, b], ctx)


@pytest.mark.parametrize("method", sorted(MLP_PARAMS))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_model_is_refused(method, value, make_model, ctx):
    """Average used to return a model answering NaN; zipit and mudsc failed with "symmetrise the matrix"."""
    # same-task methods take models of one head and (HF, KF) no BatchNorm; the others models of two tasks
    same_task = REGISTRY[method].same_task
    spec = {"hidden": [8], "batch_norm": not same_task}
    a = make_model("mlp", spec, {"A": 5}, seed=1)
    b = make_model("mlp", spec, {"A" if same_task else "B": 5}, seed=2)
    with torch.no_grad():
        b.body.fc0.linear.weight[3, 2] = value
    with pytest.raises(MergeError, match=rf"'{method}': model 1 holds NaN or inf in \['body\.fc0\.linear\.weight'\]"):
        build_method(method, MLP_PARAMS[method])([a, b], ctx)


def test_a_merge_that_overflows_is_refused_naming_the_tensor(make_model, ctx):
    """Finite models whose mean overflows float32: the merged weight is inf, and no model comes back."""
    a = make_model("mlp", {"hidden": [8]}, {"A": 5}, seed=1)
    b = make_model("mlp", {"hidden": [8]}, {"B": 5}, seed=2)
    with torch.no_grad():
        for model in (a, b):
            model.body.fc0.norm.bias.fill_(3e38)
    with pytest.raises(
        MergeError, match=r"'average': the merged model holds NaN or inf in \[.trunk\.body\.fc0\.norm\.bias.\]"
    ):
        build_method("average", {"reset_bn": False})([a, b], ctx)


def test_nan_after_the_batchnorm_reset_is_refused(pair, cpu):
    """NaN in the merge data reaches the merged BatchNorm statistics: refused, pointing at the data."""
    data = [torch.full((4, 1, 8, 8), float("nan"))]
    ctx = MergeContext(device=cpu, batches=lambda: iter(data))
    with pytest.raises(MergeError, match=r"'average': the merged model holds NaN or inf in .*running_mean.*merge data"):
        build_method("average")(list(pair), ctx)


@pytest.mark.parametrize("method", ["zipit", "permute", "mudsc"])
def test_given_statistics_with_nan_are_refused_naming_the_space(method, pair, ctx):
    stats = {
        name: SpaceStats(s.widths, s.mean, s.cov.clone(), s.count)
        for name, s in collect_statistics(list(pair), ctx.batches()).items()
    }
    stats["conv2"].cov[1, 0] = float("nan")
    ctx.stats = stats
    with pytest.raises(MergeError, match=r"statistics of feature space\(s\) \['conv2'\] hold NaN or inf"):
        build_method(method, {"lam": 0.5, "max_sweeps": 2} if method == "mudsc" else {})(list(pair), ctx)
