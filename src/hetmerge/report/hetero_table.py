"""One table per group of experiments with the "hetero" layout: merges of models of different depth or width
next to their homogeneous references, one block of rows per experiment, and the same numbers as CSV."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from hetmerge.atomic import atomic_open
from hetmerge.report.aggregate import STATS
from hetmerge.report.data import ReportData, dataset_label, experiments_of, report_labels, slug
from hetmerge.report.latex import Artifact
from hetmerge.report.layout import Layout, Output, register_layout
from hetmerge.report.tables import (
    TABLE_DIR,
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

LAYOUT = "hetero"
ID_COLUMNS = ("dataset", "group", "experiment", "arch_label", "method", "label", "kind", "n_pairs")
"""Leading columns of a group's CSV; `<metric>_{mean,std,n}` follow for Joint, each task and Avg."""


def groups(spec: Mapping[str, Any]) -> dict[str, list[Mapping[str, Any]]]:
    """The hetero-layout experiments by group, groups and members in spec order."""
    found: dict[str, list[Mapping[str, Any]]] = {}
    for experiment in experiments_of(spec, LAYOUT):
        found.setdefault(str(experiment["group"]), []).append(experiment)
    return found


def stem(group: str) -> str:
    return f"{LAYOUT}_{slug(group)}"


@register_layout
class HeteroTable(Layout):
    name = "hetero_table"
    table = LAYOUT

    def outputs(self, spec: Mapping[str, Any]) -> list[Output]:
        outputs = []
        for group, members in groups(spec).items():
            labels = {"group": group, "experiments": "; ".join(experiment["label"] for experiment in members)}
            outputs += table_outputs(stem(group), "hetero_table.rst", "Heterogeneous merging", labels)
            outputs.append(
                Output(
                    f"{TABLE_DIR}/{stem(group)}.csv",
                    "hetero_csv.rst",
                    "Data",
                    "Heterogeneous merging",
                    report_labels(**labels),
                )
            )
        return outputs

    def write(self, data: ReportData, out_dir: Path) -> list[Artifact]:
        artifacts = []
        for group, members in groups(data.spec).items():
            rows_of = {experiment["key"]: experiment_rows(data, experiment) for experiment in members}
            metrics = {"Joint": "joint", **task_columns(pd.concat(rows_of.values())), "Avg": "task_avg"}
            blocks = []
            for experiment in members:
                rows = rows_of[experiment["key"]]
                accuracy, bold = accuracy_cells(rows, metrics, bold_best=list(metrics.values()))
                chosen = chosen_cells(data, experiment).reset_index(drop=True)
                blocks.append((experiment["label"], rows, pd.concat([accuracy, chosen], axis=1), bold))
            all_rows = pd.concat(rows_of.values(), ignore_index=True)
            chosen_columns = [column for _, _, cells, _ in blocks for column in cells.columns if column not in metrics]
            caption = table_caption(
                data,
                group,
                f"accuracy (%) of merging models of different depth or width, with homogeneous references, "
                f"{seeds_phrase(all_rows['n_pairs'])}. One block per experiment, titled by its models; best merge per "
                "column within each block in bold (base models and the ensemble are references and do not compete)."
                + chosen_note(list(dict.fromkeys(chosen_columns)))
                + alignment_note(members),
            )
            table = experiment_table(stem(group), caption, blocks)
            tex, page = write_tables(out_dir, stem(group), [table], title=group)
            csv = Path(out_dir) / TABLE_DIR / f"{stem(group)}.csv"
            columns = [f"{metric}_{stat}" for metric in metrics.values() for stat in STATS]
            frame = pd.concat(
                [rows.assign(group=group, experiment=key) for key, rows in rows_of.items()], ignore_index=True
            )
            with atomic_open(csv) as handle:
                frame[[*ID_COLUMNS, *columns]].to_csv(handle, index=False, lineterminator="\n")
            artifacts.append(Artifact("table", dataset_label(data.spec), tex, (tex, page, csv)))
        return artifacts


def alignment_note(members: list[Mapping[str, Any]]) -> str:
    """Caption sentence on depth alignment, for groups where a row offers the alignment analysis."""
    if not any("alignment" in row.get("analyses", ()) for experiment in members for row in experiment["rows"]):
        return ""
    return (
        " Depth-heterogeneous merges place each block of the shallower model at a block of the deeper one, as the"
        " row's alignment strategy chooses by minibatch linear CKA on the merge slice, pad the remaining positions"
        " with identity blocks and then match the equally deep models."
    )
