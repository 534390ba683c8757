"""Provenance of every evaluated row: seeds, device, code and package versions, and the row's config slice.

Reads the fields that result JSONs record (see hetmerge.provenance) and writes them as `provenance.csv` and as
a standalone `provenance.html` for the HTML report. Fields a record lacks are left empty rather than refused,
so that partial results still get a (sparser) table.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hetmerge.atomic import atomic_path
from hetmerge.report.data import ReportData, dataset_label, report_labels
from hetmerge.report.html import render_html
from hetmerge.report.latex import Artifact
from hetmerge.report.layout import Layout, Output, register_layout

CSV_PATH = "provenance.csv"
HTML_PATH = "provenance.html"

PROVENANCE_COLUMNS = (
    "dataset",
    "experiment",
    "method",
    "label",
    "pair",
    "split_seed",
    "seed",
    "device",
    "git_commit",
    "git_dirty",
    "hetmerge",
    "torch",
    "python",
    "torch_cuda_build",
    "config",
)
"""Columns of provenance.csv. `seed` is the seed of the evaluated model itself (a base model's training seed,
a merge's seed where its result records one); `torch_cuda_build` the CUDA version torch was built for, which a
CPU run records too (`device` says where the row ran); `config` is the row's method, params and analyses as
compact JSON."""
SUMMARY_FIELDS = {
    "git_commit": "Git commit",
    "hetmerge": "hetmerge",
    "torch": "torch",
    "python": "Python",
    "torch_cuda_build": "torch CUDA build",
    "device": "Device",
}
"""Fields whose distinct values provenance.html lists above the table (one value each, ideally)."""


def compact_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: one stable line per config slice."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def provenance_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """One record's provenance as a flat row of PROVENANCE_COLUMNS; None where it records nothing."""
    prov = record.get("provenance") or {}
    git = prov.get("git") or {}
    packages = prov.get("packages") or {}
    return {
        "dataset": record["dataset"],
        "experiment": record["arch"],
        "method": record["method"],
        "label": record["label"],
        "pair": record["pair"],
        "split_seed": record["split_seed"],
        "seed": record["source"].get("seed"),
        "device": prov.get("device"),
        "git_commit": git.get("commit"),
        "git_dirty": git.get("dirty"),
        "hetmerge": packages.get("hetmerge"),
        "torch": packages.get("torch"),
        "python": prov.get("python"),
        "torch_cuda_build": prov.get("cuda"),
        "config": compact_json(record["config"]),
    }


def provenance_rows(data: ReportData) -> list[dict[str, Any]]:
    """A row per record, in report order: experiment (spec order), seed, then the experiment's row order."""
    position = {experiment["key"]: i for i, experiment in enumerate(data.spec["experiments"])}
    records = sorted(data.records, key=lambda record: (position[record["arch"]], record["pair"]))
    return [provenance_row(record) for record in records]


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _commit_text(commit: str | None, dirty: bool | None) -> str | None:
    """A commit as provenance.html shows it: marked when the checkout had uncommitted changes."""
    if commit is None:
        return None
    return f"{commit} (uncommitted changes)" if dirty else commit


@register_layout
class Provenance(Layout):
    name = "provenance"

    def outputs(self, spec: Mapping[str, Any]) -> list[Output]:
        labels = report_labels(dataset=dataset_label(spec))
        return [
            Output(CSV_PATH, "provenance.rst", "Data", "Provenance", labels),
            Output(HTML_PATH, "provenance.rst", "Provenance", "Evaluation records", labels),
        ]

    def write(self, data: ReportData, out_dir: Path) -> list[Artifact]:
        provenance_files(data, out_dir)
        return []


def provenance_files(data: ReportData, out_dir: Path) -> list[Path]:
    """Write `provenance.csv` and `provenance.html` under `out_dir` and return both paths."""
    rows = provenance_rows(data)
    csv_path = Path(out_dir) / CSV_PATH
    with atomic_path(csv_path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(PROVENANCE_COLUMNS)
        writer.writerows([_csv_value(row[column]) for column in PROVENANCE_COLUMNS] for row in rows)

    summary = []
    for field, name in SUMMARY_FIELDS.items():
        if field == "git_commit":
            values = Counter(_commit_text(row["git_commit"], row["git_dirty"]) for row in rows)
        else:
            values = Counter(row[field] for row in rows)
        # Most common first; ties (and the unrecorded None) in a fixed order, so the page is byte-stable.
        ordered = sorted(values.items(), key=lambda item: (-item[1], item[0] is None, str(item[0])))
        summary.append({"name": name, "counts": ordered})
    html_path = render_html(
        Path(out_dir) / HTML_PATH,
        "provenance.html.j2",
        title="Provenance",
        summary=summary,
        rows=rows,
        n_records=len(rows),
    )
    return [csv_path, html_path]
