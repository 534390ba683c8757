"""Figure builders: paper-sized matplotlib figures saved as PDF (for LaTeX) and PNG (for quick looks),
plus a CSV of the plotted numbers where the text needs to quote them (the λ figure).

Figures are drawn on a standalone `Figure` with an Agg canvas inside an rc_context of the package
matplotlibrc, so building a report neither depends on nor changes the caller's pyplot state.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from hetmerge.atomic import atomic_open, atomic_path
from hetmerge.report.aggregate import ReportData, methods_in
from hetmerge.report.latex import Artifact, latex_escape, pairs_phrase, slug

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
    """Per dataset and architecture with partial ZipIt! rows: joint accuracy against how much is zipped.

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
        if set(by_x) == {1.0}:
            continue  # only full zips: nothing to plot against
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


def lambda_figures(data: ReportData, out_dir: Path) -> list[Artifact]:
    """Per dataset and architecture with λ-sweep analysis records: MuDSC's joint accuracy against λ.

    One colour per MuDSC method (solver): the test-set curve with a mean ± std band over model pairs, the
    merge-slice curve dashed, and stars at the λ chosen on the merge slice. The plotted numbers go to
    `lambda_<dataset>_<arch>.csv` next to the figure, so that the text can quote them.
    """
    sweeps: dict[tuple[str, str], dict[str, list[Mapping[str, Any]]]] = {}
    for record in data.analysis:
        if record.get("kind") == "lambda_sweep":
            key = (record["dataset"], record["arch"])
            sweeps.setdefault(key, {}).setdefault(record["method"], []).append(record)
    ranks = dict(zip(data.frame["method"], data.frame["method_rank"], strict=True))
    artifacts = []
    for (dataset, arch), by_method in sorted(sweeps.items()):
        methods = sorted(by_method, key=lambda method: (ranks.get(method, math.inf), method))
        table = pd.concat([_lambda_table(dataset, arch, by_method[method]) for method in methods], ignore_index=True)
        stem = out_dir / "figures" / f"lambda_{slug(dataset)}_{slug(arch)}"
        with matplotlib.rc_context(fname=RC_FILE):
            pdf, png = save_figure(_lambda_curves(table), stem)
        csv = stem.parent / f"{stem.name}.csv"
        with atomic_open(csv) as handle:
            table.to_csv(handle, index=False, lineterminator="\n")
        first = by_method[methods[0]][0]
        grid = table.loc[table["selectable"], "lam"]
        pairs = pairs_phrase(table.groupby("method")["n_pairs"].first())
        caption = (
            rf"{latex_escape(dataset)}, {latex_escape(first['arch_label'])}: joint accuracy (\%) of MuDSC against "
            r"$\lambda$, the activation share of the unit similarity (0: weight only, 1: activation only). "
            rf"Solid lines and bands: test set, {pairs}; dashed lines: the merge slice that $\lambda$ is chosen "
            r"on; stars: the $\lambda$ that a model pair chose there"
            + (f" (candidates {grid.min():g} to {grid.max():g})." if len(grid) else ".")
        )
        label = f"fig:lambda-{slug(dataset)}-{slug(arch)}"
        artifacts.append(Artifact("figure", dataset, pdf, (pdf, png, csv), caption, label))
    return artifacts


LAMBDA_COLUMNS = (
    "dataset",
    "arch",
    "method",
    "label",
    "solver",
    "lam",
    "selectable",
    "n_pairs",
    "test_joint_mean",
    "test_joint_std",
    "test_joint_n",
    "merge_joint_mean",
    "merge_joint_std",
    "merge_joint_n",
    "chosen_pairs",
)
"""Columns of a λ figure's CSV: accuracies as fractions (like results.csv), std over pairs (ddof=1), and how
many model pairs chose each λ on the merge slice."""


