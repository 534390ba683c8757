"""Neuron importance: hand-computed attributions on a tiny ReLU net, shapes on every family, bad input."""

from __future__ import annotations

import pytest
import torch

from hetmerge.importance import neuron_importance
from hetmerge.models import build_model

# A 2 → 2 → 2 ReLU net. Hidden pre-activations z(x) = W1·x + b1, baseline x = 0 gives z0 = b1 = (-2, 3).
W1 = [[1.0, 2.0], [-1.0, 1.0]]
B1 = [-2.0, 3.0]
W2 = [[1.0, -1.0], [2.0, 1.0]]
# x1 = (1, 2), label 0: z = (3, 4). Unit 0 crosses its kink on the way from the baseline, so DeepLift's rescale
# rule (and the path integral of conductance) gives W2[0, 0]·(relu 3 − relu −2) = 3, where gradient × Δz would give
# 5; unit 1 stays active: W2[0, 1]·(4 − 3) = −1.
# x2 = (2, 1), label 1: z = (2, 2): unit 0 W2[1, 0]·(2 − 0) = 4, unit 1 W2[1, 1]·(2 − 3) = −1.
# Score = Σ |attribution| / 2 samples + 1e-8 = (3.5, 1).
EXPECTED = torch.tensor([3.5, 1.0])


@pytest.fixture
def tiny():
    model = build_model("mlp", {"hidden": [2], "batch_norm": False}, (2,), {"all": 2}).eval()
    with torch.no_grad():
        model.body.fc0.linear.weight.copy_(torch.tensor(W1))
        model.body.fc0.linear.bias.copy_(torch.tensor(B1))
        model.heads.all.weight.copy_(torch.tensor(W2))
        model.heads.all.bias.copy_(torch.tensor([0.5, -0.5]))  # an output bias changes no attribution
    return model


def labelled():
    return [(torch.tensor([[1.0, 2.0]]), torch.tensor([0])), (torch.tensor([[2.0, 1.0]]), torch.tensor([1]))]


@pytest.mark.parametrize("point", ["pre", "post"])
def test_deeplift_by_hand(tiny, point):
    scores = neuron_importance(tiny, tiny.space_graph().spaces, labelled(), "deeplift", point)
    torch.testing.assert_close(scores["fc0"], EXPECTED + 1e-8)


@pytest.mark.parametrize("point", ["pre", "post"])
def test_conductance_by_hand(tiny, point):
    """Conductance is the path integral of the gradient through the unit, so it converges to the same values
    with the steps (the gradient's jump at unit 0's kink makes the pre-activation converge more slowly)."""
    spaces = tiny.space_graph().spaces
    error = [
        (neuron_importance(tiny, spaces, labelled(), "conductance", point, n_steps=n)["fc0"] - EXPECTED).abs().max()
        for n in (50, 1000)
    ]
    assert error[1] < 0.01 and error[1] < error[0]


def test_batches_accumulate(tiny):
    """One batch of both samples or two batches of one: the same score per sample."""
    x = torch.cat([b[0] for b in labelled()])
    y = torch.cat([b[1] for b in labelled()])
    spaces = tiny.space_graph().spaces
    together = neuron_importance(tiny, spaces, [(x, y)], "deeplift")
    torch.testing.assert_close(together["fc0"], neuron_importance(tiny, spaces, labelled(), "deeplift")["fc0"])


def test_uniform_is_ones_and_reads_no_data(tiny):
    class Untouchable:
        def __iter__(self):
            raise AssertionError("uniform importance must not read the data")

    scores = neuron_importance(tiny, tiny.space_graph().spaces, Untouchable(), "uniform")
    assert list(scores) == ["fc0"]
    assert torch.equal(scores["fc0"], torch.ones(2))


@pytest.mark.parametrize(
    ("family", "spec", "shape"),
    [
        ("vgg", {"depth": 11, "width": 0.05, "batch_norm": False}, (3, 16, 16)),
        ("resnet", {"depth": 8, "width": 0.5}, (3, 8, 8)),
        ("vit", {"patch": 4, "depth": 1, "width": 8, "heads": 2}, (3, 8, 8)),
    ],
)
@pytest.mark.parametrize("kind", ["conductance", "deeplift"])
def test_shapes_on_every_family(family, spec, shape, kind):
    """Conv channels (unit dim 1) and tokens' features (unit dim −1): one positive score per unit, on the model's
    device, for every space."""
    torch.manual_seed(0)
    model = build_model(family, spec, shape, {"all": 3}).eval()
    graph = model.space_graph()
    data = [(torch.randn(3, *shape), torch.tensor([0, 2, 1]))]
    scores = neuron_importance(model, graph.spaces, data, kind, n_steps=3)
    assert list(scores) == list(graph.names)
    for space in graph.spaces:
        s = scores[space.name]
        assert s.shape == (space.width,) and s.dtype == torch.float32 and s.device.type == "cpu"
        assert torch.isfinite(s).all() and (s >= 1e-8).all()
    assert any((s > 1e-6).any() for s in scores.values())


