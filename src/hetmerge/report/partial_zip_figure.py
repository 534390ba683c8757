"""Joint accuracy of merges that merge only a prefix of the network, against the fraction merged.

The rows come from the experiment's `partial_zip` analysis (their results name `source.cut` of `source.units`
body units). A row of the same method whose settings differ only in leaving the cut unset merges the whole
network and is drawn at 1; the base models and ensembles are horizontal reference lines, each in its own style.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from hetmerge.report.data import ReportData, dataset_label, experiment_labels, slug
from hetmerge.report.figures import (
    COLOURS,
    COLUMN_WIDTH_IN,
    LINESTYLES,
    experiments_with,
    figure_outputs,
    figure_style,
    frame_rows,
    legend_columns,
    new_figure,
    pairs_phrase,
    row_records,
    save_figure,
    spec_row,
)
from hetmerge.report.latex import Artifact, latex_escape
from hetmerge.report.layout import Layout, Output, register_layout

ANALYSIS = "partial_zip"
_CURVE = "Merge (up to the cut)"


def stem(experiment: Mapping[str, Any]) -> str:
    return f"partial_zip_{slug(experiment['key'])}"


def full_counterparts(experiment: Mapping[str, Any], partial: list[str]) -> list[str]:
    """Rows that merge the whole network with the partial rows' method and settings (see `_uncut`)."""
    rows = [spec_row(experiment, key) for key in partial]
    return [
        row["key"]
        for row in experiment["rows"]
        if row["key"] not in partial
        and row["kind"] == "merge"
        and all(
            row.get("method") == p.get("method") and _uncut(row.get("params") or {}, p.get("params") or {})
            for p in rows
        )
    ]


def _uncut(full: Mapping[str, Any], partial: Mapping[str, Any]) -> bool:
    """Whether `full` equals `partial` but for params it leaves unset where `partial` sets them (at least one)."""
    names = set(full) | set(partial)
    unset = {name for name in names if full.get(name) is None and partial.get(name) is not None}
    return bool(unset) and all(full.get(name) == partial.get(name) for name in names - unset)


def fractions(data: ReportData, experiment: str, rows: list[str]) -> dict[str, float]:
    """Fraction of the body each row merges (1 without a cut), the same for every seed."""
    result = {}
    for row in rows:
        values = set()
        for record in row_records(data, experiment, row):
            source = record.get("source") or {}
            if "units" not in source:
                raise ValueError(
                    f"partial merge figure: result of {experiment}/{row} seed {record['pair']} has no units"
                )
            values.add(1.0 if source.get("cut") is None else source["cut"] / source["units"])
        if len(values) != 1:
            raise ValueError(f"partial merge figure: seeds of {experiment}/{row} merge different fractions {values}")
        result[row] = values.pop()
    return result


def partial_figure(data: ReportData, experiment: Mapping[str, Any]) -> Figure:
    partial = list(experiment["analyses"][ANALYSIS])
    curve_rows = partial + full_counterparts(experiment, partial)
    x = fractions(data, experiment["key"], curve_rows)
    frame = {row["method"]: row for row in frame_rows(data, experiment["key"])}
    fig = new_figure(COLUMN_WIDTH_IN, 2.6)
    ax = fig.add_subplot()
    references = [row for row in experiment["rows"] if row["kind"] != "merge" and row["key"] in frame]
    for i, row in enumerate(references):
        mean = frame[row["key"]]["joint_mean"]
        ax.axhline(
            100 * mean,
            color=COLOURS[(i + 1) % len(COLOURS)],
            linestyle=LINESTYLES[(i + 1) % len(LINESTYLES)],
            linewidth=1.0,
            label=row["label"],
        )
    points = sorted(curve_rows, key=lambda row: x[row])
    ax.errorbar(
        [x[row] for row in points],
        [100 * frame[row]["joint_mean"] for row in points],
        yerr=[100 * frame[row]["joint_std"] if frame[row]["joint_n"] > 1 else 0.0 for row in points],
        color=COLOURS[0],
        marker="o",
        markersize=3.5,
        capsize=2,
        label=_CURVE,
        zorder=3,
    )
    for row in points:
        ax.annotate(
            spec_row(experiment, row)["label"],
            (x[row], 100 * frame[row]["joint_mean"]),
            xytext=(0, 4),
            textcoords="offset points",
            ha="right" if x[row] > 0.75 else "center",  # labels near the right end stay inside
            fontsize="x-small",
            annotation_clip=False,
            clip_on=True,
        )
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 100)
    ax.set_xlabel("Fraction of the network merged")
    ax.set_ylabel("Joint accuracy (%)")
    labels = [row["label"] for row in references] + [_CURVE]
    fig.legend(loc="outside upper center", ncol=legend_columns(labels, COLUMN_WIDTH_IN, 2))
    return fig


@register_layout
class PartialZipFigure(Layout):
    """Per experiment with partial merges: joint accuracy against the merged fraction of the network."""

    name = "partial_zip_figure"

    def outputs(self, spec: Mapping[str, Any]) -> list[Output]:
        return [
            output
            for experiment in experiments_with(spec, ANALYSIS)
            for output in figure_outputs(
                stem(experiment), "partial_zip.rst", "Partial merges", experiment_labels(experiment)
            )
        ]

    def write(self, data: ReportData, out_dir: Path) -> list[Artifact]:
        section = dataset_label(data.spec)
        artifacts = []
        for experiment in experiments_with(data.spec, ANALYSIS):
            with figure_style():
                pdf, png = save_figure(partial_figure(data, experiment), out_dir, stem(experiment))
            n_pairs = [row["n_pairs"] for row in frame_rows(data, experiment["key"])]
            caption = (
                rf"{latex_escape(section)}, {latex_escape(experiment['label'])}: joint accuracy (\%) of merges "
                r"that merge the network only up to a cut (the rest stays one branch per model) against the "
                rf"fraction of the network merged, {pairs_phrase(n_pairs)}; the base models and the ensemble are "
                "horizontal reference lines."
            )
            label = f"fig:partial-zip-{slug(experiment['key'])}"
            artifacts.append(Artifact("figure", section, pdf, (pdf, png), caption, label))
        return artifacts
