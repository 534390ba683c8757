"""The table of each experiment with the "mudsc" layout, as in the MuDSC paper: joint accuracy, the average of
the task accuracies and each task's accuracy for every row, the best merge per column in bold."""

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
    seeds_phrase,
    table_caption,
    table_outputs,
    task_columns,
    write_tables,
)

LAYOUT = "mudsc"


def stem(experiment: Mapping[str, Any]) -> str:
    return f"{LAYOUT}_{slug(experiment['key'])}"


@register_layout
class MudscTable(Layout):
    name = "mudsc_table"
    table = LAYOUT

    def outputs(self, spec: Mapping[str, Any]) -> list[Output]:
        return [
            output
            for experiment in experiments_of(spec, LAYOUT)
            for output in table_outputs(stem(experiment), "mudsc_table.rst", "MuDSC", experiment_labels(experiment))
        ]

    def write(self, data: ReportData, out_dir: Path) -> list[Artifact]:
        artifacts = []
        for experiment in experiments_of(data.spec, LAYOUT):
            rows = experiment_rows(data, experiment)
            metrics = {"Joint": "joint", "Per-Task Avg": "task_avg", **task_columns(rows)}
            accuracy, bold = accuracy_cells(rows, metrics, bold_best=list(metrics.values()))
            chosen = chosen_cells(data, experiment).reset_index(drop=True)
            cells = pd.concat([accuracy, chosen], axis=1)
            caption = table_caption(
                data,
                experiment["label"],
                f"accuracy (%), {seeds_phrase(rows['n_pairs'])}. Best merge per column in bold (base models and the "
                "ensemble are references and do not compete)." + chosen_note(chosen.columns),
            )
            table = experiment_table(stem(experiment), caption, [("", rows, cells, bold)])
            tex, page = write_tables(out_dir, stem(experiment), [table], title=experiment["label"])
            artifacts.append(Artifact("table", dataset_label(data.spec), tex, (tex, page)))
        return artifacts
