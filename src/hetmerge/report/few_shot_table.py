"""One table per group of experiments with the "few_shot" layout, as in the FS-Merge paper (Foldable SuperNets,
Tables 1 and 3): N models of one architecture, trained from different initialisations on different tasks, merged
from a few unlabelled images per task. A group is one set of models; its experiments differ only in how many
original training images per task (`few_shot`) the merges that learn get, and each is one block of rows, blocks by
that number. Columns: each task's accuracy, their average and the joint accuracy. The same numbers are written as
CSV.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from hetmerge.report.data import ReportData
from hetmerge.report.grouped import ExperimentGroup, GroupTableLayout, experiment_groups, group_frame, seeds_text
from hetmerge.report.layout import register_layout
from hetmerge.report.tables import (
    DASH,
    Table,
    accuracy_cells,
    experiment_rows,
    experiment_table,
    table_caption,
    task_columns,
)

LAYOUT = "few_shot"


@dataclass(frozen=True)
class FewShotGroup(ExperimentGroup):
    """The experiments of one few-shot table, by number of original images per task."""

    layout = LAYOUT
    what = "few-shot"
    order = ("few_shot", "few_shot")
    alike = ("models", "models", "set of models")  # their blocks would not compare

    @classmethod
    def check(cls, experiment: Mapping[str, Any]) -> None:
        few_shot = experiment.get("few_shot")
        if isinstance(few_shot, bool) or not isinstance(few_shot, int) or few_shot < 1:
            raise ValueError(
                f"few-shot experiment {experiment['key']!r} has few_shot {few_shot!r}, "
                "not a positive number of images per task"
            )

    @property
    def n_models(self) -> int:
        return int(self.experiments[0]["n_models"])

    @property
    def title(self) -> str:
        return f"{self.arch}, {self.n_models} models"

    @property
    def sizes(self) -> list[int]:
        return [experiment["few_shot"] for experiment in self.experiments]


def block_title(experiment: Mapping[str, Any]) -> str:
    return f"{experiment['few_shot']} images per task"


def few_shot_groups(spec: Mapping[str, Any]) -> list[FewShotGroup]:
    """The few-shot-layout experiments by group, groups in spec order, each group's experiments by `few_shot`.

    Raises ValueError naming the experiment for a `few_shot` that is not a positive integer or a model count that
    disagrees with its models, and naming the group for experiments of different models (their blocks would not
    compare) or of the same `few_shot` (two blocks would read alike).
    """
    return experiment_groups(spec, FewShotGroup)


def few_shot_table(data: ReportData, group: FewShotGroup) -> tuple[Table, pd.DataFrame]:
    """The group's table and its CSV frame (one row per experiment and row, in table order)."""
    rows_of = [experiment_rows(data, experiment) for experiment in group.experiments]
    metrics = {**task_columns(pd.concat(rows_of)), "Avg": "task_avg", "Joint": "joint"}
    blocks = [
        (block_title(experiment), rows, *accuracy_cells(rows, metrics, bold_best=list(metrics.values())))
        for experiment, rows in zip(group.experiments, rows_of, strict=True)
    ]
    frame = group_frame(group, rows_of, ("few_shot", "n_models"), metrics.values())
    caption = table_caption(
        data,
        group.title,
        f"accuracy (%) of merging models trained from different initialisations on different tasks, "
        f"{seeds_text(frame['n_pairs'])}. One block per number of original training images per task that the merges "
        "which learn get (unlabelled, with augmented copies); the other merges use the held-out merge slice, "
        "the same in every block. Columns: each task's accuracy (its images through its "
        "own head), their average, and the joint accuracy (every head's logits concatenated). Best merge per column "
        f"within each block in bold (base models and the ensemble are references and do not compete); {DASH}: no "
        "such number (a base model has no head for the other tasks).",
    )
    return experiment_table(group.stem, caption, blocks), frame


@register_layout
class FewShotTable(GroupTableLayout[FewShotGroup]):
    name = "few_shot_table"
    table = LAYOUT
    summarised = False  # a group's table sets its few-shot sizes side by side: the summaries would only repeat it
    subcategory = "Few-shot merging"

    def groups(self, spec: Mapping[str, Any]) -> list[FewShotGroup]:
        return few_shot_groups(spec)

    def group_table(self, data: ReportData, group: FewShotGroup) -> tuple[Table, pd.DataFrame]:
        return few_shot_table(data, group)
