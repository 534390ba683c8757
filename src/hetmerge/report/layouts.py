"""The built-in layouts. `ORDER` is the order main.tex shows them in; importing a module registers its layout."""

import importlib

ORDER = (
    "summary_table",
    "standard_table",
    "mudsc_table",
    "hetero_table",
    "fusion_table",
    "few_shot_table",
    "summary_figure",
    "partial_zip_figure",
    "lambda_figure",
    "landscape_figure",
    "alignment_figure",
    "fusion_figure",
    "few_shot_figure",
    "results_csv",
    "provenance",
    "overview",
)

for _module in ORDER:
    importlib.import_module(f"hetmerge.report.{_module}")
