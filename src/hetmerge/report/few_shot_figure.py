"""Joint accuracy of few-shot merging against the number of original training images per task (FS-Merge paper):
one panel per few-shot group (a set of models), one line per method run at every size of the group (mean, bars:
std over seeds), the x axis log-scaled with a tick at every size of the group.

A line is a row label of the group's table (`unique_labels`), so the figure and the table name the same method
alike; base models are not drawn (their accuracy does not depend on the images), the ensemble is drawn as the
dashed black reference. Which rows are drawn follows from the spec alone, so that a spec with nothing to draw
declares no figure. Panels fill up to three columns; more groups than three rows hold continue in a further figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullLocator

from hetmerge.report.data import ReportData, dataset_label
from hetmerge.report.few_shot_table import FewShotGroup, few_shot_groups
from hetmerge.report.figures import COLOURS, COLUMN_WIDTH_IN, MARKERS, TEXT_WIDTH_IN
from hetmerge.report.grouped import GroupFigureLayout, Sheet, grid, paged, panel_figure, sheet_seeds
from hetmerge.report.latex import latex_escape
from hetmerge.report.layout import register_layout
from hetmerge.report.tables import experiment_rows, unique_labels

STEM = "few_shot_accuracy"
MIN_SIZES = 2
"""A row is drawn where the group has it at this many sizes or more: one point is no trend (the table shows it)."""
_METHOD_COLOURS = tuple(colour for colour in COLOURS if colour != "#000000")
"""Black is the ensemble's."""
_ENSEMBLE = {"color": "#000000", "linestyle": "--", "marker": "x"}
_X_MARGIN = 1.3
"""The x axis reaches this factor beyond the smallest and largest size (log scale: equal room on both sides)."""


@dataclass(frozen=True)
class Style:
    colour: str
    marker: str
    linestyle: str


def line_labels(group: FewShotGroup) -> list[str]:
    """The table labels of the group's non-base rows present at every size of the group, where it has MIN_SIZES
    sizes or more, in first-seen order (blocks by size, rows in configuration order): a config draws a method's
    curve by listing it in every experiment of the group, the extra sizes' experiments only the curves' methods."""
    sizes: dict[str, int] = {}
    for experiment in group.experiments:
        for row, label in zip(experiment["rows"], unique_labels(experiment["rows"]), strict=True):
            if row["kind"] != "base":
                sizes[label] = sizes.get(label, 0) + 1
    every = len(group.experiments)
    return [label for label, count in sizes.items() if count == every >= MIN_SIZES]


def drawn_groups(spec: Mapping[str, Any]) -> list[FewShotGroup]:
    """The few-shot groups with at least one line, in spec order."""
    return [group for group in few_shot_groups(spec) if line_labels(group)]


def figure_lines(data: ReportData, group: FewShotGroup) -> pd.DataFrame:
    """What the group's panel draws: one row per (line label, size) with its kind and joint accuracy statistics
    (fractions), ordered by line, then size."""
    labels = line_labels(group)
    frames = []
    for experiment in group.experiments:
        rows = experiment_rows(data, experiment)
        frames.append(rows[rows["display"].isin(labels)].assign(few_shot=experiment["few_shot"]))
    lines = pd.concat(frames, ignore_index=True).rename(columns={"display": "line"})
    lines = lines.assign(order=lines["line"].map(labels.index)).sort_values(["order", "few_shot"], kind="stable")
    return lines[["line", "kind", "few_shot", "joint_mean", "joint_std", "joint_n"]].reset_index(drop=True)


def line_styles(groups: Sequence[FewShotGroup]) -> dict[str, Style]:
    """A style per line label of `groups`, coloured in first-seen order, the same in every panel and figure of a
    report; lines of ensemble rows get the ensemble's."""
    kinds: dict[str, str] = {}
    for group in groups:
        labels = line_labels(group)
        for experiment in group.experiments:
            for row, label in zip(experiment["rows"], unique_labels(experiment["rows"]), strict=True):
                if label in labels:
                    kinds.setdefault(label, row["kind"])
    styles, i = {}, 0
    for label, kind in kinds.items():
        if kind == "ensemble":
            styles[label] = Style(_ENSEMBLE["color"], _ENSEMBLE["marker"], _ENSEMBLE["linestyle"])
            continue
        styles[label] = Style(_METHOD_COLOURS[i % len(_METHOD_COLOURS)], MARKERS[i % len(MARKERS)], "-")
        i += 1
    return styles


def sheets(spec: Mapping[str, Any]) -> list[Sheet[FewShotGroup]]:
    return paged(STEM, drawn_groups(spec))


def _draw_panel(ax: Axes, data: ReportData, group: FewShotGroup, styles: Mapping[str, Style]) -> None:
    for label, line in figure_lines(data, group).groupby("line", sort=False):
        style = styles[str(label)]
        ax.errorbar(
            line["few_shot"],
            100 * line["joint_mean"],
            yerr=100 * line["joint_std"].fillna(0.0),
            color=style.colour,
            marker=style.marker,
            linestyle=style.linestyle,
            markersize=3,
            elinewidth=0.5,
            label=str(label),
            zorder=3,
        )
    ax.set_xscale("log")
    ax.set_xticks(group.sizes, [str(size) for size in group.sizes])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(min(group.sizes) / _X_MARGIN, max(group.sizes) * _X_MARGIN)
    ax.set_title(group.title, loc="left", fontsize="medium")


def few_shot_figure(data: ReportData, sheet: Sheet[FewShotGroup], styles: Mapping[str, Style]) -> Figure:
    """The sheet's panels on a grid, the shared legend (one entry per line drawn on the sheet) below them."""
    drawn = {label for group in sheet.groups for label in line_labels(group)}
    labels = [label for label in styles if label in drawn]
    handles = [
        Line2D([], [], color=style.colour, marker=style.marker, linestyle=style.linestyle, markersize=3)
        for style in (styles[label] for label in labels)
    ]
    return panel_figure(
        sheet,
        lambda ax, group: _draw_panel(ax, data, group, styles),
        handles,
        labels,
        width=TEXT_WIDTH_IN if grid(len(sheet.groups))[1] > 1 else COLUMN_WIDTH_IN,
        ylabel="Joint accuracy (%)",
        xlabel="Original images per task",
    )


@register_layout
class FewShotFigure(GroupFigureLayout[FewShotGroup, dict[str, Style]]):
    """Joint accuracy against the few-shot size for every few-shot group with methods run at all of its sizes."""

    name = "few_shot_figure"
    subcategory = "Few-shot merging"

    def sheets(self, spec: Mapping[str, Any]) -> list[Sheet[FewShotGroup]]:
        return sheets(spec)

    def styles(self, groups: Sequence[FewShotGroup]) -> dict[str, Style]:
        return line_styles(groups)

    def figure(self, data: ReportData, sheet: Sheet[FewShotGroup], styles: dict[str, Style]) -> Figure:
        return few_shot_figure(data, sheet, styles)

    def caption(self, data: ReportData, sheet: Sheet[FewShotGroup], styles: dict[str, Style]) -> str:
        return (
            rf"{latex_escape(dataset_label(data.spec))}, few-shot merging{sheet.part_text}: joint accuracy (\%) "
            "against the number of original training images per task the merges that learn get (log scale; "
            f"unlabelled, with augmented copies), {sheet_seeds(data, sheet)} (bars: std). One panel per set of models, "
            "one line per method run at every size of its table (the others are in the table); dashed black: the "
            "ensemble."
        )
