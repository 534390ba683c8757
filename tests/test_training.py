"""Training: bit-exact determinism on CPU, resumption after an interruption, the learning-rate schedule,
mixed precision and channels-last, and the training benchmark."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from benchmarks_loader import load_benchmark

import hetmerge.training
from hetmerge.checkpoint import load_tensors, save_tensors
from hetmerge.cli import main as cli_main
from hetmerge.data import iterate_batches, save_prepared, save_split
from hetmerge.params import ParameterError, parse_params
from hetmerge.training import (
    TrainSettings,
    lr_at,
    make_deterministic,
    resolve_channels_last,
    resolve_precision,
    train_model,
)

SPEC = {"hidden": [16], "batch_norm": True}
VGG = ("vgg", {"depth": 11, "width": 0.0625})


@pytest.fixture
def train(digits, digits_split, cpu, make_model, keep_determinism_flag):
    """`train(seed, resume=None, model=("mlp", SPEC), **settings)` -> (model, history): a tiny net on task A,
    as the CLI does it."""

    def run(seed=0, resume=None, model=("mlp", SPEC), **overrides):
        settings = TrainSettings(**{"epochs": 3, "batch_size": 32, "lr": 0.05, "warmup_epochs": 0.5, **overrides})
        make_deterministic(seed, cpu)
        model = make_model(*model, {"A": 5}, digits.input_shape, seed=seed)
        history = train_model(model, digits, digits_split, "A", settings, seed, cpu, resume)
        return model, history

    return run


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
    err = capsys.readouterr().err
    assert "resuming" not in err
    # reported, naming the state and what differs, never silently dropped
    assert f"ignoring resume state {resume}: it was written for other training settings: lr 0.05 (now 0.1)" in err
    assert "starting from epoch 1" in err
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert same_state(model, train(0, lr=0.1)[0])
    assert load_tensors(resume)[1]["epoch"] == 3  # overwritten by the new run


def test_resume_state_of_another_seed_is_reported(train, tmp_path, monkeypatch, capsys):
    resume = tmp_path / "model.resume"
    restore = interrupt_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(3, resume)
    restore()
    capsys.readouterr()
    model, history = train(0, resume)
    assert "written for seed 3 (now 0); starting from epoch 1" in capsys.readouterr().err
    assert len(history) == 3 and same_state(model, train(0)[0])


def test_resume_state_of_an_older_version_is_reported_by_fingerprint(train, tmp_path, capsys):
    """A state that records only its fingerprint (written before the run record existed) is not silently dropped."""
    resume = tmp_path / "model.resume"
    save_tensors(resume, {"generator": torch.Generator().get_state()}, {"epoch": 1, "fingerprint": "0" * 16})
    _, history = train(0, resume)
    err = capsys.readouterr().err
    assert f"ignoring resume state {resume}: it was written for settings with fingerprint '{'0' * 16}'" in err
    assert "starting from epoch 1" in err and len(history) == 3


def test_cli_keeps_training_state_next_to_its_output(tmp_path, digits, digits_split, cpu, make_model, capsys):
    """Two outputs of one file name in different folders (other seeds, task counts, datasets) never share a
    training state: it is keyed by the output's full path and removed once the model is saved."""
    save_prepared(digits, tmp_path / "digits.safetensors")
    save_split(digits_split, tmp_path / "split.json")
    settings = {"epochs": 2, "batch_size": 64}
    first, second = tmp_path / "s0" / "mlp-A.safetensors", tmp_path / "s1" / "mlp-A.safetensors"
    state = first.parent / "mlp-A.safetensors.resume"
    # a finished run's state for `first`, exactly as the CLI would have left it had it been killed before saving
    make_deterministic(0, cpu)
    model = make_model("mlp", SPEC, {"A": 5}, digits.input_shape, seed=0)
    train_model(model, digits, digits_split, "A", TrainSettings(**settings), 0, cpu, state)
    before = state.read_bytes()

    def cli(out):
        args = ["train", "--data", str(tmp_path / "digits.safetensors"), "--split", str(tmp_path / "split.json")]
        args += ["--task", "A", "--seed", "0", "--device", "cpu", "--threads", "1", "--out", str(out)]
        args += ["--model", json.dumps({"family": "mlp", "spec": SPEC}), "--train", json.dumps(settings)]
        assert cli_main(args) == 0
        return capsys.readouterr().err

    capsys.readouterr()
    assert "resum" not in cli(second)  # same file name, another folder: trains from scratch
    assert state.read_bytes() == before  # and leaves the other output's state alone
    assert not (second.parent / "mlp-A.safetensors.resume").exists()
    assert f"resuming from {state} after epoch 2" in cli(first)
    assert not state.exists()  # deleted once the model is saved
    assert sorted(p.name for p in first.parent.iterdir()) == ["mlp-A.safetensors"]


