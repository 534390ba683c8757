"""The Neuron Interpolation paper's training recipe as TrainSettings options (Adam, cosine schedule, AutoAugment,
CutMix): defaults train bit for bit as before the options existed and keep their fingerprints; the options match
hand computations and resume exactly."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_training import interrupt_in_epoch
from torch import nn

import hetmerge.training
from hetmerge.checkpoint import load_tensors
from hetmerge.data import iterate_batches, make_class_disjoint_split, make_label_map
from hetmerge.data.batches import _cifar10_autoaugment, auto_augment, cutmix, cutmix_box
from hetmerge.data.datasets import ImageDataset
from hetmerge.params import ParameterError, as_dict, parse_params
from hetmerge.plan import digest
from hetmerge.training import (
    TrainSettings,
    _fingerprint,
    _run_identity,
    lr_at,
    make_deterministic,
    make_optimizer,
    train_model,
)

MLP = ("mlp", {"hidden": [16], "batch_norm": True})
VGG = ("vgg", {"depth": 11, "width": 0.0625})
BEFORE = {  # TrainSettings() as as_dict gave it before the recipe options existed
    "epochs": 10,
    "batch_size": 128,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 0.0005,
    "warmup_epochs": 1.0,
    "augment": False,
    "label_smoothing": 0.0,
    "precision": "auto",
    "channels_last": "auto",
}
CASES = {  # dataset, model, settings; weights digests recorded with the training code before the options existed
    "mlp": ("digits", MLP, {"epochs": 2, "batch_size": 32, "lr": 0.05, "warmup_epochs": 0.5}, "636bd9f4a3d0c745"),
    "vgg_augment": (
        "rgb",
        VGG,
        {"epochs": 2, "batch_size": 16, "lr": 0.05, "warmup_epochs": 0.5, "augment": True, "label_smoothing": 0.1},
        "1debe2f99982131f",
    ),
}
RECORDED_WITH = "2.14.1"  # torch version of those digests: float kernels may differ in another


@pytest.fixture(scope="module")
def rgb():
    """Random 12x12 RGB uint8 images of 4 classes (flippable, like CIFAR) and a 2-task split of them."""
    gen = torch.Generator().manual_seed(5)
    data = ImageDataset(
        "rgb",
        torch.randint(0, 256, (200, 3, 12, 12), dtype=torch.uint8, generator=gen),
        torch.arange(200) % 4,
        torch.randint(0, 256, (40, 3, 12, 12), dtype=torch.uint8, generator=gen),
        torch.arange(40) % 4,
        tuple("abcd"),
        (0.5, 0.4, 0.3),
        (0.25, 0.2, 0.3),
        True,
    )
    split = make_class_disjoint_split(
        data.train_labels, data.test_labels, 4, 2, 0, 5, train_per_task=None, test_per_task=None, dataset="rgb"
    )
    return data, split


@pytest.fixture
def datasets(digits, digits_split, rgb):
    return {"digits": (digits, digits_split), "rgb": rgb}


@pytest.fixture
def train(datasets, cpu, make_model, keep_determinism_flag):
    """`train(dataset, model, seed=3, resume=None, **settings)` -> (model, history) on task A, as the CLI does."""

    def run(dataset, model, seed=3, resume=None, **values):
        data, split = datasets[dataset]
        make_deterministic(seed, cpu)
        net = make_model(*model, {"A": len(split.task("A").classes)}, data.input_shape, seed=seed)
        history = train_model(net, data, split, "A", TrainSettings(**values), seed, cpu, resume)
        return net, history

    return run


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode() + v.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def reference_training(model, data, split, s: TrainSettings, seed: int) -> list[float]:
    """The training loop as it was before the recipe options, written out: SGD with momentum, linear warm-up and
    decay per step, crop/flip, label smoothing, fp32. Returns the per-step losses."""
    info = split.task("A")
    indices = torch.as_tensor(split.train_indices["A"])
    images = data.train_images[indices]
    labels = make_label_map(info.label_map, data.num_classes)[data.train_labels[indices]]
    optimizer = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    criterion = nn.CrossEntropyLoss(label_smoothing=s.label_smoothing)
    per_epoch = len(indices) // s.batch_size
    total, warmup = s.epochs * per_epoch, s.warmup_epochs * per_epoch
    losses = []
    for epoch in range(s.epochs):
        model.train()
        batches = iterate_batches(
            images,
            labels,
            torch.arange(len(indices)),
            s.batch_size,
            data.mean,
            data.std,
            generator=generator,
            augment=s.augment,
            hflip=data.hflip,
            drop_last=True,
        )
        for i, (x, y) in enumerate(batches):
            step = epoch * per_epoch + i
            lr = s.lr * step / warmup if step < warmup else s.lr * max(0.0, (total - step) / max(1.0, total - warmup))
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = criterion(model.heads["A"](model.body(x)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("case", sorted(CASES))
def test_default_recipe_trains_bit_for_bit_as_before(case, train, datasets, cpu, make_model, keep_determinism_flag):
    dataset, model_kind, values, recorded = CASES[case]
    model, history = train(dataset, model_kind, **values)
    data, split = datasets[dataset]
    make_deterministic(3, cpu)
    reference = make_model(*model_kind, {"A": len(split.task("A").classes)}, data.input_shape, seed=3)
    losses = reference_training(reference, data, split, TrainSettings(**values), 3)
    assert weights_digest(model) == weights_digest(reference)
    per_epoch = len(losses) // len(history)
    assert [h["loss"] for h in history] == [
        sum(losses[e * per_epoch : (e + 1) * per_epoch]) / per_epoch for e in (0, 1)
    ]
    if torch.__version__.split("+")[0] == RECORDED_WITH:
        assert weights_digest(model) == recorded


def test_default_settings_keep_their_description_and_fingerprints(make_model, digits):
    default = TrainSettings()
    assert default.describe() == BEFORE
    assert digest(default.describe()) == digest(BEFORE)  # so the pipeline's model paths stay put
    model = make_model(*MLP, {"A": 5}, digits.input_shape)
    assert _fingerprint(_run_identity(model, "A", default, 3, 100)) == "8006aa1f2134c4cc"
    paper = TrainSettings(optimizer="adam", lr=1e-3, schedule="cosine", min_lr=1e-5, autoaugment=True, cutmix=1.0)
    described = paper.describe()
    assert {k: described[k] for k in ("optimizer", "schedule", "min_lr", "autoaugment", "cutmix")} == {
        "optimizer": "adam",
        "schedule": "cosine",
        "min_lr": 1e-5,
        "autoaugment": True,
        "cutmix": 1.0,
    }
    assert "beta1" not in described and set(as_dict(paper)) - set(described) == {"beta1", "beta2"}
    assert _run_identity(model, "A", paper, 3, 100) != _run_identity(model, "A", default, 3, 100)


def test_recipe_options_parse_from_config_and_reject_bad_values():
    parsed = parse_params(
        TrainSettings,
        {"optimizer": "adam", "beta2": 0.98, "schedule": "cosine", "min_lr": 1e-5, "autoaugment": True, "cutmix": 1},
        "training",
    )
    assert (parsed.optimizer, parsed.beta2, parsed.schedule, parsed.cutmix) == ("adam", 0.98, "cosine", 1.0)
    with pytest.raises(ParameterError, match="'adamw' is not one of"):
        parse_params(TrainSettings, {"optimizer": "adamw"}, "training")
    with pytest.raises(ParameterError, match="'step' is not one of"):
        parse_params(TrainSettings, {"schedule": "step"}, "training")
    with pytest.raises(ParameterError, match=r"'beta1': 1.0 is outside the allowed range \[0, 1\)"):
        parse_params(TrainSettings, {"beta1": 1.0}, "training")


def test_min_lr_above_lr_is_an_error(train):
    with pytest.raises(ValueError, match=r"min_lr 0\.5 is above lr 0\.1"):
        train("digits", MLP, epochs=1, lr=0.1, min_lr=0.5)


def test_cosine_and_linear_schedules_by_hand():
    cosine = TrainSettings(epochs=4, lr=1e-3, min_lr=1e-5, warmup_epochs=1.0, schedule="cosine")
    steps = 10  # per epoch: warm-up over steps 0..10, then 30 steps from lr to min_lr
    expected = {
        0: 0.0,
        5: 5e-4,
        10: 1e-3,
        20: 1e-5 + 0.99e-3 * (1 + math.cos(math.pi / 3)) / 2,  # a third of the way: 3/4 of the range left
        25: 1e-5 + 0.99e-3 / 2,
        40: 1e-5,
        45: 1e-5,
    }
    for step, lr in expected.items():
        assert lr_at(step, steps, cosine) == pytest.approx(lr, abs=1e-15), step
    linear = TrainSettings(epochs=4, lr=1e-3, min_lr=1e-5, warmup_epochs=1.0)
    assert lr_at(25, steps, linear) == pytest.approx(1e-5 + 0.99e-3 / 2, abs=1e-15)
    assert lr_at(40, steps, linear) == pytest.approx(1e-5, abs=1e-15)


def test_adam_trains_with_the_schedules_lr_and_the_papers_hyperparameters(train, monkeypatch):
    used = []

    def recording(params, s):
        optimizer = make_optimizer(params, s)
        step = optimizer.step
        optimizer.step = lambda *a, **k: (used.append(optimizer.param_groups[0]["lr"]), step(*a, **k))[1]
        used.append(optimizer)
        return optimizer

    monkeypatch.setattr(hetmerge.training, "make_optimizer", recording)
    values = {"epochs": 2, "batch_size": 64, "lr": 1e-3, "min_lr": 1e-5, "warmup_epochs": 0.5}
    _, history = train("digits", MLP, optimizer="adam", schedule="cosine", weight_decay=5e-5, **values)
    optimizer, lrs = used[0], used[1:]
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["weight_decay"] == 5e-5
    assert len(lrs) == 2 * 10  # task A's 673 training images make 10 steps of 64 per epoch
    cosine = {6: 1 / 15, 12: 7 / 15, 19: 14 / 15}  # after the 5 warm-up steps, the fraction of the 15 decay steps
    hand = {0: 0.0, 3: 1e-3 * 3 / 5} | {k: 1e-5 + 0.99e-3 * (1 + math.cos(math.pi * f)) / 2 for k, f in cosine.items()}
    for step, lr in hand.items():
        assert lrs[step] == pytest.approx(lr, rel=1e-12), step
    assert history[-1]["loss"] < history[0]["loss"]


def test_resume_with_adam_and_the_augmentations_matches_an_uninterrupted_run(train, rgb, tmp_path, monkeypatch, capsys):
    recipe = {"epochs": 3, "batch_size": 16, "lr": 1e-3, "optimizer": "adam", "schedule": "cosine", "min_lr": 1e-5}
    recipe.update(augment=True, autoaugment=True, cutmix=1.0, label_smoothing=0.1, warmup_epochs=1.0)
    reference, reference_history = train("rgb", VGG, **recipe)
    resume = tmp_path / "model.resume"
    restore = interrupt_in_epoch(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train("rgb", VGG, resume=resume, **recipe)
    restore()
    state, meta = load_tensors(resume)
    assert meta["epoch"] == 2
    assert {"optimizer.0.exp_avg", "optimizer.0.exp_avg_sq", "optimizer.0.step"} <= set(state)
    assert float(state["optimizer.0.step"]) == 2 * (len(rgb[1].train_indices["A"]) // 16)
    capsys.readouterr()
    model, history = train("rgb", VGG, resume=resume, **recipe)
    assert "after epoch 2" in capsys.readouterr().err
    assert [h["loss"] for h in history] == [h["loss"] for h in reference_history]
    assert weights_digest(model) == weights_digest(reference)


def test_cutmix_box_by_hand():
    # lam 0.75: half side 0.5 * sqrt(0.25) * 8 = 2 around (2, 7), clipped at the bottom edge
    assert cutmix_box(0.75, 2, 7, 8, 8) == (0, 5, 4, 8)
    assert cutmix_box(1.0, 3, 3, 8, 8) == (3, 3, 3, 3)  # nothing pasted
    assert cutmix_box(0.0, 4, 4, 8, 8) == (0, 0, 8, 8)  # the whole image
    assert cutmix_box(0.0, 4, 2, 6, 10) == (0, 0, 9, 5)  # side per dimension: 2 * int(0.5 * 10), 2 * int(0.5 * 6)


def test_cutmix_mixes_labels_by_the_box_area_on_a_tiny_batch():
    """Seed 6 draws u = 0.578 (lam of Beta(1, 1) is u itself) and the centre (x 3, y 4): half side
    int(0.5 * sqrt(1 - 0.578) * 8) = 2, so the box is columns 1..4 and rows 2..5, 16 of 64 pixels: kept 3/4."""
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 2, 8, 8).clone()  # image i is all i
    labels = torch.tensor([0, 2, 1, 2])
    mixed, targets, dominant = cutmix(images, labels, 3, 1.0, torch.Generator().manual_seed(6))
    box = torch.zeros(8, 8, dtype=torch.bool)
    box[2:6, 1:5] = True
    expected = torch.where(box, images.roll(1, 0), images)  # every image shows its predecessor's inside the box
    assert torch.equal(mixed, expected)
    neighbour = torch.tensor([2, 0, 2, 1])
    torch.testing.assert_close(targets, 0.75 * torch.eye(3)[labels] + 0.25 * torch.eye(3)[neighbour], rtol=0, atol=0)
    assert torch.equal(dominant, labels)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), alpha=st.sampled_from([0.2, 1.0, 5.0]), size=st.integers(1, 9))
def test_cutmix_targets_are_the_pixel_shares(seed, alpha, size):
    images = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 1, size, size + 1).clone()
    labels = torch.tensor([0, 1, 2])
    mixed, targets, dominant = cutmix(images, labels, 4, alpha, torch.Generator().manual_seed(seed))
    own = (mixed == images).float().mean((1, 2, 3))
    torch.testing.assert_close(targets[torch.arange(3), labels], own, rtol=0, atol=1e-6)
    torch.testing.assert_close(targets.sum(1), torch.ones(3))
    assert torch.equal(dominant, torch.where(own >= 0.5, labels, labels.roll(1, 0)))


def test_cutmix_soft_targets_with_label_smoothing_equal_the_papers_mixed_loss():
    """The paper mixes two smoothed losses, lam * CE(y) + (1 - lam) * CE(y'); one CE on the mixed soft targets is
    the same, since label smoothing is affine in the target."""
    gen = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(6, 5, generator=gen), torch.randint(0, 5, (6,), generator=gen)
    images = torch.randn(6, 3, 8, 8, generator=gen)
    _, targets, _ = cutmix(images, labels, 5, 1.0, gen)
    kept = float(targets[torch.arange(6), labels].min())
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    paper = kept * criterion(logits, labels) + (1 - kept) * criterion(logits, labels.roll(1, 0))
    torch.testing.assert_close(criterion(logits, targets), paper)


def reference_auto_augment(batch: torch.Tensor, seed: int) -> torch.Tensor:
    """Image by image, as torchvision's AutoAugment.forward does it, with the same draws as `auto_augment`."""
    aa = _cifar10_autoaugment()[0]
    gen = torch.Generator().manual_seed(seed)
    n, h, w = batch.shape[0], batch.shape[-2], batch.shape[-1]
    chosen = torch.randint(len(aa._policies), (n,), generator=gen)
    draws = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    negative = torch.rand(n, 2, generator=gen) < 0.5
    out = []
    for i in range(n):
        image = batch[i : i + 1]
        for slot, (name, probability, index) in enumerate(aa._policies[int(chosen[i])]):
            if not draws[i, slot] <= probability:
                continue
            magnitudes, signed = aa._AUGMENTATION_SPACE[name]
            values = magnitudes(10, h, w)
            magnitude = 0.0 if values is None else float(values[index])
            if signed and values is not None and negative[i, slot]:
                magnitude = -magnitude
            image = aa._apply_image_or_video_transform(image, name, magnitude, aa.interpolation, aa._fill)
        out.append(image)
    return torch.cat(out)


@pytest.mark.parametrize("channels", [1, 3])
def test_auto_augment_draws_a_sub_policy_per_image_and_is_seeded(channels):
    batch = torch.randint(0, 256, (64, channels, 10, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    out = auto_augment(batch, torch.Generator().manual_seed(9))
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    assert torch.equal(out, reference_auto_augment(batch, 9))
    assert torch.equal(out, auto_augment(batch, torch.Generator().manual_seed(9)))
    assert not torch.equal(out, auto_augment(batch, torch.Generator().manual_seed(10)))
    changed = (out != batch).flatten(1).any(1)
    assert 0 < int(changed.sum()) < 64  # per image: some images drew ops, others none or no-op ones


def test_autoaugment_and_cutmix_training_is_seeded(train):
    recipe = {"epochs": 1, "batch_size": 16, "autoaugment": True, "cutmix": 1.0, "augment": True}
    (a, ha), (b, hb) = train("rgb", VGG, **recipe), train("rgb", VGG, **recipe)
    assert weights_digest(a) == weights_digest(b) and ha[0]["loss"] == hb[0]["loss"]
    assert 0.0 <= ha[0]["train_acc"] <= 1.0
    plain, _ = train("rgb", VGG, epochs=1, batch_size=16, augment=True)
    assert weights_digest(a) != weights_digest(plain)
    with pytest.raises(ValueError, match="autoaugment=True needs a generator"):
        next(
            iterate_batches(
                torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2), [0, 1], 1, [0], [1], autoaugment=True
            )
        )
