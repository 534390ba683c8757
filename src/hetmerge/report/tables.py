"""Tables as data: every table is built once as a `Table` (a pandas frame of display text, which cells are bold,
where rules and block titles go) and rendered from that one object to LaTeX (booktabs) and to HTML, so the two
can never disagree about a cell.

Cell text is plain Unicode ("48.2 ± 1.0", "–"); each renderer escapes it for its format. The LaTeX renderer also
needs to know how wide a column sets: `text_width` estimates it from the font's metrics, so that a table wider
than the text is split into stacked column chunks instead of running into the margin.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hetmerge.report.aggregate import task_metric, tasks_in
from hetmerge.report.data import ReportData, dataset_label, report_labels
from hetmerge.report.html import render_tables_html
from hetmerge.report.latex import render_tables_tex
from hetmerge.report.layout import Output

TABLE_DIR = "tables"
TEXT_WIDTH_PT = 6.75 * 72.27
"""main.tex's text width (geometry textwidth=6.75in), in TeX points."""
FONT_PT = 9.0
"""Tables are set `\\small` in a 10 pt article: 9 pt Latin Modern."""
COLUMN_SEP_PT = 12.0
"""Two \\tabcolsep between neighbouring columns."""
HEADER_PT = 84.0
"""Headers break into lines only beyond this width (or their column's cells, where wider)."""
DASH = "–"
"""A cell without a value: the row has no such number (a base model without that task's head)."""
KIND_ORDER = {"base": 0, "ensemble": 1, "merge": 2}
"""Where rows from several experiments meet in one table: references first, then merges (others last)."""

# Character widths in em of Latin Modern Roman 9 pt (ec-lmr9.tfm): exact for digits and punctuation, the
# class mean rounded up for letters (the widest, M and W, are rare enough to average out over a label).
_EM_WIDTHS = {
    **dict.fromkeys("0123456789/", 0.514),
    **dict.fromkeys(".,:;!'", 0.286),
    **dict.fromkeys("()[]", 0.4),
    " ": 0.343,
    "-": 0.343,
    "–": 0.514,
    "±": 0.778,
}
_UPPER_EM, _LOWER_EM, _OTHER_EM = 0.8, 0.56, 0.8
_BOLD_FACTOR = 1.16
"""Bold extended (ec-lmbx9) digits are 0.592 em against 0.514."""
_SYMBOLS = {"alpha": "α", "beta": "β", "gamma": "γ", "lam": "λ", "lambda": "λ"}
"""Parameter names that read as a Greek letter in column headers."""


@dataclass(frozen=True)
class BodyRow:
    """One line of a table body as both renderers walk it: a block title (`title` set, no cells), or a row."""

    label: str = ""
    cells: tuple[tuple[str, bool], ...] = ()
    rule: bool = False
    title: str | None = None


