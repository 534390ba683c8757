"""Summary figures of a whole run: joint accuracy of every row of every experiment as dot plots.

One figure per summarised table layout (standard, MuDSC-like, heterogeneous, …: experiments that a reader
compares; see `Layout.summarised`), made of small multiples: one panel per experiment group (the experiments that
share a table), its rows on the y axis and one marker and colour per experiment, side by side within a row so that
none overlap; every panel spans 0–100 % so that panels compare at a glance. Panels fill one to three columns,
whichever first keeps the figure no taller than wide; a layout with more panels than one page holds continues in a
further figure.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from hetmerge.report.data import ReportData, dataset_label, slug
from hetmerge.report.figures import (
    COLOURS,
    COLUMN_WIDTH_IN,
    MARKERS,
    PAD_IN,
    TEXT_WIDTH_IN,
    figure_outputs,
    figure_style,
    new_figure,
    pairs_phrase,
    place,
    reach,
    save_figure,
)
from hetmerge.report.latex import Artifact, latex_escape
from hetmerge.report.layout import Layout, Output, register_layout, summarised_experiments

_SLOT_PT = 4.2
"""Height per marker in a row (one per experiment of the panel that has the row)."""
_ROW_PAD_PT = 5.0
_PANEL_PT = 27.0
"""A panel's title, tick labels and padding."""
_LEGEND_LINE_PT = 8.0
_TITLE_MODELS = 3
"""A group panel is titled by its models' labels where they are at most this many, else by the group's key."""
_LEGEND_CHARS = 18
"""Experiment labels up to this long fit two to a legend line."""
_GAP_IN = 0.08
"""Space between stacked panels."""
_MIN_ROW_SCALE = 0.6
"""How far rows may be squeezed when one panel alone is too tall (beyond that markers overlap)."""


@dataclass(frozen=True)
class _Panel:
    """One experiment group: its title, experiments, the union of their rows as (key, label, kind) and, per
    row, the experiments that have it."""

    title: str
    experiments: tuple[Mapping[str, Any], ...]
    rows: tuple[tuple[str, str, str], ...]
    members: tuple[tuple[int, ...], ...]

    @property
    def legend_columns(self) -> int:
        return 2 if max(len(e["label"]) for e in self.experiments) <= _LEGEND_CHARS else 1

    @property
    def legend_lines(self) -> int:
        return 0 if len(self.experiments) == 1 else math.ceil(len(self.experiments) / self.legend_columns)

    def row_heights(self) -> np.ndarray:
        """Each row's height (pt): room for one marker per experiment that has it."""
        return np.array([_ROW_PAD_PT + _SLOT_PT * len(members) for members in self.members])

    def height_pt(self, row_scale: float) -> float:
        return row_scale * float(self.row_heights().sum()) + _PANEL_PT + _LEGEND_LINE_PT * self.legend_lines


def panels(experiments: Sequence[Mapping[str, Any]]) -> list[_Panel]:
    """One panel per experiment group, in spec order; row labels that collide within a panel get their key."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for experiment in experiments:
        groups.setdefault(experiment.get("group") or experiment["key"], []).append(experiment)
    result = []
    for group, members in groups.items():
        rows: dict[str, tuple[str, str]] = {}
        has: dict[str, list[int]] = {}
        for j, experiment in enumerate(members):
            for row in experiment["rows"]:
                rows.setdefault(row["key"], (row["label"], row["kind"]))
                has.setdefault(row["key"], []).append(j)
        labels = [label for label, _ in rows.values()]
        unique = [
            (key, label if labels.count(label) == 1 else f"{label} [{key}]", kind)
            for key, (label, kind) in rows.items()
        ]
        models = list(dict.fromkeys(label for experiment in members for label in experiment["model_labels"]))
        if len(members) == 1:
            title = members[0]["label"]
        else:  # the models the group's experiments combine, where few enough to name
            title = ", ".join(models) if len(models) <= _TITLE_MODELS else group
        result.append(_Panel(title, tuple(members), tuple(unique), tuple(tuple(j) for j in has.values())))
    return result


class Plan(NamedTuple):
    """A summary figure's size (inches), row scale and columns of panel indices."""

    width: float
    height: float
    row_scale: float
    columns: list[list[int]]


@dataclass(frozen=True)
class Sheet:
    """One summary figure: the panels of one layout, or of one part of it where they fill more than a page."""

    stem: str
    layout: str
    part: int
    panels: tuple[_Panel, ...]


