"""HTML output: standalone pages for the HTML report (`snakemake --report`), where LaTeX cannot be shown.

Each page is one file with inline CSS and no scripts, links or timestamps, so that the report can embed it
and a rerun on the same records reproduces it byte for byte.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from hetmerge.atomic import atomic_path


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
