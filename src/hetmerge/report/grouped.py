"""What the layouts over groups of experiments share (fusion, few-shot): experiments of one layout with the same
`group` are set side by side, one table and CSV per group and one figure panel per group, the panels paged into
sheets of up to 3 x 3. A layout says what tells its groups' experiments apart, what they must have alike and what
a table or panel shows; grouping, validation, paging and the files are here, so that both layouts keep them alike.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from hetmerge.atomic import atomic_open
from hetmerge.report.aggregate import STATS
from hetmerge.report.data import ReportData, dataset_label, experiments_of, report_labels, slug
from hetmerge.report.figures import figure_outputs, figure_style, legend_columns, new_figure, save_figure
from hetmerge.report.latex import Artifact
from hetmerge.report.layout import Layout, Output
from hetmerge.report.tables import TABLE_DIR, Table, table_outputs, write_tables

MAX_COLUMNS, MAX_ROWS = 3, 3
PANEL_IN = 1.85
LEGEND_LINE_IN, LEGEND_PAD_IN = 0.15, 0.2


@dataclass(frozen=True)
class ExperimentGroup(abc.ABC):
    """The experiments of one layout with the same `group`, ordered by the field that tells them apart; `arch`
    names their models' architectures. A subclass per layout says which field orders them, what they must have
    alike and what an experiment must hold."""

    layout: ClassVar[str]
    """The experiments' `layout`, and the prefix of the group's file stems."""
    what: ClassVar[str]
    """How errors name the layout's experiments and groups."""
    order: ClassVar[tuple[str, str]]
    """(field, its name in errors): one experiment per value in a group (two would read alike), in its order."""
    alike: ClassVar[tuple[str, str, str]]
    """(field, its plural and what one table holds, in errors): the same in every experiment of a group, which
    would not compare otherwise."""

    key: str
    arch: str
    experiments: tuple[Mapping[str, Any], ...]

    @classmethod
    @abc.abstractmethod
    def check(cls, experiment: Mapping[str, Any]) -> None:
        """Raise ValueError naming `experiment` where the fields the layout shows are not what it can show."""

    @property
    @abc.abstractmethod
    def title(self) -> str:
        """The group's name in captions and titles."""

    @property
    def stem(self) -> str:
        return f"{self.layout}_{slug(self.key)}"

    @property
    def labels(self) -> dict[str, str]:
        """`snakemake --report` labels telling the group's files from their siblings'."""
        return {"group": self.key, "experiments": "; ".join(experiment["label"] for experiment in self.experiments)}


G = TypeVar("G", bound=ExperimentGroup)
S = TypeVar("S")


def experiment_groups(spec: Mapping[str, Any], group_type: type[G]) -> list[G]:
    """The experiments of `group_type`'s layout as its groups, in spec order, each group's experiments by `order`.

    Raises ValueError naming the experiment that fails `group_type.check` or whose model count disagrees with its
    models, and naming the group whose experiments differ in the `alike` field or repeat a value of the `order`
    one.
    """
    found: dict[str, list[Mapping[str, Any]]] = {}
    for experiment in experiments_of(spec, group_type.layout):
        group_type.check(experiment)
        n_models = experiment.get("n_models")
        if not isinstance(n_models, int) or n_models != len(experiment["models"]):
            raise ValueError(
                f"{group_type.what} experiment {experiment['key']!r} has n_models {n_models!r} "
                f"but {len(experiment['models'])} models"
            )
        found.setdefault(str(experiment["group"]), []).append(experiment)
    (field, field_name), (same, plural, one) = group_type.order, group_type.alike
    groups = []
    for key, members in found.items():
        values = sorted({_hashable(experiment[same]) for experiment in members})
        if len(values) > 1:
            raise ValueError(f"{group_type.what} group {key!r} mixes the {plural} {values}: one table per {one}")
        ranks = [experiment[field] for experiment in members]
        if len(set(ranks)) != len(ranks):
            raise ValueError(
                f"{group_type.what} group {key!r} has several experiments of the same {field_name}: {sorted(ranks)}"
            )
        arch = " / ".join(dict.fromkeys(label for experiment in members for label in experiment["model_labels"]))
        groups.append(group_type(key, arch, tuple(sorted(members, key=lambda experiment: experiment[field]))))
    return groups


