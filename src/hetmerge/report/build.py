"""Assemble the report: run every registered layout (`hetmerge.report.layout`), then write main.tex, which
places the tables and figures the layouts return, in registry order, under each section.

To add a table or figure, write one layout module and import it in `hetmerge.report.layouts`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hetmerge.report.data import dataset_label, load_report_data
from hetmerge.report.latex import render_to
from hetmerge.report.layout import declared_outputs, ordered_layouts

MAIN_TEX = "main.tex"


def build_report(spec: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write every file of the report for `spec` under `out_dir` and return their paths, in declaration order.

    The layouts write into a fresh staging folder, which is compared with `declared_outputs(spec)` before
    anything moves into `out_dir`: a layout that writes a file it did not declare, or skips one it did, is
    a ValueError, so the pipeline's list of report files cannot drift from the code. Output depends only on
    the spec and the files it names (no timestamps), so a rerun reproduces every file byte for byte.
    """
    out_dir = Path(out_dir)
    declared = [output.path for output in declared_outputs(spec)]
    data = load_report_data(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".report-", dir=out_dir))
    try:
        artifacts = [artifact for layout in ordered_layouts() for artifact in layout.write(data, staging)]
        sections: dict[str, list[dict[str, str]]] = {}
        for artifact in artifacts:
            sections.setdefault(artifact.section, []).append(
                {
                    "kind": artifact.kind,
                    "path": artifact.path.relative_to(staging).as_posix(),
                    "caption": artifact.caption,
                    "label": artifact.label,
                }
            )
        render_to(staging / MAIN_TEX, "main.tex.j2", title=spec["title"], sections=sections)
        written = sorted(path.relative_to(staging).as_posix() for path in staging.rglob("*") if path.is_file())
        undeclared, missing = sorted(set(written) - set(declared)), sorted(set(declared) - set(written))
        if undeclared or missing:
            raise ValueError(
                f"report layouts wrote files they did not declare ({undeclared}) or declared files they did not "
                f"write ({missing}) for the report of {dataset_label(spec)}"
            )
        for path in declared:
            (out_dir / path).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / path, out_dir / path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out_dir / path for path in declared]
