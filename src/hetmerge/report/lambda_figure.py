"""Joint accuracy against the parameter a method chooses on the merge slice (its result's `curve`).

For every row of the experiment's `lambda_curve` analysis: the test-set curve with a mean ± std band over the
seeds, the merge-slice curve (what the choice sees) dashed, and stars at the values the seeds chose. Values
the method may not choose (shown for context, e.g. the ends of the range) are hollow. The plotted numbers go
to a CSV next to the figure, so that the text can quote them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from hetmerge.atomic import atomic_open
from hetmerge.report.data import ReportData, dataset_label, experiment_labels, slug
from hetmerge.report.figures import (
    COLOURS,
    COLUMN_WIDTH_IN,
    FIGURE_DIR,
    MARKERS,
    experiments_with,
    figure_outputs,
    figure_style,
    legend_columns,
    new_figure,
    pairs_phrase,
    param_symbol,
    row_records,
    save_figure,
    spec_row,
)
from hetmerge.report.latex import Artifact, latex_escape
from hetmerge.report.layout import Layout, Output, register_layout

ANALYSIS = "lambda_curve"
COLUMNS = (
    "experiment",
    "row",
    "label",
    "param",
    "value",
    "selectable",
    "n_pairs",
    "test_joint_mean",
    "test_joint_std",
    "test_joint_n",
    "merge_joint_mean",
    "merge_joint_std",
    "merge_joint_n",
    "chosen_pairs",
)
"""Columns of the CSV: one row per (row, parameter value); accuracies as fractions (like results.csv), std over
seeds (ddof=1, empty below two), and how many seeds chose the value on the merge slice."""


def stem(experiment: Mapping[str, Any]) -> str:
    return f"lambda_{slug(experiment['key'])}"


def curve_table(data: ReportData, experiment: Mapping[str, Any]) -> pd.DataFrame:
    """The curves of the experiment's `lambda_curve` rows over all seeds, aggregated, in COLUMNS."""
    key = experiment["key"]
    points = []
    params = {}
    for row in experiment["analyses"][ANALYSIS]:
        for record in row_records(data, key, row):
            where = f"λ figure: result of {key}/{row} seed {record['pair']}"
            curve = record.get("curve")
            if not curve:
                raise ValueError(f"{where} has no curve")
            param = params.setdefault(row, curve["param"])
            values = [float(point[param]) for point in curve["points"]]
            if len(set(values)) != len(values):
                raise ValueError(f"{where} repeats a value of {param}")
            chosen = curve.get("chosen")
            if chosen is not None and float(chosen) not in values:
                raise ValueError(f"{where} chose {param} = {chosen}, which is not one of its points")
            points += [
                {
                    "row": row,
                    "pair": record["pair"],
                    "value": value,
                    "selectable": bool(point["selectable"]),
                    "test": _number(point["test"]["joint"]),
                    "merge": _number(point["merge"]["joint"]),
                    "chosen": chosen is not None and float(chosen) == value,
                }
                for value, point in zip(values, curve["points"], strict=True)
                if "error" not in point  # a value the method could not merge at: no point to draw
            ]
    if len(set(params.values())) != 1:
        raise ValueError(f"λ figure of {key}: its rows choose different parameters {params}")
    long = pd.DataFrame(points)
    disagree = long.groupby(["row", "value"])["selectable"].nunique() > 1
    if disagree.any():
        row, value = disagree[disagree].index[0]
        raise ValueError(f"λ figure of {key}: the seeds of row {row} disagree on whether {value:g} is a candidate")
    table = (
        long.groupby(["row", "value"], sort=False)
        .agg(
            selectable=("selectable", "first"),
            n_pairs=("pair", "nunique"),
            test_joint_mean=("test", "mean"),
            test_joint_std=("test", "std"),
            test_joint_n=("test", "count"),
            merge_joint_mean=("merge", "mean"),
            merge_joint_std=("merge", "std"),
            merge_joint_n=("merge", "count"),
            chosen_pairs=("chosen", "sum"),
        )
        .reset_index()
    )
    order = {row: i for i, row in enumerate(experiment["analyses"][ANALYSIS])}
    table = table.sort_values(["row", "value"], key=lambda c: c.map(order) if c.name == "row" else c, kind="stable")
    table["experiment"] = key
    table["label"] = [spec_row(experiment, row)["label"] for row in table["row"]]
    table["param"] = next(iter(params.values()))
    return table.reindex(columns=list(COLUMNS)).reset_index(drop=True)


