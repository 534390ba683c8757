"""Architectures: feature-space descriptions agree with the tensors, permutations keep the function, cuts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetmerge.models import build_model
from hetmerge.params import ParameterError
from hetmerge.spaces import permute_state

SPECS = [
    ("mlp", {"hidden": [16, 8]}),
    ("mlp", {"hidden": [12], "batch_norm": False}),
    ("vgg", {"depth": 11, "width": 0.125}),
    ("vgg", {"depth": 13, "width": 0.25, "batch_norm": False}),
    ("resnet", {"depth": 20, "width": 0.25}),
    ("resnet", {"depth": 26, "width": 0.125}),
]
SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
HEADS = {"A": 3, "B": 4}
CASES = [
    pytest.param(family, spec, shape, id=f"{family}-{'-'.join(map(str, spec.values()))}-{'x'.join(map(str, shape))}")
    for family, spec in SPECS
    for shape in SHAPES
]


def build(family, spec, shape, randomize_bn, seed=0):
    torch.manual_seed(seed)
    return randomize_bn(build_model(family, spec, shape, HEADS), seed).eval()


@pytest.mark.parametrize(("family", "spec", "shape"), CASES)
def test_space_graph_matches_tensors_and_activations(family, spec, shape, randomize_bn):
    model = build(family, spec, shape, randomize_bn)
    graph = model.space_graph()
    graph.check_against(model.state_dict())

    # Every cut's space has the width of the activation actually flowing there.
    assert len(graph.cuts) == len(model.body) + 1
    x = torch.randn(2, *shape)
    for k, name in enumerate(graph.cuts):
        if name is not None:
            assert model.run_body(x, 0, k).shape[1] == graph[name].width, (k, name)

    # Every space's `observe` module outputs that space's units on dim 1.
    seen = {}
    hooks = [
        model.get_submodule(s.observe).register_forward_hook(lambda m, i, o, n=s.name: seen.__setitem__(n, o.shape[1]))
        for s in graph.spaces
    ]
    model(x)
    for h in hooks:
        h.remove()
    assert seen == {s.name: s.width for s in graph.spaces}


@pytest.mark.parametrize(("family", "spec", "shape"), CASES)
def test_space_graph_leaves_nothing_out(family, spec, shape, make_model):
    """Every unit axis of every float tensor belongs to a space, except the raw input and the head outputs."""
    model = make_model(family, spec, HEADS, shape)
    state = model.state_dict()
    covered = {(ref.param, ref.axis) for space in model.space_graph().spaces for ref in space.axes()}
    first_weight = next(k for k, v in state.items() if v.dim() >= 2)
    exempt = {(first_weight, 1)} | {(f"heads.{t}.{p}", 0) for t in HEADS for p in ("weight", "bias")}
    missing = [
        (key, axis)
        for key, tensor in state.items()
        if tensor.is_floating_point()
        for axis in range(min(tensor.dim(), 2))
        if (key, axis) not in covered and (key, axis) not in exempt
    ]
    assert missing == []
    assert not covered & exempt


@pytest.mark.parametrize(("family", "spec", "shape"), CASES)
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_permuting_every_space_keeps_the_function(family, spec, shape, seed, randomize_bn):
    model = build(family, spec, shape, randomize_bn, seed % 1000)
    graph = model.space_graph()
    gen = torch.Generator().manual_seed(seed)
    perms = {s.name: torch.randperm(s.width, generator=gen) for s in graph.spaces}
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values()), "all permutations trivial"
    permuted = build_model(family, spec, shape, HEADS).eval()
    permuted.load_state_dict(permute_state(model.state_dict(), graph, perms))
    x = torch.randn(4, *shape, generator=gen)
    with torch.no_grad():
        expected, got = model(x), permuted(x)
    assert set(got) == set(HEADS)
    for task in HEADS:
        torch.testing.assert_close(got[task], expected[task], atol=1e-5, rtol=1e-4)


def test_permutation_of_one_space_alone_changes_the_function(make_model, randomize_bn):
    """Guards the test above: permuting only the producers of a space must break the network."""
    model = randomize_bn(make_model("mlp", {"hidden": [16, 8]}, HEADS)).eval()
    state = model.state_dict()
    broken = dict(state)
    perm = torch.roll(torch.arange(16), 1)
    for ref in model.space_graph()["fc0"].producers:
        broken[ref.param] = state[ref.param].index_select(ref.axis, perm)
    other = make_model("mlp", {"hidden": [16, 8]}, HEADS).eval()
    other.load_state_dict(broken)
    x = torch.randn(4, 1, 8, 8)
    assert not torch.allclose(other(x)["A"], model(x)["A"], atol=1e-3)


@pytest.mark.parametrize(("family", "spec"), SPECS)
def test_every_cut_continues_to_the_same_output(family, spec, make_model, randomize_bn):
    model = randomize_bn(make_model(family, spec, HEADS, (3, 32, 32))).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        for k in range(len(model.body) + 1):
            out = model.forward_from(model.run_body(x, 0, k), k)
            for task in HEADS:
                torch.testing.assert_close(out[task], expected[task], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("family", "spec"), SPECS)
def test_two_heads_both_answer(family, spec, make_model):
    model = make_model(family, spec, {"B": 7, "A": 2}, (1, 28, 28)).eval()
    out = model(torch.randn(5, 1, 28, 28))
    assert {t: tuple(v.shape) for t, v in out.items()} == {"A": (5, 2), "B": (5, 7)}
    assert model.tasks == ("A", "B")
    assert model.describe()["heads"] == {"A": 2, "B": 7}


def test_resnet_depth_8_and_widths(make_model):
    model = make_model("resnet", {"depth": 8, "width": 0.25}, HEADS)
    assert [n for n in model.body._modules if n.startswith("s")] == ["stem", "s1b0", "s2b0", "s3b0"]
    assert model.feature_dim == 16  # 64 * 0.25


def test_unknown_family_names_it():
    with pytest.raises(ValueError, match=r"'resnext'.*known.*'mlp'"):
        build_model("resnext", {}, (1, 8, 8), HEADS)


def test_unknown_family_is_a_parameter_error():
    with pytest.raises(ParameterError):
        build_model("resnext", {}, (1, 8, 8), HEADS)


@pytest.mark.parametrize(
    ("family", "spec", "key"),
    [
        ("mlp", {"hiden": [16]}, "hiden"),
        ("resnet", {"depth": 20, "widht": 0.5}, "widht"),
        ("mlp", {"hidden": 16}, "hidden"),
        ("mlp", {"hidden": [16.5]}, "hidden"),
        ("mlp", {"batch_norm": "yes"}, "batch_norm"),
        ("vgg", {"depth": 12}, "depth"),
        ("resnet", {"width": "half"}, "width"),
        ("resnet", {"depth": 20.0}, "depth"),
    ],
)
def test_bad_spec_names_the_key(family, spec, key):
    with pytest.raises(ParameterError, match=f"architecture '{family}'.*'{key}'") as info:
        build_model(family, spec, (1, 8, 8), HEADS)
    if "known parameters" in str(info.value):  # unknown keys also list the valid ones
        assert "'depth'" in str(info.value) or "'hidden'" in str(info.value)


@pytest.mark.parametrize(
    ("family", "spec", "match"),
    [("resnet", {"depth": 21}, "6n\\+2"), ("resnet", {"depth": 2}, "6n\\+2"), ("mlp", {"hidden": []}, "hidden")],
)
def test_invalid_spec_values(family, spec, match):
    with pytest.raises(ValueError, match=match):
        build_model(family, spec, (1, 8, 8), HEADS)


def test_model_needs_a_head():
    with pytest.raises(ValueError, match="head"):
        build_model("mlp", {}, (1, 8, 8), {})
