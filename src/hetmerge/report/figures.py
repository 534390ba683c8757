"""What the figure layouts share: the paper style, figure sizes, saving, declared outputs and spec look-ups.

Figures are drawn on a standalone `Figure` with an Agg canvas inside an rc_context of the package matplotlibrc,
so building a report neither depends on nor changes the caller's pyplot state. Every figure is at most the text
width wide and no taller than wide: wider would overflow the page, taller loses its top in `snakemake --report`,
which centres items vertically. Its labels are fitted in by constrained layout or, where panels need exact
proportions (equal axis scales, equal row heights), by hand: labels are drawn and measured first, then the axes
placed. `save_figure` refuses a figure that breaks these limits or whose labels stick out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hetmerge.atomic import atomic_path
from hetmerge.report.data import experiment_labels
from hetmerge.report.latex import latex_escape
from hetmerge.report.layout import Output

if TYPE_CHECKING:
    from hetmerge.report.data import ReportData

RC_FILE = Path(__file__).with_name("matplotlibrc")
COLUMN_WIDTH_IN = 3.25
TEXT_WIDTH_IN = 6.75
FIGURE_DIR = "figures"
COLOURS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
"""Okabe-Ito, as the matplotlibrc colour cycle: distinguishable for colour-blind readers."""
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
PAD_IN = 0.03
"""Margin of a figure laid out by hand."""
_CHAR_IN = 0.05
_HANDLE_IN = 0.45
"""Legend widths: an upper bound of a character at legend.fontsize, and of a handle with its spacing."""
_FIT_TOLERANCE_PT = 1.0
_SETTLED = 1e-3
"""Constrained layout has settled when no axes moves by more than this (figure fraction, ~0.5 pt)."""
# No dates or software versions in the files: a rerun on the same records must give identical bytes.
_METADATA = {"pdf": {"Creator": None, "Producer": None, "CreationDate": None}, "png": {"Software": None}}
_SYMBOLS = {"alpha": ("α", r"$\alpha$"), "beta": ("β", r"$\beta$"), "gamma": ("γ", r"$\gamma$")}
_SYMBOLS |= {"lam": ("λ", r"$\lambda$"), "lambda": ("λ", r"$\lambda$"), "tau": ("τ", r"$\tau$")}


@contextlib.contextmanager
def figure_style() -> Iterator[None]:
    """The package style (fonts, sizes, Type 42 fonts), for drawing and saving alike."""
    with matplotlib.rc_context(fname=RC_FILE):
        yield


def new_figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    """A figure of exactly `width` x `height` inches, within the limits every figure keeps; by default its
    layout engine fits the labels in."""
    if width > TEXT_WIDTH_IN + 1e-9 or height > width + 1e-9:
        raise ValueError(f"figure of {width:.2f} x {height:.2f} in is wider than the text or taller than wide")
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def legend_columns(labels: Sequence[str], width: float, most: int) -> int:
    """How many legend columns of `labels` fit `width` inches (up to `most`): a too-wide legend cannot be fitted
    into the figure, so long labels go one per line."""
    needed = max(map(len, labels), default=0) * _CHAR_IN + _HANDLE_IN
    return max(1, min(most, len(labels), int(width // needed)))


def settle(fig: Figure, rounds: int = 8) -> None:
    """Draw until the layout engine stops moving the axes: constrained layout starts from the previous layout,
    so one draw may leave labels where the next would move them."""
    previous = None
    for _ in range(rounds):
        fig.canvas.draw()
        positions = np.array([ax.get_position().bounds for ax in fig.axes])
        if (
            previous is not None
            and previous.shape == positions.shape
            and np.allclose(previous, positions, rtol=0, atol=_SETTLED)
        ):
            return
        previous = positions


class Reach(NamedTuple):
    """How far an axes' labels (ticks, axis labels, title) reach beyond its box on each side, in inches."""

    left: float
    bottom: float
    right: float
    top: float


def reach(ax: Axes) -> Reach:
    """The reach of `ax` as last drawn: figures laid out by hand measure it once, then place their axes."""
    inches = ax.figure.dpi_scale_trans.inverted()
    box, tight = ax.bbox.transformed(inches), ax.get_tightbbox().transformed(inches)
    return Reach(box.x0 - tight.x0, box.y0 - tight.y0, tight.x1 - box.x1, tight.y1 - box.y1)


def place(ax: Axes, box: tuple[float, float, float, float]) -> None:
    """Put `ax` at `box` = (left, bottom, width, height) in inches of its figure as now sized."""
    width, height = ax.figure.get_size_inches()
    ax.set_position((box[0] / width, box[1] / height, box[2] / width, box[3] / height))


