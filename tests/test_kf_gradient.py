"""KF-Gradient (the paper's ALF) and last-layer KD: the levels of each architecture, the level trainer, the k-means and
head targets, self-fusion, determinism and the errors that name their cause."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hetmerge.levels import (
    LevelTraining,
    level_forward,
    level_input,
    level_loss,
    level_rows,
    levels,
    reinitialise,
    seeded,
    train_level,
)
from hetmerge.methods import MergeContext, MergeError, build_method
from hetmerge.methods.kf_gradient import align_to_input, head_targets, kmeans_targets, paper_vgg_optimizer
from hetmerge.observe import as_rows

MLP = {"hidden": [16, 8], "batch_norm": False}
VGG = {"depth": 11, "width": 0.0625, "batch_norm": False}
VIT = {"patch": 4, "depth": 2, "width": 8, "heads": 2, "mlp_ratio": 1.0}
HEAD = {"all": 5}
FAST = {"epochs": 3, "head_epochs": 3}


@pytest.fixture
def mlps(make_model):
    return [make_model("mlp", MLP, HEAD, seed=s).eval() for s in range(3)]


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 1, 8, 8, generator=gen)
    y = torch.randint(0, 5, (40,), generator=gen)
    return x, y


def context(data, labelled=True, **kwargs):
    x, y = data
    return MergeContext(
        device=torch.device("cpu"),
        batches=lambda: iter(x.split(16)),
        labelled=(lambda: iter(zip(x.split(16), y.split(16), strict=True))) if labelled else None,
        **kwargs,
    )


def test_levels_end_at_each_unit_writing_a_space(make_model):
    """MLP: one level per fc unit; VGG11: each conv with the pools before it, 8 + head as the paper's 9 levels; ViT:
    the embedding, then each block; the head level holds what is left, and `join_first` merges the first two."""
    mlp = levels(make_model("mlp", MLP, HEAD))
    assert [lvl.units for lvl in mlp] == [("flatten", "fc0"), ("fc1",), ()]
    assert [(lvl.space, lvl.head, lvl.width) for lvl in mlp] == [("fc0", None, 16), ("fc1", None, 8), (None, "all", 5)]
    assert [lvl.observed.act for lvl in mlp] == ["body.fc0.act", "body.fc1.act", None]  # the pre-activations
    vgg = levels(make_model("vgg", VGG, HEAD, input_shape=(3, 32, 32)))
    assert [lvl.units for lvl in vgg] == [
        ("conv0",),
        ("pool0", "conv1"),
        ("pool1", "conv2"),
        ("conv3",),
        ("pool2", "conv4"),
        ("conv5",),
        ("pool3", "conv6"),
        ("conv7",),
        ("pool4", "gap"),
    ]
    assert vgg[-1].head == "all" and vgg[1].input_space == "conv0"
    vit = make_model("vit", VIT, HEAD, input_shape=(1, 8, 8))
    assert [lvl.units for lvl in levels(vit)] == [("embed",), ("block0",), ("block1",), ("norm", "pool")]
    joined = levels(vit, join_first=True)
    assert [lvl.units for lvl in joined] == [("embed", "block0"), ("block1",), ("norm", "pool")]
    assert [(lvl.space, lvl.input_space, lvl.observed.act) for lvl in joined[:2]] == [
        ("stream", None, None),
        ("stream", "stream", None),
    ]
    with pytest.raises(ValueError, match="join_first needs two levels"):
        levels(make_model("mlp", {"hidden": [4], "batch_norm": False}, HEAD), join_first=True)


def test_level_forward_observes_the_linear_and_conv_outputs(make_model, data):
    x, _ = data
    mlp = make_model("mlp", MLP, HEAD).eval()
    first, second, head = levels(mlp)
    with torch.no_grad():
        pre0 = mlp.body.fc0.linear(x.flatten(1))
        torch.testing.assert_close(level_forward(mlp, level_input(mlp, x, first), first), pre0)
        torch.testing.assert_close(
            level_forward(mlp, level_input(mlp, x, second), second), mlp.body.fc1.linear(pre0.relu())
        )
        torch.testing.assert_close(level_forward(mlp, level_input(mlp, x, head), head), mlp(x)["all"])
    vgg = make_model("vgg", VGG, HEAD, input_shape=(3, 32, 32)).eval()
    images = torch.randn(2, 3, 32, 32)
    level = levels(vgg)[1]
    with torch.no_grad():
        expected = vgg.body.conv1.conv(F.max_pool2d(vgg.body.conv0(images), 2, ceil_mode=True))
        torch.testing.assert_close(level_forward(vgg, level_input(vgg, images, level), level), expected)
    vit = make_model("vit", VIT, HEAD, input_shape=(1, 8, 8)).eval()
    level = levels(vit)[1]
    with torch.no_grad():
        torch.testing.assert_close(level_forward(vit, level_input(vit, x, level), level), vit.run_body(x, 0, 2))


def test_identical_parents_give_their_own_activations_as_targets(mlps, data):
    acts = level_rows(mlps[0], data[0], levels(mlps[0])[0])
    for init_model in (0, 1):
        for normalize in (False, True):
            targets, weights = kmeans_targets(
                [acts, acts.clone()], [torch.ones(16), torch.ones(16)], 16, normalize=normalize, init_model=init_model
            )
            torch.testing.assert_close(targets, acts)
            torch.testing.assert_close(weights, torch.full((16,), 2.0))


def test_kmeans_targets_are_importance_weighted_cluster_means():
    """Two parents of width 2 whose neurons pair up: each target is the weighted mean of its pair."""
    a = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    b = torch.tensor([[11.0, 1.5], [21.0, 2.5], [31.0, 3.5]])  # b's neurons swapped and shifted
    targets, weights = kmeans_targets(
        [a, b], [torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0])], 2, normalize=False, init_model=0
    )
    torch.testing.assert_close(targets, torch.stack([(a[:, 0] + b[:, 1]) / 2, (3 * a[:, 1] + b[:, 0]) / 4], 1))
    torch.testing.assert_close(weights, torch.tensor([2.0, 4.0]))


def test_head_targets_mean_logits_share_weighted_and_kd():
    z = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 6.0]])]
    models = [lambda x, z=z_k: {"all": z} for z_k in z]
    x = torch.zeros(1, 1)
    torch.testing.assert_close(head_targets(models, x, "all", None, None), torch.tensor([[2.0, 4.0]]))
    shares = torch.tensor([[0.25, 1.0], [0.75, 0.0]])
    torch.testing.assert_close(head_targets(models, x, "all", shares, None), torch.tensor([[2.5, 2.0]]))
    kd = (F.softmax(z[0] / 2, -1) + F.softmax(z[1] / 2, -1)) / 2
    torch.testing.assert_close(head_targets(models, x, "all", None, 2.0), kd)
    mixed = 0.25 * F.softmax(z[0], -1) * torch.tensor([1.0, 0.0]) + torch.tensor([0.0, 1.0]) * F.softmax(z[0], -1)
    mixed = mixed + 0.75 * F.softmax(z[1], -1) * torch.tensor([1.0, 0.0])
    torch.testing.assert_close(head_targets(models, x, "all", shares, 1.0), mixed / mixed.sum())


def test_kl_loss_is_the_tempered_kd_and_paper_mse_regresses_probabilities():
    out = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    target = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.4, 0.0]])
    tau = 2.0
    q = F.softmax(out / tau, -1)
    expected = tau**2 * torch.xlogy(target, target / q).sum() / 2
    kl = LevelTraining("adam", 1e-3, 1, 0.0, "kl", tau)
    torch.testing.assert_close(level_loss(out, target, kl, None), expected)
    paper = LevelTraining("adam", 1e-3, 1, 0.0, "paper_mse", tau)
    torch.testing.assert_close(level_loss(out, target, paper, None), ((out - target) ** 2).mean())
    weighted = LevelTraining("adam", 1e-3, 1, 0.0)
    w = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(level_loss(out, target, weighted, w), ((out - target) ** 2 * w).mean())


def test_align_to_input_recovers_the_stream_basis():
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(50, 6, generator=gen)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    targets, weights = align_to_input(inputs, inputs[:, perm] + 0.01, torch.arange(1.0, 7.0)[perm])
    torch.testing.assert_close(targets, inputs + 0.01)
    torch.testing.assert_close(weights, torch.arange(1.0, 7.0))


def test_training_a_level_lowers_its_loss_to_the_targets(mlps, data):
    """KF-Gradient's level step on a tiny case: the loss of the trained level to its k-means targets, over the same
    images before and after, falls; nothing outside the level changes."""
    x, _ = data
    fused = copy.deepcopy(mlps[0])
    level = levels(fused)[1]
    acts = [level_rows(m, x, levels(m)[1]) for m in mlps]
    targets, weights = kmeans_targets(acts, [torch.ones(8)] * 3, 8, normalize=False, init_model=1)
    inputs = level_input(fused, x, level)
    settings = LevelTraining("adam", 1e-2, 5, 0.0)

    def loss() -> float:
        with torch.no_grad():
            return float(level_loss(as_rows(level_forward(fused, inputs, level), 1), targets, settings, weights))

    before = loss()
    outside = {k: v.clone() for k, v in fused.state_dict().items() if not k.startswith("body.fc1.")}
    result = train_level(fused, level, inputs, targets, settings, torch.Generator().manual_seed(0), weights)
    assert loss() < 0.9 * before
    assert result.best_val_loss < result.initial_val_loss and result.epochs_run == 5
    for name, value in outside.items():
        torch.testing.assert_close(fused.state_dict()[name], value, rtol=0, atol=0)


def test_kf_gradient_improves_every_level_and_records_it(mlps, data):
    ctx = context(data, seed=0)
    before = [copy.deepcopy(m.state_dict()) for m in mlps]
    merged = build_method("kf_gradient", {**FAST, "lr": 1e-2, "head_lr": 1e-2})(mlps, ctx)
    assert [r["units"] for r in ctx.notes["levels"]] == [["flatten", "fc0"], ["fc1"], []]
    assert all(r["best_val_loss"] < r["initial_val_loss"] and r["epochs_run"] == 3 for r in ctx.notes["levels"])
    assert ctx.notes["paper_defaults_for"] == "mlp" and ctx.notes["settings"]["weighted_loss"] is True
    assert merged.trunk.describe() == mlps[0].describe()
    for model, state in zip(mlps, before, strict=True):
        torch.testing.assert_close(model.state_dict(), state, rtol=0, atol=0)  # the inputs are not modified


@pytest.mark.parametrize("family,spec,shape", [("mlp", MLP, (1, 8, 8)), ("vit", VIT, (1, 8, 8))])
def test_self_fusion_without_training_is_model_0(make_model, data, family, spec, shape):
    """Fusing a model with its copy: every level's targets are the model's own outputs (so the loss at the start is
    0 at every level) and with no epochs the fused network is the model."""
    model = make_model(family, spec, HEAD, input_shape=shape).eval()
    shares = torch.full((2, 5), 0.5)
    ctx = context(data, class_shares=shares)
    params = {"epochs": 0, "head_epochs": 0, "reset_level_parameters": False, "weight_perturbation": 0.0}
    if family == "vit":
        params["align_skip_connections"] = True
    merged = build_method("kf_gradient", params)([model, copy.deepcopy(model)], ctx)
    assert all(r["initial_val_loss"] == pytest.approx(0, abs=1e-10) for r in ctx.notes["levels"])
    torch.testing.assert_close(merged(data[0])["all"], model(data[0])["all"], rtol=0, atol=0)


def test_kf_gradient_is_seeded(mlps, data):
    params = {**FAST, "weight_perturbation": 0.5, "importance": "conductance"}
    runs = [build_method("kf_gradient", params)(mlps, context(data, seed=s)).state_dict() for s in (4, 4, 5)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert not torch.equal(runs[0]["trunk.body.fc0.linear.weight"], runs[2]["trunk.body.fc0.linear.weight"])


def test_reinitialise_resets_every_submodule_and_perturbs_linearly(make_model):
    """Not only direct children (§9.6: that would leave a ViT block's attention at model 0's weights); ε mixes."""
    block = make_model("vit", VIT, HEAD, input_shape=(1, 8, 8)).body.block0
    old = copy.deepcopy(block)
    fresh = copy.deepcopy(block)
    with seeded(1, torch.device("cpu")):
        reinitialise([fresh])
    with seeded(1, torch.device("cpu")):
        reinitialise([block], 0.25)
    assert not torch.equal(fresh.attn.q.weight, old.attn.q.weight)
    for p, q, r in zip(block.parameters(), old.parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(p, 0.75 * q + 0.25 * r)


def test_last_layer_kd_trains_only_the_head_level(mlps, data):
    ctx = context(data, labelled=False)
    merged = build_method("last_layer_kd", {"epochs": 4, "lr": 1e-2})(mlps, ctx)
    (record,) = ctx.notes["levels"]
    assert record["head"] == "all" and record["best_val_loss"] < record["initial_val_loss"]
    assert ctx.notes["settings"]["temperature"] == 1.0 and ctx.notes["settings"]["optimizer"] == "adam"
    trained = merged.trunk.state_dict()
    for name, value in mlps[0].state_dict().items():
        assert torch.equal(trained[name], value) != name.startswith("heads.")


def test_paper_vgg_optimizer_follows_the_split():
    sharded = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    non_iid = torch.tensor([[0.5, 0.2, 0.1], [0.25, 0.7, 0.1], [0.25, 0.1, 0.8]])
    assert paper_vgg_optimizer(2, None) == "adam"
    assert paper_vgg_optimizer(3, sharded) == "adam"
    assert paper_vgg_optimizer(3, non_iid) == "sgd"
    assert paper_vgg_optimizer(3, None) is None
    assert build_method("kf_gradient").resolved("vgg", 3, non_iid).lr == 1e-4


def test_errors_name_their_cause(make_model, mlps, data):
    method = build_method("kf_gradient", {**FAST, "class_weighted_head": True})
    with pytest.raises(MergeError, match="no class_shares"):
        method(mlps, context(data))
    other = make_model("mlp", MLP, {"other": 5})
    with pytest.raises(MergeError, match="one label space"):
        build_method("kf_gradient", FAST)([mlps[0], other], context(data))
    with pytest.raises(MergeError, match="labels of the fusion data"):
        build_method("kf_gradient", {**FAST, "importance": "deeplift"})(mlps, context(data, labelled=False))
    vggs = [make_model("vgg", VGG, HEAD, input_shape=(3, 32, 32)) for _ in range(3)]
    for name in ("kf_gradient", "last_layer_kd"):
        build_method(name).check(vggs[:2])  # two models: the paper's Adam settings
        build_method(name).check(vggs)  # more: they depend on the split, known from the data's class shares
    with pytest.raises(MergeError, match=r"set \['epochs', 'head_lr', 'lr', 'optimizer'\].*sharded"):
        build_method("kf_gradient").resolved("vgg", 3)
    with pytest.raises(MergeError, match=r"set \['lr'\]"):
        build_method("last_layer_kd").resolved("vgg", 3)
    with pytest.raises(MergeError, match=r"skip_levels \[3\] do not exist"):
        build_method("kf_gradient", {"skip_levels": [3]}).check(mlps)
    deeper = make_model("mlp", {"hidden": [16, 8, 4], "batch_norm": False}, HEAD)
    with pytest.raises(MergeError, match="level by level"):
        build_method("kf_gradient").check([mlps[0], deeper])