def test_unreadable_resume_state_is_ignored(train, tmp_path, capsys):
    resume = tmp_path / "model.resume"
    resume.write_bytes(b"not a checkpoint")
    model, history = train(0, resume)
    assert "ignoring unreadable resume state" in capsys.readouterr().err
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


def test_precision_and_channels_last_parse_from_config():
    parsed = parse_params(TrainSettings, {"precision": "bf16", "channels_last": True}, "training")
    assert (parsed.precision, parsed.channels_last) == ("bf16", True)
    assert parse_params(TrainSettings, {"channels_last": "auto"}, "training").channels_last == "auto"
    assert (TrainSettings().precision, TrainSettings().channels_last) == ("auto", "auto")
    with pytest.raises(ParameterError, match="'fp8' is not one of"):
        parse_params(TrainSettings, {"precision": "fp8"}, "training")
    with pytest.raises(ParameterError, match="channels_last"):
        parse_params(TrainSettings, {"channels_last": "yes"}, "training")


def test_auto_precision_is_fp32_on_cpu_and_bf16_on_a_bf16_gpu(cpu, monkeypatch):
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"  # allowed on request, never the default
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert resolve_precision("auto", cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision("auto", cuda) == "fp32"  # emulated bf16 is slow: not chosen automatically


def test_half_precision_that_autocast_cannot_run_is_a_clear_error(cpu, monkeypatch):
    monkeypatch.setattr(hetmerge.training, "_autocast_runs", lambda device, dtype: False)
    with pytest.raises(ValueError, match=r"precision 'fp16': .* no fp16 autocast on cpu; use fp32"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", cpu)


def test_channels_last_only_for_conv_nets_and_auto_only_on_cuda(cpu, make_model):
    cuda = torch.device("cuda")
    mlp, vgg = make_model("mlp", SPEC), make_model(*VGG)
    assert [resolve_channels_last(s, vgg, cpu) for s in ("auto", True, False)] == [False, True, False]
    assert [resolve_channels_last(s, vgg, cuda) for s in ("auto", True, False)] == [True, True, False]
    assert not any(resolve_channels_last(s, mlp, d) for s in ("auto", True) for d in (cpu, cuda))


def test_default_on_cpu_is_plain_fp32_nchw(train):
    (a, ha), (b, hb) = train(0, model=VGG), train(0, model=VGG, precision="fp32", channels_last=False)
    assert same_state(a, b)
    assert [(h["loss"], h["train_acc"]) for h in ha] == [(h["loss"], h["train_acc"]) for h in hb]


def test_bf16_training_on_cpu_is_close_to_fp32(train):
    (a, ha), (b, hb) = train(0), train(0, precision="bf16")
    assert not same_state(a, b)  # autocast really ran in bf16
    assert all(math.isfinite(h["loss"]) for h in hb)
    assert [h["loss"] for h in hb] == pytest.approx([h["loss"] for h in ha], abs=0.01)
    assert hb[-1]["train_acc"] > 0.8
    assert same_state(b, train(0, precision="bf16")[0])  # deterministic too


def test_channels_last_training_on_cpu_matches_nchw(train, digits):
    (a, ha), (b, hb) = train(0, model=VGG), train(0, model=VGG, channels_last=True)
    assert all(t.is_contiguous() for t in b.state_dict().values())  # handed back in the default layout
    assert [h["loss"] for h in hb] == pytest.approx([h["loss"] for h in ha], rel=1e-4)
    x, _ = next(iterate_batches(digits.test_images, digits.test_labels, range(64), 64, digits.mean, digits.std))
    with torch.no_grad():
        ya, yb = a(x)["A"], b(x)["A"]
    assert torch.allclose(ya, yb, rtol=1e-4, atol=1e-4 * ya.abs().max().item())


@pytest.mark.skipif(
    not hetmerge.training._autocast_runs(torch.device("cpu"), torch.float16), reason="no fp16 autocast on this CPU"
)
def test_fp16_grad_scaler_state_survives_resume(train, tmp_path, monkeypatch, capsys):
    reference, reference_history = train(0, precision="fp16")
    resume = tmp_path / "model.resume"
    restore = interrupt_in_epoch(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(0, resume, precision="fp16")
    restore()
    saved = load_tensors(resume)[1]["grad_scaler"]
    assert saved["scale"] > 0 and "_growth_tracker" in saved
    loaded = []
    real_load = torch.amp.GradScaler.load_state_dict

    def spy(self, state):
        loaded.append(state)
        real_load(self, state)

    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict", spy)
    capsys.readouterr()
    model, history = train(0, resume, precision="fp16")
    assert "after epoch 2" in capsys.readouterr().err
    assert loaded == [saved]
    assert [h["loss"] for h in history] == [h["loss"] for h in reference_history]
    assert same_state(model, reference)


@pytest.mark.parametrize(
    ("model", "train_settings", "expected"),
    [
        (("mlp", SPEC), {}, ("fp32", False)),
        (VGG, {"precision": "bf16", "channels_last": True}, ("bf16", True)),
    ],
    ids=["default", "bf16-channels-last"],
)
def test_checkpoint_metadata_records_resolved_precision(
    tmp_path, digits, digits_split, model, train_settings, expected, keep_determinism_flag
):
    save_prepared(digits, tmp_path / "digits.safetensors")
    save_split(digits_split, tmp_path / "split.json")
    out = tmp_path / "model.safetensors"
    args = ["train", "--data", str(tmp_path / "digits.safetensors"), "--split", str(tmp_path / "split.json")]
    args += ["--task", "A", "--seed", "0", "--device", "cpu", "--threads", "1", "--out", str(out)]
    args += ["--model", json.dumps({"family": model[0], "spec": model[1]})]
    args += ["--train", json.dumps({"epochs": 1, "batch_size": 64, **train_settings})]
    assert cli_main(args) == 0
    info = load_tensors(out)[1]["info"]
    assert (info["precision"], info["channels_last"]) == expected
    assert info["train"]["precision"] == train_settings.get("precision", "auto")


def test_training_benchmark_runs_with_tiny_sizes(capsys):
    module = load_benchmark("training")
    was = torch.are_deterministic_algorithms_enabled()
    assert module.main(["--images", "256", "--epochs", "2", "--json", "--device", "cpu"]) == 0
    assert torch.are_deterministic_algorithms_enabled() == was
    rows = json.loads(capsys.readouterr().out)
    assert [(r["device"], r["precision"]) for r in rows] == [("cpu", "fp32"), ("cpu", "bf16")]
    for r in rows:
        assert r["channels_last"] is False and r["steps_per_epoch"] == 2 and r["clock"] == "cpu"
        assert len(r["train_model_epochs_s"]) == len(r["plain_epochs_s"]) == 2
        assert r["train_model_s"] > 0 and r["plain_s"] > 0
        assert r["ratio"] == pytest.approx(r["train_model_s"] / r["plain_s"])
