"""Provenance of every evaluated row: seeds, device, code and package versions, and the row's config slice.

Reads the fields that `hetmerge evaluate` records (see hetmerge.provenance) and writes them as
`provenance.csv` and as a standalone `provenance.html` for the HTML report. Fields a record lacks are left
empty rather than refused, so that results from older runs still get a (sparser) table.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hetmerge.atomic import atomic_path
from hetmerge.report.aggregate import ReportData
from hetmerge.report.html import render_html

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
    "cuda",
    "config",
)
"""Columns of provenance.csv. `seed` is the seed of the evaluated model itself (a base model's training seed,
a merge's seed where its checkpoint records one); `config` is the row's config slice as compact JSON."""
SUMMARY_FIELDS = {
    "git_commit": "Git commit",
    "hetmerge": "hetmerge",
    "torch": "torch",
    "python": "Python",
    "cuda": "CUDA",
    "device": "Device",
}
"""Fields whose distinct values provenance.html lists above the table (one value each, ideally)."""


def compact_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: one stable line per config slice."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def provenance_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """One evaluation record's provenance as a flat row of PROVENANCE_COLUMNS; None where it records nothing."""
    prov = record.get("provenance") or {}
    git = prov.get("git") or {}
    packages = prov.get("packages") or {}
    source = record.get("source") or {}
    return {
        "dataset": record["dataset"],
        "experiment": record["arch"],
        "method": record["method"],
        "label": record.get("label"),
        "pair": record.get("pair"),
        "split_seed": record.get("split_seed"),
        "seed": source.get("seed"),
        "device": prov.get("device"),
        "git_commit": git.get("commit"),
        "git_dirty": git.get("dirty"),
        "hetmerge": packages.get("hetmerge"),
        "torch": packages.get("torch"),
        "python": prov.get("python"),
        "cuda": prov.get("cuda"),
        "config": compact_json(record["config"]) if "config" in record else None,
    }


def provenance_rows(data: ReportData) -> list[dict[str, Any]]:
    """A row per evaluation record, in table order: dataset, experiment, model pair, then method order."""
    rank = {
        (row["dataset"], row["arch"], row["method"]): row["method_rank"]
        for row in data.frame[["dataset", "arch", "method", "method_rank"]].to_dict("records")
    }
    rows = [provenance_row(record) for record in data.records]
    return sorted(
        rows,
        key=lambda row: (
            row["dataset"],
            row["experiment"],
            (row["pair"] is None, row["pair"] or 0),
            rank[(row["dataset"], row["experiment"], row["method"])],
        ),
    )


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


def provenance_files(data: ReportData, out_dir: Path) -> list[Path]:
    """Write `provenance.csv` and `provenance.html` under `out_dir` and return both paths."""
    rows = provenance_rows(data)
    csv_path = Path(out_dir) / "provenance.csv"
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
        Path(out_dir) / "provenance.html",
        "provenance.html.j2",
        title="Provenance",
        summary=summary,
        rows=rows,
        n_records=len(rows),
    )
    return [csv_path, html_path]
