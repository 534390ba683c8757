"""LaTeX output: the Jinja2 environment, number formatting, the table builders and the compiler call.

Tables are written as self-contained `table` floats so that a paper can `\\input` them unchanged, each with
an HTML twin (same caption and cells) for the HTML report.
"""

from __future__ import annotations

import html
import math
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jinja2
import pandas as pd
from markupsafe import Markup

from hetmerge.atomic import atomic_open, atomic_path
from hetmerge.report.aggregate import STATS, ReportData, groups, layouts, methods_in, task_metric, tasks_in
from hetmerge.report.html import render_html

LATEX_PACKAGES = "texlive-latex-base texlive-latex-recommended texlive-latex-extra latexmk"
"""Debian packages that provide everything main.tex needs."""

_ESCAPES = {
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "\\": r"\textbackslash{}",
    # pdflatex has no glyphs for Greek input; these letters appear in method labels ("MuDSC (λ 0.5)").
    "α": r"$\alpha$",
    "β": r"$\beta$",
    "λ": r"$\lambda$",
    # Nor for these, which experiment labels use ("VGG19 ⊕ VGG13", "ResNet-20 ×2").
    "⊕": r"$\oplus$",
    "×": r"$\times$",
    "−": r"$-$",
}
_ESCAPE_PATTERN = re.compile("|".join(map(re.escape, _ESCAPES)))
# The LaTeX that tables and captions contain, as text: each escape's character, plus what formatting adds.
_TEXT_OF = {
    **{escaped: char for char, escaped in _ESCAPES.items()},
    r"$\pm$": "±",
    "---": "—",
    "--": "–",
}
_FONT_TAGS = {r"\textbf{": "strong", r"\textit{": "em"}
# Longest first, so that `\}` wins over `}` and `$\pm$` over `$`; then any other LaTeX-special character.
_LATEX_TOKEN = re.compile(
    "|".join(re.escape(token) for token in sorted([*_TEXT_OF, *_FONT_TAGS, "}"], key=len, reverse=True))
    + r"|[\\${}~^_&#%]"
)
_UNITS = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))


class LatexUnavailableError(RuntimeError):
    """No LaTeX engine is installed; distinct from a failed compile so callers can skip, not fail."""


@dataclass(frozen=True)
class Artifact:
    """One item that main.tex places in a section.

    A table is a self-contained float that main.tex `\\input`s; a figure is a PDF that main.tex wraps
    in a float with `caption` and `label`, because an image file cannot carry its own caption. `files` is
    everything the item wrote: with the table or PDF, e.g. a table's HTML twin or a figure's PNG and CSV.
    """

    kind: Literal["table", "figure"]
    section: str
    path: Path
    files: tuple[Path, ...]
    caption: str = ""
    label: str = ""


@dataclass(frozen=True)
class TableRow:
    """One table row: a data label (escaped by the template) and already formatted LaTeX cells; a `header`
    row is a block title spanning the table (its label only)."""

    label: str
    cells: Sequence[str]
    rule_before: bool = False
    header: bool = False


def latex_escape(text: object) -> str:
    """Escape LaTeX special characters, so labels such as `W.Avg & co` or `ZipIt!_{13/20}` print as is."""
    return _ESCAPE_PATTERN.sub(lambda match: _ESCAPES[match.group()], str(text))


def latex_to_html(text: str) -> Markup:
    """The HTML of the LaTeX that the table builders write: escapes and `$\\pm$` become their characters,
    `--` an en dash, `\\textbf{..}`/`\\textit{..}` <strong>/<em>; everything else is HTML-escaped text.

    Inverts `latex_escape`, so a label prints as it was configured. Raises ValueError for any other LaTeX
    (an unknown macro, `$`, an unbalanced brace) rather than showing the reader raw markup.
    """
    parts: list[str] = []
    closing: list[str] = []
    end = 0
    for match in _LATEX_TOKEN.finditer(text):
        parts.append(html.escape(text[end : match.start()], quote=False))
        token = match.group()
        if token in _TEXT_OF:
            parts.append(html.escape(_TEXT_OF[token], quote=False))
        elif token in _FONT_TAGS:
            parts.append(f"<{_FONT_TAGS[token]}>")
            closing.append(f"</{_FONT_TAGS[token]}>")
        elif token == "}" and closing:
            parts.append(closing.pop())
        else:
            raise ValueError(f"no HTML for the LaTeX {text[match.start() : match.start() + 20]!r} in {text!r}")
        end = match.end()
    if closing:
        raise ValueError(f"unbalanced braces in {text!r}")
    parts.append(html.escape(text[end:], quote=False))
    return Markup("".join(parts))


