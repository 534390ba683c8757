"""Paper-ready report of evaluation results: LaTeX tables (each with an HTML twin), figures, results.csv, a
provenance table (CSV and HTML) and a main.tex.

Deliberately free of torch, so the report job starts fast.
"""

from hetmerge.report.aggregate import ReportData, aggregate
from hetmerge.report.build import BUILDERS, Builder, build_report
from hetmerge.report.latex import (
    Artifact,
    LatexUnavailableError,
    compile_latex,
    latex_environment,
    latex_escape,
)

__all__ = [
    "BUILDERS",
    "Artifact",
    "Builder",
    "LatexUnavailableError",
    "ReportData",
    "aggregate",
    "build_report",
    "compile_latex",
    "latex_environment",
    "latex_escape",
]