@dataclass(frozen=True)
class Table:
    """One table float.

    `cells` holds the display text, indexed by (block title, row label) with the column headers as columns;
    "" as block title means no title row. `bold` marks bold cells, `rules` the rows a rule precedes. `name`
    is unique within the report: the LaTeX label `tab:<name>` and the HTML id. `caption` is plain text.
    """

    name: str
    caption: str
    cells: pd.DataFrame
    bold: pd.DataFrame
    rules: pd.Series
    corner: str = "Method"

    def __post_init__(self) -> None:
        if not self.cells.index.is_unique:
            duplicated = sorted(set(self.cells.index[self.cells.index.duplicated()]))
            raise ValueError(f"table {self.name!r} has rows that read the same: {duplicated}")
        if self.bold.shape != self.cells.shape or len(self.rules) != len(self.cells):
            raise ValueError(f"table {self.name!r}: cells, bold and rules differ in shape")

    @property
    def columns(self) -> list[str]:
        return [str(column) for column in self.cells.columns]

    def body(self, columns: Sequence[str] | None = None) -> Iterator[BodyRow]:
        """The body lines in order, limited to `columns`: each block's title row, then its rows."""
        columns = self.columns if columns is None else list(columns)
        text, bold = self.cells[columns], self.bold[columns]
        previous = None
        for i, (block, label) in enumerate(self.cells.index):
            rule = bool(self.rules.iloc[i])
            if block != previous and block:
                yield BodyRow(title=str(block), rule=i > 0)
                rule = False
            previous = block
            yield BodyRow(str(label), tuple(zip(text.iloc[i], bold.iloc[i].astype(bool), strict=True)), rule)

    def column_width(self, column: str) -> float:
        """Estimated width (pt) of a data column: its widest cell or header line."""
        return max(self._body_width(column), *(text_width(line) for line in self.header_lines(column)))

    def _body_width(self, column: str) -> float:
        """Estimated width (pt) of a data column's widest cell or header word (a word cannot break)."""
        cells = [text_width(text, bold) for text, bold in zip(self.cells[column], self.bold[column], strict=True)]
        return max([*cells, *(text_width(word) for word in column.split())])

    def label_width(self) -> float:
        """Estimated width (pt) of the row-label column (block titles span the table and do not count)."""
        return max(text_width(str(label)) for label in [self.corner, *self.cells.index.get_level_values(1)])

    def header_lines(self, column: str) -> list[str]:
        """A header broken at spaces into lines no wider than its column's cells or HEADER_PT (a long experiment
        label would otherwise widen its column far beyond the numbers under it)."""
        width = max(self._body_width(column), HEADER_PT)
        lines: list[str] = []
        for word in column.split():
            if lines and text_width(f"{lines[-1]} {word}") <= width:
                lines[-1] = f"{lines[-1]} {word}"
            else:
                lines.append(word)
        return lines or [""]

    def width(self, columns: Sequence[str]) -> float:
        """Estimated width (pt) of a tabular of the label column and `columns`."""
        return self.label_width() + sum(COLUMN_SEP_PT + self.column_width(column) for column in columns)

    def chunks(self, width: float = TEXT_WIDTH_PT) -> list[list[str]]:
        """The data columns in consecutive chunks that each fit `width` next to the label column; LaTeX stacks
        one tabular per chunk (a browser scrolls instead, so the HTML keeps one table)."""
        chunks: list[list[str]] = [[]]
        for column in self.columns:
            if chunks[-1] and self.width([*chunks[-1], column]) > width:
                chunks.append([])
            chunks[-1].append(column)
        return chunks


def text_width(text: str, bold: bool = False) -> float:
    """Estimated width in pt of `text` set in the tables' font (slightly over, never far under)."""
    em = sum(
        _EM_WIDTHS.get(char, _UPPER_EM if char.isupper() else _LOWER_EM if char.islower() else _OTHER_EM)
        for char in text
    )
    return em * FONT_PT * (_BOLD_FACTOR if bold else 1.0)


def format_accuracy(mean: pd.Series, std: pd.Series, n: pd.Series) -> pd.Series:
    """`48.2 ± 1.0` in percent; the mean alone for one value (no spread to show); a dash for none."""
    mean_text = (100 * mean.astype(float)).map("{:.1f}".format)
    spread = mean_text + " ± " + (100 * std.astype(float)).map("{:.1f}".format)
    return pd.Series(np.select([n == 0, n == 1], [DASH, mean_text], spread), index=mean.index)


def humanize_count(value: float) -> str:
    """Parameter/FLOP counts with two significant digits and the unit that keeps them >= 0.1: `0.68G`."""
    if math.isnan(value):
        return DASH
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if value >= 0.1 * scale:
            scaled = value / scale
            decimals = max(0, 1 - math.floor(math.log10(scaled)))
            return f"{scaled:.{decimals}f}{suffix}"
    return f"{value:.0f}"


def seeds_phrase(n_pairs: pd.Series) -> str:
    """Caption fragment saying how many seeds (model pairs) the numbers summarise."""
    low, high = int(n_pairs.min()), int(n_pairs.max())
    if high == 1:
        return "from a single model pair"
    count = str(high) if low == high else f"{low}–{high}"
    return f"mean ± std over {count} model pairs (seeds)"