def slug(name: str) -> str:
    """A file-name and `\\label`-safe form of a data name (LaTeX chokes on odd characters in paths)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name)


def latex_environment() -> jinja2.Environment:
    """Jinja2 environment whose delimiters cannot clash with LaTeX braces and `%` comments.

    StrictUndefined turns a misspelt template variable into an error instead of a silently empty cell.
    """
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("hetmerge.report", "templates"),
        block_start_string=r"\BLOCK{",
        block_end_string="}",
        variable_start_string=r"\VAR{",
        variable_end_string="}",
        comment_start_string=r"\#{",
        comment_end_string="}",
        line_statement_prefix="%%",
        line_comment_prefix="%#",
        autoescape=False,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["latex_escape"] = latex_escape
    return env


def render_to(path: Path, template: str, **context: Any) -> Path:
    """Render a package template into `path` atomically and return `path`."""
    text = latex_environment().get_template(template).render(**context)
    with atomic_open(path) as handle:
        handle.write(text)
    return path


def write_table(
    out_dir: Path, stem: str, *, caption: str, label: str, columns: Sequence[str], rows: Sequence[TableRow]
) -> tuple[Path, Path]:
    """Write `tables/<stem>.tex`, a booktabs float for main.tex, and `tables/<stem>.html`, the same caption and
    cells as a standalone page for the HTML report (a browser cannot show LaTeX). Returns both paths.

    `caption` and `cells` are LaTeX; `columns` and row labels are plain text, escaped by each template.
    """
    tex = render_to(
        out_dir / "tables" / f"{stem}.tex", "table.tex.j2", caption=caption, label=label, columns=columns, rows=rows
    )
    page = render_html(
        out_dir / "tables" / f"{stem}.html",
        "table.html.j2",
        title=stem,
        caption=latex_to_html(caption),
        label=label,
        columns=columns,
        rows=[
            {
                "label": row.label,
                "cells": [latex_to_html(cell) for cell in row.cells],
                "rule_before": row.rule_before,
                "header": row.header,
            }
            for row in rows
        ],
    )
    return tex, page


def format_accuracy(mean: float, std: float, n: int, *, bold: bool = False) -> str:
    """`48.2 $\\pm$ 1.0` in percent; the mean alone for one value (no spread to show); `--` for none."""
    if n == 0:
        return "--"
    text = f"{100 * mean:.1f}" if n == 1 else f"{100 * mean:.1f} $\\pm$ {100 * std:.1f}"
    return rf"\textbf{{{text}}}" if bold else text


def humanize_count(value: float) -> str:
    """Parameter/FLOP counts with two significant digits and the unit that keeps them >= 0.1: `0.68G`."""
    if math.isnan(value):
        return "--"
    for scale, suffix in _UNITS:
        if value >= 0.1 * scale:
            scaled = value / scale
            decimals = max(0, 1 - math.floor(math.log10(scaled)))
            return f"{scaled:.{decimals}f}{suffix}"
    return f"{value:.0f}"


def pairs_phrase(n_pairs: pd.Series) -> str:
    """Caption fragment saying how many model pairs the numbers summarise."""
    low, high = int(n_pairs.min()), int(n_pairs.max())
    if high == 1:
        return "from a single model pair"
    count = str(high) if low == high else f"{low}--{high}"
    return rf"mean $\pm$ std over {count} model pairs"


def accuracy_cells(rows: Sequence[Mapping[str, Any]], metric: str, *, bold_best: bool) -> list[str]:
    """Format `metric` for each row; with `bold_best`, bold the best merged mean (all ties at display
    precision, since readers cannot tell apart numbers that print the same)."""
    # Compare the printed percentages (None: nothing printed, or not a merge, so never bold).
    printed = [
        float(f"{100 * row[f'{metric}_mean']:.1f}") if row["kind"] == "merge" and row[f"{metric}_n"] else None
        for row in rows
    ]
    best = max((value for value in printed if value is not None), default=None)
    return [
        format_accuracy(
            row[f"{metric}_mean"],
            row[f"{metric}_std"],
            row[f"{metric}_n"],
            bold=bold_best and value is not None and value == best,
        )
        for value, row in zip(printed, rows, strict=True)
    ]


def kind_rules(kinds: Sequence[str]) -> list[bool]:
    """A `\\midrule` wherever the row kind changes, separating base models from merges."""
    return [i > 0 and kind != kinds[i - 1] for i, kind in enumerate(kinds)]


def accuracy_tables(data: ReportData, out_dir: Path) -> list[Artifact]:
    """Per (dataset, arch) with the standard layout: Params, FLOPs, Joint, each task and Avg for every method."""
    layout = layouts(data.records)
    artifacts = []
    for (dataset, arch), table in data.frame.groupby(["dataset", "arch"], sort=True):
        if layout[(dataset, arch)] != "standard":
            continue
        rows = table.to_dict("records")
        tasks = tasks_in(table)
        metrics = ["joint", *(task_metric(task) for task in tasks), "task_avg"]
        columns_by_metric = [accuracy_cells(rows, metric, bold_best=metric == "joint") for metric in metrics]
        rules = kind_rules([row["kind"] for row in rows])
        table_rows = [
            TableRow(
                label=row["label"],
                cells=[
                    humanize_count(row["params_mean"]),
                    humanize_count(row["flops_mean"]),
                    *(cells[i] for cells in columns_by_metric),
                ],
                rule_before=rules[i],
            )
            for i, row in enumerate(rows)
        ]
        caption = (
            rf"{latex_escape(dataset)}, {latex_escape(rows[0]['arch_label'])}: accuracy (\%), "
            f"{pairs_phrase(table['n_pairs'])}. Best merged joint accuracy in bold."
        )
        path, page = write_table(
            out_dir,
            f"accuracy_{slug(dataset)}_{slug(arch)}",
            caption=caption,
            label=f"tab:accuracy-{slug(dataset)}-{slug(arch)}",
            columns=["Method", "Params", "FLOPs", "Joint", *(f"Task {task}" for task in tasks), "Avg"],
            rows=table_rows,
        )
        artifacts.append(Artifact("table", dataset, path, (path, page)))
    return artifacts


def mudsc_tables(data: ReportData, out_dir: Path) -> list[Artifact]:
    """Per (dataset, arch) with the "mudsc" layout, the MuDSC paper's table: Joint, Per-Task Avg and each
    task for every method, best merge per column in bold, and the λ each MuDSC merge used per model pair.
    """
    layout = layouts(data.records)
    lams = _lams(data.records)
    artifacts = []
    for (dataset, arch), table in data.frame.groupby(["dataset", "arch"], sort=True):
        if layout[(dataset, arch)] != "mudsc":
            continue
        rows = table.to_dict("records")
        tasks = tasks_in(table)
        metrics = ["joint", "task_avg", *(task_metric(task) for task in tasks)]
        columns_by_metric = [accuracy_cells(rows, metric, bold_best=True) for metric in metrics]
        lam_cells = [format_lams(lams.get((dataset, arch, row["method"]), {})) for row in rows]
        with_lam = any(cell != "--" for cell in lam_cells)
        rules = kind_rules([row["kind"] for row in rows])
        table_rows = [
            TableRow(
                label=row["label"],
                cells=[*(cells[i] for cells in columns_by_metric), *([lam_cells[i]] if with_lam else [])],
                rule_before=rules[i],
            )
            for i, row in enumerate(rows)
        ]
        caption = (
            rf"{latex_escape(dataset)}, {latex_escape(rows[0]['arch_label'])}: accuracy (\%), "
            f"{pairs_phrase(table['n_pairs'])}. Best merge per column in bold (base models and the ensemble "
            "are references and do not compete)."
        )
        if with_lam:
            caption += (
                r" $\lambda$: activation share of MuDSC's unit similarity (0: weight only, 1: activation only) "
                "for each model pair in turn, chosen by joint accuracy on the merge slice unless fixed in the "
                "configuration."
            )
        path, page = write_table(
            out_dir,
            f"mudsc_{slug(dataset)}_{slug(arch)}",
            caption=caption,
            label=f"tab:mudsc-{slug(dataset)}-{slug(arch)}",
            columns=[
                "Method",
                "Joint",
                "Per-Task Avg",
                *(f"Task {task}" for task in tasks),
                *(["λ"] if with_lam else []),
            ],
            rows=table_rows,
        )
        artifacts.append(Artifact("table", dataset, path, (path, page)))
    return artifacts


def format_lams(by_pair: Mapping[int, float | None]) -> str:
    """λ per model pair in pair order, `0.4/0.6`; `--` for a pair without one, or alone for none at all."""
    if all(lam is None for lam in by_pair.values()):
        return "--"
    return "/".join("--" if by_pair[pair] is None else f"{by_pair[pair]:g}" for pair in sorted(by_pair))


def _lams(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, str], dict[int, float | None]]:
    """The λ each merge recorded (`source.notes.lam`), per (dataset, arch, method) and pair."""
    lams: dict[tuple[str, str, str], dict[int, float | None]] = {}
    for record in records:
        lam = ((record.get("source") or {}).get("notes") or {}).get("lam")
        key = (record["dataset"], record["arch"], record["method"])
        lams.setdefault(key, {})[record["pair"]] = None if lam is None else float(lam)
    return lams


_KIND_ORDER = {"base": 0, "ensemble": 1, "merge": 2}
"""Row order within a block of the hetero table: references first, then merges (unknown kinds last)."""
HETERO_ID_COLUMNS = ("dataset", "group", "experiment", "arch_label", "method", "label", "kind", "n_pairs")
"""Leading columns of a hetero table's CSV; `<metric>_{mean,std,n}` follow for Joint, each task and Avg."""


