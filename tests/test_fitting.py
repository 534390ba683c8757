"""The fit loop of the merges that learn: its steps by hand, the OneCycle schedule, clipping, early stopping and
keep-best, the checkpoint's bit-identical resume and its refusal of another run's state, and its errors."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from torch import nn

from hetmerge.fitting import FitSettings, fit

SGD = FitSettings(optimizer="sgd", lr=0.1, weight_decay=0.0, schedule="constant", precision="fp32")


def scalar(value: float) -> nn.Parameter:
    return nn.Parameter(torch.tensor([value], dtype=torch.float64))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("wd", [0.0, 0.5])
def test_sgd_on_a_quadratic_follows_the_hand_computed_steps(wd):
    """(p − 3)² from p = 0, lr 0.1, L2 decay wd: p ← p − 0.1·(2(p − 3) + wd·p), so after k steps
    p = c − c·a^k with a = 0.8 − 0.1·wd and c = 0.6/(1 − a); 4 rows in batches of 2 over 3 epochs: k = 6."""
    p = scalar(0.0)

    def quad() -> torch.Tensor:
        return ((p - 3) ** 2).sum()

    settings = dataclasses.replace(SGD, weight_decay=wd, epochs=3, batch_size=2)
    result = fit([p], lambda idx: quad(), torch.arange(4), quad, settings, gen(), desc="quad")
    a = 0.8 - 0.1 * wd
    c = 0.6 / (1 - a)
    assert p.item() == pytest.approx(c - c * a**6, rel=1e-12)
    assert result.epochs_run == 3 and result.best_epoch == 3 and result.resumed_from == 0
    assert result.initial_val_loss == 9.0 and result.best_val_loss == pytest.approx((p.item() - 3) ** 2, rel=1e-12)


def test_onecycle_lr_starts_peaks_and_ends_where_torch_defines_it():
    """A loss of gradient 1 under plain SGD moves p by exactly the step's lr: torch's OneCycleLR starts at lr/25,
    reaches lr at step pct_start·total − 1, and ends at lr/25/1e4, linearly in between."""
    p = scalar(0.0)
    seen = []

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        seen.append(p.item())
        return p.sum()

    settings = dataclasses.replace(SGD, lr=1.0, epochs=10, batch_size=8, schedule="onecycle", keep_best=False)
    fit([p], loss_on, torch.arange(5), p.item, settings, gen(), desc="cycle")
    lrs = [a - b for a, b in itertools.pairwise([*seen, p.item()])]
    assert len(lrs) == 10
    assert lrs[0] == pytest.approx(1 / 25)
    assert lrs[1] == pytest.approx((1 / 25 + 1) / 2)
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(1 / 25 / 1e4)
    assert max(lrs) == lrs[2]


@pytest.mark.parametrize("clip", [None, 1.0])
def test_clipping_bounds_the_step(clip):
    """Σ(p − (30, 40))² from 0 has a gradient of norm 100: one SGD step moves p by lr·100 unclipped, by lr·clip
    clipped (torch divides by norm + 1e-6)."""
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    target = torch.tensor([30.0, 40.0], dtype=torch.float64)

    def loss() -> torch.Tensor:
        return ((p - target) ** 2).sum()

    settings = dataclasses.replace(SGD, epochs=1, clip_grad_norm=clip)
    fit([p], lambda idx: loss(), torch.arange(1), loss, settings, gen(), desc="clip")
    expected = 0.1 * torch.tensor([60.0, 80.0], dtype=torch.float64)
    if clip is not None:
        expected = expected / (100 + 1e-6)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=0)


def scripted(values: list[float]):
    """A held-out loss that answers `values` in turn (the first: before training)."""
    answers = iter(values)
    return lambda: next(answers)


@pytest.mark.parametrize("keep_best", [True, False])
def test_patience_stops_and_keep_best_restores_the_best_epoch(keep_best):
    """Each epoch moves p by −0.1 (gradient 1, one step); the held-out loss improves at epochs 1 and 2, then not for
    3 epochs: patience 3 stops after epoch 5, and keep_best returns epoch 2's p = −0.2 (else the last, −0.5)."""
    p = scalar(0.0)
    settings = dataclasses.replace(SGD, epochs=20, patience=3, keep_best=keep_best)
    val = scripted([10.0, 9.0, 8.0, 8.5, 8.2, 8.1])
    result = fit([p], lambda idx: p.sum(), torch.arange(3), val, settings, gen(), desc="stop")
    assert (result.epochs_run, result.best_epoch, result.best_val_loss) == (5, 2, 8.0)
    assert p.item() == pytest.approx(-0.2 if keep_best else -0.5, rel=1e-12)


def test_keep_best_keeps_the_start_when_nothing_improves():
    p = scalar(1.0)
    result = fit(
        [p], lambda idx: p.sum(), torch.arange(3), lambda: 0.0, dataclasses.replace(SGD, epochs=4), gen(), desc="flat"
    )
    assert (result.best_epoch, result.epochs_run, p.item()) == (0, 4, 1.0)


class Interrupt(Exception):
    pass


def regression(seed: int = 1):
    """A tiny linear regression: 40 rows, a seeded Linear(3, 2) (built fresh, as a restarted job builds it)."""
    g = gen(seed)
    x, w = torch.randn(40, 3, generator=g), torch.randn(3, 2, generator=g)
    y = x @ w + 0.1 * torch.randn(40, 2, generator=g)
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    val = torch.arange(30, 40)

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        return ((model(x[idx]) - y[idx]) ** 2).mean()

    return model, loss_on, lambda: float(loss_on(val)), torch.arange(30)


