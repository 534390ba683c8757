"""Assemble a report: run every registered table/figure builder, then write results.csv, the provenance table
and main.tex.

To add a table or figure, write a function `(ReportData, out_dir) -> list[Artifact]` and add it to
BUILDERS; main.tex places whatever the builders return, in registry order, under each section.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hetmerge.atomic import atomic_open
from hetmerge.report.aggregate import ReportData, aggregate
from hetmerge.report.figures import (
    alignment_figures,
    joint_accuracy_figures,
    lambda_figures,
    landscape_figures,
    partial_zip_figures,
)
from hetmerge.report.latex import Artifact, accuracy_tables, hetero_tables, mudsc_tables, render_to, summary_tables
from hetmerge.report.provenance import provenance_files

Builder = Callable[[ReportData, Path], list[Artifact]]

BUILDERS: dict[str, Builder] = {
    "summary_tables": summary_tables,
    "accuracy_tables": accuracy_tables,
    "mudsc_tables": mudsc_tables,
    "hetero_tables": hetero_tables,
    "joint_accuracy_figures": joint_accuracy_figures,
    "partial_zip_figures": partial_zip_figures,
    "lambda_figures": lambda_figures,
    "landscape_figures": landscape_figures,
    "alignment_figures": alignment_figures,
}

ANALYSIS_KINDS = ("lambda_sweep", "landscape")
"""`kind`s of analysis records that some builder reads; any other kind is refused rather than dropped."""


def build_report(
    records: Sequence[Mapping[str, Any]],
    out_dir: Path,
    *,
    title: str,
    method_order: Sequence[str] = (),
    analysis: Sequence[Mapping[str, Any]] = (),
) -> list[Path]:
    """Write tables, figures, results.csv, provenance.{csv,html} and main.tex under `out_dir`; return the
    written paths.

    `analysis` holds records that are not one evaluated model (λ sweeps, loss landscapes), told apart by
    their `kind`. Output depends only on the arguments (no timestamps, sorted iteration), so rerunning on
    the same records reproduces every file byte for byte.
    """
    out_dir = Path(out_dir)
    unknown = sorted({str(record.get("kind")) for record in analysis} - set(ANALYSIS_KINDS))
    if unknown:
        raise ValueError(f"analysis records of unknown kind {unknown} (known: {', '.join(ANALYSIS_KINDS)})")
    data = ReportData(
        records=tuple(records), frame=aggregate(records, method_order=method_order), analysis=tuple(analysis)
    )
    artifacts = [artifact for build in BUILDERS.values() for artifact in build(data, out_dir)]
    written = [path for artifact in artifacts for path in artifact.files]
    if len(set(written)) != len(written):
        # Distinct names can share a slug (e.g. "a.b" and "a-b"); one file would silently overwrite another.
        raise ValueError(f"report builders wrote the same file twice: {sorted(map(str, written))}")

    csv = out_dir / "results.csv"
    with atomic_open(csv) as handle:
        data.frame.to_csv(handle, index=False, lineterminator="\n")
    provenance = provenance_files(data, out_dir)

    sections: dict[str, list[dict[str, str]]] = {}
    for artifact in artifacts:
        sections.setdefault(artifact.section, []).append(
            {
                "kind": artifact.kind,
                "path": artifact.path.relative_to(out_dir).as_posix(),
                "caption": artifact.caption,
                "label": artifact.label,
            }
        )
    main_tex = render_to(out_dir / "main.tex", "main.tex.j2", title=title, sections=sections)
    return [*written, csv, *provenance, main_tex]
