"""Evaluation: task and joint accuracy on a hand-made case, parameter and MAC counts by hand."""

from __future__ import annotations

import pytest
import torch

from hetmerge.data import ImageDataset, Task, TaskSplit
from hetmerge.evaluation import accuracies, cost
from hetmerge.merged import MergedModel

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
