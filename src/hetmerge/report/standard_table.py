"""The accuracy table of each experiment with the "standard" layout: parameters, FLOPs, joint accuracy, each
task's accuracy and their average for every row, the best merged joint accuracy in bold."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from hetmerge.report.data import ReportData, dataset_label, experiment_labels, experiments_of, slug
from hetmerge.report.latex import Artifact
from hetmerge.report.layout import Layout, Output, register_layout
from hetmerge.report.tables import (
    accuracy_cells,
    chosen_cells,
    chosen_note,
    experiment_rows,
    experiment_table,
    humanize_count,
    seeds_phrase,
    table_caption,
    table_outputs,
    task_columns,
    write_tables,
)

LAYOUT = "standard"


def stem(experiment: Mapping[str, Any]) -> str:
    return f"{LAYOUT}_{slug(experiment['key'])}"


@register_layout
class StandardTable(Layout):
    name = "standard_table"
    table = LAYOUT

    def outputs(self, spec: Mapping[str, Any]) -> list[Output]:
        return [
            output
            for experiment in experiments_of(spec, LAYOUT)
            for output in table_outputs(
                stem(experiment), "standard_table.rst", "Accuracy", experiment_labels(experiment)
            )
        ]

    def write(self, data: ReportData, out_dir: Path) -> list[Artifact]:
        artifacts = []
        for experiment in experiments_of(data.spec, LAYOUT):
            rows = experiment_rows(data, experiment)
            counts = pd.DataFrame(
                {"Params": rows["params_mean"].map(humanize_count), "FLOPs": rows["flops_mean"].map(humanize_count)}
            )
            metrics = {"Joint": "joint", **task_columns(rows), "Avg": "task_avg"}
            accuracy, bold = accuracy_cells(rows, metrics, bold_best=["joint"])
            chosen = chosen_cells(data, experiment).reset_index(drop=True)
            cells = pd.concat([counts, accuracy, chosen], axis=1)
            caption = table_caption(
                data,
                experiment["label"],
                f"accuracy (%), {seeds_phrase(rows['n_pairs'])}. Best merged joint accuracy in bold."
                + chosen_note(chosen.columns),
            )
            table = experiment_table(stem(experiment), caption, [("", rows, cells, bold)])
            tex, page = write_tables(out_dir, stem(experiment), [table], title=experiment["label"])
            artifacts.append(Artifact("table", dataset_label(data.spec), tex, (tex, page)))
        return artifacts