def save_figure(fig: Figure, out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write `fig` to `<out_dir>/figures/<stem>.pdf` and `.png` atomically, without timestamps.

    The layout is settled and then frozen, so that both files show the layout that was checked. Raises
    ValueError naming the figure when it breaks the size limits or a label sticks out (it would be cut off).
    """
    settle(fig)
    fig.set_layout_engine("none")
    box = fig.get_tightbbox()
    size = fig.get_size_inches()
    if size[0] > TEXT_WIDTH_IN + 1e-6 or size[1] > size[0] + 1e-6:
        raise ValueError(
            f"figure {stem} of {size[0]:.2f} x {size[1]:.2f} in is wider than the text or taller than wide"
        )
    tol = _FIT_TOLERANCE_PT / 72
    if box.x0 < -tol or box.y0 < -tol or box.x1 > size[0] + tol or box.y1 > size[1] + tol:
        raise ValueError(
            f"figure {stem}: its content ({box.width:.2f} x {box.height:.2f} in) does not fit its "
            f"{size[0]:.2f} x {size[1]:.2f} in (labels too long?)"
        )
    paths = []
    for fmt, metadata in _METADATA.items():
        path = out_dir / FIGURE_DIR / f"{stem}.{fmt}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, metadata=metadata)
        paths.append(path)
    return paths[0], paths[1]


def figure_outputs(
    stem: str, caption: str, subcategory: str, labels: Mapping[str, str], *, csv_caption: str | None = None
) -> list[Output]:
    """The files of one figure: the PDF (for LaTeX, not shown), the PNG shown under Figures and, where the
    plotted numbers are written too, their CSV shown under Data."""
    outputs = [
        Output(f"{FIGURE_DIR}/{stem}.pdf"),
        Output(f"{FIGURE_DIR}/{stem}.png", caption, "Figures", subcategory, _report_labels(labels)),
    ]
    if csv_caption is not None:
        outputs.append(Output(f"{FIGURE_DIR}/{stem}.csv", csv_caption, "Data", subcategory, _report_labels(labels)))
    return outputs


def _report_labels(labels: Mapping[str, str]) -> dict[str, str]:
    # Snakemake fills {name} in label values as a wildcard; configured labels are text, never wildcards.
    return {key: str(value).replace("{", "(").replace("}", ")") for key, value in labels.items()}


def experiments_with(spec: Mapping[str, Any], analysis: str) -> list[Mapping[str, Any]]:
    """The experiments (in spec order) whose methods offer `analysis`."""
    return [experiment for experiment in spec["experiments"] if analysis in experiment.get("analyses", {})]


def spec_row(experiment: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """The row `key` of an experiment; ValueError naming both when it has none."""
    for row in experiment["rows"]:
        if row["key"] == key:
            return row
    raise ValueError(
        f"experiment {experiment['key']!r} has no row {key!r} (rows: {[r['key'] for r in experiment['rows']]})"
    )


def first_seed(results: Mapping[str, Any], what: str) -> str:
    """The lowest seed of an analysis' per-seed results (the one its figure shows)."""
    if not results:
        raise ValueError(f"{what} names no result files")
    return min(results, key=int)


def experiment_figure_outputs(
    spec: Mapping[str, Any], analysis: str, stem: Callable[[Mapping[str, Any]], str], caption: str, subcategory: str
) -> list[Output]:
    """The files of a figure drawn per experiment that has `analysis`: PDF and PNG each."""
    return [
        output
        for experiment in experiments_with(spec, analysis)
        for output in figure_outputs(stem(experiment), caption, subcategory, experiment_labels(experiment))
    ]


def first_analysis(
    data: ReportData, experiment: Mapping[str, Any], analysis: str
) -> tuple[str, str, Mapping[str, Any]]:
    """(seed, path, content) of the first seed's result of an experiment's per-seed `analysis` (what its figure
    shows), checked to be of that kind."""
    results = experiment["analyses"][analysis]["results"]
    seed = first_seed(results, f"{analysis} of {experiment['key']}")
    return seed, results[seed], analysis_content(data, results[seed], analysis)


def analysis_content(data: ReportData, path: str, kind: str) -> Mapping[str, Any]:
    """The loaded analysis JSON at `path`, checked to be of `kind`."""
    try:
        content = data.analyses[path]
    except KeyError:
        raise ValueError(f"analysis file {path} was not loaded") from None
    if content.get("kind") != kind:
        raise ValueError(f"analysis file {path} is of kind {content.get('kind')!r}, expected {kind!r}")
    return content


def row_records(data: ReportData, experiment: str, row: str) -> list[Mapping[str, Any]]:
    """Records of one row of one experiment, in seed order; ValueError when there are none."""
    found = sorted(
        (record for record in data.records if record["arch"] == experiment and record["method"] == row),
        key=lambda record: record["pair"],
    )
    if not found:
        raise ValueError(f"no results for row {row!r} of experiment {experiment!r}")
    return found


def frame_rows(data: ReportData, experiment: str) -> list[dict[str, Any]]:
    """The aggregated rows of one experiment, in report order."""
    frame = data.frame
    return frame[frame["arch"] == experiment].sort_values("method_rank").to_dict("records")


def param_symbol(name: str) -> tuple[str, str]:
    """A parameter's name for plain text and for LaTeX: Greek letters by their symbol, others as written."""
    return _SYMBOLS.get(name, (name, latex_escape(name)))


def pairs_phrase(n_pairs: Sequence[int]) -> str:
    """Caption fragment saying how many model pairs (seeds) the numbers summarise."""
    low, high = min(n_pairs), max(n_pairs)
    if high == 1:
        return "from a single model pair"
    count = str(high) if low == high else f"{low}--{high}"
    return rf"mean $\pm$ std over {count} model pairs"
