"""Evaluation: task and joint accuracy on a hand-made case, parameter and MAC counts by hand and against the
hand-written counter that `cost` used before FlopCounterMode, on every architecture and merged form."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from hetmerge.api import merge
from hetmerge.data import ImageDataset, Task, TaskSplit
from hetmerge.evaluation import accuracies, cost
from hetmerge.merged import MergedModel, UnitMap
from hetmerge.models import build_model

# 8 test images over 4 classes; image i has every pixel equal to i, so a fake model can tell them apart.
LABELS = [0, 1, 2, 3, 0, 1, 2, 3]
# Task A = classes (0, 2) -> test images 0, 2, 4, 6; task B = classes (1, 3) -> test images 1, 3, 5, 7.
# Logits per image: head A (class 0, class 2) and head B (class 1, class 3).
HEAD_A = {0: [2, 1], 2: [0, 1], 4: [0, 1], 6: [0, 5], 1: [0, 0], 3: [4, 0], 5: [0, 0], 7: [0, 0]}
HEAD_B = {0: [5, 0], 2: [3, 0], 4: [0, 0], 6: [0, 0], 1: [1, 0], 3: [0, 1], 5: [0, 1], 7: [1, 0]}
# By hand:
#   task A: img0 -> 0 ok, img2 -> 2 ok, img4 -> 2 wrong, img6 -> 2 ok                 = 3/4
#   task B: img1 -> 1 ok, img3 -> 3 ok, img5 -> 3 wrong, img7 -> 1 wrong              = 2/4
#   joint (argmax over [A0, A2, B1, B3] -> classes 0, 2, 1, 3):
#     img0 [2,1,5,0] -> 1 wrong, img2 [0,1,3,0] -> 1 wrong, img4 [0,1,0,0] -> 2 wrong, img6 -> 2 ok,
#     img1 [0,0,1,0] -> 1 ok, img3 [4,0,0,1] -> 0 wrong, img5 -> 3 wrong, img7 -> 1 wrong   = 2/8
#   joint without head B: A images as task A (3 right), B images all wrong               = 3/8


@pytest.fixture(scope="module")
def toy():
    images = torch.arange(8, dtype=torch.uint8).view(8, 1, 1, 1).expand(8, 1, 2, 2).contiguous()
    data = ImageDataset(
        name="toy",
        train_images=images,
        train_labels=torch.tensor(LABELS),
        test_images=images,
        test_labels=torch.tensor(LABELS),
        classes=("c0", "c1", "c2", "c3"),
        mean=(0.0,),
        std=(1.0,),
        hflip=False,
    )
    split = TaskSplit(
        dataset="toy",
        seed=0,
        kind="class_disjoint",
        tasks=(Task("A", (0, 2)), Task("B", (1, 3))),
        train_indices={"A": (0, 2), "B": (1, 3)},
        merge_indices=(),
        test_indices={"A": (0, 2, 4, 6), "B": (1, 3, 5, 7)},
    )
    return data, split


def fake_model(heads):
    def model(x):
        ids = (x[:, 0, 0, 0] * 255).round().long()
        return {t: torch.tensor([table[int(i)] for i in ids], dtype=torch.float32) for t, table in heads.items()}

    return model


@pytest.mark.parametrize("batch_size", [1, 3, 100])
def test_accuracies_by_hand(toy, cpu, batch_size):
    data, split = toy
    metrics = accuracies(fake_model({"A": HEAD_A, "B": HEAD_B}), data, split, batch_size, cpu)
    assert metrics["tasks"] == {"A": pytest.approx(3 / 4), "B": pytest.approx(2 / 4)}
    assert metrics["joint"] == pytest.approx(2 / 8)
    assert metrics["task_avg"] == pytest.approx(5 / 8)
    assert metrics["n_images"] == 8


def test_model_without_head_b(toy, cpu):
    data, split = toy
    metrics = accuracies(fake_model({"A": HEAD_A}), data, split, 3, cpu)
    assert metrics["tasks"] == {"A": pytest.approx(3 / 4), "B": None}
    assert metrics["joint"] == pytest.approx(3 / 8)
    assert metrics["task_avg"] is None


def test_unknown_task_and_wrong_head_size_are_errors(toy, cpu):
    data, split = toy
    with pytest.raises(ValueError, match=r"\['C'\]"):
        accuracies(fake_model({"A": HEAD_A, "C": HEAD_B}), data, split, 4, cpu)
    wide = {i: [*v, 0] for i, v in HEAD_B.items()}
    with pytest.raises(ValueError, match=r"'B' has 3 outputs.*2 classes"):
        accuracies(fake_model({"A": HEAD_A, "B": wide}), data, split, 4, cpu)


def test_cost_of_an_mlp_by_hand(make_model):
    plain = make_model("mlp", {"hidden": [16], "batch_norm": False}, {"A": 5})
    assert cost(plain, (1, 8, 8)) == {"params": 64 * 16 + 16 + 16 * 5 + 5, "flops": 64 * 16 + 16 * 5}
    with_bn = make_model("mlp", {"hidden": [16], "batch_norm": True}, {"A": 5})
    # no linear bias before BN; BN contributes 2 x 16 affine parameters and no MACs
    assert cost(with_bn, (1, 8, 8)) == {"params": 64 * 16 + 2 * 16 + 16 * 5 + 5, "flops": 64 * 16 + 16 * 5}


def test_cost_of_a_two_head_model_counts_both_heads(make_model):
    model = make_model("mlp", {"hidden": [16], "batch_norm": False}, {"A": 5, "B": 3})
    assert cost(model, (1, 8, 8)) == {"params": 1040 + 85 + 51, "flops": 1024 + 80 + 48}


def test_cost_of_an_ensemble_is_the_sum(make_model):
    a = make_model("mlp", {"hidden": [16], "batch_norm": False}, {"A": 5})
    b = make_model("mlp", {"hidden": [16], "batch_norm": False}, {"B": 3})
    ensemble = MergedModel(None, [a, b])
    assert cost(ensemble, (1, 8, 8)) == {"params": (1040 + 85) + (1040 + 51), "flops": (1024 + 80) + (1024 + 48)}
    assert ensemble.training  # cost() restores the mode it found


def test_cost_of_a_tiny_vgg_by_hand(make_model):
    # VGG-11 at width 1/64 on 8x8: channels 1, 2, 4, 4, 8, 8, 8, 8 at spatial sizes 8, 4, 2, 2, 1, 1, 1, 1
    # (ceil-mode pooling); every 3x3 conv costs H*W*C_out*C_in*9 MACs, with zero padding counted.
    model = make_model("vgg", {"depth": 11, "width": 1 / 64}, {"A": 5})
    layers = [(8, 1, 1), (4, 1, 2), (2, 2, 4), (2, 4, 4), (1, 4, 8), (1, 8, 8), (1, 8, 8), (1, 8, 8)]
    macs = sum(s * s * c_in * c_out * 9 for s, c_in, c_out in layers) + 8 * 5
    params = sum(c_in * c_out * 9 + 2 * c_out for _, c_in, c_out in layers) + 8 * 5 + 5
    assert (macs, params) == (3784, 2390)
    assert cost(model, (1, 8, 8)) == {"params": params, "flops": macs}


def test_cost_of_a_784_16_10_mlp_by_hand(make_model):
    model = make_model("mlp", {"hidden": [16], "batch_norm": False}, {"A": 10}, (1, 28, 28))
    assert cost(model, (1, 28, 28)) == {"params": 784 * 16 + 16 + 16 * 10 + 10, "flops": 784 * 16 + 16 * 10}


def _reference_macs(module: nn.Module, output: torch.Tensor) -> int:
    per_sample_out = output[0].numel()
    if isinstance(module, nn.Conv2d):
        return per_sample_out * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
    if isinstance(module, nn.Linear):
        return per_sample_out * module.in_features
    if isinstance(module, UnitMap):
        return per_sample_out * module.weight.shape[1]
    return 0


@torch.no_grad()
def reference_cost(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """The hand-written counter `cost` used before FlopCounterMode (forward hooks; MACs of the Conv2d, Linear and
    UnitMap layers that ran, from their output sizes): the numbers in results.csv files written until then."""
    ran: dict[int, nn.Module] = {}
    total = [0]

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
        ran[id(module)] = module
        if isinstance(output, torch.Tensor) and not list(module.children()):
            total[0] += _reference_macs(module, output)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    model.eval()
    try:
        model(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
    params = sum(p.numel() for m in ran.values() for p in m.parameters(recurse=False))
    return {"params": int(params), "flops": int(total[0])}


SHAPE = (1, 8, 8)
VIT = {"patch": 4, "depth": 2, "width": 16, "heads": 2}
PLAIN = {
    "mlp-bn": ("mlp", {"hidden": [16, 16], "batch_norm": True}, SHAPE),
    "mlp-no-bn": ("mlp", {"hidden": [16, 16], "batch_norm": False}, SHAPE),
    "vgg11": ("vgg", {"depth": 11, "width": 1 / 16}, SHAPE),
    "vgg11-no-bn": ("vgg", {"depth": 11, "width": 1 / 16, "batch_norm": False}, SHAPE),
    "vgg13-stages": ("vgg", {"depth": 13, "width": 1 / 16, "variant": "stages"}, (1, 28, 28)),
    "resnet20": ("resnet", {"depth": 20, "width": 0.25}, SHAPE),
    "resnet8-groupnorm": ("resnet", {"depth": 8, "width": 0.5, "norm": "group", "groups": 4}, SHAPE),
    "resnet50": ("resnet", {"depth": 50, "width": 0.125}, SHAPE),
    "resnet26": ("resnet", {"depth": 26, "width": 0.125}, SHAPE),
    "vit-cls": ("vit", VIT, SHAPE),
    "vit-mean-paper": ("vit", {**VIT, "pool": "mean", "mlp_out_act": True, "attn_scale": "width"}, (3, 16, 16)),
}


def _pair(family: str, spec: dict[str, Any], shape: tuple[int, ...] = SHAPE) -> list[nn.Module]:
    models = []
    for seed, head in ((1, {"A": 3}), (2, {"B": 2})):
        torch.manual_seed(seed)
        models.append(build_model(family, spec, shape, head).eval())
    return models


def _merged(kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    """Every merged form results.csv holds: full and partial zips (the partial one with UnitMaps), an ensemble,
    a heterogeneous (depth-padded) merge, and a ViT zip."""
    data = [torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    if kind == "zip-mlp":
        return merge(_pair("mlp", {"hidden": [16, 16]}), "zipit", data=data), SHAPE
    if kind == "partial-zip-resnet":
        model = merge(_pair("resnet", {"depth": 8, "width": 0.25}), "zipit", {"stop_after": "s2b0"}, data=data)
        assert any(isinstance(m, UnitMap) for m in model.modules())
        return model, SHAPE
    if kind == "partial-zip-vgg":
        return merge(_pair("vgg", {"depth": 11, "width": 1 / 16}), "zipit", {"stop_after": "conv3"}, data=data), SHAPE
    if kind == "ensemble-vit":
        return merge(_pair("vit", VIT), "ensemble", data=data), SHAPE
    if kind == "zip-vit":
        return merge(_pair("vit", VIT), "zipit", data=data), SHAPE
    if kind == "hetero-resnet14+8":
        deep, shallow = (_pair("resnet", {"depth": depth, "width": 0.25})[k] for depth, k in ((14, 0), (8, 1)))
        return merge([deep, shallow], "hetero", data=data), SHAPE
    if kind == "shared-layers":  # one layer in two networks, one network twice: layers with several paths
        a, b = _pair("mlp", {"hidden": [16]})
        b.body.fc0.linear = a.body.fc0.linear
        return MergedModel(None, [a, b, a]), SHAPE
    raise AssertionError(kind)


MERGED = [
    "zip-mlp",
    "partial-zip-resnet",
    "partial-zip-vgg",
    "ensemble-vit",
    "zip-vit",
    "hetero-resnet14+8",
    "shared-layers",
]


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_cost_equals_the_hand_written_counter_on_every_architecture(name):
    family, spec, shape = PLAIN[name]
    torch.manual_seed(0)
    model = build_model(family, spec, shape, {"A": 5, "B": 3})
    assert cost(model, shape) == reference_cost(model, shape)


@pytest.mark.parametrize("kind", MERGED)
def test_cost_equals_the_hand_written_counter_on_every_merged_form(kind):
    model, shape = _merged(kind)
    assert cost(model, shape) == reference_cost(model, shape)


SHAPE_X = torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(0))


def test_cost_leaves_out_attention_products_and_unused_trunk_layers(make_model):
    """One ViT block at width 16 over 4 patches + class token (5 tokens): q, k, v, proj and the MLP's two linear
    layers count, the scores (5x5 per head) and their product with v do not."""
    model = make_model("vit", {**VIT, "depth": 1, "mlp_ratio": 2.0}, {"A": 5})
    tokens, width = 5, 16
    macs = 4 * 16 * 16 + tokens * (4 * width * width + 2 * width * 2 * width) + width * 5
    assert cost(model, SHAPE)["flops"] == macs
    partial = merge(_pair("resnet", {"depth": 8, "width": 0.25}), "zipit", {"stop_after": "s1b0"}, data=[SHAPE_X])
    parts = [partial.trunk, *partial.branches]
    # everything would cost the parts in full plus the unmerge maps
    assert cost(partial, SHAPE)["flops"] < sum(cost(m, SHAPE)["flops"] for m in parts)
