"""One table per group of experiments with the "fusion" layout, as in the Neuron Interpolation paper: N models
trained on the same task, each on its own partition of the data, fused into one. A group is one (architecture,
dataset, setting); its columns are its experiments by number of models ("N = 2", "N = 4", …), its rows the
individual models, then the configured rows (baselines, the ensemble, the fusion methods) in configuration
order. The same numbers, with macro F1, are written as CSV.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from hetmerge.atomic import atomic_open
from hetmerge.report.aggregate import STATS
from hetmerge.report.data import ReportData, dataset_label, experiments_of, report_labels, slug
from hetmerge.report.latex import Artifact
from hetmerge.report.layout import Layout, Output, register_layout
from hetmerge.report.tables import (
    DASH,
    TABLE_DIR,
    Table,
    best_merges,
    experiment_rows,
    format_accuracy,
    table_caption,
    table_outputs,
    unique_labels,
    write_tables,
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
ID_COLUMNS = (
    "dataset",
    "group",
    "experiment",
    "n_models",
    "setting",
    "arch_label",
    "method",
    "label",
    "kind",
    "n_pairs",
)
"""Leading columns of a group's CSV; `<metric>_{mean,std,n}` follow for each of METRICS."""


@dataclass(frozen=True)
class FusionGroup:
    """The experiments of one fusion table, by number of models, with the union of their rows."""

    key: str
    arch: str
    setting: str
    experiments: tuple[Mapping[str, Any], ...]

    @property
    def title(self) -> str:
        return f"{self.arch}, {SETTINGS[self.setting][0]}"

    @property
    def stem(self) -> str:
        return f"{LAYOUT}_{slug(self.key)}"

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
    found: dict[str, list[Mapping[str, Any]]] = {}
    for experiment in experiments_of(spec, LAYOUT):
        key = experiment["key"]
        if experiment.get("setting") not in SETTINGS:
            raise ValueError(
                f"fusion experiment {key!r} has setting {experiment.get('setting')!r}, not one of {list(SETTINGS)}"
            )
        n_models = experiment.get("n_models")
        if not isinstance(n_models, int) or n_models != len(experiment["models"]):
            raise ValueError(
                f"fusion experiment {key!r} has n_models {n_models!r} but {len(experiment['models'])} models"
            )
        found.setdefault(str(experiment["group"]), []).append(experiment)
    groups = []
    for key, members in found.items():
        settings = sorted({experiment["setting"] for experiment in members})
        if len(settings) > 1:
            raise ValueError(f"fusion group {key!r} mixes the settings {settings}: one table per setting")
        counts = [experiment["n_models"] for experiment in members]
        if len(set(counts)) != len(counts):
            raise ValueError(f"fusion group {key!r} has several experiments of the same N: {sorted(counts)}")
        arch = " / ".join(dict.fromkeys(label for experiment in members for label in experiment["model_labels"]))
        ordered = tuple(sorted(members, key=lambda experiment: experiment["n_models"]))
        groups.append(FusionGroup(key, arch, settings[0], ordered))
    return groups


def seeds_text(n_pairs: pd.Series) -> str:
    """Caption fragment saying over how many seeds (each a partition of the data and its N models) cells are."""
    low, high = int(n_pairs.min()), int(n_pairs.max())
    if high == 1:
        return "from a single seed"
    count = str(high) if low == high else f"{low}–{high}"
    return f"mean ± std over {count} seeds (a seed draws the partition and trains its models)"


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
    cells, bold, frames = {}, {}, []
    for experiment in group.experiments:
        rows = experiment_rows(data, experiment)
        by_key = rows.set_index("method")
        text = format_accuracy(by_key["joint_mean"], by_key["joint_std"], by_key["joint_n"])
        cells[column(experiment)] = text.reindex(keys, fill_value=DASH)
        bold[column(experiment)] = best_merges(by_key, "joint").reindex(keys, fill_value=False)
        frames.append(
            rows.assign(
                group=group.key,
                experiment=experiment["key"],
                n_models=experiment["n_models"],
                setting=experiment["setting"],
            )
        )
    index = pd.MultiIndex.from_arrays([[""] * len(keys), unique_labels(spec_rows)], names=["block", "row"])
    family = pd.Series(families(spec_rows))
    rules = (family != family.shift()) & (family.index > 0)
    all_rows = pd.concat(frames, ignore_index=True)
    description, seeds = SETTINGS[group.setting][1], seeds_text(all_rows["n_pairs"])
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
    columns = [f"{metric}_{stat}" for metric in METRICS for stat in STATS]
    return table, all_rows.reindex(columns=[*ID_COLUMNS, *columns])


def _labels(group: FusionGroup) -> dict[str, str]:
    return {"group": group.key, "experiments": "; ".join(experiment["label"] for experiment in group.experiments)}


@register_layout
class FusionTable(Layout):
    name = "fusion_table"
    table = LAYOUT
    summarised = False  # a group's table sets its N side by side: the summaries would only repeat it

    def outputs(self, spec: Mapping[str, Any]) -> list[Output]:
        outputs = []
        for group in fusion_groups(spec):
            outputs += table_outputs(group.stem, "fusion_table.rst", "Same-task fusion", _labels(group))
            outputs.append(
                Output(
                    f"{TABLE_DIR}/{group.stem}.csv",
                    "fusion_csv.rst",
                    "Data",
                    "Same-task fusion",
                    report_labels(**_labels(group)),
                )
            )
        return outputs

    def write(self, data: ReportData, out_dir: Path) -> list[Artifact]:
        artifacts = []
        for group in fusion_groups(data.spec):
            table, frame = fusion_table(data, group)
            tex, page = write_tables(out_dir, group.stem, [table], title=group.title)
            csv = Path(out_dir) / TABLE_DIR / f"{group.stem}.csv"
            with atomic_open(csv) as handle:
                frame.to_csv(handle, index=False, lineterminator="\n")
            artifacts.append(Artifact("table", dataset_label(data.spec), tex, (tex, page, csv)))
        return artifacts
