"""Test accuracy of same-task fusion against the number of models N: one panel per fusion group (architecture and
data setting), one line per fused or baseline row (mean, bars: std over seeds), with the ensemble (dashed) and the
best individual model at each N (dotted) as references.

Rows of one method that differ only in their neuron importance share a colour and marker and differ in line
style, so that a dozen rows read as a few methods times a few importances and the legend stays compact. Panels
fill up to three columns; more groups than three rows hold continue in a further figure.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from hetmerge.report.data import ReportData, dataset_label
from hetmerge.report.figures import COLOURS, MARKERS, TEXT_WIDTH_IN
from hetmerge.report.fusion_table import FusionGroup, fusion_groups
from hetmerge.report.grouped import GroupFigureLayout, Sheet, paged, panel_figure, sheet_seeds
from hetmerge.report.latex import latex_escape
from hetmerge.report.layout import register_layout

STEM = "fusion_accuracy"
IMPORTANCE_PARAM = "importance"


class ImportanceStyle(NamedTuple):
    linestyle: str
    name: str
    described: str


IMPORTANCE_STYLES = {
    "uniform": ImportanceStyle("-", "Uniform", "solid"),
    "conductance": ImportanceStyle("-.", "Conductance", "dash-dotted"),
    "deeplift": ImportanceStyle(":", "DeepLIFT", "dotted"),
}
"""Line style, legend name and caption word of each neuron importance; rows without one are solid."""
_METHOD_COLOURS = tuple(colour for colour in COLOURS if colour != "#000000")
"""Black is the ensemble's."""
_ENSEMBLE = {"color": "#000000", "linestyle": "--"}
_BEST_BASE = {"color": "0.55", "linestyle": (0, (1, 2.5))}
"""Sparser dots than DeepLIFT's, and grey: a reference, not a method."""
_TRIM = " ,;:-–(["
"""Trailing characters dropped from the label prefix shared by a method's rows ("KF, " → "KF")."""


@dataclass(frozen=True)
class Style:
    """How one row is drawn: its family's colour, marker and name, and its importance's line style."""

    family: str
    colour: str
    marker: str
    importance: str | None
    linestyle: str


def family_name(labels: Sequence[str]) -> str:
    """A legend name for rows that differ only in importance: the words their labels share ("KF, Uniform" and
    "KF, DeepLIFT" → "KF"); a single row's (or unrelated rows') labels as they are."""
    unique = list(dict.fromkeys(labels))
    if len(unique) == 1:
        return unique[0]
    shortest = min(unique, key=len)
    prefix = next((shortest[:i] for i, chars in enumerate(zip(*unique, strict=False)) if len(set(chars)) > 1), shortest)
    if prefix[-1:].isalnum() and any(label[len(prefix) :][:1].isalnum() for label in unique):
        prefix = re.sub(r"\w+$", "", prefix)  # a word shared only in part ("Deep" of "DeepLIFT" and "Deeper")
    return prefix.rstrip(_TRIM) or " / ".join(unique)


def importance_linestyle(importance: str | None) -> str:
    """The line style of an importance (solid without one); ValueError for one without a style, which would be
    drawn like another."""
    if importance is None:
        return "-"
    if importance not in IMPORTANCE_STYLES:
        raise ValueError(f"fusion figure: no line style for importance {importance!r} (have {list(IMPORTANCE_STYLES)})")
    return IMPORTANCE_STYLES[importance].linestyle


def row_styles(groups: Sequence[FusionGroup]) -> dict[str, Style]:
    """A style per merge row key of `groups`: one family per method and parameters other than the importance,
    families coloured in first-seen order (the same in every panel and figure of a report)."""
    unique: dict[str, Mapping[str, Any]] = {}
    for group in groups:
        for row in group.rows():
            if row["kind"] == "merge":
                unique.setdefault(row["key"], row)
    merges = list(unique.values())
    family_of: dict[str, str] = {}
    members: dict[str, list[Mapping[str, Any]]] = {}
    for row in merges:
        params = {k: v for k, v in (row.get("params") or {}).items() if k != IMPORTANCE_PARAM}
        family = json.dumps([row.get("method"), params], sort_keys=True, default=str)
        family_of[row["key"]] = family
        members.setdefault(family, []).append(row)
    index = {family: i for i, family in enumerate(members)}
    names = {family: family_name([str(row["label"]) for row in rows]) for family, rows in members.items()}
    styles = {}
    for row in merges:
        family = family_of[row["key"]]
        i = index[family]
        importance = (row.get("params") or {}).get(IMPORTANCE_PARAM)
        styles[row["key"]] = Style(
            names[family],
            _METHOD_COLOURS[i % len(_METHOD_COLOURS)],
            MARKERS[i % len(MARKERS)],
            importance,
            importance_linestyle(importance),
        )
    return styles


def sheets(spec: Mapping[str, Any]) -> list[Sheet[FusionGroup]]:
    return paged(STEM, fusion_groups(spec))


def _group_frame(data: ReportData, group: FusionGroup) -> pd.DataFrame:
    """The aggregated rows of the group's experiments, with their N."""
    n_models = {experiment["key"]: experiment["n_models"] for experiment in group.experiments}
    frame = data.frame[data.frame["arch"].isin(list(n_models))]
    missing = sorted(set(n_models) - set(frame["arch"]))
    if missing:
        raise ValueError(f"fusion figure: experiments {missing} of group {group.key!r} have no results")
    return frame.assign(n_models=frame["arch"].map(n_models)).sort_values("n_models")


