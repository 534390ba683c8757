"""What every layout reads: the report spec, one flat record per (experiment, row, seed), the aggregated frame
and the analysis results (λ curves live in the records; landscapes and alignments here).

`load_report_data` reads every JSON file the spec names, so that a layout never opens a file itself and a
missing or corrupt one fails before anything is written, with an error naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from hetmerge.metrics import macro_f1
from hetmerge.report.aggregate import aggregate

RESULT_FIELDS = ("kind", "dataset", "split_seed", "tasks", "metrics")
"""Fields every result JSON must have (the others are optional: older or partial results still report)."""
METRIC_FIELDS = ("joint", "task_avg", "tasks", "params", "flops")


@dataclass(frozen=True)
class ReportData:
    """`records` keep every field of the result files (provenance, notes, curves); `frame` is their aggregate
    over seeds, which every table and figure reads so that they never disagree about a number; `analyses`
    maps each analysis JSON path of the spec to its content."""

    spec: Mapping[str, Any]
    records: tuple[Mapping[str, Any], ...]
    frame: pd.DataFrame
    analyses: Mapping[str, Mapping[str, Any]]


def load_report_data(spec: Mapping[str, Any]) -> ReportData:
    """Read every result, ensemble member and analysis file that `spec` names and aggregate them.

    One record per (experiment, row, seed), in spec order; ensemble rows are scored from their members'
    stored predictions. Raises ValueError naming the file for a missing, corrupt or mismatched one.
    """
    files = _JsonFiles()
    dataset = spec["dataset"]["name"]
    records = []
    for experiment in spec["experiments"]:
        for row in experiment["rows"]:
            for seed in spec["seeds"]:
                where = f"experiment {experiment['key']!r}, row {row['key']!r}, seed {seed}"
                if row["kind"] == "ensemble":
                    paths = _per_seed(row, "members", seed, where)
                    result = ensemble_result([files.result(path, "base", dataset, seed) for path in paths], paths)
                else:
                    path = _per_seed(row, "results", seed, where)
                    result = files.result(path, row["kind"], dataset, seed)
                records.append(_record(spec, experiment, row, int(seed), result))
    analyses = {
        path: files.analysis(path, name)
        for experiment in spec["experiments"]
        for name, analysis in experiment.get("analyses", {}).items()
        if isinstance(analysis, Mapping)
        for path in analysis["results"].values()
    }
    # base models first (model_a, model_b, model_c, ...), then every other row as first seen: one row order for
    # all experiments, whatever models each has
    rows = [row for experiment in spec["experiments"] for row in experiment["rows"]]
    order = list(dict.fromkeys(row["key"] for row in sorted(rows, key=lambda row: row["kind"] != "base")))
    return ReportData(spec, tuple(records), aggregate(records, method_order=order), analyses)


def ensemble_result(members: Sequence[Mapping[str, Any]], paths: Sequence[str]) -> dict[str, Any]:
    """The result of an ensemble of base models, from their test predictions.

    Members of a same-task split (each records its `data_share` of every class) are combined as the Neuron
    Interpolation paper's ensemble: each member's softmax probabilities weighted per class by its data share,
    summed, argmax (`weighted_ensemble`). Otherwise (class-disjoint tasks) the joint answer is the member with the
    highest top logit (the first on ties), each task is answered by the member that has its head.

    Numbers are what evaluating the ensemble as one model gives: the joint accuracy is rounded through
    float32 like `hetmerge.evaluation.accuracies`, the task average is the same Python sum.
    """
    first = members[0]
    for member, path in zip(members, paths, strict=True):
        for field, value in (("split_seed", member["split_seed"]), ("tasks", member["tasks"])):
            if value != first[field]:
                raise ValueError(f"ensemble member {path} has {field} {value!r}, but {paths[0]} has {first[field]!r}")
        predictions = member.get("predictions") or {}
        if "score" not in predictions or "correct" not in predictions:
            raise ValueError(f"ensemble member {path} has no predictions (score, correct): not a base model's result")
        n_images = first["metrics"]["n_images"]
        if not len(predictions["score"]) == len(predictions["correct"]) == n_images:
            raise ValueError(f"ensemble member {path}: its predictions do not cover the {n_images} test images")
    shared = ["data_share" in member for member in members]
    if any(shared):
        if not all(shared):
            path = paths[shared.index(False)]
            raise ValueError(f"ensemble member {path} has no data_share, but {paths[shared.index(True)]} has one")
        return _same_task_ensemble(members, paths)
    scores = [member["predictions"]["score"] for member in members]
    correct = [member["predictions"]["correct"] for member in members]
    score, hit = np.array(scores, dtype=float), np.array(correct, dtype=bool)
    answer = score.argmax(axis=0)  # the first member wins ties, as argmax over concatenated heads does
    hits = int(hit[answer, np.arange(score.shape[1])].sum())

    tasks: dict[str, float | None] = {}
    for task in first["metrics"]["tasks"]:
        answered = [(m["metrics"]["tasks"][task], p) for m, p in zip(members, paths, strict=True)]
        answered = [(value, path) for value, path in answered if value is not None]
        if len(answered) > 1:
            raise ValueError(f"ensemble members {[p for _, p in answered]} all have a head for task {task!r}")
        tasks[task] = answered[0][0] if answered else None
    scored = [value for value in tasks.values() if value is not None]
    return _ensemble_record(
        members,
        {
            "joint": float(np.float32(hits) / np.float32(score.shape[1])),
            "tasks": tasks,
            "task_avg": sum(scored) / len(scored) if len(scored) == len(tasks) else None,
            "n_images": score.shape[1],
        },
    )


def weighted_ensemble(logits: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Column index of each image's answer: per member k, softmax(logits[k]) times its share of each class
    `shares[k]`, summed over members, argmax (the first column on ties).

    `logits` is (members, images, classes) and `shares` (members, classes), as the paper's evaluation scores its
    `Ensemble(percentages)`: probabilities, not logits (KF-Gradient's head targets weight logits), so that a member
    that never saw a class (share 0) has no say on it. With shares 1/N it is the plain mean of the probabilities.
    """
    shifted = logits - logits.max(axis=2, keepdims=True)
    probabilities = np.exp(shifted)
    probabilities /= probabilities.sum(axis=2, keepdims=True)
    return np.einsum("kic,kc->ic", probabilities, shares).argmax(axis=1)


