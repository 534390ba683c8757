"""Training: bit-exact determinism on CPU, resumption after an interruption, the learning-rate schedule."""

from __future__ import annotations

import itertools

import pytest
import torch

import hetmerge.training
from hetmerge.checkpoint import load_tensors
from hetmerge.training import TrainSettings, lr_at, make_deterministic, train_model

SPEC = {"hidden": [16], "batch_norm": True}


@pytest.fixture
def train(digits, digits_split, cpu, make_model):
    """`train(seed, resume=None, **settings)` -> (model, history): a tiny MLP on task A, as the CLI does it."""
    was = torch.are_deterministic_algorithms_enabled()

    def run(seed=0, resume=None, **overrides):
        settings = TrainSettings(**{"epochs": 3, "batch_size": 32, "lr": 0.05, "warmup_epochs": 0.5, **overrides})
        make_deterministic(seed, cpu)
        model = make_model("mlp", SPEC, {"A": 5}, digits.input_shape, seed=seed)
        history = train_model(model, digits, digits_split, "A", settings, seed, cpu, resume)
        return model, history

    yield run
    torch.use_deterministic_algorithms(was)


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_same_seed_gives_bit_identical_weights(train):
    (a, ha), (b, hb) = train(0), train(0)
    assert same_state(a, b)
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
    assert not a.training


def test_different_seeds_give_different_weights(train):
    assert not same_state(train(0)[0], train(1)[0])


def test_training_learns(train, digits, digits_split):
    _, history = train(0)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["train_acc"] > 0.8


def interrupt_in_epoch(monkeypatch, epoch):
    """Make the `epoch`-th pass over the data (1-based) raise, after the state of the previous epoch was saved."""
    real = hetmerge.training.iterate_batches
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(hetmerge.training, "iterate_batches", flaky)
    return lambda: monkeypatch.setattr(hetmerge.training, "iterate_batches", real)


def test_resume_after_interruption_matches_an_uninterrupted_run(train, tmp_path, monkeypatch, capsys):
    reference, reference_history = train(0)
    resume = tmp_path / "state" / "model.resume"
    restore = interrupt_in_epoch(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(0, resume)
    restore()
    _, meta = load_tensors(resume)
    assert meta["epoch"] == 2 and [h["epoch"] for h in meta["history"]] == [1, 2]
    capsys.readouterr()

    model, history = train(0, resume)
    assert "after epoch 2" in capsys.readouterr().err
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["loss"] for h in history] == [h["loss"] for h in reference_history]
    assert same_state(model, reference)


def test_resume_state_of_other_settings_is_ignored(train, tmp_path, monkeypatch, capsys):
    resume = tmp_path / "model.resume"
    restore = interrupt_in_epoch(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(0, resume, lr=0.05)
    restore()
    capsys.readouterr()

    model, history = train(0, resume, lr=0.1)
    assert "resuming" not in capsys.readouterr().err
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert same_state(model, train(0, lr=0.1)[0])
    assert load_tensors(resume)[1]["epoch"] == 3  # overwritten by the new run


def test_unreadable_resume_state_is_ignored(train, tmp_path):
    resume = tmp_path / "model.resume"
    resume.write_bytes(b"not a checkpoint")
    model, history = train(0, resume)
    assert len(history) == 3
    assert same_state(model, train(0)[0])


def test_lr_schedule_by_hand():
    s = TrainSettings(epochs=4, lr=0.1, warmup_epochs=1.0)
    steps = 10  # per epoch: warm-up is steps 0..10, decay over the remaining 30 steps
    expected = {0: 0.0, 1: 0.01, 5: 0.05, 10: 0.1, 11: 0.1 * 29 / 30, 25: 0.05, 39: 0.1 / 30, 40: 0.0, 45: 0.0}
    for step, lr in expected.items():
        assert lr_at(step, steps, s) == pytest.approx(lr, abs=1e-12), step
    lrs = [lr_at(i, steps, s) for i in range(40)]
    assert max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == 10
    assert all(a < b for a, b in itertools.pairwise(lrs[:11]))  # strictly rising warm-up
    assert all(a > b for a, b in itertools.pairwise(lrs[10:]))  # strictly falling decay


def test_lr_schedule_without_warmup_and_with_fractional_warmup():
    assert lr_at(0, 8, TrainSettings(epochs=2, lr=0.2, warmup_epochs=0.0)) == pytest.approx(0.2)
    assert lr_at(8, 8, TrainSettings(epochs=2, lr=0.2, warmup_epochs=0.0)) == pytest.approx(0.1)
    half = TrainSettings(epochs=2, lr=0.2, warmup_epochs=0.5)
    assert lr_at(2, 8, half) == pytest.approx(0.1)
    assert lr_at(4, 8, half) == pytest.approx(0.2)
    assert lr_at(10, 8, half) == pytest.approx(0.2 * 6 / 12)


def test_training_needs_a_head_for_the_task(digits, digits_split, cpu, make_model):
    model = make_model("mlp", SPEC, {"B": 5})
    with pytest.raises(ValueError, match="no head for task 'A'"):
        train_model(model, digits, digits_split, "A", TrainSettings(epochs=1), 0, cpu)


def test_training_needs_one_full_batch(digits, digits_split, cpu, make_model):
    model = make_model("mlp", SPEC, {"A": 5})
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_model(model, digits, digits_split, "A", TrainSettings(epochs=1, batch_size=10_000), 0, cpu)