def _lambda_table(dataset: str, arch: str, records: list[Mapping[str, Any]]) -> pd.DataFrame:
    """One method's sweep records (one per pair) as one row per λ, in LAMBDA_COLUMNS."""
    records = sorted(records, key=lambda record: record["pair"])
    pairs = [record["pair"] for record in records]
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"duplicate λ sweep record for {dataset}/{arch}/{records[0]['method']}")
    by_lam: dict[float, dict[str, Any]] = {}
    for record in records:
        for point in record["points"]:
            lam = float(point["lam"])
            entry = by_lam.setdefault(lam, {"selectable": set(), "test": [], "merge": []})
            entry["selectable"].add(bool(point["selectable"]))
            entry["test"].append(_number(point["test"]["joint"]))
            entry["merge"].append(_number(point["merge"]["joint"]))
    chosen = [float(record["chosen"]) for record in records if record.get("chosen") is not None]
    rows = []
    for lam in sorted(by_lam):
        entry = by_lam[lam]
        if len(entry["selectable"]) > 1:
            raise ValueError(
                f"λ sweep records for {dataset}/{arch}/{records[0]['method']} disagree on whether λ {lam:g} "
                "is a candidate"
            )
        rows.append(
            {
                "dataset": dataset,
                "arch": arch,
                "method": records[0]["method"],
                "label": records[0]["label"],
                "solver": records[0].get("solver", ""),
                "lam": lam,
                "selectable": entry["selectable"].pop(),
                "n_pairs": len(records),
                **_stats("test_joint", entry["test"]),
                **_stats("merge_joint", entry["merge"]),
                "chosen_pairs": sum(value == lam for value in chosen),
            }
        )
    return pd.DataFrame(rows, columns=list(LAMBDA_COLUMNS))


def _stats(name: str, values: list[float]) -> dict[str, float | int]:
    """Mean, sample std (ddof=1, NaN below two values) and count of the non-null values, as aggregate() does."""
    array = np.array(values, dtype=float)
    array = array[~np.isnan(array)]
    return {
        f"{name}_mean": array.mean() if len(array) else np.nan,
        f"{name}_std": array.std(ddof=1) if len(array) > 1 else np.nan,
        f"{name}_n": len(array),
    }


def _number(value: Any) -> float:
    return np.nan if value is None else float(value)


def _lambda_curves(table: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(SINGLE_COLUMN_IN, matplotlib.rcParams["figure.figsize"][1]))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    legend = []
    for j, (_, curve) in enumerate(table.groupby("method", sort=False)):
        colour = colours[j % len(colours)]
        lam = curve["lam"].to_numpy()
        test = 100 * curve["test_joint_mean"].to_numpy()
        spread = 100 * curve["test_joint_std"].fillna(0).to_numpy()
        ax.fill_between(lam, test - spread, test + spread, color=colour, alpha=0.2, linewidth=0)
        ax.plot(lam, test, color=colour, marker="o", markersize=2)
        ax.plot(lam, 100 * curve["merge_joint_mean"].to_numpy(), color=colour, linestyle="--")
        chosen = curve[curve["chosen_pairs"] > 0]
        ax.plot(
            chosen["lam"],
            100 * chosen["test_joint_mean"],
            linestyle="none",
            marker="*",
            markersize=7,
            color=colour,
            markeredgecolor="black",
            markeredgewidth=0.4,
        )
        legend.append(Line2D([], [], color=colour, label=curve["label"].iloc[0]))
    legend += [
        Line2D([], [], color="black", label="test set"),
        Line2D([], [], color="black", linestyle="--", label="merge slice"),
        Line2D([], [], color="black", linestyle="none", marker="*", markersize=7, label="chosen λ"),
    ]
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("λ (0 = weight only, 1 = activation only)")
    ax.set_ylabel("Joint accuracy (%)")
    ax.legend(handles=legend, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(legend), 3))
    return fig


