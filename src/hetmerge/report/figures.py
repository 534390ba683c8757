"""Figure builders: paper-sized matplotlib figures saved as PDF (for LaTeX) and PNG (for quick looks).

Figures are drawn on a standalone `Figure` with an Agg canvas inside an rc_context of the package
matplotlibrc, so building a report neither depends on nor changes the caller's pyplot state.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from hetmerge.atomic import atomic_path
from hetmerge.report.aggregate import ReportData, methods_in
from hetmerge.report.latex import Artifact, latex_escape, slug

RC_FILE = Path(__file__).with_name("matplotlibrc")
SINGLE_COLUMN_IN = 3.25
DOUBLE_COLUMN_IN = 6.75
# No dates or software versions in the files: a rerun on the same records must give identical bytes.
_METADATA = {"pdf": {"Creator": None, "Producer": None, "CreationDate": None}, "png": {"Software": None}}
# Hatched, hollow bars mark everything that is not a merge, so merges stand out at a glance.
_KIND_STYLE = {"merge": ("", "Merged"), "base": ("////", "Base model"), "ensemble": ("xxxx", "Ensemble")}


def save_figure(fig: Figure, stem: Path) -> tuple[Path, Path]:
    """Write `fig` to `<stem>.pdf` and `<stem>.png` atomically, without timestamps."""
    paths = []
    for fmt, metadata in _METADATA.items():
        path = stem.parent / f"{stem.name}.{fmt}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, metadata=metadata)
        paths.append(path)
    return paths[0], paths[1]


def joint_accuracy_figures(data: ReportData, out_dir: Path) -> list[Artifact]:
    """Per dataset: grouped bars of joint accuracy per method (groups) and architecture (colours)."""
    artifacts = []
    for dataset, frame in data.frame.groupby("dataset", sort=True):
        with matplotlib.rc_context(fname=RC_FILE):
            pdf, png = save_figure(_joint_accuracy_bars(frame), out_dir / "figures" / f"joint_accuracy_{slug(dataset)}")
        caption = (
            rf"{latex_escape(dataset)}: joint accuracy (\%) per method and architecture. Error bars: "
            r"std over model pairs; hatched hollow bars: models that are not merges."
        )
        artifacts.append(Artifact("figure", dataset, pdf, (pdf, png), caption, f"fig:joint-accuracy-{slug(dataset)}"))
    return artifacts


def _kind_style(kind: str) -> tuple[str, str]:
    """Hatch and legend name for a model kind; unknown kinds still get a (dotted) non-merge look."""
    return _KIND_STYLE.get(kind, ("....", kind))


def _joint_accuracy_bars(frame: pd.DataFrame) -> Figure:
    methods = methods_in(frame)
    labels = frame.drop_duplicates("method").set_index("method")["label"]
    archs = sorted(frame["arch"].unique())
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    # A handful of bars fits one paper column; more need the full text width to stay legible.
    width = SINGLE_COLUMN_IN if len(methods) * len(archs) <= 12 else DOUBLE_COLUMN_IN
    fig = Figure(figsize=(width, matplotlib.rcParams["figure.figsize"][1]))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()

    bar_width = 0.8 / len(archs)
    legend = []
    for j, arch in enumerate(archs):
        colour = colours[j % len(colours)]
        of_arch = frame[frame["arch"] == arch]
        rows = of_arch[of_arch["joint_n"] > 0]
        offset = (j - (len(archs) - 1) / 2) * bar_width
        for row in rows.to_dict("records"):
            hatch = _kind_style(row["kind"])[0]
            x = methods.index(row["method"]) + offset
            ax.bar(
                x,
                100 * row["joint_mean"],
                bar_width,
                color="white" if hatch else colour,
                edgecolor=colour,
                hatch=hatch,
            )
            if row["joint_n"] > 1:
                ax.errorbar(x, 100 * row["joint_mean"], 100 * row["joint_std"], fmt="none", ecolor="black")
        legend.append(Patch(facecolor=colour, edgecolor=colour, label=of_arch["arch_label"].iloc[0]))
    for kind in dict.fromkeys(frame["kind"]):
        hatch, name = _kind_style(kind)
        if hatch:
            legend.append(Patch(facecolor="white", edgecolor="black", hatch=hatch, label=name))

    ax.set_xticks(range(len(methods)), [labels[method] for method in methods])
    ax.tick_params(axis="x", length=0)
    for tick in ax.get_xticklabels():
        tick.set(rotation=30, ha="right", rotation_mode="anchor")
    ax.set_xlim(-0.6, len(methods) - 0.4)
    ax.set_ylim(0, 100)
    ax.set_xlabel("Method")
    ax.set_ylabel("Joint accuracy (%)")
    ax.legend(handles=legend, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(legend), 4))
    return fig


def partial_zip_figures(data: ReportData, out_dir: Path) -> list[Artifact]:
    """Per dataset and architecture with ZipIt! rows: joint accuracy against how much of the network is zipped.

    x is the fraction of body units merged (1 = full zip); the ensemble and the base models are drawn as
    horizontal reference lines.
    """
    points: dict[tuple[str, str], dict[str, list]] = {}
    for record in data.records:
        source = record.get("source", {})
        if source.get("method") != "zipit":
            continue
        cut = source.get("cut")
        x = 1.0 if cut is None else cut / source["units"]
        key = (record["dataset"], record["arch"])
        points.setdefault(key, {}).setdefault(x, []).append(100 * record["metrics"]["joint"])
    artifacts = []
    for (dataset, arch), by_x in sorted(points.items()):
        frame = data.frame[(data.frame["dataset"] == dataset) & (data.frame["arch"] == arch)]
        with matplotlib.rc_context(fname=RC_FILE):
            fig = _partial_zip_curve(by_x, frame)
            pdf, png = save_figure(fig, out_dir / "figures" / f"partial_zip_{slug(dataset)}_{slug(arch)}")
        arch_label = latex_escape(frame["arch_label"].iloc[0])
        caption = (
            rf"{latex_escape(dataset)}, {arch_label}: joint accuracy (\%) of ZipIt! against the fraction of the "
            r"network that is zipped (mean $\pm$ std over model pairs), with the ensemble and the base models "
            "as reference lines."
        )
        label = f"fig:partial-zip-{slug(dataset)}-{slug(arch)}"
        artifacts.append(Artifact("figure", dataset, pdf, (pdf, png), caption, label))
    return artifacts


def _partial_zip_curve(by_x: dict[float, list[float]], frame: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(SINGLE_COLUMN_IN, matplotlib.rcParams["figure.figsize"][1]))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = sorted(by_x)
    means = [float(pd.Series(by_x[x]).mean()) for x in xs]
    stds = [float(pd.Series(by_x[x]).std()) if len(by_x[x]) > 1 else 0.0 for x in xs]
    ax.errorbar(xs, means, yerr=stds, marker="o", capsize=2, label="ZipIt!", color="C0")
    styles = {"ensemble": ("C3", "--"), "base": ("0.4", ":")}
    for row in frame.to_dict("records"):
        if row["kind"] in styles and row["joint_n"] > 0:
            colour, line = styles[row["kind"]]
            ax.axhline(100 * row["joint_mean"], color=colour, linestyle=line, linewidth=1, label=row["label"])
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 100)
    ax.set_xlabel("Fraction of the network zipped")
    ax.set_ylabel("Joint accuracy (%)")
    ax.legend(loc="lower left", fontsize="small")
    return fig
