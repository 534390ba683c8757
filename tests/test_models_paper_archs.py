"""The Neuron Interpolation paper's networks (algorithms.md §5.2) as options of the existing families.

VGG11 without BatchNorm, the 784-256-classes MLP and the paper's ViT (GELU after both MLP linears, attention
scaled by 1/√width): their structure, that every feature-space description keeps the function under random
permutations, and that the observation points see the tensors the neuron-level methods expect.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_models import assert_permutations_keep_the_function, randomize_norms
from torch import nn

from hetmerge.models import build_from_description, build_model
from hetmerge.models.vgg import CONFIGS
from hetmerge.observe import activations, as_rows

HEAD = {"all": 10}
PAPER_VGG = {"depth": 11, "batch_norm": False}
PAPER_MLP = {"hidden": [256], "batch_norm": False}
PAPER_VIT = {
    "patch": 4,
    "depth": 7,
    "width": 384,
    "heads": 12,
    "mlp_ratio": 1.0,
    "pool": "cls",
    "mlp_out_act": True,
    "attn_scale": "width",
}
TINY_VIT = {"patch": 4, "depth": 2, "width": 24, "heads": 12, "mlp_ratio": 1.0}
TINY_PAPER_VIT = {**PAPER_VIT, "depth": 2, "width": 24}
CASES = [
    pytest.param("vgg", {**PAPER_VGG, "width": 0.125}, (3, 32, 32), id="vgg11-nobn-32"),
    pytest.param("vgg", {**PAPER_VGG, "width": 0.125}, (1, 28, 28), id="vgg11-nobn-28"),
    pytest.param("mlp", PAPER_MLP, (1, 28, 28), id="mlp-256"),
    pytest.param("vit", TINY_VIT, (3, 32, 32), id="vit-tiny-default-flags"),
    pytest.param("vit", TINY_PAPER_VIT, (3, 32, 32), id="vit-tiny-paper-flags-32"),
    pytest.param("vit", {**TINY_PAPER_VIT, "heads": 4}, (1, 28, 28), id="vit-tiny-paper-flags-28"),
]


@torch.no_grad()
def build(family, spec, shape, randomize_bn, seed=0):
    """A seeded network with random LayerNorm affines and non-zero biases (VGG zero-initialises its conv
    biases), so a description that forgot to permute one of them would change the function."""
    torch.manual_seed(seed)
    model = randomize_norms(build_model(family, spec, shape, HEAD), randomize_bn, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _wb(layer: nn.Linear | nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's (weight, bias), the trailing arguments of F.linear / F.conv2d."""
    return layer.weight, layer.bias


