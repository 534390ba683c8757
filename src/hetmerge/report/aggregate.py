"""Collapse per-model-pair evaluation records into mean/std/n per (dataset, arch, method).

Every table and figure reads this one frame, so that they can never disagree about a number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

KEYS = ("dataset", "arch", "method")
"""One aggregated row per combination of these record fields."""
DESCRIPTORS = ("arch_label", "label", "kind")
"""Display fields that must be constant within a row's records."""
BASE_METRICS = ("joint", "task_avg", "params", "flops")
OPTIONAL_METRICS = ("f1",)
"""Metrics only some results have (macro F1: results written before it was evaluated lack it, and a class-disjoint
ensemble has none); aggregated, right after `joint`, only where a record has them, so older runs report as before."""
STATS = ("mean", "std", "n")


def task_metric(task: str) -> str:
    """Metric name of one task's accuracy, mirroring its JSON path `metrics.tasks.<task>`."""
    return f"tasks.{task}"


def aggregate(records: Sequence[Mapping[str, Any]], *, method_order: Sequence[str] = ()) -> pd.DataFrame:
    """Aggregate records over model pairs.

    Returns one row per (dataset, arch, method) with columns `dataset, arch, method, arch_label, label,
    kind, method_rank, n_pairs` and, per metric, `<metric>_mean`, `<metric>_std` (sample std, ddof=1;
    NaN below two values) and `<metric>_n` (non-null values). Metrics are `joint`, `f1` where any record has it,
    `task_avg, params, flops` and `tasks.<name>` for every task name seen (sorted). Null metrics are excluded,
    not counted as zero, because a model without a head for a task has no accuracy on it.

    Rows are sorted by dataset and arch, then by `method_rank`: the position in `method_order`, with
    methods not in it following in the order they are first seen, so the caller controls how methods
    read in every table and figure.
    """
    if not records:
        raise ValueError("no evaluation records to aggregate")
    flat = pd.DataFrame([_flatten(record) for record in records])
    duplicated = flat.duplicated([*KEYS, "pair"])
    if duplicated.any():
        first = flat.loc[duplicated, [*KEYS, "pair"]].iloc[0].to_dict()
        raise ValueError(f"duplicate evaluation record for {first}; each model pair must be evaluated once")

    rank = {method: i for i, method in enumerate(dict.fromkeys([*method_order, *flat["method"]]))}
    tasks = sorted({key[len("tasks.") :] for key in flat.columns if key.startswith("tasks.")})
    optional = [metric for metric in OPTIONAL_METRICS if metric in flat.columns]
    metrics = [BASE_METRICS[0], *optional, *BASE_METRICS[1:], *(task_metric(task) for task in tasks)]
    # Sorting by pair fixes the summation order, so means do not depend on the order records arrive in.
    flat = flat.reindex(columns=[*KEYS, "pair", *DESCRIPTORS, *metrics]).sort_values([*KEYS, "pair"])

    rows = []
    for key, group in flat.groupby(list(KEYS), sort=True):
        row: dict[str, Any] = dict(zip(KEYS, key, strict=True))
        for field in DESCRIPTORS:
            values = group[field].unique()
            if len(values) != 1:
                raise ValueError(f"records for {row} disagree on {field!r}: {sorted(map(str, values))}")
            row[field] = values[0]
        row["method_rank"] = rank[row["method"]]
        row["n_pairs"] = len(group)
        for metric in metrics:
            values = group[metric].to_numpy(dtype=float)
            values = values[~np.isnan(values)]
            row[f"{metric}_mean"] = values.mean() if len(values) else np.nan
            row[f"{metric}_std"] = values.std(ddof=1) if len(values) > 1 else np.nan
            row[f"{metric}_n"] = len(values)
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["dataset", "arch", "method_rank"]).reset_index(drop=True)


def tasks_in(frame: pd.DataFrame) -> list[str]:
    """Task names with at least one accuracy in `frame`, so a table shows no all-empty task columns."""
    return [
        column[len("tasks.") : -len("_n")]
        for column in frame.columns
        if column.startswith("tasks.") and column.endswith("_n") and frame[column].sum() > 0
    ]


def _flatten(record: Mapping[str, Any]) -> dict[str, Any]:
    """One record as a flat dict of the fields aggregation uses; nulls become NaN."""
    try:
        metrics = record["metrics"]
        flat = {field: record[field] for field in (*KEYS, "pair", *DESCRIPTORS)}
        flat.update({metric: _number(metrics[metric]) for metric in BASE_METRICS})
        flat.update({metric: _number(metrics[metric]) for metric in OPTIONAL_METRICS if metric in metrics})
        flat.update({task_metric(task): _number(value) for task, value in metrics["tasks"].items()})
    except KeyError as missing:
        raise ValueError(f"evaluation record lacks field {missing} (record keys: {sorted(record)})") from None
    return flat


def _number(value: Any) -> float:
    return np.nan if value is None else float(value)
