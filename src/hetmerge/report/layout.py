"""Table and figure layouts: each is one registered module under `hetmerge.report` that declares the files it
writes and writes exactly those.

The pipeline takes the report rule's outputs from the same declaration (`declared_outputs`), so the list of
report files can never drift from the code that writes them. Which layouts apply follows from the report spec
alone (an experiment's `layout`, the `analyses` its methods offer), never from a method's name.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from hetmerge.report.data import ReportData
    from hetmerge.report.latex import Artifact


@dataclass(frozen=True)
class Output:
    """One file a layout writes, relative to the report's folder.

    `caption` names an rst file under the repository's `report/` folder: the file is then shown by
    `snakemake --report` under `category` / `subcategory`, told apart from its siblings by `labels`. Files a
    browser cannot show (LaTeX, PDF) have no caption.
    """

    path: str
    caption: str | None = None
    category: str | None = None
    subcategory: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "caption": self.caption,
            "category": self.category,
            "subcategory": self.subcategory,
            "labels": dict(self.labels),
        }


class Layout(abc.ABC):
    """A table or figure layout. `outputs` must be cheap (it runs when the pipeline is planned); `write` gets
    the loaded results and returns what main.tex places, in order."""

    name: ClassVar[str]
    table: ClassVar[str | None] = None
    """The value of an experiment's `table:` setting whose tables this layout draws, if it draws any."""
    summarised: ClassVar[bool] = True
    """Whether the run's summary table and figure repeat the experiments of this table layout (not where its own
    tables already set all of a group's experiments side by side)."""

    @abc.abstractmethod
    def outputs(self, spec: Mapping[str, Any]) -> list[Output]:
        """Every file `write` will write for this spec (none where the layout does not apply)."""

    @abc.abstractmethod
    def write(self, data: ReportData, out_dir: Path) -> list[Artifact]:
        """Write the declared files under `out_dir`; return the items main.tex includes."""


LAYOUTS: dict[str, Layout] = {}
"""Registered layouts in registration order, which is the order of main.tex."""


def register_layout(cls: type[Layout]) -> type[Layout]:
    """Class decorator: register one instance of a layout under its `name`."""
    if cls.name in LAYOUTS:
        raise ValueError(f"layout {cls.name!r} is registered twice")
    LAYOUTS[cls.name] = cls()
    return cls


def ordered_layouts() -> list[Layout]:
    """The registered layouts in main.tex order: the built-in ones as `layouts.ORDER` lists their modules, then
    any other in registration order (registration order alone would follow whichever module was imported first)."""
    from hetmerge.report.layouts import ORDER

    def rank(layout: Layout) -> int:
        module = type(layout).__module__.rsplit(".", 1)[-1]
        return ORDER.index(module) if module in ORDER else len(ORDER)

    return sorted(LAYOUTS.values(), key=rank)


def table_layouts() -> list[str]:
    """Every value an experiment's `table:` setting may take: one per registered table layout."""
    return [layout.table for layout in ordered_layouts() if layout.table is not None]


def summarised_experiments(spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The experiments the run's summary table and figure show, in spec order."""
    hidden = {layout.table for layout in ordered_layouts() if layout.table is not None and not layout.summarised}
    return [experiment for experiment in spec["experiments"] if experiment["layout"] not in hidden]


def declared_outputs(spec: Mapping[str, Any]) -> list[Output]:
    """Every file the report writes for `spec`: main.tex first, then each layout's declaration."""
    outputs = [Output("main.tex")]
    for layout in ordered_layouts():
        outputs += layout.outputs(spec)
    paths = [output.path for output in outputs]
    if len(set(paths)) != len(paths):
        duplicated = sorted({path for path in paths if paths.count(path) > 1})
        raise ValueError(f"report layouts declare the same file twice: {duplicated}")
    return outputs