OFF_PLANE_TOLERANCE = 1e-3
"""Relative distance from the plane (in units of |B - A|) below which a point counts as on it."""
_LOSS_DECADES = 3
"""The colour scale spans at most this many decades above the lowest loss, so low-loss basins keep their
contrast; higher losses share the top colour."""
_POINT_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def landscape_figures(data: ReportData, out_dir: Path) -> list[Artifact]:
    """Per landscape analysis record (one dataset and architecture): each task's loss on a plane through
    three models, as filled contours on a log colour scale, with every marked model at its (projected) place.
    """
    records: dict[tuple[str, str], Mapping[str, Any]] = {}
    for record in data.analysis:
        if record.get("kind") == "landscape":
            key = (record["dataset"], record["arch"])
            if key in records:
                raise ValueError(f"more than one landscape record for {key[0]}/{key[1]}")
            records[key] = record
    artifacts = []
    for (dataset, arch), record in sorted(records.items()):
        with matplotlib.rc_context(fname=RC_FILE):
            pdf, png = save_figure(
                _landscape_panels(record), out_dir / "figures" / f"landscape_{slug(dataset)}_{slug(arch)}"
            )
        label = f"fig:landscape-{slug(dataset)}-{slug(arch)}"
        artifacts.append(Artifact("figure", dataset, pdf, (pdf, png), _landscape_caption(record), label))
    return artifacts


def _landscape_caption(record: Mapping[str, Any]) -> str:
    labels = {point["method"]: point["label"] for point in record["points"]}
    plane = record["plane"]
    origin, u, v = (latex_escape(labels.get(plane[axis], plane[axis])) for axis in ("origin", "u", "v"))
    tasks = " and ".join(f"task {latex_escape(task)}" for task in record["loss"])
    off = [point for point in record["points"] if point["off_plane"] > OFF_PLANE_TOLERANCE]
    if off:
        where = (
            "Hollow markers lie off the plane and are drawn at their projection: "
            + "; ".join(f"{latex_escape(point['label'])} at distance {point['off_plane']:.2g}" for point in off)
            + r" (relative to $|B - A|$). All other points lie on the plane."
        )
    else:
        where = "All marked points lie on the plane."
    reset = (
        "after resetting the BatchNorm statistics of every model on the plane on the merge slice"
        if record.get("bn_reset")
        else "without a BatchNorm reset (the models have no BatchNorm)"
    )
    return (
        rf"{latex_escape(record['dataset'])}, {latex_escape(record['arch_label'])}: loss landscape ({tasks}) of "
        f"model pair {latex_escape(record['pair'])} on the plane through {origin} (origin), {u} and {v}; "
        r"coordinates in units of $|B - A|$. Each panel: mean cross-entropy of that task's head on that task's "
        f"images, {reset}, on a log colour scale. Images: {latex_escape(record['images'])}. {where}"
    )


def _landscape_panels(record: Mapping[str, Any]) -> Figure:
    tasks = list(record["loss"])
    x = np.array(record["x"], dtype=float)
    y = np.array(record["y"], dtype=float)
    losses = {task: np.array(record["loss"][task], dtype=float) for task in tasks}
    for task, loss in losses.items():
        if loss.shape != (len(y), len(x)):
            raise ValueError(f"landscape loss of task {task} has shape {loss.shape}, expected {(len(y), len(x))}")
    finite = np.concatenate([loss[np.isfinite(loss) & (loss > 0)] for loss in losses.values()])
    if not len(finite):
        raise ValueError(f"landscape of {record['dataset']}/{record['arch']} has no positive finite loss")
    low = float(finite.min())
    high = float(min(finite.max(), low * 10**_LOSS_DECADES))
    if high <= low * 1.01:
        high = low * 10
    levels = np.geomspace(low, high, 16)
    norm = LogNorm(low, high)

    points = record["points"]
    xs = [*x, *(point["x"] for point in points)]
    ys = [*y, *(point["y"] for point in points)]
    margin = 0.03 * max(max(xs) - min(xs), max(ys) - min(ys))
    xlim = (min(xs) - margin, max(xs) + margin)
    ylim = (min(ys) - margin, max(ys) + margin)
    # Equal axis scales keep the plane's geometry; size the figure to the panels so no blank band remains.
    width = DOUBLE_COLUMN_IN if len(tasks) > 1 else SINGLE_COLUMN_IN
    panel = (width - 0.9) / len(tasks)
    height = min(max(panel * (ylim[1] - ylim[0]) / (xlim[1] - xlim[0]) + 1.1, 1.8), 6.0)
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(tasks), squeeze=False, sharex=True, sharey=True)[0]
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    for ax, task in zip(axes, tasks, strict=True):
        # Losses outside the colour range are clamped, not masked, so the plane has no holes.
        contours = ax.contourf(
            x, y, np.clip(losses[task], low, high), levels=levels, norm=norm, cmap="viridis", extend="neither"
        )
        for i, point in enumerate(points):
            off = point["off_plane"] > OFF_PLANE_TOLERANCE
            colour = "white" if i == 0 else colours[(i - 1) % len(colours)]
            name = point["label"] + (f" (off plane by {point['off_plane']:.2g} |B − A|)" if off else "")
            (handle,) = ax.plot(
                point["x"],
                point["y"],
                linestyle="none",
                marker=_POINT_MARKERS[i % len(_POINT_MARKERS)],
                markersize=5,
                markerfacecolor="none" if off else colour,
                markeredgecolor="white" if off else "black",
                markeredgewidth=0.9 if off else 0.5,
                label=name,
                zorder=3,
            )
            if off:
                # A white outline in a black halo stays visible on every colour of the map.
                handle.set_path_effects([patheffects.withStroke(linewidth=2.0, foreground="black")])
            if ax is axes[0]:
                handles.append(handle)
        ax.set_title(f"Task {task} loss")
        ax.set_xlabel("x (units of |B − A|)")
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_aspect("equal", adjustable="box")
        ax.grid(False)
    axes[0].set_ylabel("y (units of |B − A|)")
    colourbar = fig.colorbar(contours, ax=list(axes), pad=0.02)
    colourbar.set_label("Cross-entropy (log scale)")
    colourbar.ax.minorticks_off()
    # Plain 1-2-5 tick labels: the rc file turns mathtext off, so matplotlib's 10^x labels would print raw.
    ticks = [
        mantissa * 10.0**exponent
        for exponent in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
        for mantissa in (1, 2, 5)
        if low <= mantissa * 10.0**exponent <= high
    ]
    colourbar.set_ticks(ticks, labels=[f"{tick:g}" for tick in ticks])
    fig.legend(handles=handles, loc="outside upper center", ncol=min(len(handles), 4))
    return fig


