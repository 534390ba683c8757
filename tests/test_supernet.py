"""FS-Merge's SuperNet: it starts as model 0 (init first), folds exactly into a plain network, and refuses what it
cannot fold."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetmerge.supernet import FoldError, MapSpec, MergeMap, SuperNet, check_foldable, check_ranks

FAMILIES = {
    "mlp": ({"hidden": [12, 10], "batch_norm": True}, (1, 8, 8)),
    "vit": ({"patch": 4, "depth": 2, "width": 16, "heads": 4, "mlp_ratio": 2.0}, (1, 8, 8)),
    "vgg": ({"depth": 11, "width": 0.0625}, (1, 8, 8)),
    "resnet": ({"depth": 8, "width": 0.25}, (1, 8, 8)),
}


def models_of(make_model, randomize_bn, family, n=2, spec=None):
    base, shape = FAMILIES[family]
    tasks = "ABCD"[:n]
    return [
        randomize_bn(make_model(family, spec or base, {t: 3 + i}, shape, seed=10 + i), i).eval()
        for i, t in enumerate(tasks)
    ]


def supernet(models, kind="diagonal_and_low_rank", init="first", rank=2, comp_factor=1.0, seed=0):
    owners = {t: i for i, m in enumerate(models) for t in m.heads}
    return SuperNet(models, owners, MapSpec(kind, rank, init), comp_factor, torch.Generator().manual_seed(seed))


def perturb(net: SuperNet, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.trainable():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", ["diagonal", "diagonal_and_low_rank", "full"])
@pytest.mark.parametrize("n", [2, 3])
def test_first_init_computes_model_0(make_model, randomize_bn, family, kind, n):
    models = models_of(make_model, randomize_bn, family, n)
    net = supernet(models, kind)
    x = torch.randn(6, *models[0].input_shape)
    with torch.no_grad():
        for mode in ("explicit", "folded"):
            with net.computing(mode):
                torch.testing.assert_close(net.net.body(x), models[0].body(x), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(net.net(x)["A"], models[0](x)["A"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", ["diagonal", "low_rank", "diagonal_and_low_rank", "full"])
def test_folded_model_computes_what_the_supernet_computes(make_model, randomize_bn, family, kind):
    models = models_of(make_model, randomize_bn, family)
    net = supernet(models, kind, init="random" if kind == "low_rank" else "average")
    perturb(net)
    folded = net.fold()
    assert type(folded) is type(models[0]) and folded.describe()["spec"] == models[0].describe()["spec"]
    assert set(folded.heads) == {"A", "B"}
    x = torch.randn(6, *models[0].input_shape)
    with torch.no_grad():
        with net.computing("explicit"):  # the paper's SuperNet: N copies of every layer between its maps
            want = net.net(x)
        with net.computing("folded"):
            fused = net.net(x)
        got = folded(x)
    for task in want:
        scale = want[task].abs().max()
        assert scale > 1e-3  # the maps really moved the function away from zero
        torch.testing.assert_close(got[task], want[task], rtol=1e-4, atol=1e-5 * float(scale))
        torch.testing.assert_close(fused[task], want[task], rtol=1e-4, atol=1e-5 * float(scale))


@pytest.mark.parametrize("family", ["mlp", "vit"])
def test_training_through_the_folded_weights_has_the_explicit_gradients(make_model, randomize_bn, family):
    models = models_of(make_model, randomize_bn, family)
    net = supernet(models, init="average")
    perturb(net)
    x = torch.randn(4, *models[0].input_shape)
    grads = []
    for mode in ("explicit", "folded"):
        with net.computing(mode):
            loss = sum(v.square().mean() for v in net.net(x).values())
        grads.append(torch.autograd.grad(loss, net.trainable()))
    for g_explicit, g_fused in zip(*grads, strict=True):
        torch.testing.assert_close(g_fused, g_explicit, rtol=1e-4, atol=1e-6)


def test_each_batch_takes_the_cheaper_computation(make_model, randomize_bn):
    """A ViT's many token rows make the folded weight cheaper; a wide layer on a handful of rows the explicit path."""
    vit = supernet(models_of(make_model, randomize_bn, "vit"))
    qkv = vit.net.body.block0.attn.q
    assert qkv._folding_is_cheaper(torch.zeros(64, 5, 16)) and not qkv._folding_is_cheaper(torch.zeros(1, 1, 16))


