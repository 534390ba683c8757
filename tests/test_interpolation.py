"""Least-squares neuron interpolation (`hetmerge.interpolation`) and the methods on it, HF and KF."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from benchmarks_loader import load_benchmark
from torch import nn

from hetmerge.interpolation import LayerSystem, design_rows, layer_chain, output_rows, refit
from hetmerge.methods import MergeContext, MergeError, build_method
from hetmerge.methods.hf import pair_costs
from hetmerge.models import build_model
from hetmerge.spaces import permute_state, random_permutations

MLP = {"hidden": [16, 12], "batch_norm": False}
VGG = {"depth": 11, "width": 0.0625, "batch_norm": False}


def _system(x: torch.Tensor, a: torch.Tensor) -> LayerSystem:
    x, a = x.double(), a.double()
    return LayerSystem(x.T @ x, [x.T @ a], [a.square().sum(0)], len(x), torch.float32)


def test_refit_hand_computed():
    # X = [[1,0],[0,1],[1,1]], a = [1,2,4]: XᵀX = [[2,1],[1,2]], Xᵀa = [5,6], w = [4/3, 7/3],
    # Xw = [4/3, 7/3, 11/3], so the misfit ‖Xw − a‖² = 3·(1/3)².
    refits = refit(_system(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([[1.0], [2.0], [4.0]])))
    assert refits.weights[0].squeeze(1).tolist() == pytest.approx([4 / 3, 7 / 3])
    assert refits.misfit[0].item() == pytest.approx(1 / 3)
    assert refits.features[0].square().sum().item() == pytest.approx(21 - 1 / 3)  # ‖Xw‖²


def test_refit_is_pinv_and_features_measure_row_distances():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    x[:, 3] = 0  # a dead input: pinv's minimum-norm solution gives it no weight
    a = torch.randn(40, 9, generator=gen, dtype=torch.float64)
    refits = refit(LayerSystem(x.T @ x, [x.T @ a], [a.square().sum(0)], 40, torch.float64))
    w = refits.weights[0]
    assert torch.allclose(w, torch.linalg.pinv(x) @ a)
    rows = x @ w
    assert torch.allclose(torch.cdist(rows.T, rows.T), torch.cdist(refits.features[0].T, refits.features[0].T))
    assert torch.allclose(refits.misfit[0], (rows - a).square().sum(0))


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.Conv2d(2, 4, 2, dilation=2, bias=False)])
def test_unfolded_rows_line_up_with_the_conv_output(conv):
    x = torch.randn(3, conv.in_channels, 7, 6)
    weights = conv.weight.reshape(conv.out_channels, -1).T
    if conv.bias is not None:
        weights = torch.cat([weights, conv.bias[None, :]])
    assert torch.allclose(design_rows(conv, x) @ weights, output_rows(conv, conv(x)), atol=1e-5)


def _model(family, spec, seed, shape, classes=5, head="all"):
    torch.manual_seed(seed)
    return build_model(family, spec, shape, {head: classes}).eval()


def _permuted(model, seed):
    graph = model.space_graph()
    other = copy.deepcopy(model)
    other.load_state_dict(
        permute_state(model.state_dict(), graph, random_permutations(graph, torch.Generator().manual_seed(seed)))
    )
    return other


def _context(shape, n=192, labels=False, seed=0):
    gen = torch.Generator().manual_seed(11)
    data = [torch.randn(64, *shape, generator=gen) for _ in range(n // 64)]
    labelled = [(x, torch.randint(0, 5, (len(x),), generator=gen)) for x in data]
    return MergeContext(
        torch.device("cpu"),
        batches=lambda: iter(data),
        labelled=(lambda: iter(labelled)) if labels else None,
        seed=seed,
    )


def _same_function(merged, model, shape):
    x = torch.randn(50, *shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = model(x)["all"], merged(x)["all"]
    return torch.allclose(got, want, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize(("family", "spec", "shape"), [("mlp", MLP, (1, 8, 8)), ("vgg", VGG, (3, 8, 8))])
def test_kf_of_a_model_with_itself_is_the_model(family, spec, shape):
    model = _model(family, spec, 1, shape)
    kf = build_method("kf", {"restarts": 2})
    assert _same_function(kf([model, copy.deepcopy(model)], _context(shape)), model, shape)
    ctx = _context(shape)
    assert _same_function(kf([model, _permuted(model, 4), _permuted(model, 5)], ctx), model, shape)
    assert [note["layer"] for note in ctx.notes["layers"]] == [layer.module for layer in layer_chain(model)[:-1]]


def test_kf_with_importance_reads_labels():
    model = _model("mlp", MLP, 1, (1, 8, 8))
    merged = build_method("kf", {"importance": "conductance", "restarts": 1})(
        [model, _permuted(model, 2)], _context((1, 8, 8), labels=True)
    )
    assert _same_function(merged, model, (1, 8, 8))


def test_kf_fuses_parents_of_different_widths_into_the_chosen_one():
    # The wide parent computes the narrow one's function with each of its first 4 hidden units split in two halves
    # (same incoming weights, outgoing weights halved): the duplicates cluster together, and the narrow function
    # comes back at the narrow widths.
    narrow = _model("mlp", {"hidden": [8], "batch_norm": False}, 1, (1, 8, 8))
    wide = _model("mlp", {"hidden": [12], "batch_norm": False}, 2, (1, 8, 8))
    with torch.no_grad():
        src, dst = narrow.body.fc0.linear, wide.body.fc0.linear
        split = torch.cat([torch.arange(8), torch.arange(4)])
        dst.weight.copy_(src.weight[split])
        dst.bias.copy_(src.bias[split])
        out = narrow.heads.all.weight.clone()
        out[:, :4] /= 2
        wide.heads.all.weight.copy_(out[:, split])
        wide.heads.all.bias.copy_(narrow.heads.all.bias)
    assert _same_function(wide, narrow, (1, 8, 8))
    merged = build_method("kf", {"restarts": 2})([wide, narrow], _context((1, 8, 8)))
    assert merged.trunk.body.fc0.linear.out_features == 12
    merged = build_method("kf", {"restarts": 2, "like": 1})([wide, narrow], _context((1, 8, 8)))
    assert merged.trunk.body.fc0.linear.out_features == 8
    assert _same_function(merged, narrow, (1, 8, 8))


@pytest.mark.parametrize(("family", "spec", "shape"), [("mlp", MLP, (1, 8, 8)), ("vgg", VGG, (3, 8, 8))])
def test_hf_of_a_model_with_its_permuted_copy_is_the_model(family, spec, shape):
    model = _model(family, spec, 1, shape)
    ctx = _context(shape)
    merged = build_method("hf")([model, _permuted(model, 6)], ctx)
    assert _same_function(merged, model, shape)
    if family == "mlp":  # model 0's basis: its own weights come back (VGG's 1×1 maps leave kernel taps unseen,
        for name, value in model.state_dict().items():  # and the minimum-norm refit zeroes them)
            assert torch.allclose(merged.trunk.state_dict()[name], value, atol=1e-4), name
    assert len(ctx.notes["layers"]) == len(layer_chain(model)) - 1


def test_hf_costs_match_the_row_space_definition():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    a0, a1 = (
        torch.randn(30, 4, generator=gen, dtype=torch.float64),
        torch.randn(30, 4, generator=gen, dtype=torch.float64),
    )
    refits = refit(
        LayerSystem(x.T @ x, [x.T @ a0, x.T @ a1], [a0.square().sum(0), a1.square().sum(0)], 30, torch.float64)
    )
    s0, s1 = (
        torch.rand(4, generator=gen, dtype=torch.float64) + 0.1,
        torch.rand(4, generator=gen, dtype=torch.float64) + 0.1,
    )
    w0, w1 = refits.weights
    pairs = (s0[None, :, None] * w0[:, :, None] + s1[None, None, :] * w1[:, None, :]) / (s0[:, None] + s1[None, :])
    pred = torch.einsum("rc,cij->rij", x, pairs)
    want = s0[:, None] * (pred - a0[:, :, None]).norm(dim=0) + s1[None, :] * (pred - a1[:, None, :]).norm(dim=0)
    assert torch.allclose(pair_costs(refits, s0, s1), want)


def test_hf_refuses_other_counts_and_widths():
    shape = (1, 8, 8)
    models = [_model("mlp", MLP, s, shape) for s in range(3)]
    with pytest.raises(MergeError, match=r"pairs the neurons of two models.*'kf'"):
        build_method("hf")(models, _context(shape))
    wider = _model("mlp", {"hidden": [16, 14], "batch_norm": False}, 0, shape)
    with pytest.raises(MergeError, match="widths \\[12, 14\\]"):
        build_method("hf")([models[0], wider], _context(shape))


@pytest.mark.parametrize("method", ["hf", "kf"])
def test_networks_that_are_not_a_plain_chain_are_refused(method):
    shape = (3, 8, 8)
    resnet = [_model("resnet", {"depth": 8, "width": 0.25}, s, shape) for s in range(2)]
    with pytest.raises(MergeError, match="chain of conv/linear layers without normalisation"):
        build_method(method)(resnet, _context(shape))
    bn = [_model("mlp", {"hidden": [8], "batch_norm": True}, s, (1, 8, 8)) for s in range(2)]
    with pytest.raises(MergeError, match=r"space 'fc0' is also written by .*BatchNorm1d"):
        build_method(method)(bn, _context((1, 8, 8)))


def test_residual_streams_have_their_own_words():
    resnet = _model("resnet", {"depth": 8, "width": 0.25, "norm": "group", "groups": 1}, 0, (3, 8, 8))
    with pytest.raises(MergeError, match="residual stream written by several layers"):
        layer_chain(resnet)


@pytest.mark.parametrize("method", ["hf", "kf"])
def test_models_of_different_label_spaces_are_refused(method):
    shape = (1, 8, 8)
    a, b = _model("mlp", MLP, 0, shape), _model("mlp", MLP, 1, shape, head="other")
    with pytest.raises(MergeError, match="one label space"):
        build_method(method)([a, b], _context(shape))


@pytest.mark.parametrize("method", ["hf", "kf"])
def test_importance_without_labels_is_refused(method):
    shape = (1, 8, 8)
    models = [_model("mlp", MLP, s, shape) for s in range(2)]
    with pytest.raises(MergeError, match="needs the labels of the fusion data"):
        build_method(method, {"importance": "deeplift"})(models, _context(shape))


def test_kf_is_seeded():
    shape = (1, 8, 8)
    models = [_model("mlp", MLP, s, shape) for s in range(3)]
    runs = [build_method("kf", {"restarts": 1})(models, _context(shape, seed=s)).trunk.state_dict() for s in (0, 0, 1)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


@pytest.mark.parametrize("method", ["hf", "kf"])
def test_runs_on_the_data_device_with_the_cpu_result(method):
    from fake_cuda import fake_cuda, is_on_fake_cuda

    shape = (1, 8, 8)
    model = _model("mlp", MLP, 1, shape)
    models = [model, _permuted(model, 3)]
    data = [torch.randn(64, *shape, generator=torch.Generator().manual_seed(b)) for b in range(3)]
    params = {"restarts": 2} if method == "kf" else {}
    want = build_method(method, params)(models, MergeContext(torch.device("cpu"), batches=lambda: iter(data)))
    with fake_cuda() as device:
        on_device = [x.to(device) for x in data]
        got = build_method(method, params)(models, MergeContext(device, batches=lambda: iter(on_device)))
        assert all(is_on_fake_cuda(t) for t in got.state_dict().values())
        assert all(torch.equal(t.cpu(), want.state_dict()[k]) for k, t in got.state_dict().items())


def test_the_benchmark_agrees_with_its_reference_loops(capsys):
    bench = load_benchmark("neuron_interpolation")
    assert bench.main(["--widths", "8", "24", "--rows", "300", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["ls_reference"], r["kmeans_reference"]) for r in rows] == [("full", "full")] * 2
    assert all(r["ls_same"] and r["kmeans_same"] for r in rows)
