"""LaTeX output: the Jinja2 environment, escaping, the booktabs rendering of `Table`s, main.tex's items and the
compiler call.

Tables are written as self-contained `table` floats so that a paper can `\\input` them unchanged.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import jinja2

from hetmerge.atomic import atomic_open, atomic_path

if TYPE_CHECKING:
    from hetmerge.report.tables import Table

LATEX_PACKAGES = "texlive-latex-base texlive-latex-recommended texlive-latex-extra lmodern latexmk"
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
    # pdflatex has no glyphs for Greek input; these letters appear in labels and headers ("MuDSC (λ 0.5)").
    "α": r"$\alpha$",
    "β": r"$\beta$",
    "γ": r"$\gamma$",
    "λ": r"$\lambda$",
    # Nor for these, which experiment labels and table cells use ("VGG19 ⊕ VGG13", "ResNet-20 ×2", "48.2 ± 1.0").
    "⊕": r"$\oplus$",
    "×": r"$\times$",
    "±": r"$\pm$",
    "−": r"$-$",
    "–": "--",
    "—": "---",
}
_ESCAPE_PATTERN = re.compile("|".join(map(re.escape, _ESCAPES)))


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


def latex_escape(text: object) -> str:
    """Escape LaTeX special characters, so labels such as `W.Avg & co` or `ZipIt!_{13/20}` print as is."""
    return _ESCAPE_PATTERN.sub(lambda match: _ESCAPES[match.group()], str(text))


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


def render_tables_tex(path: Path, tables: Sequence[Table]) -> Path:
    """Write `tables` as booktabs floats to `path`. A table wider than the text is set as stacked tabulars of
    column chunks (`Table.chunks`), each repeating the row labels; long headers break into lines."""
    floats = []
    for table in tables:
        chunks = []
        for columns in table.chunks():
            header = [_header(table.header_lines(column)) for column in columns]
            rows = [
                {
                    "title": None if row.title is None else latex_escape(row.title),
                    "rule": row.rule,
                    "cells": [latex_escape(row.label), *(_cell(text, bold) for text, bold in row.cells)],
                }
                for row in table.body(columns)
            ]
            chunks.append({"n": len(columns) + 1, "header": [latex_escape(table.corner), *header], "rows": rows})
        floats.append({"caption": latex_escape(table.caption), "label": f"tab:{table.name}", "chunks": chunks})
    return render_to(path, "table.tex.j2", tables=floats)


def _cell(text: str, bold: bool) -> str:
    escaped = latex_escape(text)
    return rf"\textbf{{{escaped}}}" if bold else escaped


def _header(lines: Sequence[str]) -> str:
    """One header cell; several lines as a bottom-aligned inner tabular (booktabs has no line break)."""
    if len(lines) == 1:
        return latex_escape(lines[0])
    return r"\begin{tabular}[b]{@{}r@{}}" + r" \\ ".join(map(latex_escape, lines)) + r"\end{tabular}"


def compile_latex(main_tex: Path, timeout_s: float = 120) -> Path:
    """Compile `main_tex` to PDF next to it and return the PDF path.

    Runs in `main_tex`'s directory (so relative `\\input`/`\\includegraphics` resolve) with auxiliary
    files in a temporary directory; the PDF is moved into place only on success, so a failed compile
    never leaves a stale or truncated PDF behind. The log goes next to the PDF (`main.log`), so that its
    warnings (overfull boxes, missing fonts) can be read.
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
        log = Path(build_dir, main_tex.stem).with_suffix(".log")
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
                text = log.read_text(errors="replace") if log.exists() else result.stdout + result.stderr
                tail = "\n".join(text.splitlines()[-40:])
                raise RuntimeError(f"{engine[0]} failed on {main_tex} (exit {result.returncode}); log tail:\n{tail}")
        with atomic_path(main_tex.with_suffix(".log")) as tmp:
            shutil.copyfile(log, tmp)
        with atomic_path(pdf) as tmp:
            shutil.copyfile(Path(build_dir, pdf.name), tmp)
    return pdf
