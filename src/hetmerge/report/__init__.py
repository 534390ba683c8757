"""Paper-ready report of a run, built from the report spec alone (labels, table membership, row order and the
result files to read): LaTeX tables (each with an HTML twin), figures, results.csv, a provenance table, an
overview page for the HTML report and a main.tex. Every table or figure is one registered layout module.

Deliberately free of torch, so the report job starts fast.
"""

from hetmerge.report.aggregate import aggregate
from hetmerge.report.build import build_report
from hetmerge.report.data import ReportData, load_report_data
from hetmerge.report.latex import (
    Artifact,
    LatexUnavailableError,
    compile_latex,
    latex_environment,
    latex_escape,
)

__all__ = [
    "Artifact",
    "LatexUnavailableError",
    "ReportData",
    "aggregate",
    "build_report",
    "compile_latex",
    "latex_environment",
    "latex_escape",
    "load_report_data",
]
