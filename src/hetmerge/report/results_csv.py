"""results.csv: the aggregated frame that every table and figure reads, one row per (experiment, row), so that
any number of the report can be quoted or checked against another run."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hetmerge.atomic import atomic_open
from hetmerge.report.data import ReportData, dataset_label, report_labels
from hetmerge.report.latex import Artifact
from hetmerge.report.layout import Layout, Output, register_layout

PATH = "results.csv"


@register_layout
class ResultsCsv(Layout):
    name = "results_csv"

    def outputs(self, spec: Mapping[str, Any]) -> list[Output]:
        return [Output(PATH, "results_csv.rst", "Data", "Results", report_labels(dataset=dataset_label(spec)))]

    def write(self, data: ReportData, out_dir: Path) -> list[Artifact]:
        with atomic_open(Path(out_dir) / PATH) as handle:
            data.frame.to_csv(handle, index=False, lineterminator="\n")
        return []