def test_the_source_weights_stay_frozen(make_model, randomize_bn):
    models = models_of(make_model, randomize_bn, "vit")
    net = supernet(models)
    names = {n for n, p in net.net.named_parameters() if p.requires_grad}
    assert names and all(".merge." in n or ".unmerge." in n or "norm" in n for n in names)
    assert {id(p) for p in net.trainable()} == {id(p) for p in net.net.parameters() if p.requires_grad}


def test_folding_by_hand():
    """One hidden layer, diagonal maps: the hidden layer's folded weight is Σᵢ diag(mᵢ)·Wᵢ (every model reads the raw
    input), and a head's is W_head·diag(u): its map's diagonal scales the head's columns."""
    from hetmerge.models import build_model

    torch.manual_seed(0)
    models = [build_model("mlp", {"hidden": [3], "batch_norm": False}, (1, 1, 2), {t: 2}) for t in "AB"]
    net = supernet(models, "diagonal", init="average")
    layer = net.net.body.fc0.linear
    m = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]])
    with torch.no_grad():
        layer.merge.diag.copy_(m)
        net.net.heads["B"].unmerge.diag.copy_(torch.tensor([[2.0, -1.0, 0.5]]))
    folded = net.fold()
    w = [mod.body.fc0.linear.weight for mod in models]
    b = [mod.body.fc0.linear.bias for mod in models]
    torch.testing.assert_close(folded.body.fc0.linear.weight, m[0, :, None] * w[0] + m[1, :, None] * w[1])
    torch.testing.assert_close(folded.body.fc0.linear.bias, m[0] * b[0] + m[1] * b[1])
    torch.testing.assert_close(folded.heads["B"].weight, models[1].heads["B"].weight * torch.tensor([2.0, -1.0, 0.5]))
    torch.testing.assert_close(folded.heads["A"].weight, models[0].heads["A"].weight)  # head map at its start: I


@given(
    n=st.integers(1, 3), d=st.integers(1, 5), merged=st.integers(1, 6), direction=st.sampled_from(["merge", "unmerge"])
)
@settings(max_examples=30, deadline=None)
def test_stacked_diagonal_layout(n, d, merged, direction):
    gen = torch.Generator().manual_seed(0)
    m = MergeMap("s", n, d, merged, direction, MapSpec("diagonal", 1, "random"), 1, gen)
    matrix = m.matrix()
    k = min(d, merged)
    expected = torch.zeros(n * d, merged)
    for i in range(n):
        expected[i * d : i * d + k, :k] = torch.diag(m.diag[i].detach())
    torch.testing.assert_close(matrix.detach(), expected if direction == "merge" else expected.T)


def test_low_rank_starts_at_zero_but_learns():
    gen = torch.Generator().manual_seed(0)
    m = MergeMap("s", 2, 4, 4, "merge", MapSpec("diagonal_and_low_rank", 2, "first"), 2, gen)
    assert torch.equal(m.matrix().detach(), torch.cat([torch.eye(4), torch.zeros(4, 4)]))
    m.matrix().sum().backward()
    assert m.a.grad is not None and m.a.grad.abs().sum() > 0  # B ≠ 0, so gradients reach A (§9.7)


@pytest.mark.parametrize("family", ["mlp", "vit"])
def test_narrower_merge_folds_exactly(make_model, randomize_bn, family):
    models = models_of(make_model, randomize_bn, family)
    net = supernet(models, comp_factor=0.5)
    perturb(net)
    folded = net.fold()
    widths = [s.width for s in folded.space_graph().spaces]
    assert widths == [s.width // 2 for s in models[0].space_graph().spaces]
    x = torch.randn(4, *models[0].input_shape)
    with torch.no_grad(), net.computing("explicit"):
        torch.testing.assert_close(folded(x)["B"], net.net(x)["B"], rtol=1e-4, atol=1e-5)


def test_refuses_what_it_cannot_fold(make_model, randomize_bn):
    a = make_model("mlp", {"hidden": [8]}, {"A": 2})
    b = make_model("mlp", {"hidden": [6]}, {"B": 2})
    with pytest.raises(FoldError, match="different architectures"):
        check_foldable([a, b])
    with pytest.raises(FoldError, match="rank 50 is out of range"):
        check_ranks([a, make_model("mlp", {"hidden": [8]}, {"B": 2})], MapSpec(rank=50), 1.0)
    vgg = models_of(make_model, randomize_bn, "vgg")
    with pytest.raises(NotImplementedError, match="cannot be rebuilt at another width"):
        supernet(vgg, comp_factor=0.5)
    vit = models_of(make_model, randomize_bn, "vit")
    with pytest.raises(ValueError, match="not a positive multiple of 4 heads"):
        supernet(vit, comp_factor=0.4)
