"""OTFusion: exact recovery of permuted copies (acts and weights costs, residual streams, attention heads), widths
that differ, N = 3, entropic OT, importance marginals, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from hetmerge.methods import MergeContext, MergeError, build_method
from hetmerge.methods.otfusion import activation_distances, align_units, solve_transport
from hetmerge.models import build_model
from hetmerge.params import ParameterError
from hetmerge.spaces import permute_state, random_permutations

CPU = torch.device("cpu")
MLP = ("mlp", {"hidden": [6, 5], "batch_norm": False}, (1, 4, 4))
VGG = ("vgg", {"depth": 11, "width": 0.05, "batch_norm": False}, (3, 16, 16))
RESNET = ("resnet", {"depth": 8, "width": 0.5}, (3, 8, 8))
VIT = ("vit", {"patch": 4, "depth": 2, "width": 8, "heads": 2}, (3, 8, 8))


def make(arch, seed=0, heads=None):
    family, spec, shape = arch
    torch.manual_seed(seed)
    model = build_model(family, spec, shape, heads or {"all": 3}).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # BatchNorm that is not the identity, so its vectors must travel with their units
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=gen))
                m.bias.copy_(torch.randn(m.num_features, generator=gen))
    return model


def permuted(model, seed):
    graph = model.space_graph()
    perms = random_permutations(graph, torch.Generator().manual_seed(seed))
    copied = copy.deepcopy(model)
    copied.load_state_dict(permute_state(model.state_dict(), graph, perms))
    return copied, perms


def context(arch, n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *arch[2], generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    half = n // 2
    return MergeContext(
        CPU,
        batches=lambda: iter([x[:half], x[half:]]),
        labelled=lambda: iter([(x[:half], y[:half]), (x[half:], y[half:])]),
    ), x


def assert_same(fused, model, x, atol=1e-5):
    """The fused network (a merge or a plain network) is `model`: every tensor and the logits."""
    state = getattr(fused, "trunk", fused).state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(state[key].float(), value.float(), atol=atol, rtol=0, msg=key)
    torch.testing.assert_close(fused(x)["all"], model(x)["all"], atol=atol, rtol=0)


@pytest.mark.parametrize("arch", [MLP, VGG], ids=["mlp", "vgg"])
@pytest.mark.parametrize("cost", ["acts", "weights"])
def test_permuted_copy_is_recovered(arch, cost):
    model = make(arch)
    other, _ = permuted(model, 1)
    ctx, x = context(arch)
    fused = build_method("otfusion", {"cost": cost})([model, other], ctx)
    assert_same(fused, model, x)
    assert set(ctx.notes["transport_cost"]) == set(model.space_graph().names)
    assert all(c < 1e-4 for c in ctx.notes["transport_cost"].values())


@pytest.mark.parametrize(
    ("arch", "cost"),
    [(MLP, "acts"), (MLP, "weights"), (VGG, "acts"), (VGG, "weights"), (RESNET, "acts"), (VIT, "acts")],
    ids=["mlp-acts", "mlp-weights", "vgg-acts", "vgg-weights", "resnet-acts", "vit-acts"],
)
def test_other_models_order_does_not_matter(arch, cost):
    """Fusing with a different model or with any permutation of it gives one fused network, which is not model 0:
    the alignment really undoes the other model's order."""
    model, other = make(arch, 0), make(arch, 1)
    ctx, x = context(arch)
    method = build_method("otfusion", {"cost": cost})
    fused = method([model, other], ctx)
    assert_same(method([model, permuted(other, 3)[0]], ctx), fused.trunk, x)
    assert not torch.allclose(fused(x)["all"], model(x)["all"], atol=1e-3)


def test_uniform_plan_is_the_permutation():
    """Uniform marginals between a model and its permuted copy: the exact plan is the permutation / n."""
    model = make(MLP)
    other, perms = permuted(model, 2)
    _, x = context(MLP)
    distances = activation_distances([model, other], ["fc0", "fc1"], [x], "pre")[0]
    for name, perm in perms.items():
        width = len(perm)
        plan, cost = align_units(distances[name], torch.ones(width), torch.ones(width), "emd", 0.01)
        # permute_state: the copy's unit i is the model's unit perm[i]
        assert torch.equal(plan * width, torch.eye(width, dtype=torch.float64)[perm])
        assert cost < 1e-5


def test_self_merge_returns_the_model():
    model = make(MLP)
    ctx, x = context(MLP)
    assert_same(build_method("otfusion", {})([model, model], ctx), model, x, atol=1e-6)


@pytest.mark.parametrize("cost", ["acts", "weights"])
def test_three_models(cost):
    model = make(VGG)
    ctx, x = context(VGG)
    fused = build_method("otfusion", {"cost": cost})([model, permuted(model, 1)[0], permuted(model, 2)[0]], ctx)
    assert_same(fused, model, x)
    different = build_method("otfusion", {"cost": cost})([make(VGG, 0), make(VGG, 1), make(VGG, 2)], ctx)
    assert torch.isfinite(different(x)["all"]).all()