def best_merges(rows: pd.DataFrame, metric: str) -> pd.Series:
    """True for the merges with the best printed mean of `metric` (all ties: readers cannot tell apart numbers
    that print the same); base models and ensembles are references and never compete."""
    printed = (100 * rows[f"{metric}_mean"].astype(float)).map("{:.1f}".format).astype(float)
    competing = printed.where((rows["kind"] == "merge") & (rows[f"{metric}_n"] > 0))
    return competing.notna() & (competing == competing.max())


def kind_rules(kinds: pd.Series) -> pd.Series:
    """A rule wherever the row kind changes, separating base models, the ensemble and merges."""
    return (kinds != kinds.shift()) & (np.arange(len(kinds)) > 0)


def symbol(name: str) -> str:
    """A parameter's name as a column header: Greek letters by their symbol, others as written."""
    return _SYMBOLS.get(name, name)


def unique_labels(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The spec rows' labels, made distinct where they read alike (equal but for case, spaces and punctuation,
    like "ZipIt!" and "ZipIt"): each of those gets what tells its row apart, the method where the methods
    differ, else the parameters that differ, else the row key."""
    labels = [str(row["label"]) for row in rows]
    for colliding in _alike(labels):
        members = [rows[i] for i in colliding]
        for i, suffix in zip(colliding, _distinguishing(members), strict=True):
            labels[i] = f"{rows[i]['label']} ({suffix})"
    for colliding in _alike(labels):  # a suffix made a label read like another one
        for i in colliding:
            labels[i] = f"{rows[i]['label']} ({rows[i]['key']})"
    return labels


def _alike(labels: Sequence[str]) -> list[list[int]]:
    positions: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        positions[re.sub(r"[\W_]+", "", label).casefold()].append(i)
    return [found for found in positions.values() if len(found) > 1]


def _distinguishing(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    methods = [str(row.get("method", row["kind"])) for row in rows]
    if len(set(methods)) == len(methods):
        return methods
    params = [row.get("params") or {} for row in rows]
    differing = [
        key
        for key in dict.fromkeys(key for values in params for key in values)
        if len({json.dumps(values.get(key), sort_keys=True) for values in params}) > 1
    ]
    texts = [", ".join(f"{key} {_param_text(values[key])}" for key in differing if key in values) for values in params]
    if all(texts) and len(set(texts)) == len(texts):
        return texts
    return [str(row["key"]) for row in rows]


def _param_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "/".join(map(_param_text, value))
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def experiment_rows(data: ReportData, experiment: Mapping[str, Any]) -> pd.DataFrame:
    """The aggregated rows of one experiment in the spec's row order, with `display`: unique row labels."""
    frame = data.frame[data.frame["arch"] == experiment["key"]].set_index("method")
    keys = [row["key"] for row in experiment["rows"]]
    missing = sorted(set(keys) - set(frame.index))
    if missing:
        raise ValueError(f"experiment {experiment['key']!r} has no results for rows {missing}")
    rows = frame.loc[keys].reset_index()
    rows["display"] = unique_labels(experiment["rows"])
    return rows