STRATEGY_STYLES = {
    "segment": ("SMA (segment)", "#0072B2", "o"),
    "layer": ("LMA", "#E69F00", "s"),
    "layer_code": ("LMA (code)", "#009E73", "^"),
    "head": ("head", "#D55E00", "v"),
    "uniform": ("uniform", "#CC79A7", "D"),
    "head_tail": ("head–tail", "#56B4E9", "P"),
}
"""Readable name, colour and marker of each depth-alignment strategy, fixed so that every figure agrees."""
_OTHER_STYLES = (("#000000", "X"), ("#F0E442", "h"), ("#000000", "<"), ("#F0E442", ">"))


@dataclass(frozen=True)
class AlignmentCurve:
    """One distinct alignment drawn on the CKA map: its strategy, legend name, the (global) points
    (shallow block, deep position) per stage, and the rows (methods) that produced it."""

    strategy: str
    name: str
    stages: tuple[tuple[tuple[int, int], ...], ...]
    methods: tuple[str, ...]


def stage_offsets(blocks: Sequence[int]) -> list[int]:
    """Global index of each stage's first block, given the blocks per stage."""
    return [int(sum(blocks[:i])) for i in range(len(blocks))]


def global_positions(
    positions: Sequence[Sequence[int]], deep_blocks: Sequence[int], shallow_blocks: Sequence[int]
) -> list[list[tuple[int, int]]]:
    """Per stage, the (shallow block, deep block) pairs of an alignment in global indices (stages concatenated,
    as in the CKA matrix): shallow block k of stage s sits at deep position `positions[s][k]` of that stage.

    Raises ValueError for positions that do not fit the stages (wrong count, not strictly increasing or
    beyond the stage), since they would be drawn in the wrong place.
    """
    if not len(positions) == len(deep_blocks) == len(shallow_blocks):
        raise ValueError(
            f"alignment has {len(positions)} stages of positions, {len(deep_blocks)} deep and "
            f"{len(shallow_blocks)} shallow stages"
        )
    deep_start, shallow_start = stage_offsets(deep_blocks), stage_offsets(shallow_blocks)
    points = []
    for s, stage in enumerate(positions):
        stage = [int(p) for p in stage]
        if len(stage) != shallow_blocks[s] or any(b <= a for a, b in itertools.pairwise(stage)):
            raise ValueError(f"stage {s} positions {stage} are not {shallow_blocks[s]} strictly increasing positions")
        if stage and not 0 <= stage[0] <= stage[-1] < deep_blocks[s]:
            raise ValueError(f"stage {s} positions {stage} lie outside its {deep_blocks[s]} deep blocks")
        points.append([(shallow_start[s] + k, deep_start[s] + p) for k, p in enumerate(stage)])
    return points