def _hashable(value: Any) -> Any:
    """A list field (the models) as a tuple, so that the values of a group's experiments form a set."""
    return tuple(value) if isinstance(value, list) else value


def group_frame(
    group: ExperimentGroup, rows: Sequence[pd.DataFrame], fields: Sequence[str], metrics: Iterable[str]
) -> pd.DataFrame:
    """A group's CSV: each experiment's `rows` (`experiment_rows`) in order, tagged with the group, the experiment
    and its `fields`; columns: those, the row's identity, then `<metric>_{mean,std,n}` for each of `metrics`."""
    frame = pd.concat(
        [
            table_rows.assign(
                group=group.key, experiment=experiment["key"], **{field: experiment[field] for field in fields}
            )
            for experiment, table_rows in zip(group.experiments, rows, strict=True)
        ],
        ignore_index=True,
    )
    identity = ("arch_label", "method", "label", "kind", "n_pairs")
    statistics = [f"{metric}_{stat}" for metric in metrics for stat in STATS]
    return frame.reindex(columns=["dataset", "group", "experiment", *fields, *identity, *statistics])


def seeds_text(n_pairs: pd.Series, note: str = "") -> str:
    """Table caption fragment saying over how many seeds (`n_pairs`, one per cell) the cells are; `note` says what
    a seed draws."""
    low, high = int(n_pairs.min()), int(n_pairs.max())
    if high == 1:
        return "from a single seed"
    count = str(high) if low == high else f"{low}–{high}"
    return f"mean ± std over {count} seeds{note}"


class GroupTableLayout(Layout, Generic[G]):
    """One table per group: `tables/<stem>.{tex,html}` shown with the repository's `report/<name>.rst`, and its
    numbers as `tables/<stem>.csv` shown with `report/<table>_csv.rst`, both under `subcategory`."""

    subcategory: ClassVar[str]

    @abc.abstractmethod
    def groups(self, spec: Mapping[str, Any]) -> list[G]:
        """The groups of `spec`, one table each."""

    @abc.abstractmethod
    def group_table(self, data: ReportData, group: G) -> tuple[Table, pd.DataFrame]:
        """The group's table and its CSV frame."""

    def outputs(self, spec: Mapping[str, Any]) -> list[Output]:
        outputs = []
        for group in self.groups(spec):
            outputs += table_outputs(group.stem, f"{self.name}.rst", self.subcategory, group.labels)
            outputs.append(
                Output(
                    f"{TABLE_DIR}/{group.stem}.csv",
                    f"{self.table}_csv.rst",
                    "Data",
                    self.subcategory,
                    report_labels(**group.labels),
                )
            )
        return outputs

    def write(self, data: ReportData, out_dir: Path) -> list[Artifact]:
        artifacts = []
        for group in self.groups(data.spec):
            table, frame = self.group_table(data, group)
            tex, page = write_tables(out_dir, group.stem, [table], title=group.title)
            csv = Path(out_dir) / TABLE_DIR / f"{group.stem}.csv"
            with atomic_open(csv) as handle:
                frame.to_csv(handle, index=False, lineterminator="\n")
            artifacts.append(Artifact("table", dataset_label(data.spec), tex, (tex, page, csv)))
        return artifacts


@dataclass(frozen=True)
class Sheet(Generic[G]):
    """One figure: up to MAX_COLUMNS x MAX_ROWS panels; `part` counts the figures of a layout from 1 where it
    needs several, else 0."""

    stem: str
    part: int
    groups: tuple[G, ...]

    @property
    def part_text(self) -> str:
        """Caption fragment telling the sheet from the layout's other sheets."""
        return f" (part {self.part})" if self.part else ""


def paged(stem: str, groups: Sequence[G]) -> list[Sheet[G]]:
    """`groups` in sheets of up to MAX_COLUMNS x MAX_ROWS panels: one named `stem`, or several `<stem>_<part>`."""
    size = MAX_COLUMNS * MAX_ROWS
    parts = [tuple(groups[i : i + size]) for i in range(0, len(groups), size)]
    if len(parts) == 1:
        return [Sheet(stem, 0, parts[0])]
    return [Sheet(f"{stem}_{k}", k, part) for k, part in enumerate(parts, start=1)]