def _number(value: Any) -> float:
    return np.nan if value is None else float(value)


def curve_figure(table: pd.DataFrame) -> Figure:
    fig = new_figure(COLUMN_WIDTH_IN, 2.8)
    ax = fig.add_subplot()
    legend = []
    for j, (_, curve) in enumerate(table.groupby("row", sort=False)):
        colour, marker = COLOURS[j % len(COLOURS)], MARKERS[j % len(MARKERS)]
        x = curve["value"].to_numpy()
        test = 100 * curve["test_joint_mean"].to_numpy()
        spread = 100 * curve["test_joint_std"].fillna(0).to_numpy()
        selectable = curve["selectable"].to_numpy(dtype=bool)
        ax.fill_between(x, test - spread, test + spread, color=colour, alpha=0.2, linewidth=0)
        ax.plot(x, test, color=colour)
        ax.plot(x, 100 * curve["merge_joint_mean"].to_numpy(), color=colour, linestyle="--")
        for filled in (True, False):
            shown = selectable == filled
            ax.plot(
                x[shown],
                test[shown],
                linestyle="none",
                marker=marker,
                markersize=3,
                color=colour,
                markerfacecolor=colour if filled else "white",
            )
        picked = curve["chosen_pairs"].to_numpy() > 0
        ax.plot(
            x[picked],
            test[picked],
            linestyle="none",
            marker="*",
            markersize=8,
            color=colour,
            markeredgecolor="black",
            markeredgewidth=0.4,
            zorder=4,
        )
        legend.append(Line2D([], [], color=colour, marker=marker, markersize=3, label=curve["label"].iloc[0]))
    symbol = param_symbol(table["param"].iloc[0])[0]
    legend += [
        Line2D([], [], color="black", label="test set"),
        Line2D([], [], color="black", linestyle="--", label="merge slice"),
        Line2D([], [], color="black", linestyle="none", marker="*", markersize=7, label=f"chosen {symbol}"),
        Line2D(
            [],
            [],
            color="black",
            linestyle="none",
            marker="o",
            markersize=3,
            markerfacecolor="white",
            label="not a candidate",
        ),
    ]
    low, high = float(table["value"].min()), float(table["value"].max())
    pad = 0.03 * (high - low or 1.0)
    ax.set_xlim(low - pad, high + pad)
    ax.set_xlabel(f"{symbol} (chosen on the merge slice)")
    ax.set_ylabel("Joint accuracy (%)")
    labels = [handle.get_label() for handle in legend]
    fig.legend(handles=legend, loc="outside upper center", ncol=legend_columns(labels, COLUMN_WIDTH_IN, 2))
    return fig


@register_layout
class LambdaFigure(Layout):
    """Per experiment with rows that choose a parameter: their accuracy curves over it, and the CSV."""

    name = "lambda_figure"

    def outputs(self, spec: Mapping[str, Any]) -> list[Output]:
        return [
            output
            for experiment in experiments_with(spec, ANALYSIS)
            for output in figure_outputs(
                stem(experiment), "lambda.rst", "λ curve", experiment_labels(experiment), csv_caption="lambda_csv.rst"
            )
        ]

    def write(self, data: ReportData, out_dir: Path) -> list[Artifact]:
        section = dataset_label(data.spec)
        artifacts = []
        for experiment in experiments_with(data.spec, ANALYSIS):
            table = curve_table(data, experiment)
            with figure_style():
                pdf, png = save_figure(curve_figure(table), out_dir, stem(experiment))
            csv = out_dir / FIGURE_DIR / f"{stem(experiment)}.csv"
            with atomic_open(csv) as handle:
                table.to_csv(handle, index=False, lineterminator="\n")
            symbol = param_symbol(table["param"].iloc[0])[1]
            grid = table.loc[table["selectable"], "value"]
            candidates = f" (candidates {grid.min():g} to {grid.max():g})" if len(grid) else ""
            caption = (
                rf"{latex_escape(section)}, {latex_escape(experiment['label'])}: joint accuracy (\%) against "
                rf"{symbol}, the parameter these merges choose on the held-out merge slice. Solid lines and "
                rf"bands: test set, {pairs_phrase(table['n_pairs'].tolist())}; dashed lines: the merge slice; "
                rf"stars: the {symbol} that a model pair chose{candidates}; hollow markers: values shown for "
                "context that are not candidates."
            )
            label = f"fig:lambda-{slug(experiment['key'])}"
            artifacts.append(Artifact("figure", section, pdf, (pdf, png, csv), caption, label))
        return artifacts
