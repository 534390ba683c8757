"""Collapse per-model-pair evaluation records into mean/std/n per (dataset, arch, method).

Every table and figure reads this one frame, so that they can never disagree about a number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

KEYS = ("dataset", "arch", "method")
"""One aggregated row per combination of these record fields."""
DESCRIPTORS = ("arch_label", "label", "kind")
"""Display fields that must be constant within a row's records."""
BASE_METRICS = ("joint", "task_avg", "params", "flops")
STATS = ("mean", "std", "n")
LAYOUTS = ("standard", "mudsc", "hetero")
"""Table layouts an experiment can ask for (record field `layout`; records without it are "standard")."""


def task_metric(task: str) -> str:
    """Metric name of one task's accuracy, mirroring its JSON path `metrics.tasks.<task>`."""
    return f"tasks.{task}"


@dataclass(frozen=True)
class ReportData:
    """What every table/figure builder receives: the raw records (for builders that need fields the
    aggregation drops, e.g. provenance), the aggregated frame, and analysis records (λ sweeps, loss
    landscapes: anything that is not one evaluated model, told apart by their `kind`)."""

    records: tuple[Mapping[str, Any], ...]
    frame: pd.DataFrame
    analysis: tuple[Mapping[str, Any], ...] = ()


def aggregate(records: Sequence[Mapping[str, Any]], *, method_order: Sequence[str] = ()) -> pd.DataFrame:
    """Aggregate records over model pairs.

    Returns one row per (dataset, arch, method) with columns `dataset, arch, method, arch_label, label,
    kind, method_rank, n_pairs` and, per metric, `<metric>_mean`, `<metric>_std` (sample std, ddof=1;
    NaN below two values) and `<metric>_n` (non-null values). Metrics are `joint, task_avg, params, flops` and
    `tasks.<name>` for every task name seen (sorted). Null metrics are excluded, not counted as zero,
    because a model without a head for a task has no accuracy on it.

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
    metrics = [*BASE_METRICS, *(task_metric(task) for task in tasks)]
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


def methods_in(frame: pd.DataFrame) -> list[str]:
    """Methods of `frame` in report order, also when architectures have different method sets."""
    return list(frame.drop_duplicates("method").sort_values("method_rank")["method"])


def tasks_in(frame: pd.DataFrame) -> list[str]:
    """Task names with at least one accuracy in `frame`, so a table shows no all-empty task columns."""
    return [
        column[len("tasks.") : -len("_n")]
        for column in frame.columns
        if column.startswith("tasks.") and column.endswith("_n") and frame[column].sum() > 0
    ]


def layouts(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], str]:
    """Table layout of every (dataset, arch) in `records`: one of LAYOUTS, "standard" where not given.

    Raises ValueError for an unknown layout or an experiment whose records disagree (e.g. some
    evaluated before the layout was configured), since its tables would depend on which record won.
    """
    found: dict[tuple[str, str], set[str]] = {}
    for record in records:
        layout = record.get("layout", "standard")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown table layout {layout!r} (known: {', '.join(LAYOUTS)})")
        found.setdefault((record["dataset"], record["arch"]), set()).add(layout)
    for (dataset, arch), values in found.items():
        if len(values) > 1:
            raise ValueError(f"records for {dataset}/{arch} disagree on 'layout': {sorted(values)}")
    return {key: next(iter(values)) for key, values in found.items()}


def groups(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], str]:
    """Table group of every (dataset, arch) in `records`: the record field `group`, or the experiment's own
    key where it is null or absent (an experiment without a group gets a table of its own).

    Raises ValueError for an experiment whose records disagree, since it would land in two tables.
    """
    found: dict[tuple[str, str], set[str]] = {}
    for record in records:
        group = record.get("group")
        key = (record["dataset"], record["arch"])
        found.setdefault(key, set()).add(record["arch"] if group is None else str(group))
    for (dataset, arch), values in found.items():
        if len(values) > 1:
            raise ValueError(f"records for {dataset}/{arch} disagree on 'group': {sorted(values)}")
    return {key: next(iter(values)) for key, values in found.items()}


def _flatten(record: Mapping[str, Any]) -> dict[str, Any]:
    """One record as a flat dict of the fields aggregation uses; nulls become NaN."""
    try:
        metrics = record["metrics"]
        flat = {field: record[field] for field in (*KEYS, "pair", *DESCRIPTORS)}
        flat.update({metric: _number(metrics[metric]) for metric in BASE_METRICS})
        flat.update({task_metric(task): _number(value) for task, value in metrics["tasks"].items()})
    except KeyError as missing:
        raise ValueError(f"evaluation record lacks field {missing} (record keys: {sorted(record)})") from None
    return flat


def _number(value: Any) -> float:
    return np.nan if value is None else float(value)