def accuracy_cells(
    rows: pd.DataFrame, metrics: Mapping[str, str], bold_best: Sequence[str] = ()
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Text and bold of accuracy columns: `metrics` maps each header to its metric; the best merge is bold in
    the columns of the metrics in `bold_best`."""
    cells = pd.DataFrame(
        {
            header: format_accuracy(rows[f"{metric}_mean"], rows[f"{metric}_std"], rows[f"{metric}_n"])
            for header, metric in metrics.items()
        },
        index=rows.index,
    )
    bold = pd.DataFrame(
        {
            header: best_merges(rows, metric) if metric in bold_best else pd.Series(False, index=rows.index)
            for header, metric in metrics.items()
        },
        index=rows.index,
    )
    return cells, bold


def task_columns(rows: pd.DataFrame) -> dict[str, str]:
    """Header → metric of every task with at least one accuracy among `rows`."""
    return {f"Task {task}": task_metric(task) for task in tasks_in(rows)}


def chosen_cells(data: ReportData, experiment: Mapping[str, Any]) -> pd.DataFrame:
    """For rows whose results carry a curve (a parameter chosen on the merge slice), the value each seed
    chose, in seed order (`0.4/0.6`, a dash for a seed without one); one column per curve parameter, a dash
    for rows without any. Indexed by row key; no columns where no row has a curve."""
    chosen: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for record in data.records:
        curve = record.get("curve")
        if record["arch"] == experiment["key"] and curve:
            chosen[curve["param"]][record["method"]][record["pair"]] = curve["chosen"]
    keys = [row["key"] for row in experiment["rows"]]
    seeds = data.spec["seeds"]
    columns = {
        symbol(param): [
            "/".join(f"{by_row[key][seed]:g}" if seed in by_row[key] else DASH for seed in seeds)
            if by_row.get(key)
            else DASH
            for key in keys
        ]
        for param, by_row in chosen.items()
    }
    return pd.DataFrame(columns, index=keys)


def chosen_note(columns: Sequence[str]) -> str:
    """Caption sentence explaining the `chosen_cells` columns (none without them)."""
    if not len(columns):
        return ""
    return (
        f" {' and '.join(columns)}: the value each seed's merge chose by joint accuracy on the held-out merge slice,"
        " in seed order (a dash: nothing chosen)."
    )


def experiment_table(
    name: str, caption: str, blocks: Sequence[tuple[str, pd.DataFrame, pd.DataFrame, pd.DataFrame]]
) -> Table:
    """A table of (block title, rows, cells, bold) blocks; rows are `experiment_rows` (labels and kinds). Blocks
    may lack columns of others (a dash there), and `bold` columns of `cells` (not bold)."""
    index = pd.MultiIndex.from_tuples(
        [(title, label) for title, rows, _, _ in blocks for label in rows["display"]], names=["block", "row"]
    )
    cells = pd.concat([block_cells for _, _, block_cells, _ in blocks], ignore_index=True).fillna(DASH)
    bold = pd.concat(
        [block_bold.reindex(columns=cells.columns, fill_value=False) for _, _, _, block_bold in blocks],
        ignore_index=True,
    )
    rules = pd.concat([kind_rules(rows["kind"].reset_index(drop=True)) for _, rows, _, _ in blocks], ignore_index=True)
    return Table(name, caption, cells.set_axis(index), bold.set_axis(index), rules.set_axis(index))


def table_outputs(stem: str, caption: str, subcategory: str, labels: Mapping[str, str]) -> list[Output]:
    """The files of one table: the LaTeX float (for main.tex, not shown) and its HTML page, shown under
    Tables / `subcategory` with `caption` (an rst file of the repository's report/ folder)."""
    return [
        Output(f"{TABLE_DIR}/{stem}.tex"),
        Output(f"{TABLE_DIR}/{stem}.html", caption, "Tables", subcategory, report_labels(**labels)),
    ]


def table_caption(data: ReportData, subject: str, text: str) -> str:
    """`<Dataset>, <subject>: <text>`: every table caption names the dataset by its display name."""
    return f"{dataset_label(data.spec)}, {subject}: {text}"


def write_tables(out_dir: Path, stem: str, tables: Sequence[Table], title: str) -> tuple[Path, Path]:
    """Write `tables/<stem>.tex` (the floats, for main.tex) and `tables/<stem>.html` (one page holding them
    all, for the HTML report) and return both paths."""
    tex = render_tables_tex(Path(out_dir) / TABLE_DIR / f"{stem}.tex", tables)
    page = render_tables_html(Path(out_dir) / TABLE_DIR / f"{stem}.html", tables, title=title)
    return tex, page