def hetero_tables(data: ReportData, out_dir: Path) -> list[Artifact]:
    """Per dataset and group of "hetero"-layout experiments (see `groups`): heterogeneous merges next to
    their homogeneous references, one block of rows per experiment.

    A block is titled by the experiment's label and lists its base models, the ensemble, then its merges in
    method order; columns are Joint, each task and Avg, the best merge per column within each block in bold.
    Experiments follow the order in which their records first arrive (the pipeline's is the configuration's).
    The same numbers go to `hetero_<dataset>_<group>.csv` (fractions, like results.csv), so that the text
    can quote them.
    """
    layout = layouts(data.records)
    group_of = groups(data.records)
    members: dict[tuple[str, str], list[str]] = {}
    for dataset, arch in dict.fromkeys((record["dataset"], record["arch"]) for record in data.records):
        if layout[(dataset, arch)] == "hetero":
            members.setdefault((dataset, group_of[(dataset, arch)]), []).append(arch)
    depth_merged = {
        (record["dataset"], record["arch"])
        for record in data.records
        if (record.get("source") or {}).get("method") == "hetero"
    }
    artifacts = []
    for (dataset, group), archs in sorted(members.items()):
        frame = data.frame[(data.frame["dataset"] == dataset) & data.frame["arch"].isin(archs)]
        tasks = tasks_in(frame)
        metrics = ["joint", *(task_metric(task) for task in tasks), "task_avg"]
        table_rows: list[TableRow] = []
        csv_rows: list[dict[str, Any]] = []
        for arch in archs:
            rows = sorted(
                frame[frame["arch"] == arch].to_dict("records"),
                key=lambda row: (_KIND_ORDER.get(row["kind"], len(_KIND_ORDER)), row["method_rank"]),
            )
            table_rows.append(TableRow(rows[0]["arch_label"], [], rule_before=bool(table_rows), header=True))
            columns_by_metric = [accuracy_cells(rows, metric, bold_best=True) for metric in metrics]
            rules = kind_rules([row["kind"] for row in rows])
            for i, row in enumerate(rows):
                table_rows.append(TableRow(row["label"], [cells[i] for cells in columns_by_metric], rules[i]))
                csv_rows.append(
                    {
                        "dataset": dataset,
                        "group": group,
                        "experiment": arch,
                        **{field: row[field] for field in HETERO_ID_COLUMNS[3:]},
                        **{f"{metric}_{stat}": row[f"{metric}_{stat}"] for metric in metrics for stat in STATS},
                    }
                )
        caption = (
            rf"{latex_escape(dataset)}, {latex_escape(group)}: accuracy (\%) of merging models of different "
            f"depth or width, with homogeneous references, {pairs_phrase(frame['n_pairs'])}. One block per "
            "experiment, titled by its two models; best merge per column within each block in bold (base models "
            "and the ensemble are references and do not compete)."
        )
        if any((dataset, arch) in depth_merged for arch in archs):
            caption += (
                " Depth-heterogeneous merges place each block of the shallower model at a block of the deeper one, "
                "by minibatch linear CKA on the merge slice (SMA: segment-wise, LMA: layer-wise alignment), pad "
                "the remaining positions with identity blocks and then match the equally deep models."
            )
        stem = f"hetero_{slug(dataset)}_{slug(group)}"
        path, page = write_table(
            out_dir,
            stem,
            caption=caption,
            label=f"tab:hetero-{slug(dataset)}-{slug(group)}",
            columns=["Method", "Joint", *(f"Task {task}" for task in tasks), "Avg"],
            rows=table_rows,
        )
        csv = out_dir / "tables" / f"{stem}.csv"
        columns = [*HETERO_ID_COLUMNS, *(f"{metric}_{stat}" for metric in metrics for stat in STATS)]
        with atomic_open(csv) as handle:
            pd.DataFrame(csv_rows, columns=columns).to_csv(handle, index=False, lineterminator="\n")
        artifacts.append(Artifact("table", dataset, path, (path, page, csv)))
    return artifacts