def alignment_curves(rows: Sequence[Mapping[str, Any]]) -> list[AlignmentCurve]:
    """The distinct (strategy, positions) among one model pair's hetero records, in the given row order.

    Rows that differ only in their solver share an alignment and give one curve. A strategy that appears with
    different positions (e.g. rows merged on differently computed similarities) gets a curve per alignment,
    its legend name then followed by the rows' labels.
    """
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        notes = row["source"]["notes"]
        strategy = str(row["source"].get("params", {}).get("strategy", "segment"))
        stages = global_positions(notes["positions"], notes["deep_blocks"], notes["shallow_blocks"])
        key = (strategy, json.dumps(stages))
        entry = found.setdefault(key, {"stages": stages, "methods": [], "labels": []})
        entry["methods"].append(row["method"])
        entry["labels"].append(row["label"])
    per_strategy = Counter(strategy for strategy, _ in found)
    curves = []
    for (strategy, _), entry in found.items():
        name = STRATEGY_STYLES.get(strategy, (strategy,))[0]
        if per_strategy[strategy] > 1:
            name += f" ({', '.join(entry['labels'])})"
        stages = tuple(tuple(stage) for stage in entry["stages"])
        curves.append(AlignmentCurve(strategy, name, stages, tuple(entry["methods"])))
    return curves


def alignment_figures(data: ReportData, out_dir: Path) -> list[Artifact]:
    """Per dataset and architecture with heterogeneous-merging rows (`source.method` "hetero"), for the first
    model pair: the CKA between the deeper model's blocks (y) and the shallower one's (x) as a heat map with
    the stage boundaries, and the alignment of every strategy drawn on it.
    """
    ranks = dict(zip(data.frame["method"], data.frame["method_rank"], strict=True))
    by_experiment: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for record in data.records:
        if (record.get("source") or {}).get("method") == "hetero":
            by_experiment.setdefault((record["dataset"], record["arch"]), []).append(record)
    artifacts = []
    for (dataset, arch), records in sorted(by_experiment.items()):
        pair = min(record["pair"] for record in records)
        rows = sorted(
            (record for record in records if record["pair"] == pair),
            key=lambda record: (ranks.get(record["method"], math.inf), record["method"]),
        )
        first = rows[0]
        notes = first["source"]["notes"]
        for row in rows[1:]:
            other = row["source"]["notes"]
            if any(other[field] != notes[field] for field in ("deep_model", "deep_blocks", "shallow_blocks")):
                raise ValueError(
                    f"hetero rows of {dataset}/{arch} pair {pair} disagree on which model is deeper or on its "
                    f"stages ({first['method']} vs {row['method']})"
                )
        curves = alignment_curves(rows)
        names = _model_names(first)
        deep, shallow = names[notes["deep_model"]], names[1 - notes["deep_model"]]
        with matplotlib.rc_context(fname=RC_FILE):
            fig = _alignment_map(notes, curves, deep, shallow)
            pdf, png = save_figure(fig, out_dir / "figures" / f"alignment_{slug(dataset)}_{slug(arch)}")
        caption = (
            rf"{latex_escape(dataset)}, {latex_escape(first['arch_label'])}: depth alignment of model pair "
            f"{latex_escape(pair)}. Heat map: minibatch linear CKA on the merge slice between the output of every "
            f"block of the deeper model ({latex_escape(deep)}, y axis) and of the shallower one "
            f"({latex_escape(shallow)}, x axis); lines mark the stage boundaries, tick labels count blocks "
            "within their stage. Markers: the deep block at which each strategy places every shallow block "
            "(positions without one become identity blocks); rows that differ only in their solver share one "
            "alignment."
        )
        if len(curves) > 1:
            caption += " Strategies are shifted slightly sideways so that coinciding alignments stay visible."
        label = f"fig:alignment-{slug(dataset)}-{slug(arch)}"
        artifacts.append(Artifact("figure", dataset, pdf, (pdf, png), caption, label))
    return artifacts