def _same_task_ensemble(members: Sequence[Mapping[str, Any]], paths: Sequence[str]) -> dict[str, Any]:
    """The share-weighted ensemble of same-task members (one head over every class), checked to be combinable."""
    first = members[0]
    if len(first["tasks"]) != 1:
        raise ValueError(
            f"ensemble member {paths[0]} has a data_share but {len(first['tasks'])} tasks: same-task models have one"
        )
    (task, classes), n_images = next(iter(first["tasks"].items())), first["metrics"]["n_images"]
    if sorted(classes) != list(range(len(classes))):
        raise ValueError(f"ensemble member {paths[0]}: task {task!r} has classes {classes}, not 0..C-1 for C classes")
    labels = first["predictions"].get("labels")
    logits, shares = [], []
    for member, path in zip(members, paths, strict=True):
        predictions = member["predictions"]
        if "logits" not in predictions or "labels" not in predictions:
            raise ValueError(f"ensemble member {path} has a data_share but no predictions.logits and .labels")
        if len(predictions["labels"]) != n_images:
            raise ValueError(f"ensemble member {path}: its labels do not cover the {n_images} test images")
        if predictions["labels"] != labels:
            raise ValueError(f"ensemble member {path} has other test labels than {paths[0]}")
        member_logits = np.array(predictions["logits"], dtype=float)
        if member_logits.shape != (n_images, len(classes)):
            raise ValueError(
                f"ensemble member {path}: its logits have shape {member_logits.shape}, expected "
                f"({n_images} images, {len(classes)} classes)"
            )
        if len(member["data_share"]) != len(classes):
            raise ValueError(
                f"ensemble member {path}: its data_share has {len(member['data_share'])} entries, expected "
                f"{len(classes)} (one per class)"
            )
        logits.append(member_logits)
        shares.append(member["data_share"])
    column_class = np.array(classes)  # logit columns follow the task's classes; shares are indexed by class
    answer = column_class[weighted_ensemble(np.stack(logits), np.array(shares, dtype=float)[:, column_class])]
    true = np.array(labels)
    accuracy = float(np.float32((answer == true).sum()) / np.float32(n_images))
    return _ensemble_record(
        members,
        {
            "joint": accuracy,
            "f1": macro_f1(true, answer),
            "tasks": {task: accuracy},
            "task_avg": accuracy,
            "n_images": n_images,
        },
    )


def _ensemble_record(members: Sequence[Mapping[str, Any]], metrics: dict[str, Any]) -> dict[str, Any]:
    """An ensemble's result: its `metrics`, the members' summed cost and the first member's identity."""
    first = members[0]
    return {
        "kind": "ensemble",
        "dataset": first["dataset"],
        "split_seed": first["split_seed"],
        "tasks": first["tasks"],
        "metrics": {
            **metrics,
            "params": sum(member["metrics"]["params"] for member in members),
            "flops": sum(member["metrics"]["flops"] for member in members),
        },
        "source": {"method": "ensemble"},
        "timings": {},
        "provenance": first.get("provenance"),
    }