def _draw_panel(ax: Axes, data: ReportData, group: FusionGroup, styles: Mapping[str, Style]) -> None:
    frame = _group_frame(data, group)
    scored = frame[frame["joint_n"] > 0]
    for key, rows in scored[scored["kind"] == "merge"].groupby("method", sort=False):
        style = styles[str(key)]
        ax.errorbar(
            rows["n_models"],
            100 * rows["joint_mean"],
            yerr=100 * rows["joint_std"].fillna(0.0),
            color=style.colour,
            marker=style.marker,
            linestyle=style.linestyle,
            markersize=3,
            elinewidth=0.5,
            zorder=3,
        )
    for _, rows in scored[scored["kind"] == "ensemble"].groupby("method", sort=False):
        ax.errorbar(
            rows["n_models"],
            100 * rows["joint_mean"],
            yerr=100 * rows["joint_std"].fillna(0.0),
            marker="x",
            markersize=3,
            elinewidth=0.5,
            zorder=2,
            **_ENSEMBLE,
        )
    best = scored[scored["kind"] == "base"].groupby("n_models")["joint_mean"].max()
    ax.plot(best.index, 100 * best.to_numpy(), marker=".", markersize=3, zorder=2, **_BEST_BASE)
    counts = [experiment["n_models"] for experiment in group.experiments]
    ax.set_xticks(counts)
    ax.set_xlim(min(counts) - 0.5, max(counts) + 0.5)
    ax.set_title(group.title, loc="left", fontsize="medium")


def _legend(styles: Mapping[str, Style], ensemble: str) -> tuple[list[Line2D], list[str]]:
    """One entry per family (colour and marker), per importance drawn (line style) and per reference."""
    entries: dict[str, Line2D] = {}
    for style in styles.values():
        entries.setdefault(style.family, Line2D([], [], color=style.colour, marker=style.marker, markersize=3))
    for importance in drawn_importances(styles):
        style = IMPORTANCE_STYLES[importance]
        entries[f"{style.name} importance"] = Line2D([], [], color="0.3", linestyle=style.linestyle)
    entries[ensemble] = Line2D([], [], marker="x", markersize=3, **_ENSEMBLE)
    entries["Best individual model"] = Line2D([], [], marker=".", markersize=3, **_BEST_BASE)
    return list(entries.values()), list(entries)


def fusion_figure(data: ReportData, sheet: Sheet[FusionGroup], styles: Mapping[str, Style]) -> Figure:
    """The sheet's panels on a grid, the shared legend below them."""
    ensembles = [row["label"] for group in sheet.groups for row in group.rows() if row["kind"] == "ensemble"]
    handles, labels = _legend(sheet_styles(styles, sheet), ensembles[0] if ensembles else "Ensemble")
    return panel_figure(
        sheet,
        lambda ax, group: _draw_panel(ax, data, group, styles),
        handles,
        labels,
        width=TEXT_WIDTH_IN,
        ylabel="Test accuracy (%)",
        xlabel="Models fused (N)",
    )


def _keys(group: FusionGroup) -> set[str]:
    return {row["key"] for row in group.rows()}


def drawn_importances(styles: Mapping[str, Style]) -> list[str]:
    """The importances that tell rows apart, in IMPORTANCE_STYLES order: none where all rows have one (or none)."""
    present = {style.importance for style in styles.values()} - {None}
    return [importance for importance in IMPORTANCE_STYLES if importance in present] if len(present) > 1 else []


def sheet_styles(styles: Mapping[str, Style], sheet: Sheet[FusionGroup]) -> dict[str, Style]:
    """The styles of the rows drawn on `sheet`."""
    keys = set().union(*(_keys(group) for group in sheet.groups))
    return {key: style for key, style in styles.items() if key in keys}


@register_layout
class FusionFigure(GroupFigureLayout[FusionGroup, dict[str, Style]]):
    """Accuracy against N for every fusion group, references included."""

    name = "fusion_figure"
    subcategory = "Same-task fusion"

    def sheets(self, spec: Mapping[str, Any]) -> list[Sheet[FusionGroup]]:
        return sheets(spec)

    def styles(self, groups: Sequence[FusionGroup]) -> dict[str, Style]:
        return row_styles(groups)

    def figure(self, data: ReportData, sheet: Sheet[FusionGroup], styles: dict[str, Style]) -> Figure:
        return fusion_figure(data, sheet, styles)

    def caption(self, data: ReportData, sheet: Sheet[FusionGroup], styles: dict[str, Style]) -> str:
        importances = drawn_importances(sheet_styles(styles, sheet))
        style_text = (
            "; line style: its neuron importance ("
            + ", ".join(f"{IMPORTANCE_STYLES[i].described} {IMPORTANCE_STYLES[i].name}" for i in importances)
            + ")"
            if importances
            else ""
        )
        return (
            rf"{latex_escape(dataset_label(data.spec))}, same-task fusion{sheet.part_text}: test accuracy (\%) against "
            f"the number of models fused N, {sheet_seeds(data, sheet)} (bars: std). One panel per architecture and "
            f"data setting. Colour and marker: the method{latex_escape(style_text)}. Dashed black: the ensemble "
            "(members' class probabilities weighted by their share of the class's training data); dotted grey: the "
            "best individual model's mean at each N. A lone marker: a row run at one N only."
        )