@pytest.mark.parametrize("cost", ["acts", "weights"])
def test_wider_model_of_split_units(cost):
    """Model 1 has every hidden unit of model 0 twice, each copy with half its outgoing weights (the same
    function, twice the width): the two copies are transported onto their unit, and the fused model, of model 0's
    architecture, is model 0 again."""
    model = make(("mlp", {"hidden": [4], "batch_norm": False}, (1, 4, 4)))
    wide = make(("mlp", {"hidden": [8], "batch_norm": False}, (1, 4, 4)), seed=5)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    source = torch.arange(8) % 4  # wide unit u copies unit source[u]
    with torch.no_grad():
        wide.body.fc0.linear.weight.copy_(model.body.fc0.linear.weight[source][order])
        wide.body.fc0.linear.bias.copy_(model.body.fc0.linear.bias[source][order])
        wide.heads.all.weight.copy_(model.heads.all.weight[:, source][:, order] / 2)
        wide.heads.all.bias.copy_(model.heads.all.bias)
    ctx, x = context(MLP)
    torch.testing.assert_close(wide(x)["all"], model(x)["all"])
    fused = build_method("otfusion", {"cost": cost})([model, wide], ctx)
    assert fused.trunk.body.fc0.linear.out_features == 4
    assert_same(fused, model, x)


def test_residual_streams_move_consistently():
    """A ResNet with BatchNorm and conv shortcuts: each stream is transported once, for every block writing or
    reading it, so the permuted copy fuses back into the model exactly (its BatchNorm statistics included)."""
    model = make(RESNET)
    other, _ = permuted(model, 1)
    ctx, x = context(RESNET)
    assert_same(build_method("otfusion", {})([model, other], ctx), model, x)


def test_attention_heads_are_recovered():
    """Heads shuffled as wholes, and units shuffled inside each head (both keep the function): one head transport
    per block for query/key and value/output, then units matched inside paired heads."""
    model = make(VIT)
    other, perms = permuted(model, 4)
    assert not torch.equal(perms["block0.qk"], torch.arange(8))
    ctx, x = context(VIT)
    assert_same(build_method("otfusion", {})([model, other], ctx), model, x)


@pytest.mark.parametrize("arch", [RESNET, VIT], ids=["resnet", "vit"])
def test_weight_cost_refuses_residual_nets(arch):
    model = make(arch)
    ctx, _ = context(arch)
    with pytest.raises(MergeError, match=r"cost='weights'.*before that space is transported.*use cost='acts'"):
        build_method("otfusion", {"cost": "weights"})([model, model], ctx)


def test_sinkhorn_approaches_emd():
    """Entropic OT on the max-normalised cost: the plan tends to the exact one as ε shrinks."""
    gen = torch.Generator().manual_seed(0)
    cost = torch.rand(6, 6, generator=gen, dtype=torch.float64) * 5
    mu = torch.rand(6, generator=gen, dtype=torch.float64) + 0.5
    mu, nu = mu / mu.sum(), torch.full((6,), 1 / 6, dtype=torch.float64)
    exact = solve_transport(mu, nu, cost, "emd", 0.0)
    gaps = [(solve_transport(mu, nu, cost, "sinkhorn", eps) - exact).abs().sum() for eps in (1.0, 0.1, 0.003)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3


def test_sinkhorn_fusion_approaches_emd_fusion():
    """A small ε finds the permuted copy's units as the exact plan does; a large one blurs them together."""
    model = make(MLP)
    ctx, x = context(MLP)
    models = [model, permuted(model, 1)[0]]
    assert_same(build_method("otfusion", {"solver": "sinkhorn", "epsilon": 0.003})(models, ctx), model, x, atol=1e-3)
    blurred = build_method("otfusion", {"solver": "sinkhorn", "epsilon": 1.0})(models, ctx)
    assert (blurred.trunk.body.fc0.linear.weight - model.body.fc0.linear.weight).abs().max() > 0.01


@pytest.mark.parametrize("importance", ["conductance", "deeplift"])
def test_importance_marginals_end_to_end(importance):
    model = make(VGG)
    other, _ = permuted(model, 1)
    ctx, x = context(VGG)
    fused = build_method("otfusion", {"importance": importance})([model, other], ctx)
    assert_same(fused, model, x, atol=1e-4)
    different = build_method("otfusion", {"importance": importance})([model, make(VGG, 1)], ctx)
    assert torch.isfinite(different(x)["all"]).all()


def test_samples_caps_the_fusion_images():
    models = [make(MLP, 0), make(MLP, 1)]
    ctx, x = context(MLP)
    capped = build_method("otfusion", {"samples": 4})(models, ctx)
    first = MergeContext(CPU, batches=lambda: iter([x[:4]]))
    for key, value in build_method("otfusion", {})(models, first).state_dict().items():
        torch.testing.assert_close(capped.state_dict()[key], value)


def test_bad_input():
    model = make(MLP)
    ctx, _ = context(MLP)
    method = build_method("otfusion", {})
    with pytest.raises(MergeError, match="one label space"):
        method([model, make(MLP, heads={"other": 3})], ctx)
    with pytest.raises(MergeError, match="one label space"):
        method([make(MLP, heads={"a": 3, "b": 3})] * 2, ctx)
    with pytest.raises(MergeError, match="laid out differently"):
        method([model, make(("mlp", {"hidden": [6], "batch_norm": False}, (1, 4, 4)))], ctx)
    with pytest.raises(MergeError, match="labels of the fusion data"):
        build_method("otfusion", {"importance": "deeplift"})([model, model], MergeContext(CPU, lambda: iter([])))
    with pytest.raises(MergeError, match="no images"):
        method([model, model], MergeContext(CPU, lambda: iter([])))
    with pytest.raises(ParameterError, match="epsilon"):
        build_method("otfusion", {"epsilon": 0.0})
    assert method.keeps_first_basis()
