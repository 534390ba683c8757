"""HTML output: standalone pages for the HTML report (`snakemake --report`), where LaTeX cannot be shown.

Each page is one file with inline CSS and no scripts, links or timestamps, so that the report can embed it
and a rerun on the same results reproduces it byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from hetmerge.atomic import atomic_path

if TYPE_CHECKING:
    from hetmerge.report.tables import Table


def html_environment() -> jinja2.Environment:
    """Jinja2 environment for the `*.html.j2` templates: HTML autoescaping (text is escaped unless marked
    `Markup`) and StrictUndefined, as for LaTeX."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("hetmerge.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render_html(path: Path, template: str, **context: Any) -> Path:
    """Render a package template into `path` atomically (UTF-8, as each page declares) and return `path`."""
    text = html_environment().get_template(template).render(**context)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")
    return path


def render_tables_html(path: Path, tables: Sequence[Table], *, title: str) -> Path:
    """Write `tables` as one page to `path`: the same captions, rows and cells as their LaTeX, one HTML table
    each (a browser scrolls a wide table, so there are no column chunks)."""
    return render_html(
        path,
        "table.html.j2",
        title=title,
        tables=[
            {
                "id": f"tab:{table.name}",
                "caption": table.caption,
                "columns": [table.corner, *table.columns],
                "rows": list(table.body()),
            }
            for table in tables
        ],
    )
