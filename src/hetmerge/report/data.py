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
    """The result of an ensemble of base models, from their test predictions: the joint answer is the member
    with the highest top logit (the first on ties), each task is answered by the member that has its head.

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
    return {
        "kind": "ensemble",
        "dataset": first["dataset"],
        "split_seed": first["split_seed"],
        "tasks": first["tasks"],
        "metrics": {
            "joint": float(np.float32(hits) / np.float32(score.shape[1])),
            "tasks": tasks,
            "task_avg": sum(scored) / len(scored) if len(scored) == len(tasks) else None,
            "n_images": score.shape[1],
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