def _model_names(record: Mapping[str, Any]) -> list[str]:
    """Names of the two models as the base rows label them: model i was trained on the record's i-th task."""
    tasks = list(record.get("tasks") or record["metrics"]["tasks"])
    return [f"Model {task}" for task in tasks] if len(tasks) == 2 else ["Model 1", "Model 2"]


def _strategy_style(strategy: str, others: dict[str, tuple[str, str]]) -> tuple[str, str]:
    if strategy in STRATEGY_STYLES:
        return STRATEGY_STYLES[strategy][1:]
    return others.setdefault(strategy, _OTHER_STYLES[len(others) % len(_OTHER_STYLES)])


def _alignment_map(notes: Mapping[str, Any], curves: Sequence[AlignmentCurve], deep: str, shallow: str) -> Figure:
    deep_blocks = [int(n) for n in notes["deep_blocks"]]
    shallow_blocks = [int(n) for n in notes["shallow_blocks"]]
    cka = np.array(notes["cka"], dtype=float)
    if cka.shape != (sum(deep_blocks), sum(shallow_blocks)):
        raise ValueError(f"CKA matrix has shape {cka.shape}, expected {(sum(deep_blocks), sum(shallow_blocks))}")
    n_deep, n_shallow = cka.shape
    # Square cells; the height follows the depth ratio, within what a page holds.
    axes_width = SINGLE_COLUMN_IN - 1.0
    height = min(max(axes_width * n_deep / n_shallow + 0.7, 2.2), 6.0)
    fig = Figure(figsize=(SINGLE_COLUMN_IN, height), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # Greys up to a mid grey only, so that coloured markers stay visible on the most similar blocks.
    greys = ListedColormap(matplotlib.colormaps["Greys"](np.linspace(0.0, 0.7, 256)))
    image = ax.imshow(cka, cmap=greys, vmin=0.0, vmax=1.0, origin="lower", interpolation="nearest", aspect="equal")
    for start in stage_offsets(deep_blocks)[1:]:
        ax.axhline(start - 0.5, color="black", linewidth=0.6)
    for start in stage_offsets(shallow_blocks)[1:]:
        ax.axvline(start - 0.5, color="black", linewidth=0.6)

    others: dict[str, tuple[str, str]] = {}
    handles = []
    shift = 0.12 if len(curves) > 1 else 0.0
    for j, curve in enumerate(curves):
        colour, marker = _strategy_style(curve.strategy, others)
        dx = (j - (len(curves) - 1) / 2) * shift
        xs: list[float] = []
        ys: list[float] = []
        for stage in curve.stages:
            # A gap between stages: each stage is aligned on its own.
            xs += [x + dx for x, _ in stage] + [math.nan]
            ys += [y for _, y in stage] + [math.nan]
        (handle,) = ax.plot(
            xs,
            ys,
            color=colour,
            marker=marker,
            markersize=3.5,
            markeredgecolor="black",
            markeredgewidth=0.3,
            linewidth=0.8,
            label=curve.name,
        )
        handles.append(handle)

    ax.set_xticks(range(n_shallow), [str(k) for n in shallow_blocks for k in range(n)])
    ax.set_yticks(range(n_deep), [str(k) for n in deep_blocks for k in range(n)])
    ax.tick_params(length=0)
    ax.set_xlim(-0.5, n_shallow - 0.5)
    ax.set_ylim(-0.5, n_deep - 0.5)
    ax.grid(False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(True)
    ax.set_xlabel(f"Block of the shallower model ({shallow}), per stage")
    ax.set_ylabel(f"Block of the deeper model ({deep}), per stage")
    colourbar = fig.colorbar(image, ax=ax, pad=0.02, shrink=0.8)
    colourbar.set_label("Linear CKA")
    if handles:
        fig.legend(handles=handles, loc="outside upper center", ncol=min(len(handles), 3))
    return fig
