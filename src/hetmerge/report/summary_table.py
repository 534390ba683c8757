"""The summary of the whole run: joint accuracy of every row (columns: experiments), one table per panel of
experiments that share rows, so that each fits the text width (a single table of every experiment did not).

Experiments of a group with several members form one panel (a group's experiments are compared anyway); the
others are pooled by table layout, since experiments of one layout list the same kind of rows. Layouts whose own
tables already compare a whole group (`Layout.summarised` False) are left out; without other experiments, so is
the summary.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from hetmerge.report.data import ReportData, dataset_label, slug
from hetmerge.report.latex import Artifact
from hetmerge.report.layout import Layout, Output, register_layout, summarised_experiments
from hetmerge.report.tables import (
    DASH,
    KIND_ORDER,
    Table,
    best_merges,
    experiment_rows,
    format_accuracy,
    kind_rules,
    seeds_phrase,
    table_caption,
    table_outputs,
    unique_labels,
    write_tables,
)

STEM = "summary"


def panels(spec: Mapping[str, Any]) -> dict[str, list[Mapping[str, Any]]]:
    """Panel title → its experiments, both in spec order."""
    experiments = summarised_experiments(spec)
    sizes = Counter(experiment["group"] for experiment in experiments)
    found: dict[str, list[Mapping[str, Any]]] = {}
    for experiment in experiments:
        if sizes[experiment["group"]] > 1:
            title = f"group {experiment['group']}"
        else:
            title = f"{experiment['layout']} experiments"
        found.setdefault(title, []).append(experiment)
    return found


@register_layout
class SummaryTable(Layout):
    name = "summary_table"

    def outputs(self, spec: Mapping[str, Any]) -> list[Output]:
        if not panels(spec):
            return []
        return table_outputs(STEM, "summary_table.rst", "Summary", {"dataset": dataset_label(spec)})

    def write(self, data: ReportData, out_dir: Path) -> list[Artifact]:
        tables = [panel_table(data, title, members) for title, members in panels(data.spec).items()]
        if not tables:
            return []
        tex, page = write_tables(out_dir, STEM, tables, title=f"{dataset_label(data.spec)}: summary")
        return [Artifact("table", dataset_label(data.spec), tex, (tex, page))]


def panel_table(data: ReportData, title: str, experiments: list[Mapping[str, Any]]) -> Table:
    """Rows: every row key of the panel's experiments (references first, then in spec order); columns: the
    experiments; the best merge of each experiment in bold, a dash where an experiment lacks the row."""
    spec_rows: dict[str, Mapping[str, Any]] = {}
    for experiment in experiments:
        for row in experiment["rows"]:
            spec_rows.setdefault(row["key"], row)
    keys = sorted(spec_rows, key=lambda key: KIND_ORDER.get(spec_rows[key]["kind"], len(KIND_ORDER)))
    cells, bold = {}, {}
    for experiment in experiments:
        rows = experiment_rows(data, experiment).set_index("method")
        text = format_accuracy(rows["joint_mean"], rows["joint_std"], rows["joint_n"])
        cells[experiment["label"]] = text.reindex(keys, fill_value=DASH)
        bold[experiment["label"]] = best_merges(rows, "joint").reindex(keys, fill_value=False)
    if len(cells) != len(experiments):
        raise ValueError(
            f"summary panel {title!r} has experiments with the same label: {[e['key'] for e in experiments]}"
        )
    index = pd.MultiIndex.from_arrays(
        [[""] * len(keys), unique_labels([spec_rows[key] for key in keys])], names=["block", "row"]
    )
    frame = data.frame[data.frame["arch"].isin([experiment["key"] for experiment in experiments])]
    caption = table_caption(
        data,
        f"summary of the {title}",
        f"joint accuracy (%) of every method (rows) in each experiment (columns), {seeds_phrase(frame['n_pairs'])}. "
        f"Best merge per experiment in bold (base models and the ensemble are references and do not compete); "
        f"{DASH}: not part of that experiment.",
    )
    return Table(
        name=f"{STEM}_{slug(title)}",
        caption=caption,
        cells=pd.DataFrame(cells).set_axis(index),
        bold=pd.DataFrame(bold).set_axis(index),
        rules=kind_rules(pd.Series([spec_rows[key]["kind"] for key in keys])).set_axis(index),
    )