def summary_tables(data: ReportData, out_dir: Path) -> list[Artifact]:
    """Per dataset: joint accuracy of every method (rows) on every architecture (columns)."""
    artifacts = []
    for dataset, frame in data.frame.groupby("dataset", sort=True):
        archs = sorted(frame["arch"].unique())
        methods = methods_in(frame)
        by_arch = {arch: frame[frame["arch"] == arch].set_index("method") for arch in archs}
        cells_by_arch = []
        for arch in archs:
            # Methods missing on an architecture become n == 0 rows, printed as `--`.
            rows = [
                by_arch[arch].loc[method].to_dict()
                if method in by_arch[arch].index
                else {"kind": "", "joint_mean": math.nan, "joint_std": math.nan, "joint_n": 0}
                for method in methods
            ]
            cells_by_arch.append(accuracy_cells(rows, "joint", bold_best=True))
        first = frame.drop_duplicates("method").set_index("method")
        rules = kind_rules([first.loc[method, "kind"] for method in methods])
        table_rows = [
            TableRow(first.loc[method, "label"], [cells[i] for cells in cells_by_arch], rules[i])
            for i, method in enumerate(methods)
        ]
        caption = (
            rf"{latex_escape(dataset)}: joint accuracy (\%) of every method and architecture, "
            f"{pairs_phrase(frame['n_pairs'])}. Best merged result per architecture in bold."
        )
        path, page = write_table(
            out_dir,
            f"summary_{slug(dataset)}",
            caption=caption,
            label=f"tab:summary-{slug(dataset)}",
            columns=["Method", *(by_arch[arch]["arch_label"].iloc[0] for arch in archs)],
            rows=table_rows,
        )
        artifacts.append(Artifact("table", dataset, path, (path, page)))
    return artifacts