def grid(n_panels: int) -> tuple[int, int]:
    """(rows, columns) of a sheet: as few rows as up to three columns allow, then as few columns as those rows
    need (four panels: 2 x 2, not 3 + 1)."""
    rows = math.ceil(n_panels / MAX_COLUMNS)
    return rows, math.ceil(n_panels / rows)


def panel_figure(
    sheet: Sheet[G],
    draw: Callable[[Axes, G], None],
    handles: Sequence[Line2D],
    labels: Sequence[str],
    *,
    width: float,
    ylabel: str,
    xlabel: str,
) -> Figure:
    """The sheet's panels (`draw` fills one per group) on a `grid` `width` inches wide, y labels on the first
    column, x labels on the bottom panel of each column, the shared legend below them."""
    rows, columns = grid(len(sheet.groups))
    n_columns = legend_columns(labels, width, 4)
    legend_in = LEGEND_PAD_IN + LEGEND_LINE_IN * math.ceil(len(labels) / n_columns)
    fig = new_figure(width, min(width, rows * PANEL_IN + legend_in))
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(sheet.groups):
            ax.remove()
            continue
        draw(ax, sheet.groups[k])
        if k % columns == 0:
            ax.set_ylabel(ylabel)
        if k + columns >= len(sheet.groups):
            ax.set_xlabel(xlabel)
    fig.legend(handles, labels, loc="outside lower center", ncol=n_columns, columnspacing=1.0, handlelength=2.5)
    return fig


def sheet_seeds(data: ReportData, sheet: Sheet[G]) -> str:
    """Caption fragment (LaTeX) saying over how many seeds the sheet's points are."""
    keys = [experiment["key"] for group in sheet.groups for experiment in group.experiments]
    n_pairs = data.frame.loc[data.frame["arch"].isin(keys), "n_pairs"]
    low, high = int(n_pairs.min()), int(n_pairs.max())
    return "a single seed" if high == 1 else f"mean $\\pm$ std over {low if low == high else f'{low}--{high}'} seeds"


class GroupFigureLayout(Layout, Generic[G, S]):
    """One panel per group, on sheets (`paged`): `figures/<sheet stem>.{pdf,png}`, the PNG shown with the
    repository's `report/<name>.rst` under `subcategory`; `styles` draws a line alike on every sheet."""

    subcategory: ClassVar[str]

    @abc.abstractmethod
    def sheets(self, spec: Mapping[str, Any]) -> list[Sheet[G]]:
        """The sheets of `spec` (none where nothing is drawn)."""

    @abc.abstractmethod
    def styles(self, groups: Sequence[G]) -> S:
        """How the lines of `groups` (all of a report's) are drawn."""

    @abc.abstractmethod
    def figure(self, data: ReportData, sheet: Sheet[G], styles: S) -> Figure:
        """The sheet's figure."""

    @abc.abstractmethod
    def caption(self, data: ReportData, sheet: Sheet[G], styles: S) -> str:
        """The sheet's LaTeX caption."""

    def outputs(self, spec: Mapping[str, Any]) -> list[Output]:
        labels = {"dataset": dataset_label(spec)}
        return [
            output
            for sheet in self.sheets(spec)
            for output in figure_outputs(
                sheet.stem,
                f"{self.name}.rst",
                self.subcategory,
                {**labels, "part": str(sheet.part)} if sheet.part else labels,
            )
        ]

    def write(self, data: ReportData, out_dir: Path) -> list[Artifact]:
        section = dataset_label(data.spec)
        sheets = self.sheets(data.spec)
        styles = self.styles([group for sheet in sheets for group in sheet.groups])
        artifacts = []
        for sheet in sheets:
            with figure_style():
                pdf, png = save_figure(self.figure(data, sheet, styles), out_dir, sheet.stem)
            label = f"fig:{sheet.stem.replace('_', '-')}"
            caption = self.caption(data, sheet, styles)
            artifacts.append(Artifact("figure", section, pdf, (pdf, png), caption, label))
        return artifacts