def sheets(spec: Mapping[str, Any]) -> list[Sheet]:
    """The summary figures of a spec: per summarised layout (in spec order), panels in order, each figure taking
    panels while they fit unsqueezed."""
    by_layout: dict[str, list[Mapping[str, Any]]] = {}
    for experiment in summarised_experiments(spec):
        by_layout.setdefault(experiment["layout"], []).append(experiment)
    result = []
    for layout, experiments in by_layout.items():
        parts: list[list[_Panel]] = []
        for panel in panels(experiments):
            if parts and _unsqueezed([*parts[-1], panel]) is not None:
                parts[-1].append(panel)
            else:
                parts.append([panel])
        for k, part in enumerate(parts, start=1):
            stem = f"summary_{slug(layout)}" + (f"_{k}" if len(parts) > 1 else "")
            result.append(Sheet(stem, layout, k if len(parts) > 1 else 0, tuple(part)))
    return result


def _columns(heights: Sequence[float], n_columns: int) -> list[list[int]]:
    """Split panel indices, in order, into `n_columns` contiguous columns with the lowest tallest column."""
    n = len(heights)
    best: tuple[float, list[list[int]]] = (math.inf, [list(range(n))])
    for cuts in itertools.combinations(range(1, n), min(n_columns, n) - 1):
        bounds = [0, *cuts, n]
        columns = [list(range(a, b)) for a, b in itertools.pairwise(bounds)]
        tallest = max(sum(heights[i] for i in column) for column in columns)
        if tallest < best[0] - 1e-9:
            best = (tallest, columns)
    return best[1]


def _unsqueezed(all_panels: Sequence[_Panel]) -> Plan | None:
    """One column at column width if the panels fit it, else two or three at text width; None if none fits."""
    heights = [panel.height_pt(1.0) / 72 for panel in all_panels]
    for width, n_columns in ((COLUMN_WIDTH_IN, 1), (TEXT_WIDTH_IN, 2), (TEXT_WIDTH_IN, 3)):
        columns = _columns(heights, n_columns)
        height = max(sum(heights[i] for i in column) for column in columns)
        if height <= width:
            return Plan(width, height, 1.0, columns)
    return None


def plan(all_panels: Sequence[_Panel]) -> Plan:
    """The unsqueezed plan if there is one, else three columns at text width with rows squeezed to fit."""
    unsqueezed = _unsqueezed(all_panels)
    if unsqueezed is not None:
        return unsqueezed
    columns = _columns([panel.height_pt(1.0) for panel in all_panels], 3)
    fixed = [sum(all_panels[i].height_pt(0.0) for i in column) / 72 for column in columns]
    rows = [
        sum(all_panels[i].height_pt(1.0) for i in column) / 72 - f for column, f in zip(columns, fixed, strict=True)
    ]
    scale = min((TEXT_WIDTH_IN - f) / r for f, r in zip(fixed, rows, strict=True))
    if scale < _MIN_ROW_SCALE:
        raise ValueError(f"summary figure: panel {all_panels[0].title!r} has too many rows to fit one page")
    heights = [panel.height_pt(scale) / 72 for panel in all_panels]
    return Plan(TEXT_WIDTH_IN, TEXT_WIDTH_IN, scale, _columns(heights, 3))


def _draw_panel(ax: Axes, panel: _Panel, frame: pd.DataFrame, row_scale: float) -> None:
    """Rows top to bottom in y units of points; within a row, the experiments that have it side by side."""
    heights = panel.row_heights()
    centres = np.cumsum(heights) - heights / 2
    position = {
        (panel.rows[r][0], j): centres[r] + (i - (len(members) - 1) / 2) * _SLOT_PT
        for r, members in enumerate(panel.members)
        for i, j in enumerate(members)
    }
    kinds = {key: kind for key, _, kind in panel.rows}
    handles = []
    for j, experiment in enumerate(panel.experiments):
        rows = frame[(frame["arch"] == experiment["key"]) & (frame["joint_n"] > 0)]
        missing = [row["key"] for row in experiment["rows"] if row["key"] not in set(rows["method"])]
        if missing:
            raise ValueError(f"summary figure: experiment {experiment['key']!r} has no joint accuracy for {missing}")
        keys = rows["method"].to_numpy()
        x = 100 * rows["joint_mean"].to_numpy(dtype=float)
        xerr = 100 * np.nan_to_num(rows["joint_std"].to_numpy(dtype=float))
        y = np.array([position[key, j] for key in keys])
        colour, marker = COLOURS[j % len(COLOURS)], MARKERS[j % len(MARKERS)]
        ax.errorbar(x, y, xerr=xerr, fmt="none", ecolor=colour, elinewidth=0.6, capsize=1.0, zorder=2)
        merged = np.array([kinds[key] == "merge" for key in keys])
        handles.append(
            ax.scatter(
                x,
                y,
                s=(3.2 * min(row_scale, 1.0) ** 0.5) ** 2,
                marker=marker,
                facecolors=np.where(merged[:, None], [to_rgba(colour)], [to_rgba("white")]),
                edgecolors=colour,
                linewidths=0.6,
                zorder=3,
                label=experiment["label"],
            )
        )
    ax.set_yticks(centres, [label for _, label, _ in panel.rows])
    ax.set_ylim(float(heights.sum()), 0)
    ax.set_xlim(0, 100)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xticks(range(10, 100, 20), minor=True)
    ax.tick_params(axis="y", length=0)
    ax.tick_params(axis="x", which="minor", length=1.5)
    ax.grid(True, axis="x", which="both", linewidth=0.4, alpha=0.5)
    if len(panel.experiments) == 1:
        ax.grid(True, axis="y", linewidth=0.3, alpha=0.3, linestyle=":")
    else:  # rows of several markers: lines between rows group each row's markers
        ax.grid(False, axis="y")
        ax.hlines(np.cumsum(heights)[:-1], 0, 100, colors="0.85", linewidth=0.4, zorder=1)
    ax.spines["left"].set_visible(False)
    if len(panel.experiments) == 1:
        ax.set_title(panel.title, loc="left", fontsize="medium")
    else:
        ax.legend(
            handles=handles,
            title=panel.title,
            loc="lower left",
            bbox_to_anchor=(0.0, 1.0),
            ncol=panel.legend_columns,
            alignment="left",
            borderaxespad=0.2,
            handletextpad=0.2,
            columnspacing=0.8,
            title_fontproperties={"size": "medium"},
        )