def test_paper_vgg11_is_vgg11_without_batchnorm_with_conv_biases(make_model):
    """[64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M], 3×3 convs with bias, ReLU, no BN, then
    Linear(512 → classes) on a 1×1 map (our global average pool over 1×1 = the paper's Flatten)."""
    for shape in ((3, 32, 32), (1, 28, 28)):
        model = make_model("vgg", PAPER_VGG, HEAD, shape).eval()
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert [c.out_channels for c in convs] == [c for c in CONFIGS[11] if c != "M"]
        assert all(c.bias is not None and c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
        assert all(isinstance(model.body.get_submodule(f"conv{k}").act, nn.ReLU) for k in range(8))
        assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
        pre_gap = model.run_body(torch.randn(1, *shape), 0, len(model.body) - 1)
        assert pre_gap.shape == (1, 512, 1, 1)
        assert (model.heads.all.in_features, model.heads.all.out_features) == (512, 10)
        assert model.describe()["spec"] == {"depth": 11, "width": 1.0, "batch_norm": False}


def test_paper_mlp_is_784_256_classes_without_batchnorm(make_model):
    model = make_model("mlp", PAPER_MLP, HEAD, (1, 28, 28))
    assert list(model.body._modules) == ["flatten", "fc0"]
    assert list(model.body.fc0._modules) == ["linear", "act"]
    linear = model.body.fc0.linear
    assert (linear.in_features, linear.out_features, linear.bias is not None) == (784, 256, True)
    assert isinstance(model.body.fc0.act, nn.ReLU)
    assert (model.heads.all.in_features, model.heads.all.out_features) == (256, 10)
    assert model.describe()["spec"] == {"hidden": [256], "batch_norm": False}


@pytest.mark.parametrize(("shape", "tokens"), [((3, 32, 32), 65), ((1, 28, 28), 50)])
def test_paper_vit_structure(shape, tokens, make_model):
    """384 wide, 12 heads, 7 pre-norm blocks, MLP hidden 384 with GELU after both linears, scores / √384;
    4×4 patches give an 8×8 grid on CIFAR (65 tokens with the class token) and 7×7 on 28×28 inputs."""
    model = make_model("vit", PAPER_VIT, HEAD, shape).eval()
    blocks = [model.body.get_submodule(f"block{k}") for k in range(7)]
    assert list(model.body._modules) == ["embed", *(f"block{k}" for k in range(7)), "norm", "pool"]
    assert model.body.embed.pos_embed.shape == (1, tokens, 384)
    for block in blocks:
        assert list(block.mlp._modules) == ["fc1", "act", "fc2", "act2"]
        assert block.mlp.fc1.out_features == 384
        assert isinstance(block.mlp.act, nn.GELU) and isinstance(block.mlp.act2, nn.GELU)
        assert block.attn.heads == 12
        assert block.attn.scale == pytest.approx(384**-0.5)
    assert model.run_body(torch.randn(1, *shape), 0, len(model.body) - 1).shape == (1, tokens, 384)
    graph = model.space_graph()
    assert {s.name: s.act for s in graph.spaces if s.name.startswith("block0") or s.name == "stream"} == {
        "stream": None,
        "block0.qk": None,
        "block0.vo": None,
        "block0.mlp": "body.block0.mlp.act",
    }


def test_vit_patch_must_divide_28():
    with pytest.raises(ValueError, match="'patch'"):
        build_model("vit", {**TINY_PAPER_VIT, "patch": 8}, (1, 28, 28), HEAD)


def test_default_vit_describes_itself_as_before(make_model):
    """The new fields at their defaults are left out, so stored metadata and training fingerprints still match."""
    model = make_model("vit", {}, HEAD, (1, 28, 28))
    explicit = make_model("vit", {"mlp_out_act": False, "attn_scale": "head"}, HEAD, (1, 28, 28))
    before = {"patch": 7, "depth": 4, "width": 64, "heads": 4, "mlp_ratio": 2.0, "pool": "cls"}
    assert model.describe()["spec"] == before
    assert explicit.describe() == model.describe()
    assert list(model.body.block0.mlp._modules) == ["fc1", "act", "fc2"]
    assert model.body.block0.attn.scale == (64 // 4) ** -0.5
    assert all(torch.equal(v, explicit.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("extra", "described"),
    [
        ({"attn_scale": "width"}, {"attn_scale": "width"}),
        ({"mlp_out_act": True}, {"mlp_out_act": True}),
        ({"mlp_out_act": True, "attn_scale": "width"}, {"mlp_out_act": True, "attn_scale": "width"}),
    ],
)
def test_vit_options_are_described_and_rebuilt(extra, described, make_model):
    model = make_model("vit", {**TINY_VIT, **extra}, HEAD, (3, 32, 32))
    assert model.describe()["spec"] == {**TINY_VIT, "pool": "cls", **described}
    again = build_from_description(model.describe())
    assert again.spec == model.spec
    assert list(again.body.block0.mlp._modules) == list(model.body.block0.mlp._modules)


@pytest.mark.parametrize(("family", "spec", "shape"), CASES)
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_permuting_every_space_keeps_the_function(family, spec, shape, seed, randomize_bn):
    assert_permutations_keep_the_function(build(family, spec, shape, randomize_bn, seed % 1000), seed)


def test_permuting_only_the_stream_writes_of_the_paper_mlp_changes_the_function(randomize_bn):
    """Guards the test above for `mlp_out_act`: fc2 (through act2) writes the stream, so its rows must move."""
    model = build("vit", TINY_PAPER_VIT, (3, 32, 32), randomize_bn)
    state = dict(model.state_dict())
    roll = torch.arange(24).roll(1)
    for param in ("body.block0.mlp.fc2.weight", "body.block0.mlp.fc2.bias"):
        state[param] = state[param][roll]
    broken = build_model("vit", TINY_PAPER_VIT, (3, 32, 32), HEAD).eval()
    broken.load_state_dict(state)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(broken(x)["all"], model(x)["all"], atol=1e-3)


@pytest.mark.parametrize(("scale", "c"), [("width", 1 / 2), ("head", 1 / math.sqrt(2))])
def test_attention_scale_by_hand(scale, c):
    """Width 4, 2 heads, q = k = v = proj = identity on tokens x0 = [2, 0, 1, 0], x1 = [0, 2, 0, 0].

    Head 0 (units 0, 1) has scores [[4, 0], [0, 4]], head 1 (units 2, 3) [[1, 0], [0, 0]]; times c = 1/√width
    or 1/√head_dim, the softmax rows are sigmoids: token 0 gets [2σ(4c), 2σ(-4c), σ(c), 0] and token 1
    [2σ(-4c), 2σ(4c), 1/2, 0].
    """
    model = build_model("vit", {"patch": 1, "depth": 1, "width": 4, "heads": 2, "attn_scale": scale}, (1, 1, 2), HEAD)
    attn = model.body.block0.attn
    with torch.no_grad():
        for layer in (attn.q, attn.k, attn.v, attn.proj):
            layer.weight.copy_(torch.eye(4))
            layer.bias.zero_()
        out = attn(torch.tensor([[[2.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]]]))
    s = torch.sigmoid(torch.tensor([4 * c, -4 * c, c]))
    expected = torch.tensor([[[2 * s[0], 2 * s[1], s[2], 0.0], [2 * s[1], 2 * s[0], 0.5, 0.0]]])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("out_act", [False, True])
def test_mlp_out_act_applies_gelu_after_fc2(out_act, make_model):
    model = make_model("vit", {**TINY_VIT, "mlp_out_act": out_act}, HEAD, (3, 32, 32)).eval()
    block = model.body.block0
    x = torch.randn(2, 65, 24)
    with torch.no_grad():
        hidden = F.gelu(F.linear(F.layer_norm(x, (24,), block.norm2.weight, block.norm2.bias), *_wb(block.mlp.fc1)))
        branch = F.linear(hidden, *_wb(block.mlp.fc2))
        expected = F.gelu(branch) if out_act else branch
        torch.testing.assert_close(block.mlp(block.norm2(x)), expected)
        stream = x + block.attn(block.norm1(x))
        torch.testing.assert_close(block(x), stream + block.mlp(block.norm2(stream)))


def test_mlp_observation_points_by_hand(randomize_bn):
    model = build("mlp", PAPER_MLP, (1, 28, 28), randomize_bn)
    x = torch.randn(5, 1, 28, 28)
    spaces = model.space_graph().spaces
    pre = F.linear(x.flatten(1), *_wb(model.body.fc0.linear))
    seen = {point: activations(model, spaces, [x[:2], x[2:]], point)["fc0"] for point in ("pre", "post", "input")}
    torch.testing.assert_close(seen["pre"], pre)
    torch.testing.assert_close(seen["post"], pre.relu())
    torch.testing.assert_close(seen["input"], pre.relu())  # the head reads the ReLU output


def test_vgg_observation_points_by_hand(randomize_bn):
    """Pre = each conv's output (no BN), input = what the next conv (or the head, after the pools and the
    global average) receives; rows are samples then positions."""
    model = build("vgg", {**PAPER_VGG, "width": 0.125}, (3, 32, 32), randomize_bn)
    x = torch.randn(3, 3, 32, 32)
    graph = model.space_graph()
    got = {point: activations(model, graph.spaces, [x], point) for point in ("pre", "input")}
    h, pres, inputs = x, [], []
    for item in CONFIGS[11]:
        if item == "M":
            h = F.max_pool2d(h, 2, ceil_mode=True)
            continue
        if pres:
            inputs.append(h)
        h = F.conv2d(h, *_wb(model.body.get_submodule(f"conv{len(pres)}").conv), padding=1)
        pres.append(h)
        h = h.relu()
    inputs.append(h.mean(dim=(2, 3)))
    assert [s.name for s in graph.spaces] == [f"conv{k}" for k in range(8)]
    for space, pre, inp in zip(graph.spaces, pres, inputs, strict=True):
        torch.testing.assert_close(got["pre"][space.name], as_rows(pre, 1), msg=space.name)
        torch.testing.assert_close(got["input"][space.name], as_rows(inp, 1), msg=space.name)


def test_paper_vit_observation_points(randomize_bn):
    """Token spaces give one row per image and token. The MLP space's pre is fc1's output and its post the GELU
    of it; the head spaces and the stream have no nonlinearity (pre = post). The stream's input point is its
    first consumer's (block 0's query map's) input, the normalised embedding; the query/key space has no consumer
    layer, so its input point is refused by name."""
    model = build("vit", TINY_PAPER_VIT, (3, 32, 32), randomize_bn)
    x = torch.randn(3, 3, 32, 32)
    graph = model.space_graph()
    got = {point: activations(model, graph.spaces, [x], point) for point in ("pre", "post")}
    assert {name: t.shape for name, t in got["pre"].items()} == {name: (3 * 65, 24) for name in graph.names}
    for space in graph.spaces:
        if space.act is None:
            assert torch.equal(got["pre"][space.name], got["post"][space.name]), space.name
    with torch.no_grad():
        tokens = model.body.embed(x)
        block = model.body.block0
        stream = tokens + block.attn(block.norm1(tokens))
        normed = F.layer_norm(stream, (24,), block.norm2.weight, block.norm2.bias)
        fc1 = F.linear(normed, *_wb(block.mlp.fc1))
    torch.testing.assert_close(got["pre"]["block0.mlp"], as_rows(fc1, -1))
    torch.testing.assert_close(got["post"]["block0.mlp"], as_rows(F.gelu(fc1), -1))
    inputs = activations(model, [graph["stream"], graph["block0.vo"], graph["block1.mlp"]], [x], "input")
    norm1 = F.layer_norm(tokens, (24,), block.norm1.weight, block.norm1.bias)
    torch.testing.assert_close(inputs["stream"], as_rows(norm1, -1))
    torch.testing.assert_close(inputs["block0.vo"], got["post"]["block0.vo"])  # proj reads the mixed heads
    torch.testing.assert_close(inputs["block1.mlp"], got["post"]["block1.mlp"])  # fc2 reads the first GELU
    with pytest.raises(ValueError, match=r"'block0\.qk'"):
        activations(model, [graph["block0.qk"]], [x], "input")
