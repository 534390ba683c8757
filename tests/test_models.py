"""Architectures: feature-space descriptions agree with the tensors, permutations keep the function, cuts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hetmerge.batchnorm import reset_batchnorm
from hetmerge.models import build_from_description, build_model
from hetmerge.params import ParameterError
from hetmerge.spaces import permute_state, random_permutations
from hetmerge.statistics import collect_statistics

SPECS = [
    ("mlp", {"hidden": [16, 8]}),
    ("mlp", {"hidden": [12], "batch_norm": False}),
    ("vgg", {"depth": 11, "width": 0.125}),
    ("vgg", {"depth": 13, "width": 0.25, "batch_norm": False}),
    ("vgg", {"depth": 13, "width": 0.0625, "variant": "stages"}),
    ("vgg", {"depth": 19, "width": 0.03125, "batch_norm": False, "variant": "stages"}),
    ("resnet", {"depth": 20, "width": 0.25}),
    ("resnet", {"depth": 26, "width": 0.125}),
    ("resnet", {"depth": 8, "width": 0.5, "norm": "group", "groups": 4}),
    ("vit", {"patch": 4, "depth": 2, "width": 16, "heads": 4}),
    ("vit", {"patch": 4, "depth": 1, "width": 12, "heads": 3, "mlp_ratio": 1.5, "pool": "mean"}),
]
VIT = {"patch": 4, "depth": 2, "width": 16, "heads": 4}
RESNET_GN = {"depth": 8, "width": 0.5, "norm": "group", "groups": 4}
SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
HEADS = {"A": 3, "B": 4}
CASES = [
    pytest.param(family, spec, shape, id=f"{family}-{'-'.join(map(str, spec.values()))}-{'x'.join(map(str, shape))}")
    for family, spec in SPECS
    for shape in SHAPES
]


@torch.no_grad()
def randomize_norms(model, randomize_bn, seed=0):
    """Non-trivial BatchNorm statistics and GroupNorm/LayerNorm affine vectors, so permuting them matters."""
    gen = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.GroupNorm | nn.LayerNorm):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
    return randomize_bn(model, seed)


def build(family, spec, shape, randomize_bn, seed=0):
    torch.manual_seed(seed)
    return randomize_norms(build_model(family, spec, shape, HEADS), randomize_bn, seed).eval()


def outputs_equal(a, b, x):
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return all(torch.allclose(ya[t], yb[t], atol=1e-4, rtol=1e-4) for t in HEADS)


@pytest.mark.parametrize(("family", "spec", "shape"), CASES)
def test_space_graph_matches_tensors_and_activations(family, spec, shape, randomize_bn):
    model = build(family, spec, shape, randomize_bn)
    graph = model.space_graph()
    graph.check_against(model.state_dict())

    # Every cut's space has the width of the activation actually flowing there (units on its `unit_dim`).
    assert len(graph.cuts) == len(model.body) + 1
    x = torch.randn(2, *shape)
    for k, name in enumerate(graph.cuts):
        if name is not None:
            assert model.run_body(x, 0, k).shape[graph[name].unit_dim] == graph[name].width, (k, name)

    # Every space's `observe` module outputs that space's units on dim `unit_dim`.
    seen = {}
    hooks = [
        model.get_submodule(s.observe).register_forward_hook(
            lambda m, i, o, s=s: seen.__setitem__(s.name, o.shape[s.unit_dim])
        )
        for s in graph.spaces
    ]
    model(x)
    for h in hooks:
        h.remove()
    assert seen == {s.name: s.width for s in graph.spaces}


@pytest.mark.parametrize(("family", "spec", "shape"), CASES)
def test_space_graph_leaves_nothing_out(family, spec, shape, make_model):
    """Every unit axis of every float tensor belongs to a space, except the raw input and the head outputs.

    Unit axes are a weight's output and input axes (0, 1), and the last axis of token-shaped (1, T, D)
    parameters (a ViT's class token and positions), whose other axes index nothing mergeable.
    """
    model = make_model(family, spec, HEADS, shape)
    state = model.state_dict()
    covered = {(ref.param, ref.axis) for space in model.space_graph().spaces for ref in space.axes()}
    first_weight = next(k for k, v in state.items() if v.dim() in (2, 4))  # the first Linear/Conv reads the input
    exempt = {(first_weight, 1)} | {(f"heads.{t}.{p}", 0) for t in HEADS for p in ("weight", "bias")}
    missing = [
        (key, axis)
        for key, tensor in state.items()
        if tensor.is_floating_point()
        for axis in ((2,) if tensor.dim() == 3 else range(min(tensor.dim(), 2)))
        if (key, axis) not in covered and (key, axis) not in exempt
    ]
    assert missing == []
    assert not covered & exempt


@pytest.mark.parametrize(("family", "spec", "shape"), CASES)
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_permuting_every_space_keeps_the_function(family, spec, shape, seed, randomize_bn):
    """Groups (heads, GroupNorm groups) move whole, linked spaces share their group order."""
    assert_permutations_keep_the_function(build(family, spec, shape, randomize_bn, seed % 1000), seed)


def assert_permutations_keep_the_function(model, seed):
    """A random function-preserving permutation of every space of `model` (a hetmerge net) changes no output."""
    graph = model.space_graph()
    graph.check_against(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    perms = random_permutations(graph, gen)
    assert set(perms) == set(graph.names)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values()), "all permutations trivial"
    permuted = build_from_description(model.describe()).eval()
    permuted.load_state_dict(permute_state(model.state_dict(), graph, perms))
    x = torch.randn(4, *model.input_shape, generator=gen)
    with torch.no_grad():
        expected, got = model(x), permuted(x)
    assert set(got) == set(model.heads)
    for task in model.heads:
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


def test_breaking_a_head_link_changes_the_function(randomize_bn):
    """Guards the invariance test for attention: query/key and value/output heads must move together."""
    model = build("vit", VIT, (1, 8, 8), randomize_bn)
    graph = model.space_graph()
    identity = {s.name: torch.arange(s.width) for s in graph.spaces}
    size = VIT["width"] // VIT["heads"]
    heads = torch.arange(VIT["width"]).view(VIT["heads"], size)
    rolled = heads.roll(1, dims=0).reshape(-1)
    x = torch.randn(4, 1, 8, 8)
    linked, broken = build_model("vit", VIT, (1, 8, 8), HEADS).eval(), build_model("vit", VIT, (1, 8, 8), HEADS).eval()
    linked.load_state_dict(
        permute_state(model.state_dict(), graph, identity | {"block0.qk": rolled, "block0.vo": rolled})
    )
    broken.load_state_dict(permute_state(model.state_dict(), graph, identity | {"block0.qk": rolled}))
    assert outputs_equal(model, linked, x)
    assert not outputs_equal(model, broken, x)


def test_moving_a_unit_across_groupnorm_groups_changes_the_function(randomize_bn):
    """Guards the invariance test for GroupNorm: moves inside a group keep the function, across groups do not."""
    model = build("resnet", RESNET_GN, (3, 8, 8), randomize_bn)
    graph = model.space_graph()
    assert {s.groups for s in graph.spaces} == {4}
    width = graph["stage1"].width  # 8 channels in 4 groups of 2
    inside, across = torch.arange(width), torch.arange(width)
    inside[[0, 1]] = inside[[1, 0]]
    across[[0, 2]] = across[[2, 0]]
    x = torch.randn(4, 3, 8, 8)
    for perm, same in ((inside, True), (across, False)):
        other = build_model("resnet", RESNET_GN, (3, 8, 8), HEADS).eval()
        other.load_state_dict(permute_state(model.state_dict(), graph, {"stage1": perm}))
        assert outputs_equal(model, other, x) is same


@pytest.mark.parametrize(("family", "spec"), [("vit", VIT), ("resnet", RESNET_GN)])
def test_statistics_of_two_models_cover_every_space(family, spec, randomize_bn):
    models = [build(family, spec, (3, 8, 8), randomize_bn, seed) for seed in (0, 1)]
    gen = torch.Generator().manual_seed(0)
    stats = collect_statistics(models, [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(2)])
    graph = models[0].space_graph()
    assert set(stats) == set(graph.names)
    for space in graph.spaces:
        s = stats[space.name]
        assert s.widths == (space.width, space.width)
        assert s.cov.shape == (2 * space.width, 2 * space.width)
        assert torch.isfinite(s.correlation()).all(), space.name
    if family == "vit":  # token spaces: one column per image and token (4 patches + the class token)
        assert {s.count for s in stats.values()} == {8 * 5}


@pytest.mark.parametrize(("family", "spec"), [("vit", VIT), ("resnet", RESNET_GN)])
def test_batch_independent_models_have_no_batchnorm_to_reset(family, spec, make_model):
    model = make_model(family, spec, HEADS, (3, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert reset_batchnorm(model, [torch.randn(2, 3, 8, 8)]) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_vit_tokens_and_pooling(make_model):
    cls = make_model("vit", {"patch": 7, "depth": 1, "width": 8, "heads": 2}, HEADS, (1, 28, 28))
    mean = make_model("vit", {"patch": 7, "depth": 1, "width": 8, "heads": 2, "pool": "mean"}, HEADS, (1, 28, 28))
    assert cls.body.embed.pos_embed.shape == (1, 17, 8)
    assert cls.body.embed.cls_token.shape == (1, 1, 8)
    assert mean.body.embed.pos_embed.shape == (1, 16, 8)
    assert "body.embed.cls_token" not in mean.state_dict()
    assert cls.body.block0.mlp.fc1.out_features == 16
    assert cls.run_body(torch.randn(3, 1, 28, 28), 0, 1).shape == (3, 17, 8)


@pytest.mark.parametrize(("family", "spec"), SPECS)
def test_every_cut_continues_to_the_same_output(family, spec, make_model, randomize_bn):
    model = randomize_norms(make_model(family, spec, HEADS, (3, 32, 32)), randomize_bn).eval()
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


@pytest.mark.parametrize("depth", [13, 19])
@pytest.mark.parametrize(("shape", "sizes"), [((1, 28, 28), [7, 2, 1]), ((3, 32, 32), [8, 2, 1])])
def test_vgg_stages_layout(depth, shape, sizes, make_model):
    """The heterogeneous-merging VGG: 3 stages of 4 (13) or 6 (19) convs, 128/256/512 × width, pools 4/4/2."""
    model = make_model("vgg", {"depth": depth, "width": 0.0625, "variant": "stages"}, HEADS, shape)
    n = {13: 4, 19: 6}[depth]
    convs = [f"conv{k}" for k in range(3 * n)]
    assert list(model.body._modules) == [
        *convs[:n],
        "pool0",
        *convs[n : 2 * n],
        "pool1",
        *convs[2 * n :],
        "pool2",
        "gap",
    ]
    assert model.depth_stages() == [convs[:n], convs[n : 2 * n], convs[2 * n :]]
    assert [model.body.get_submodule(c).conv.out_channels for c in convs] == [8] * n + [16] * n + [32] * n
    assert all(isinstance(model.body.get_submodule(c).norm, nn.BatchNorm2d) for c in convs)
    pools = [model.body.get_submodule(f"pool{k}") for k in range(3)]
    assert [(p.kernel_size, p.stride, p.ceil_mode) for p in pools] == [(4, 4, True), (4, 4, True), (2, 2, True)]
    x = torch.randn(2, *shape)
    for k, size in enumerate(sizes):
        cut = list(model.body._modules).index(f"pool{k}") + 1
        assert model.run_body(x, 0, cut).shape == (2, [8, 16, 32][k], size, size)
    assert model.feature_dim == 32
    assert model.describe()["spec"] == {"depth": depth, "width": 0.0625, "batch_norm": True, "variant": "stages"}
    again = build_from_description(model.describe())
    assert again.spec == model.spec
    assert [(k, v.shape) for k, v in again.state_dict().items()] == [
        (k, v.shape) for k, v in model.state_dict().items()
    ]


def test_vgg_standard_is_unchanged(make_model):
    """The default variant keeps its layout, tensor names and description (training fingerprints hash it)."""
    model = make_model("vgg", {"depth": 11, "width": 0.125}, HEADS, (3, 32, 32))
    explicit = make_model("vgg", {"depth": 11, "width": 0.125, "variant": "standard"}, HEADS, (3, 32, 32))
    assert list(model.body._modules) == [
        "conv0", "pool0", "conv1", "pool1", "conv2", "conv3", "pool2", "conv4", "conv5", "pool3", "conv6", "conv7",
        "pool4", "gap",
    ]  # fmt: skip
    assert list(model.state_dict())[:6] == [
        "body.conv0.conv.weight",
        "body.conv0.norm.weight",
        "body.conv0.norm.bias",
        "body.conv0.norm.running_mean",
        "body.conv0.norm.running_var",
        "body.conv0.norm.num_batches_tracked",
    ]
    assert all(torch.equal(v, explicit.state_dict()[k]) for k, v in model.state_dict().items())
    assert model.describe() == explicit.describe()
    assert model.describe()["spec"] == {"depth": 11, "width": 0.125, "batch_norm": True}
    assert model.depth_stages() == [["conv0"], ["conv1"], ["conv2", "conv3"], ["conv4", "conv5"], ["conv6", "conv7"]]


def test_resnet_depth_stages(make_model):
    model = make_model("resnet", {"depth": 14, "width": 0.25}, HEADS)
    assert model.depth_stages() == [["s1b0", "s1b1"], ["s2b0", "s2b1"], ["s3b0", "s3b1"]]


@pytest.mark.parametrize(("family", "spec"), [("mlp", {"hidden": [8]}), ("vit", VIT)])
def test_depth_stages_name_the_family_without_them(family, spec, make_model):
    with pytest.raises(NotImplementedError, match=f"'{family}'"):
        make_model(family, spec, HEADS).depth_stages()


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
        ("vgg", {"depth": 13, "variant": "deep"}, "variant"),
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
    [
        ("resnet", {"depth": 21}, "6n\\+2"),
        ("resnet", {"depth": 2}, "6n\\+2"),
        ("mlp", {"hidden": []}, "hidden"),
        ("resnet", {"width": 0.25, "norm": "group", "groups": 8}, "'groups'"),  # 4/8/16 channels
        ("resnet", {"norm": "group", "groups": 0}, "'groups'"),
        ("vit", {"width": 10, "heads": 4, "patch": 4}, "'width'.*'heads'"),
        ("vit", {"patch": 3}, "'patch'"),
        ("vit", {"patch": 4, "depth": 0}, "'depth'"),
        ("vgg", {"depth": 11, "variant": "stages"}, "'stages'.*13 or 19"),
        ("vgg", {"depth": 16, "variant": "stages"}, "'stages'.*13 or 19"),
    ],
)
def test_invalid_spec_values(family, spec, match):
    with pytest.raises(ValueError, match=match):
        build_model(family, spec, (1, 8, 8), HEADS)


def test_model_needs_a_head():
    with pytest.raises(ValueError, match="head"):
        build_model("mlp", {}, (1, 8, 8), {})
