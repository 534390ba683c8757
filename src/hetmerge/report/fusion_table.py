"""One table per group of experiments with the "fusion" layout, as in the Neuron Interpolation paper: N models
trained on the same task, each on its own partition of the data, fused into one. A group is one (architecture,
dataset, setting); its columns are its experiments by number of models ("N = 2", "N = 4", …), its rows the
individual models, then the configured rows (baselines, the ensemble, the fusion methods) in configuration
order. The same numbers, with macro F1, are written as CSV.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from hetmerge.report.data import ReportData
from hetmerge.report.grouped import ExperimentGroup, GroupTableLayout, experiment_groups, group_frame, seeds_text
from hetmerge.report.layout import register_layout
from hetmerge.report.tables import (
    DASH,
    Table,
    best_merges,
    experiment_rows,
    format_accuracy,
    table_caption,
    unique_labels,
)

LAYOUT = "fusion"
SETTINGS = {
    "full": ("full dataset", "the whole training set (the models differ by seed)"),
    "iid": ("IID", "an IID partition of the training set (each class dealt evenly)"),
    "non_iid": ("non-IID", "a non-IID partition of the training set (per-class Dirichlet proportions)"),
    "sharded": ("sharded", "a shard of the classes (disjoint class sets, one head over every class)"),
}
"""Data setting of a fusion experiment → (its name in titles, what each model trains on)."""
METRICS = ("joint", "f1")
"""Written to the CSV: test accuracy and macro F1 (the table shows accuracy, as the paper does)."""


@dataclass(frozen=True)
class FusionGroup(ExperimentGroup):
    """The experiments of one fusion table, by number of models, with the union of their rows."""

    layout = LAYOUT
    what = "fusion"
    order = ("n_models", "N")
    alike = ("setting", "settings", "setting")

    @classmethod
    def check(cls, experiment: Mapping[str, Any]) -> None:
        if experiment.get("setting") not in SETTINGS:
            raise ValueError(
                f"fusion experiment {experiment['key']!r} has setting {experiment.get('setting')!r}, "
                f"not one of {list(SETTINGS)}"
            )

    @property
    def setting(self) -> str:
        return str(self.experiments[0]["setting"])

    @property
    def title(self) -> str:
        return f"{self.arch}, {SETTINGS[self.setting][0]}"

    def rows(self) -> list[Mapping[str, Any]]:
        """Every row of the group once: the individual models first, then the others as first seen in
        configuration order (a row key names the same configured row in every experiment)."""
        rows: dict[str, Mapping[str, Any]] = {}
        for experiment in self.experiments:
            for row in experiment["rows"]:
                rows.setdefault(row["key"], row)
        return sorted(rows.values(), key=lambda row: row["kind"] != "base")


def column(experiment: Mapping[str, Any]) -> str:
    return f"N = {experiment['n_models']}"


def fusion_groups(spec: Mapping[str, Any]) -> list[FusionGroup]:
    """The fusion-layout experiments by group, groups in spec order, each group's experiments by N.

    Raises ValueError naming the experiment for a setting without a name, a model count that disagrees with its
    models, or a group whose experiments differ in setting or repeat an N (two columns would read alike).
    """
    return experiment_groups(spec, FusionGroup)


def families(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """A family key per row, where rules separate families as the paper's tables do: the individual models, then
    each method that has several rows (one per importance, say) on its own, and the single-row ones (baselines,
    the ensemble) together."""
    methods = [str(row.get("method", row["kind"])) for row in rows]
    return [
        "base" if row["kind"] == "base" else method if methods.count(method) > 1 else ""
        for row, method in zip(rows, methods, strict=True)
    ]


def fusion_table(data: ReportData, group: FusionGroup) -> tuple[Table, pd.DataFrame]:
    """The group's table and its CSV frame (one row per experiment and row, in table order by experiment)."""
    spec_rows = group.rows()
    keys = [row["key"] for row in spec_rows]
    rows_of = [experiment_rows(data, experiment) for experiment in group.experiments]
    cells, bold = {}, {}
    for experiment, rows in zip(group.experiments, rows_of, strict=True):
        by_key = rows.set_index("method")
        text = format_accuracy(by_key["joint_mean"], by_key["joint_std"], by_key["joint_n"])
        cells[column(experiment)] = text.reindex(keys, fill_value=DASH)
        bold[column(experiment)] = best_merges(by_key, "joint").reindex(keys, fill_value=False)
    index = pd.MultiIndex.from_arrays([[""] * len(keys), unique_labels(spec_rows)], names=["block", "row"])
    family = pd.Series(families(spec_rows))
    rules = (family != family.shift()) & (family.index > 0)
    frame = group_frame(group, rows_of, ("n_models", "setting"), METRICS)
    description = SETTINGS[group.setting][1]
    seeds = seeds_text(frame["n_pairs"], " (a seed draws the partition and trains its models)")
    caption = table_caption(
        data,
        group.title,
        f"test accuracy (%) of fusing N models of one task, each trained on {description}, {seeds}. "
        "Rows: the individual models, then the baselines, the ensemble (each member's class probabilities weighted by "
        "its share of the class's training data) and the fusion methods, as configured. Best fused model per column "
        "in bold (individual models and the ensemble are references and do not compete); "
        f"{DASH}: no such model or method at that N.",
    )
    table = Table(
        name=group.stem,
        caption=caption,
        cells=pd.DataFrame(cells).set_axis(index),
        bold=pd.DataFrame(bold).set_axis(index),
        rules=rules.set_axis(index),
    )
    return table, frame


@register_layout
class FusionTable(GroupTableLayout[FusionGroup]):
    name = "fusion_table"
    table = LAYOUT
    summarised = False  # a group's table sets its N side by side: the summaries would only repeat it
    subcategory = "Same-task fusion"

    def groups(self, spec: Mapping[str, Any]) -> list[FusionGroup]:
        return fusion_groups(spec)

    def group_table(self, data: ReportData, group: FusionGroup) -> tuple[Table, pd.DataFrame]:
        return fusion_table(data, group)
