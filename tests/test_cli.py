"""The command line: its error path (bad input ends in one line on stderr and exit status 1, never a traceback),
its help, version, method list and checkpoint view."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import hetmerge
from hetmerge import checkpoint
from hetmerge.checkpoint import CheckpointError, load_model, save_model
from hetmerge.cli import KNOWN_DATASETS, KNOWN_FAMILIES, MERGE_EPILOG, build_parser, main, method_summary
from hetmerge.data import DATASETS, save_prepared, save_split
from hetmerge.methods import REGISTRY, build_method
from hetmerge.models import FAMILIES
from hetmerge.papers import PAPERS

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
    err = capsys.readouterr().err
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


# ------------------------------------------------------------------------------------------- help and version


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"hetmerge {hetmerge.__version__}\n"


def test_module_version_imports_no_torch() -> None:
    """`python -m hetmerge --version`, run in-process as it is without the worker, answers without torch."""
    script = (
        "import runpy, sys\n"
        "sys.argv = ['hetmerge', '--version']\n"
        "try:\n"
        "    runpy.run_module('hetmerge', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exit_:\n"
        "    print(exit_.code, 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "HETMERGE_WORKER": "0"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.stdout == f"hetmerge {hetmerge.__version__}\n0 False\n", proc.stderr


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _undocumented(parser: argparse.ArgumentParser) -> Iterator[str]:
    """'PROG OPTION' of every argument and subcommand of `parser` and its subcommands without a help text."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if not (action.help or "").strip():
            yield f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
        if isinstance(action, argparse._SubParsersAction):
            yield from (f"{parser.prog} {c.dest}" for c in action._choices_actions if not (c.help or "").strip())
            for sub in action.choices.values():
                yield from _undocumented(sub)


def test_every_option_has_help() -> None:
    parser = build_parser()
    assert list(_undocumented(parser)) == []
    assert set(_subparsers(parser)) >= {"data", "train", "merge", "methods", "inspect"}
    _subparsers(parser)["merge"].add_argument("--undocumented")  # the walk finds an option without help
    assert list(_undocumented(parser)) == ["hetmerge merge --undocumented"]


def test_help_names_the_known_datasets_and_families() -> None:
    """The help lists them without importing torch; they must stay the registries' names."""
    assert tuple(sorted(DATASETS)) == KNOWN_DATASETS
    assert tuple(sorted(FAMILIES)) == KNOWN_FAMILIES


def test_merge_help_example_parses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    out = capsys.readouterr().out
    assert "JSON object of the method's parameters" in out and MERGE_EPILOG.splitlines()[1] in out
    command = " ".join(line.strip().rstrip("\\") for line in MERGE_EPILOG.splitlines()[1:5])
    argv = shlex.split(command)
    assert argv[:2] == ["hetmerge", "merge"]
    args = build_parser().parse_args(argv[1:])
    assert args.params == {"alpha": 0.3, "beta": 0.125} and args.result == "zipit.json"
    build_method(args.method, args.params)  # a method and parameters that exist


# ---------------------------------------------------------------------------------------------------- methods


def test_every_method_has_a_description_and_a_paper() -> None:
    for name, cls in REGISTRY.items():
        assert cls.__doc__, name
        summary = method_summary(cls)
        assert summary == cls.__doc__.strip() and "\n" not in summary, name  # one line, the whole docstring
        if cls.paper is None:
            assert name in ("ensemble", "average"), name
        else:
            assert cls.paper in PAPERS, (name, cls.paper)


