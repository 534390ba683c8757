"""The command line's error path: bad input ends in one line on stderr and exit status 1, never a traceback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hetmerge import checkpoint
from hetmerge.checkpoint import CheckpointError, save_model
from hetmerge.cli import main
from hetmerge.data import save_prepared, save_split

RULES = Path(__file__).resolve().parents[1] / "rules"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, digits, digits_split) -> Path:
    root = tmp_path_factory.mktemp("cli")
    save_prepared(digits, root / "digits.safetensors")
    save_split(digits_split, root / "split.json")
    return root


def error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI in-process; it must fail with exit status 1 and exactly one line on stderr."""
    assert main(argv) == 1
    err = capsys.readouterr().err.rsplit("\r", 1)[-1]  # after the progress bar's carriage returns, if any
    assert err.count("\n") == 1 and err.endswith("\n"), err
    return err.rstrip("\n")


def train_args(files: Path, tmp_path: Path, model: object, train: dict[str, object]) -> list[str]:
    return [
        *("train", "--data", str(files / "digits.safetensors"), "--split", str(files / "split.json")),
        *("--task", "A", "--seed", "0", "--device", "cpu", "--model", json.dumps(model)),
        *("--train", json.dumps(train), "--out", str(tmp_path / "model.safetensors")),
    ]


def test_diverging_training_is_a_one_line_error(
    files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = {"epochs": 1, "batch_size": 32, "lr": 1e30, "warmup_epochs": 0}
    line = error_line(capsys, train_args(files, tmp_path, {"family": "mlp", "spec": {"hidden": [8]}}, train))
    assert line.startswith("hetmerge train: error: training diverged in epoch 1")
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize(
    "model", [{"spec": {"hidden": [8]}}, {"family": "mlp", "spek": {}}, {"family": ["mlp"]}, ["mlp"]]
)
def test_model_without_family_is_a_one_line_error(
    files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], model: object
) -> None:
    line = error_line(capsys, train_args(files, tmp_path, model, {"epochs": 1}))
    assert line.startswith("hetmerge train: error: --model needs 'family' (one of [")
    assert "'mlp'" in line and json.dumps(model) in line


def test_report_names_a_truncated_result_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "base", "metrics": {"joint"')
    row = {"key": "model_a", "label": "Model A", "kind": "base", "results": {"0": str(bad)}}
    experiment = {"key": "e", "label": "E", "layout": "standard", "group": "e", "models": ["m", "m"]}
    spec = {
        "title": "t",
        "name": "t",
        "dataset": {"name": "digits", "label": "Digits"},
        "seeds": [0],
        "config": {},
        "experiments": [{**experiment, "model_labels": ["M", "M"], "rows": [row], "analyses": {}}],
    }
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"report": {"spec": spec}}))
    line = error_line(capsys, ["report", "--plan", str(plan), "--out-dir", str(tmp_path / "out")])
    assert line.startswith("hetmerge report: error: ") and str(bad) in line
    plan.write_text("{}")
    line = error_line(capsys, ["report", "--plan", str(plan), "--out-dir", str(tmp_path / "out")])
    assert line.startswith(f"hetmerge report: error: {plan} is not a plan with a report spec")


def test_corrupt_input_model_says_to_delete_it(files: Path, tmp_path: Path, make_model) -> None:
    """In a subprocess: nothing but the one line may reach stderr."""
    model = tmp_path / "model.safetensors"
    save_model(make_model("mlp", {"hidden": [8]}, {"A": 5}), model, {})
    model.write_bytes(model.read_bytes()[:-100])
    argv = ["evaluate", "--data", str(files / "digits.safetensors"), "--split", str(files / "split.json")]
    argv += ["--models", str(model), "--device", "cpu", "--out", str(tmp_path / "eval.json")]
    proc = subprocess.run(
        [sys.executable, "-m", "hetmerge", *argv], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("hetmerge evaluate: error: ") and str(model) in proc.stderr
    assert "delete it and rerun" in proc.stderr  # checkpoint.py's advice, else main()'s
    assert not (tmp_path / "eval.json").exists()


@pytest.mark.parametrize(
    ("message", "advice"),
    [
        ("checkpoint m.safetensors has format 'hetmerge/0', expected 'hetmerge/1'", True),
        ("m.safetensors: tensor 'w' does not match its checksum; delete it and rerun the job that made it", False),
        ("checkpoint m.safetensors does not exist", False),
    ],
)
def test_checkpoint_errors_get_the_delete_advice_once(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, message: str, advice: bool
) -> None:
    def unreadable(path: str) -> None:
        raise CheckpointError(message)

    monkeypatch.setattr(checkpoint, "load_tensors", unreadable)
    line = error_line(capsys, ["inspect", "m.safetensors"])
    suffix = "; if snakemake made that file, delete it and rerun snakemake, which remakes it" if advice else ""
    assert line == f"hetmerge inspect: error: {message}{suffix}"


def test_missing_checkpoint_is_not_called_corrupt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = error_line(capsys, ["inspect", str(tmp_path / "nowhere.safetensors")])
    assert line == f"hetmerge inspect: error: checkpoint {tmp_path / 'nowhere.safetensors'} does not exist"


def test_rule_shell_commands_quote_params_and_wildcards() -> None:
    """A config value or wildcard with a space or a shell character must reach the command as one argument."""
    unquoted = [
        (path.name, match.group(0))
        for path in sorted(RULES.glob("*.smk"))
        for match in re.finditer(r"\{(?:params|wildcards)\.\w+\}", path.read_text())
    ]
    assert unquoted == []
