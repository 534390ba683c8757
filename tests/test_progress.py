"""Progress on stderr: throttled plain lines in log files (never a carriage return), a tqdm bar on a terminal,
nothing on stdout, and no effect on any result."""

from __future__ import annotations

import io
import sys
from types import SimpleNamespace

import pytest
import torch

from hetmerge import progress
from hetmerge.progress import ENV, Progress, duration, track
from hetmerge.statistics import collect_statistics
from hetmerge.training import TrainSettings, make_deterministic, train_model


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(err: str) -> list[str]:
    assert "\r" not in err
    return err.splitlines()


def test_a_log_gets_one_line_per_step_at_interval_zero_and_a_final_line(monkeypatch, capsys, clock):
    monkeypatch.setenv(ENV, "0")
    for _ in track(range(3), desc="demo", unit="batch"):
        clock.now += 2.0
    out, err = capsys.readouterr()
    assert out == ""
    assert lines(err) == [
        "demo: 1/3 batches (33%), 2.0 s, about 4.0 s left",
        "demo: 2/3 batches (67%), 4.0 s, about 2.0 s left",
        "demo: 3/3 batches (100%), 6.0 s",
        "demo: 3 batches in 6.0 s",
    ]


def test_lines_are_throttled_by_the_interval(monkeypatch, capsys, clock):
    monkeypatch.setenv(ENV, "10")
    with Progress("sweeps", unit="sweep") as shown:
        for _ in range(9):
            clock.now += 3.0
            shown.update()
    # at 3, 6, 9 s nothing; 12 s prints; then 15, 18 s nothing; 21 s (9 s after 12) nothing; 24 s prints; 27 s ends
    assert lines(capsys.readouterr().err) == [
        "sweeps: 4 sweeps, 12.0 s",
        "sweeps: 8 sweeps, 24.0 s",
        "sweeps: 9 sweeps in 27.0 s",
    ]


def test_a_fast_loop_prints_nothing_and_a_slow_one_only_its_final_line(monkeypatch, capsys, clock):
    monkeypatch.delenv(ENV, raising=False)  # the default interval, 10 s
    for _ in track(range(5), desc="fast"):
        clock.now += 0.1
    assert capsys.readouterr().err == ""
    for _ in track(range(2), desc="slow", unit="point"):
        clock.now += 0.6
    assert lines(capsys.readouterr().err) == ["slow: 2 points in 1.2 s"]


def test_a_loop_left_by_an_error_or_a_break_prints_no_final_line(monkeypatch, capsys, clock):
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(RuntimeError), Progress("failing", total=4) as shown:
        clock.now += 5.0
        shown.update()
        raise RuntimeError("stop")
    for _ in track(range(4), desc="left"):
        clock.now += 5.0
        break
    assert capsys.readouterr().err == ""


def test_a_resumed_loop_counts_its_earlier_steps_in_the_share_but_not_in_the_time_left(monkeypatch, capsys, clock):
    monkeypatch.setenv(ENV, "0")
    with Progress("fit", total=10, unit="epoch", initial=6) as shown:
        clock.now += 4.0
        shown.update(2)
    assert lines(capsys.readouterr().err) == [
        "fit: 8/10 epochs (80%), 4.0 s, about 4.0 s left",
        "fit: 2 epochs in 4.0 s (resumed after 6)",
    ]


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_interval_is_an_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=ENV):
        Progress("x")


def test_durations_read_as_a_person_would_write_them():
    assert [duration(s) for s in (3.14, 723.0, 7500.0)] == ["3.1 s", "12 min 03 s", "2 h 05 min"]


def test_a_terminal_gets_a_tqdm_bar_and_log_lines_above_it(monkeypatch, capsys):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setenv(ENV, "0")  # a terminal ignores it: the bar refreshes itself
    for step in track(range(3), desc="on a terminal", unit="batch"):
        if step == 1:
            progress.log("a line above the bar")
    shown = terminal.getvalue()
    assert "\r" in shown and "on a terminal" in shown and "a line above the bar\n" in shown
    assert "3 batches in" not in shown  # the bar vanishes instead of leaving a final line
    assert capsys.readouterr().out == ""


@pytest.fixture
def statistics_run(make_model, batches):
    """`statistics_run()` → activation statistics of two tiny MLPs over three batches."""
    models = [make_model("mlp", {"hidden": [6, 4]}, seed=s).eval() for s in (1, 2)]
    return lambda: collect_statistics(models, batches())


def test_statistics_report_progress_on_stderr_only_and_progress_changes_no_number(statistics_run, monkeypatch, capsys):
    monkeypatch.delenv(ENV, raising=False)
    quiet = statistics_run()
    assert capsys.readouterr() == ("", "")
    monkeypatch.setenv(ENV, "0")
    logged = statistics_run()
    out, err = capsys.readouterr()
    assert out == ""
    assert lines(err)[0].startswith("activation statistics: 1 batch, ")
    assert lines(err)[-1].startswith("activation statistics: 3 batches in ")
    monkeypatch.setattr(sys, "stderr", Terminal())
    barred = statistics_run()
    for other in (logged, barred):
        assert other.keys() == quiet.keys()
        for name, stats in quiet.items():
            assert torch.equal(other[name].mean, stats.mean) and torch.equal(other[name].cov, stats.cov)


def test_training_logs_progress_and_epochs_without_carriage_returns(
    digits, digits_split, cpu, make_model, keep_determinism_flag, monkeypatch, capsys
):
    monkeypatch.setenv(ENV, "0")
    settings = TrainSettings(epochs=2, batch_size=256, lr=0.05)
    make_deterministic(0, cpu)
    train_model(
        make_model("mlp", {"hidden": [8]}, {"A": 5}, digits.input_shape), digits, digits_split, "A", settings, 0, cpu
    )
    out, err = capsys.readouterr()
    steps = 2 * (len(digits_split.train_indices["A"]) // 256)
    assert out == ""
    logged = lines(err)
    assert logged[0].startswith(f"training A: 1/{steps} batches (")
    assert sum(line.startswith("[A] epoch ") for line in logged) == 2
    assert logged[-1].startswith(f"training A: {steps} batches in ")
