"""Files that do not belong together are refused, naming both: models of another split, dataset or input shape,
statistics of other models, merges of other models; and NaN or inf never reaches a written merge.

The commands run in-process (`hetmerge.cli.main`) on tiny untrained MLPs of the `digits` dataset, saved with
the metadata `hetmerge train` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hetmerge.api import merge
from hetmerge.checkpoint import load_tensors, save_model, save_tensors
from hetmerge.cli import main
from hetmerge.data import make_class_disjoint_split, save_prepared, save_split
from hetmerge.methods import MergeError
from hetmerge.models import build_model

SPEC = {"hidden": [8]}


def split_of(digits, seed: int, dataset: str = "digits"):
    return make_class_disjoint_split(
        digits.train_labels,
        digits.test_labels,
        digits.num_classes,
        2,
        seed,
        merge_per_class=5,
        train_per_task=None,
        test_per_task=None,
        dataset=dataset,
    )


def save_trained(path: Path, split, task: str, seed: int = 0, shape=(1, 8, 8), info: dict | None = None) -> Path:
    """An untrained model saved with the metadata `hetmerge train` writes (overridden by `info`)."""
    torch.manual_seed(seed)
    classes = list(split.task(task).classes)
    model = build_model("mlp", SPEC, shape, {task: len(classes)})
    record = {"dataset": split.dataset, "split_seed": split.seed, "task": task, "classes": classes, "seed": seed}
    save_model(model, path, {**record, **(info or {})})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits):
    """digits prepared; splits of seeds 0 and 1; models A and B of each."""
    root = tmp_path_factory.mktemp("compat")
    save_prepared(digits, root / "digits.safetensors")
    paths = {"data": root / "digits.safetensors"}
    for seed in (0, 1):
        split = split_of(digits, seed)
        paths[f"s{seed}"] = root / f"t2-s{seed}.json"
        save_split(split, paths[f"s{seed}"])
        for task in ("A", "B"):
            paths[f"s{seed}/{task}"] = save_trained(root / f"t2-s{seed}" / f"mlp-{task}.safetensors", split, task)
    return {k: str(v) for k, v in paths.items()}


def run(capsys, *argv: str) -> tuple[int, str]:
    """`hetmerge ARGV` in-process on the CPU; returns the exit code and stderr."""
    code = main([*argv, "--device", "cpu"])
    return code, capsys.readouterr().err


def inputs(files, split: str, *models: str) -> list[str]:
    return ["--data", files["data"], "--split", files[split], "--models", *models]


def statistics(capsys, files, tmp_path, split: str, *models: str) -> str:
    out = str(tmp_path / f"stats-{split}.safetensors")
    code, err = run(capsys, "statistics", *inputs(files, split, *models), "--out", out)
    assert code == 0, err
    return out


def command(name: str, tmp_path: Path, out: Path) -> list[str]:
    """The arguments after the inputs that make `name` run (everything up to where the inputs are checked)."""
    return {
        "statistics": [],
        "merge": ["--method", "average"],
        "precompute": ["--name", "alignment"],
        "landscape": ["--merges", str(tmp_path / "m.safetensors"), "--keys", "m", "--plane", "m"],
        "evaluate": [],
    }[name] + ["--out", str(out)]


@pytest.mark.parametrize("name", ["statistics", "merge", "precompute", "landscape", "evaluate"])
def test_a_model_of_another_split_is_refused_naming_both_files(capsys, files, tmp_path, name):
    """Model A of split seed 1 on split seed 0 used to give 23 % accuracy, or a merge, with exit code 0."""
    out = tmp_path / "out"
    code, err = run(capsys, name, *inputs(files, "s0", files["s0/A"], files["s1/A"]), *command(name, tmp_path, out))
    assert code == 1
    assert err == (
        f"hetmerge {name}: error: {files['s1/A']} was trained on split seed 1 of digits, but --split {files['s0']} "
        "is seed 0; use the split it was trained on\n"
    )
    assert not out.exists()


def test_models_statistics_and_merges_of_one_split_pass_and_record_where_they_come_from(capsys, files, tmp_path):
    models = [files["s0/A"], files["s0/B"]]
    stats = statistics(capsys, files, tmp_path, "s0", *models)
    recorded = load_tensors(stats)[1]["sources"]
    assert [(r["path"], r["task"], r["split_seed"], r["dataset"]) for r in recorded] == [
        (models[0], "A", 0, "digits"),
        (models[1], "B", 0, "digits"),
    ]
    merged = tmp_path / "zipit.safetensors"
    code, err = run(
        capsys, "merge", *inputs(files, "s0", *models), "--method", "zipit", "--stats", stats, "--out", str(merged)
    )
    assert code == 0, err
    info = load_tensors(merged)[1]["info"]
    assert (info["dataset"], info["split_seed"], sorted(info["tasks"])) == ("digits", 0, ["A", "B"])
    assert info["source_models"] == recorded
    evaluated = tmp_path / "eval.json"
    code, err = run(capsys, "evaluate", *inputs(files, "s0", *models, str(merged)), "--out", str(evaluated))
    assert code == 0, err
    assert len(json.loads(evaluated.read_text())) == 3
    # ...but not on the other split
    code, err = run(capsys, "evaluate", *inputs(files, "s1", str(merged)), "--out", str(evaluated))
    assert code == 1 and f"{merged} was trained on split seed 0 of digits, but --split {files['s1']} is seed 1" in err


@pytest.mark.parametrize("name", ["merge"])
def test_statistics_of_other_models_are_refused(capsys, files, tmp_path, name):
    """Statistics of split 1's models used to be accepted for split 0's models."""
    out = tmp_path / "out"

    def use(stats: str) -> tuple[int, str]:
        models = inputs(files, "s0", files["s0/A"], files["s0/B"])
        return run(capsys, name, *models, "--stats", stats, *command(name, tmp_path, out))

    stats = statistics(capsys, files, tmp_path, "s1", files["s1/A"], files["s1/B"])
    code, err = use(stats)
    assert code == 1 and not out.exists()
    assert f"hetmerge {name}: error: --stats {stats} was computed from models [{files['s1/A']} (dataset digits" in err
    assert f"not from [{files['s0/A']} (dataset digits, split_seed 0, task A, seed 0), {files['s0/B']}" in err
    # the same models in another order are other statistics too (features are concatenated in model order)
    code, err = use(statistics(capsys, files, tmp_path, "s0", files["s0/B"], files["s0/A"]))
    assert code == 1 and "file contents differ" in err and not out.exists()


def test_statistics_without_a_record_of_their_models_are_refused(capsys, files, tmp_path):
    old = tmp_path / "old-stats.safetensors"
    stats = statistics(capsys, files, tmp_path, "s0", files["s0/A"], files["s0/B"])
    tensors, meta = load_tensors(stats)
    del meta["sources"], meta["format"]
    save_tensors(old, tensors, meta)
    argv = ["merge", *inputs(files, "s0", files["s0/A"], files["s0/B"]), "--method", "zipit", "--stats", str(old)]
    code, err = run(capsys, *argv, "--out", str(tmp_path / "m.safetensors"))
    assert code == 1 and not (tmp_path / "m.safetensors").exists()
    assert err == (
        f"hetmerge merge: error: --stats {old} does not record which models it was computed from (written by an "
        "older hetmerge, or by save_statistics without `sources`); regenerate it with this version\n"
    )


def test_a_model_of_another_input_shape_is_refused_naming_both_shapes(capsys, files, tmp_path, digits):
    """A 1x28x28 model on 8x8 data used to fail with a raw matmul shape error."""
    model = save_trained(tmp_path / "wide.safetensors", split_of(digits, 0), "A", shape=(1, 28, 28))
    code, err = run(capsys, "evaluate", *inputs(files, "s0", str(model)), "--out", str(tmp_path / "e.json"))
    assert code == 1
    assert err == (
        f"hetmerge evaluate: error: {model} takes inputs of shape (1, 28, 28), but --data {files['data']} (digits) "
        "has images of shape (1, 8, 8); use the dataset it was trained on\n"
    )


@pytest.mark.parametrize(
    ("info", "message"),
    [
        (
            {"dataset": "fashion_mnist"},
            "{model} was trained on fashion_mnist, but --split {split} is a split of digits",
        ),
        (
            {"classes": [0, 1, 2, 3, 5]},
            "{model} learned task 'A' as classes [0, 1, 2, 3, 5], but --split {split} gives",
        ),
        ({"task": "C"}, "{model} knows task 'C', but --split {split} has tasks ['A', 'B']"),
    ],
    ids=["dataset", "classes", "task"],
)
def test_a_model_of_another_dataset_or_task_is_refused(capsys, files, tmp_path, digits, info, message):
    model = save_trained(tmp_path / "m.safetensors", split_of(digits, 0), "A", info=info)
    code, err = run(capsys, "evaluate", *inputs(files, "s0", str(model)), "--out", str(tmp_path / "e.json"))
    assert code == 1 and message.format(model=model, split=files["s0"]) in err


def test_a_model_without_a_training_record_is_refused(capsys, files, tmp_path):
    model = tmp_path / "library.safetensors"
    save_model(build_model("mlp", SPEC, (1, 8, 8), {"A": 5}), model, {"note": "trained elsewhere"})
    code, err = run(capsys, "evaluate", *inputs(files, "s0", str(model)), "--out", str(tmp_path / "e.json"))
    assert code == 1
    assert f"{model} does not record ['dataset', 'split_seed', 'task', 'classes']" in err
    assert "pass these fields in save_model's `info`" in err


def test_a_split_of_another_dataset_is_refused(capsys, files, tmp_path, digits):
    split = tmp_path / "fashion.json"
    save_split(split_of(digits, 0, dataset="fashion_mnist"), split)
    argv = ["--data", files["data"], "--split", str(split), "--models", files["s0/A"]]
    code, err = run(capsys, "evaluate", *argv, "--out", str(tmp_path / "e.json"))
    assert code == 1
    assert f"--split {split} is a split of fashion_mnist, but --data {files['data']} holds digits" in err


def test_landscape_refuses_a_merge_of_other_models(capsys, files, tmp_path):
    merged = tmp_path / "average.safetensors"
    models = [files["s0/A"], files["s0/B"]]
    code, err = run(capsys, "merge", *inputs(files, "s0", *models), "--method", "average", "--out", str(merged))
    assert code == 0, err
    argv = ["landscape", *inputs(files, "s0", *models[::-1]), "--merges", str(merged), "--keys", "avg"]
    code, err = run(capsys, *argv, "--plane", "avg", "--out", str(tmp_path / "l.json"))
    assert code == 1 and not (tmp_path / "l.json").exists()
    assert f"merge {merged} was computed from models [{models[0]} (dataset digits" in err


@pytest.mark.parametrize("where", ["weights", "result"])
def test_a_merge_with_nan_or_inf_writes_nothing(capsys, files, tmp_path, digits, where):
    """NaN in a model (or a merged weight that overflows) used to give a merge answering NaN, with exit code 0."""
    split = split_of(digits, 0)
    paths = []
    for task in ("A", "B"):
        paths.append(save_trained(tmp_path / f"{task}.safetensors", split, task))
        model, meta = load_tensors(paths[-1])
        model["body.fc0.norm.bias"][0] = float("nan") if where == "weights" and task == "B" else 3e38
        save_tensors(paths[-1], model, meta)
    out = tmp_path / "average.safetensors"
    argv = [*inputs(files, "s0", *map(str, paths)), "--method", "average", "--params", '{"reset_bn": false}']
    code, err = run(capsys, "merge", *argv, "--out", str(out))
    assert code == 1 and not out.exists()
    if where == "weights":
        culprit = f"{paths[1]} holds NaN or inf in ['body.fc0.norm.bias']"
        assert err == f"hetmerge merge: error: {culprit}; train or merge it again\n"
    else:
        assert "'average': the merged model holds NaN or inf in ['trunk.body.fc0.norm.bias']" in err


def test_library_merge_refuses_data_of_another_shape(make_model):
    models = [make_model("mlp", SPEC, {"A": 5}, seed=0), make_model("mlp", SPEC, {"B": 5}, seed=1)]
    data = [torch.randn(4, 1, 8, 8), torch.randn(4, 1, 28, 28)]
    with pytest.raises(
        MergeError, match=r"data batch 1 holds inputs of shape \(1, 28, 28\), the models take \(1, 8, 8\)"
    ):
        merge(models, "average", data=data)