def dataset_label(spec: Mapping[str, Any]) -> str:
    """The dataset's display name, for captions and titles (never the raw key)."""
    return str(spec["dataset"]["label"])


def experiments_of(spec: Mapping[str, Any], layout: str) -> list[Mapping[str, Any]]:
    """The experiments whose tables use `layout`, in spec (configuration) order."""
    return [experiment for experiment in spec["experiments"] if experiment["layout"] == layout]


def experiment_labels(experiment: Mapping[str, Any]) -> dict[str, str]:
    """`snakemake --report` labels telling one experiment's files from their siblings'."""
    return report_labels(experiment=experiment["key"], models=experiment["label"])


def slug(name: str) -> str:
    """A file-name and `\\label`-safe form of a key (LaTeX chokes on odd characters in paths)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name)


def report_labels(**labels: str) -> dict[str, str]:
    """Labels of a file shown by `snakemake --report`. Snakemake fills `{name}` in label values as a wildcard;
    configured labels are text, so their braces become parentheses."""
    return {key: str(value).replace("{", "(").replace("}", ")") for key, value in labels.items()}


def _per_seed(row: Mapping[str, Any], field: str, seed: int, where: str) -> Any:
    try:
        return row[field][str(seed)]
    except KeyError:
        raise ValueError(f"report spec: {where} has no {field!r} entry for the seed") from None


def _record(
    spec: Mapping[str, Any], experiment: Mapping[str, Any], row: Mapping[str, Any], seed: int, result: Mapping[str, Any]
) -> dict[str, Any]:
    """One flat record in the shape `aggregate` and every layout read."""
    return {
        "dataset": spec["dataset"]["name"],
        "dataset_label": dataset_label(spec),
        "arch": experiment["key"],
        "arch_label": experiment["label"],
        "pair": seed,
        "method": row["key"],
        "label": row["label"],
        "kind": row["kind"],
        "layout": experiment["layout"],
        "group": experiment["group"],
        "config": {field: row[field] for field in ("method", "params", "analyses") if field in row},
        "metrics": result["metrics"],
        "split_seed": result["split_seed"],
        "tasks": result["tasks"],
        "source": result.get("source") or {},
        "timings": result.get("timings") or {},
        "provenance": result.get("provenance"),
        "curve": result.get("curve"),
    }


class _JsonFiles:
    """Reads and checks each file once, however many rows, ensembles or experiments name it."""

    def __init__(self) -> None:
        self._loaded: dict[str, dict[str, Any]] = {}

    def load(self, path: str) -> dict[str, Any]:
        if path not in self._loaded:
            try:
                with open(path, encoding="utf-8") as handle:
                    content = json.load(handle)
            except FileNotFoundError:
                raise ValueError(f"{path} does not exist: the report spec names it; rerun snakemake") from None
            except ValueError as err:  # JSONDecodeError, or UnicodeDecodeError for binary garbage
                raise ValueError(f"{path} is not valid JSON ({err}): delete it and rerun snakemake") from None
            if not isinstance(content, dict):
                raise ValueError(f"{path}: expected a JSON object, found {type(content).__name__}")
            self._loaded[path] = content
        return self._loaded[path]

    def result(self, path: str, kind: str, dataset: str, seed: int) -> dict[str, Any]:
        """A model's result JSON, checked against what the spec expects of it."""
        content = self.load(path)
        missing = [field for field in RESULT_FIELDS if field not in content]
        missing += [f"metrics.{field}" for field in METRIC_FIELDS if field not in content.get("metrics", {})]
        if missing:
            raise ValueError(f"{path} lacks {', '.join(missing)}: not a result JSON of this pipeline version")
        expected = {"kind": kind, "dataset": dataset, "split_seed": int(seed)}
        for field, value in expected.items():
            if content[field] != value:
                raise ValueError(f"{path} has {field} {content[field]!r}, but the report spec expects {value!r}")
        return content

    def analysis(self, path: str, kind: str) -> dict[str, Any]:
        """An analysis JSON (`kind` is the analysis' name in the spec, e.g. landscape, alignment)."""
        content = self.load(path)
        if content.get("kind") != kind:
            raise ValueError(f"{path} has kind {content.get('kind')!r}, but the report spec lists it as {kind!r}")
        return content