def compile_latex(main_tex: Path, timeout_s: float = 120) -> Path:
    """Compile `main_tex` to PDF next to it and return the PDF path.

    Runs in `main_tex`'s directory (so relative `\\input`/`\\includegraphics` resolve) with auxiliary
    files in a temporary directory; the PDF is moved into place only on success, so a failed compile
    never leaves a stale or truncated PDF behind.
    """
    main_tex = Path(main_tex).resolve()
    if shutil.which("latexmk"):
        engine = ["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error"]
        runs = 1
    elif shutil.which("pdflatex"):
        engine = ["pdflatex", "-interaction=nonstopmode", "-halt-on-error"]
        runs = 2  # the second pass resolves references
    else:
        raise LatexUnavailableError(f"neither latexmk nor pdflatex is on PATH; install {LATEX_PACKAGES}")
    deadline = time.monotonic() + timeout_s
    pdf = main_tex.with_suffix(".pdf")
    with tempfile.TemporaryDirectory(prefix=".latex-", dir=main_tex.parent) as build_dir:
        command = [*engine, f"-output-directory={build_dir}", main_tex.name]
        for _ in range(runs):
            try:
                result = subprocess.run(
                    command,
                    cwd=main_tex.parent,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    errors="replace",
                    timeout=max(deadline - time.monotonic(), 1),
                )
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{engine[0]} on {main_tex} took longer than {timeout_s} s") from None
            if result.returncode != 0:
                log = Path(build_dir, main_tex.stem).with_suffix(".log")
                text = log.read_text(errors="replace") if log.exists() else result.stdout + result.stderr
                tail = "\n".join(text.splitlines()[-40:])
                raise RuntimeError(f"{engine[0]} failed on {main_tex} (exit {result.returncode}); log tail:\n{tail}")
        with atomic_path(pdf) as tmp:
            shutil.copyfile(Path(build_dir, pdf.name), tmp)
    return pdf