def test_methods_lists_every_method_with_its_paper(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == sorted(REGISTRY)
    for line, (name, cls) in zip(lines, sorted(REGISTRY.items()), strict=True):
        paper = "baseline" if cls.paper is None else PAPERS[cls.paper].cite()
        assert line.split(maxsplit=1)[1] == f"{method_summary(cls)} — {paper}", name
    assert "ZipIt! (Stoica et al., ICLR 2024) https://arxiv.org/abs/2305.03053" in lines[-1]


def test_methods_prints_parameters_verbosely_or_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods", "zipit", "average"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[::2]] == ["zipit", "average"]
    assert lines[1].split() == ["parameters:", "reset_bn=True,", "alpha=0.3,", "beta=0.125,", "stop_after=None"]
    assert lines[3].split() == ["parameters:", "reset_bn=True"]
    assert main(["methods", "-v"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * len(REGISTRY) and all(line.split()[0] == "parameters:" for line in lines[1::2])
    line = error_line(capsys, ["methods", "zipit", "zipp"])
    assert line.startswith("hetmerge methods: error: unknown method(s) zipp; known: average, distill, ")


# ---------------------------------------------------------------------------------------------------- inspect


@pytest.fixture(scope="module")
def checkpoints(files: Path) -> dict[str, Path]:
    """Two tiny models trained by `hetmerge train` and their ZipIt! merge by `hetmerge merge`."""
    inputs = ["--data", str(files / "digits.safetensors"), "--split", str(files / "split.json")]
    model = json.dumps({"family": "mlp", "spec": {"hidden": [8]}})
    train = json.dumps({"epochs": 1, "batch_size": 64})
    paths = {task: files / f"model-{task}.safetensors" for task in "AB"}
    for seed, (task, path) in enumerate(paths.items()):
        argv = ["train", *inputs, "--task", task, "--model", model, "--train", train, "--seed", str(seed)]
        assert main([*argv, "--device", "cpu", "--out", str(path)]) == 0
    paths["merge"] = files / "zipit.safetensors"
    argv = ["merge", *inputs, "--models", str(paths["A"]), str(paths["B"]), "--method", "zipit"]
    assert main([*argv, "--params", '{"alpha": 0.5}', "--device", "cpu", "--out", str(paths["merge"])]) == 0
    return paths


def inspect_view(capsys: pytest.CaptureFixture[str], path: Path) -> dict[str, str]:
    """The default view: its title line, then each row's label and text (continuation lines joined by ' | ')."""
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0
    title, *lines = capsys.readouterr().out.splitlines()
    rows: dict[str, str] = {"title": title}
    label = ""
    for line in lines:
        assert line.startswith("  "), line
        if line[2] != " ":
            label, text = line.strip().split("  ", 1)
            rows[label] = text.strip()
        else:
            rows[label] += " | " + line.strip()
    return rows


def test_inspect_shows_a_trained_model(checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = checkpoints["A"]
    model, meta = load_model(path)
    rows = inspect_view(capsys, path)
    assert re.fullmatch(rf"{re.escape(str(path))}: trained model, \d+\.\d KiB", rows["title"])
    assert rows["architecture"] == "mlp (batch_norm=true, hidden=[8])" and rows["input"] == "1x8x8"
    assert rows["heads"] == f"A: {len(meta['info']['classes'])} classes"
    assert rows["parameters"] == f"{sum(p.numel() for p in model.parameters()):,}"
    assert rows["trained on"] == f"digits, task A, classes {meta['info']['classes']}, split seed 0"
    assert rows["training"].startswith("seed 0, fp32, ") and rows["training"].endswith(" s")
    assert "batch_size=64" in rows["settings"] and "epochs=1" in rows["settings"]
    assert re.fullmatch(r"1: loss \d+\.\d{4}, training accuracy \d+\.\d%", rows["last epoch"])
    assert rows["made with"].startswith(f"hetmerge {hetmerge.__version__}, torch ") and "on cpu" in rows["made with"]


def test_inspect_shows_a_merge(checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = checkpoints["merge"]
    model, _ = load_model(path)
    rows = inspect_view(capsys, path)
    assert rows["title"].startswith(f"{path}: merge by zipit, ")
    assert rows["architecture"] == "one network: mlp (batch_norm=true, hidden=[8])"
    heads = model.trunk.describe()["heads"]
    assert rows["heads"] == f"A: {heads['A']} classes, B: {heads['B']} classes"
    assert rows["parameters"] == f"{sum(p.numel() for p in model.parameters()):,}"
    assert rows["method"].startswith("zipit, seed 0, ")
    assert rows["params"] == "alpha=0.5, beta=0.125, reset_bn=true, stop_after=null"
    assert rows["merged from"] == f"{checkpoints['A']} (task A, seed 0) | {checkpoints['B']} (task B, seed 1)"
    assert rows["data"].startswith("digits, split seed 0, tasks A [")
    assert "few-shot" not in rows  # a merge that learns nothing saw no few-shot slice


def test_inspect_json_prints_the_full_metadata(
    checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    for key in ("A", "merge"):
        model, meta = load_model(checkpoints[key])
        assert main(["inspect", "--json", str(checkpoints[key])]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed.pop("tensors") == {k: list(v.shape) for k, v in model.state_dict().items()}
        assert printed == meta


def test_inspect_of_a_file_without_a_model(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(files / "digits.safetensors")]) == 0
    out = capsys.readouterr().out
    assert re.fullmatch(
        rf"{re.escape(str(files / 'digits.safetensors'))}: hetmerge file \(no model\), 4 tensors, "
        r"\d+\.\d (KiB|MiB); --json prints its metadata\n",
        out,
    )


@pytest.mark.parametrize("flags", [[], ["--json"]])
def test_inspect_of_a_corrupt_file_is_one_line(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str]
) -> None:
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(checkpoints["A"].read_bytes()[:-100])
    line = error_line(capsys, ["inspect", *flags, str(path)])
    assert line.startswith(f"hetmerge inspect: error: checkpoint {path} is corrupt or not a safetensors file")
    line = error_line(capsys, ["inspect", *flags, str(tmp_path / "missing.safetensors")])
    assert line == f"hetmerge inspect: error: checkpoint {tmp_path / 'missing.safetensors'} does not exist"
