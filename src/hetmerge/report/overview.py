"""The overview item of the HTML report: what was run (every experiment with its models, table layout, rows
and analyses) and the full validated configuration. It lives in a report item rather than on the start page,
which `snakemake --report` centres vertically and cuts off when it is taller than the screen."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hetmerge.report.data import ReportData, dataset_label, report_labels
from hetmerge.report.html import render_html
from hetmerge.report.latex import Artifact
from hetmerge.report.layout import Layout, Output, register_layout

PATH = "overview.html"


@register_layout
class Overview(Layout):
    name = "overview"

    def outputs(self, spec: Mapping[str, Any]) -> list[Output]:
        labels = report_labels(dataset=dataset_label(spec))
        return [Output(PATH, "overview.rst", "Overview", "Experiments and configuration", labels)]

    def write(self, data: ReportData, out_dir: Path) -> list[Artifact]:
        spec = data.spec
        experiments = [
            {
                "key": experiment["key"],
                "label": experiment["label"],
                "models": " + ".join(experiment["model_labels"]),
                "layout": experiment["layout"],
                "group": experiment["group"],
                "rows": ", ".join(row["label"] for row in experiment["rows"]),
                "analyses": ", ".join(experiment.get("analyses", {})),
            }
            for experiment in spec["experiments"]
        ]
        render_html(
            Path(out_dir) / PATH,
            "overview.html.j2",
            title=spec["title"],
            dataset=dataset_label(spec),
            seeds=", ".join(map(str, spec["seeds"])),
            experiments=experiments,
            config=json.dumps(spec["config"], indent=2, ensure_ascii=False),
        )
        return []