RESUMABLE = [
    FitSettings(lr=0.05, epochs=6, batch_size=8, precision="fp32", clip_grad_norm=0.5),
    FitSettings(optimizer="sgd", momentum=0.9, lr=0.1, epochs=40, batch_size=8, schedule="constant", patience=2),
    FitSettings(optimizer="adam", lr=0.05, epochs=6, batch_size=8, keep_best=False),
]


@pytest.mark.parametrize("settings", RESUMABLE, ids=["adamw_onecycle_clip", "sgd_momentum_patience", "adam_last"])
def test_an_interrupted_fit_resumes_bit_identically(tmp_path, settings):
    """A run that dies mid-epoch (an exception from the loss), restarted in a fresh 'process' (new model, new
    generator) from its checkpoint, ends with the uninterrupted run's parameters and result, bit for bit; a third
    call finds the finished state and trains nothing."""
    model, loss_on, val, train = regression()
    reference = fit(list(model.parameters()), loss_on, train, val, settings, gen(), desc="ref")
    expected = [p.detach().clone() for p in model.parameters()]
    assert reference.epochs_run > 4
    path = tmp_path / "state.safetensors"

    model, loss_on, val, train = regression()
    calls = 0

    def dying(idx: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 3 * 4 + 2:  # 4 steps per epoch: in epoch 4
            raise Interrupt
        return loss_on(idx)

    with pytest.raises(Interrupt):
        fit(
            list(model.parameters()), dying, train, val, settings, gen(), desc="run", checkpoint=path, identity={"a": 1}
        )
    model, loss_on, val, train = regression()
    resumed = fit(
        list(model.parameters()), loss_on, train, val, settings, gen(), desc="run", checkpoint=path, identity={"a": 1}
    )
    assert resumed.resumed_from == 3
    assert dataclasses.replace(resumed, resumed_from=0) == reference
    for p, q in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p.detach(), q)

    def never(idx: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a finished run trains no more")

    model, _, val, train = regression()
    again = fit(
        list(model.parameters()), never, train, val, settings, gen(), desc="run", checkpoint=path, identity={"a": 1}
    )
    assert again.resumed_from == reference.epochs_run and again.epochs_run == reference.epochs_run
    for p, q in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p.detach(), q)


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    path = tmp_path / "state.safetensors"
    settings = FitSettings(lr=0.05, epochs=2, batch_size=8)
    model, loss_on, val, train = regression()
    fit(list(model.parameters()), loss_on, train, val, settings, gen(), desc="run", checkpoint=path, identity={"a": 1})
    with pytest.raises(ValueError, match=r"state\.safetensors was written for another run.*identity"):
        fit(
            list(model.parameters()),
            loss_on,
            train,
            val,
            settings,
            gen(),
            desc="run",
            checkpoint=path,
            identity={"a": 2},
        )
    with pytest.raises(ValueError, match=r"another run.*settings"):
        other = dataclasses.replace(settings, lr=0.01)
        fit(list(model.parameters()), loss_on, train, val, other, gen(), desc="run", checkpoint=path, identity={"a": 1})


@pytest.mark.parametrize(
    "field,value",
    [
        ("lr", 0.0),
        ("lr", math.nan),
        ("weight_decay", -1e-3),
        ("momentum", 1.0),
        ("epochs", 0),
        ("batch_size", 0),
        ("warmup", 1.5),
        ("clip_grad_norm", 0.0),
        ("patience", 0),
        ("optimizer", "lion"),
        ("schedule", "cosine"),
        ("precision", "fp8"),
    ],
)
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"fit settings: {field} must be"):
        FitSettings(**{field: value})


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"momentum 0\.9 is SGD's"):
        FitSettings(optimizer="adamw", momentum=0.9)
    p = scalar(0.0)
    with pytest.raises(ValueError, match="non-empty 1-D index tensor"):
        fit([p], lambda idx: p.sum(), torch.arange(0), lambda: 0.0, SGD, gen(), desc="empty")
    with pytest.raises(ValueError, match="no parameters"):
        fit([], lambda idx: p.sum(), torch.arange(2), lambda: 0.0, SGD, gen(), desc="none")
    frozen = nn.Parameter(torch.zeros(1), requires_grad=False)
    with pytest.raises(ValueError, match=r"parameter\(s\) \[1\] do not require gradients"):
        fit([p, frozen], lambda idx: p.sum(), torch.arange(2), lambda: 0.0, SGD, gen(), desc="frozen")
    with pytest.raises(FloatingPointError, match="training loss is nan in epoch 1"):
        fit([p], lambda idx: p.sum() * math.nan, torch.arange(2), lambda: 0.0, SGD, gen(), desc="nan")


def test_each_epoch_logs_one_line(capsys):
    """(p − 3)² from 0, lr 0.1, one step per epoch: the train loss of epoch 1 is 9 (at p = 0), p becomes 0.6 and
    the held-out loss 2.4² = 5.76; epoch 2: 5.76, p = 1.08, 1.92² = 3.6864."""
    p = scalar(0.0)

    def quad() -> torch.Tensor:
        return ((p - 3) ** 2).sum()

    fit([p], lambda idx: quad(), torch.arange(2), quad, dataclasses.replace(SGD, epochs=2), gen(), desc="quad")
    lines = [line for line in capsys.readouterr().err.splitlines() if " epoch " in line]
    assert lines == ["quad epoch 1/2: train 9 val 5.76 lr 0.1", "quad epoch 2/2: train 5.76 val 3.686 lr 0.1"]