@pytest.mark.parametrize(
    ("family", "spec", "shape"),
    [
        ("mlp", {"hidden": [6, 5], "batch_norm": False}, (1, 4, 4)),
        ("vgg", {"depth": 11, "width": 0.05, "batch_norm": False}, (3, 16, 16)),
        ("resnet", {"depth": 8, "width": 0.5}, (3, 8, 8)),
        ("vit", {"patch": 4, "depth": 1, "width": 8, "heads": 2}, (3, 8, 8)),
    ],
)
@pytest.mark.parametrize("point", ["pre", "post"])
def test_one_pass_conductance_is_captums_layer_conductance(family, spec, shape, point):
    """Every space from one forward/backward equals captum's LayerConductance run on that space alone."""
    from captum.attr import LayerConductance

    from hetmerge.observe import probe

    torch.manual_seed(1)
    model = build_model(family, spec, shape, {"all": 3}).eval()
    head = next(iter(model.heads))
    x, y = torch.randn(4, *shape), torch.tensor([0, 2, 1, 2])
    spaces = [s for s in model.space_graph().spaces if point == "post" or s.act is not None or s.observe]
    scores = neuron_importance(model, spaces, [(x, y)], "conductance", point, n_steps=4)
    for space in spaces:
        module, on_input = probe(space, point)
        alone = LayerConductance(lambda batch: model(batch)[head], model.get_submodule(module)).attribute(
            x, baselines=torch.zeros_like(x), target=y, n_steps=4, attribute_to_layer_input=on_input
        )
        expected = alone.abs().movedim(space.unit_dim, -1).reshape(-1, space.width).sum(0) / len(x) + 1e-8
        torch.testing.assert_close(scores[space.name], expected, rtol=1e-4, atol=1e-6, msg=space.name)


def test_rejects_bad_input(tiny):
    spaces = tiny.space_graph().spaces
    two_heads = build_model("mlp", {"hidden": [2], "batch_norm": False}, (2,), {"a": 2, "b": 2})
    with pytest.raises(ValueError, match="exactly one head"):
        neuron_importance(two_heads, spaces, labelled(), "conductance")
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\)"):
        neuron_importance(tiny, spaces, [(torch.ones(1, 2), torch.tensor([2]))], "deeplift")
    with pytest.raises(ValueError, match="no samples"):
        neuron_importance(tiny, spaces, [], "conductance")
    with pytest.raises(ValueError, match="unknown neuron importance"):
        neuron_importance(tiny, spaces, labelled(), "saliency")


@pytest.mark.parametrize("method", ["otfusion", "kf", "kf_gradient"])
@pytest.mark.parametrize("kind", ["conductance", "deeplift"])
def test_precomputed_scores_give_the_merge_computed_ones_give(method, kind):
    """The pipeline's importance input (through JSON, as a job reads it) is the same scores as computing them."""
    import json

    from hetmerge.methods import PRECOMPUTE, MergeContext, build_method

    torch.manual_seed(3)
    models = [build_model("mlp", {"hidden": [6, 5], "batch_norm": False}, (1, 4, 4), {"all": 3}).eval() for _ in "AB"]
    data = [(torch.randn(8, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))]
    params = {"importance": kind, **({"epochs": 1, "head_epochs": 1} if method == "kf_gradient" else {})}

    def context(**extra):
        extra.setdefault("labelled", lambda: iter(data))
        return MergeContext(torch.device("cpu"), batches=lambda: (x for x, _ in data), **extra)

    record = json.loads(json.dumps(PRECOMPUTE[f"importance_{kind}"](models, context())))
    merger = build_method(method, params)
    assert merger.precomputed_inputs() == (f"importance_{kind}",)
    computed = merger(models, context()).state_dict()
    read = merger(models, context(precomputed={f"importance_{kind}": record}, labelled=None)).state_dict()
    for key, value in computed.items():
        assert torch.equal(read[key], value), key


def test_the_benchmark_agrees_with_captum_at_tiny_size(capsys):
    from benchmarks_loader import load_benchmark

    assert load_benchmark("importance").main(["--widths", "0.03", "--samples", "8", "--n-steps", "2"]) == 0
    assert "| True |" in capsys.readouterr().out