def summary_figure(data: ReportData, sheet: Sheet) -> Figure:
    """The panels stacked in their columns, placed by hand so that a row has the same height in every panel:
    each panel's labels are measured first, then the axes fill what they leave."""
    width, height, row_scale, columns = plan(sheet.panels)
    fig = new_figure(width, height, layout=None)
    axes = []
    for column in columns:
        axes.append([fig.add_axes((0.0, 0.0, 1.0, 1.0)) for _ in column])
        for k, (ax, i) in enumerate(zip(axes[-1], column, strict=True)):
            _draw_panel(ax, sheet.panels[i], data.frame, row_scale)
            if k == len(column) - 1:
                ax.set_xlabel("Joint accuracy (%)")
    fig.canvas.draw()
    reaches = [[reach(ax) for ax in column] for column in axes]
    rows = [[sheet.panels[i].row_heights().sum() / 72 for i in column] for column in columns]
    fixed = [sum(r.top + r.bottom for r in column) + _GAP_IN * (len(column) - 1) + 2 * PAD_IN for column in reaches]
    height = min(width, max(f + row_scale * sum(r) for f, r in zip(fixed, rows, strict=True)))
    scale = min(row_scale, *((height - f) / sum(r) for f, r in zip(fixed, rows, strict=True)))
    fig.set_size_inches(width, height)
    column_width = width / len(columns)
    for c, (column_axes, column_reaches, column_rows) in enumerate(zip(axes, reaches, rows, strict=True)):
        left = c * column_width + max(r.left for r in column_reaches) + PAD_IN
        right = (c + 1) * column_width - max(r.right for r in column_reaches) - PAD_IN
        top = height - PAD_IN
        for ax, around, rows_in in zip(column_axes, column_reaches, column_rows, strict=True):
            top -= around.top + scale * rows_in
            place(ax, (left, top, right - left, scale * rows_in))
            top -= around.bottom + _GAP_IN
    return fig


@register_layout
class SummaryFigure(Layout):
    """Joint accuracy of every row of the run: per table layout, one panel per experiment group."""

    name = "summary_figure"

    def outputs(self, spec: Mapping[str, Any]) -> list[Output]:
        return [
            output
            for sheet in sheets(spec)
            for output in figure_outputs(sheet.stem, "summary_figure.rst", "Summary", _labels(sheet))
        ]

    def write(self, data: ReportData, out_dir: Path) -> list[Artifact]:
        section = dataset_label(data.spec)
        artifacts = []
        for sheet in sheets(data.spec):
            with figure_style():
                pdf, png = save_figure(summary_figure(data, sheet), out_dir, sheet.stem)
            keys = [e["key"] for panel in sheet.panels for e in panel.experiments]
            pairs = pairs_phrase([int(n) for n in data.frame.loc[data.frame["arch"].isin(keys), "n_pairs"]])
            part = f" (part {sheet.part})" if sheet.part else ""
            caption = (
                rf"{latex_escape(section)}, experiments of the {latex_escape(sheet.layout)} layout{part}: joint "
                rf"accuracy (\%) of every model, {pairs} (bars: std). One panel per experiment group (a table), "
                "one marker and colour per experiment; hollow markers are base models and ensembles, filled "
                "markers merges."
            )
            label = f"fig:{sheet.stem.replace('_', '-')}"
            artifacts.append(Artifact("figure", section, pdf, (pdf, png), caption, label))
        return artifacts


def _labels(sheet: Sheet) -> dict[str, str]:
    labels = {"layout": sheet.layout}
    if sheet.part:
        labels["part"] = str(sheet.part)
    return labels
