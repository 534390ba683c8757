"""Depth alignment of an experiment's first model pair: the CKA between the blocks of the deeper model (x) and
the shallower one (y) as a heat map, with the deep block at which each row's strategy places every shallow block.

The deeper model runs along x so that the figure is wide rather than tall (`snakemake --report` cuts off the
top of tall figures); the legend sits beside the map. The colour scale spans the data's range, since CKA
values of trained networks crowd into a narrow band that a 0–1 scale would wash out.
"""

from __future__ import annotations

import itertools
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.legend import Legend

from hetmerge.report.data import ReportData, dataset_label, slug
from hetmerge.report.figures import (
    COLOURS,
    MARKERS,
    PAD_IN,
    TEXT_WIDTH_IN,
    experiment_figure_outputs,
    experiments_with,
    figure_style,
    first_analysis,
    new_figure,
    place,
    reach,
    save_figure,
    spec_row,
)
from hetmerge.report.latex import Artifact, latex_escape
from hetmerge.report.layout import Layout, Output, register_layout

ANALYSIS = "alignment"
STRATEGY_PARAM = "strategy"
"""The row param that names which of the alignment's strategies the row merges with."""
# Light to mid grey only, so that coloured markers stay visible on the most similar blocks.
_GREYS = ListedColormap(matplotlib.colormaps["Greys"](np.linspace(0.02, 0.72, 256)))
_LEGEND_CHARS = 40
"""Legend entries wrap at this many characters, so that long row labels leave room for the map."""
_CELL_IN = 0.3
_GAP_IN = 0.1
"""Between the map, the colour bar and the legend."""
_BAR_IN = 0.12
"""Width of the colour bar."""


def stem(experiment: Mapping[str, Any]) -> str:
    return f"alignment_{slug(experiment['key'])}"


@dataclass(frozen=True)
class AlignmentCurve:
    """One strategy drawn on the map: its legend name, style index and (deep, shallow) points per stage."""

    name: str
    style: int
    stages: tuple[tuple[tuple[int, int], ...], ...]


def stage_offsets(blocks: Sequence[int]) -> list[int]:
    """Global index of each stage's first block, given the blocks per stage."""
    return [int(sum(blocks[:i])) for i in range(len(blocks))]


def global_positions(
    positions: Sequence[Sequence[int]], deep_blocks: Sequence[int], shallow_blocks: Sequence[int]
) -> list[list[tuple[int, int]]]:
    """Per stage, the (deep block, shallow block) pairs of an alignment in global indices (stages concatenated,
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
        points.append([(deep_start[s] + p, shallow_start[s] + k) for k, p in enumerate(stage)])
    return points


def alignment_curves(experiment: Mapping[str, Any], alignment: Mapping[str, Any], path: str) -> list[AlignmentCurve]:
    """One curve per strategy that the analysis' rows use (rows of one strategy, e.g. differing only in their
    solver, share it), in row order; the style follows the strategy's place in the alignment file, so every
    alignment figure of a run draws a strategy alike."""
    strategies = list(alignment["strategies"])
    rows: dict[str, list[str]] = {}
    for key in experiment["analyses"][ANALYSIS]["rows"]:
        row = spec_row(experiment, key)
        strategy = (row.get("params") or {}).get(STRATEGY_PARAM)
        if strategy not in alignment["strategies"]:
            raise ValueError(
                f"row {key!r} of {experiment['key']!r} merges with {STRATEGY_PARAM} {strategy!r}, which alignment "
                f"{path} does not have (it has {strategies})"
            )
        rows.setdefault(strategy, []).append(row["label"])
    curves = []
    for strategy, labels in rows.items():
        try:
            stages = global_positions(
                alignment["strategies"][strategy]["positions"], alignment["deep_blocks"], alignment["shallow_blocks"]
            )
        except ValueError as err:
            raise ValueError(f"alignment {path}, {STRATEGY_PARAM} {strategy!r}: {err}") from None
        name = textwrap.fill(f"{strategy}: {'; '.join(labels)}", _LEGEND_CHARS, subsequent_indent="  ")
        curves.append(AlignmentCurve(name, strategies.index(strategy), tuple(tuple(stage) for stage in stages)))
    return curves


def cka_limits(cka: np.ndarray) -> tuple[float, float]:
    """The colour range: the finite values' range (widened where they are all equal)."""
    finite = cka[np.isfinite(cka)]
    if not len(finite):
        raise ValueError("the CKA matrix has no finite value")
    low, high = float(finite.min()), float(finite.max())
    return (low - 0.05, high + 0.05) if high - low < 1e-6 else (low, high)


def alignment_figure(
    alignment: Mapping[str, Any], curves: Sequence[AlignmentCurve], deep: str, shallow: str, path: str
) -> Figure:
    deep_blocks = [int(n) for n in alignment["deep_blocks"]]
    shallow_blocks = [int(n) for n in alignment["shallow_blocks"]]
    cka = np.array(alignment["cka"], dtype=float)
    if cka.shape != (sum(deep_blocks), sum(shallow_blocks)):
        raise ValueError(
            f"alignment {path}: CKA matrix has shape {cka.shape}, expected {(sum(deep_blocks), sum(shallow_blocks))}"
        )
    n_deep, n_shallow = cka.shape
    fig = new_figure(TEXT_WIDTH_IN, TEXT_WIDTH_IN / 2, layout=None)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))  # placed by _place once its labels are drawn
    low, high = cka_limits(cka)
    image = ax.imshow(cka.T, cmap=_GREYS, vmin=low, vmax=high, origin="lower", interpolation="nearest", aspect="auto")
    for start in stage_offsets(deep_blocks)[1:]:
        ax.axvline(start - 0.5, color="black", linewidth=0.6)
    for start in stage_offsets(shallow_blocks)[1:]:
        ax.axhline(start - 0.5, color="black", linewidth=0.6)

    handles = []
    shift = 0.12 if len(curves) > 1 else 0.0
    for j, curve in enumerate(curves):
        colour, marker = COLOURS[curve.style % len(COLOURS)], MARKERS[curve.style % len(MARKERS)]
        dy = (j - (len(curves) - 1) / 2) * shift
        # A gap between stages: each stage is aligned on its own.
        xs = [x for stage in curve.stages for x in [*(x for x, _ in stage), math.nan]]
        ys = [y for stage in curve.stages for y in [*(y + dy for _, y in stage), math.nan]]
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

    ax.set_xticks(range(n_deep), [str(k) for n in deep_blocks for k in range(n)])
    ax.set_yticks(range(n_shallow), [str(k) for n in shallow_blocks for k in range(n)])
    ax.tick_params(length=0)
    ax.set_xlim(-0.5, n_deep - 0.5)
    ax.set_ylim(-0.5, n_shallow - 0.5)
    ax.grid(False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(True)
    ax.set_xlabel(f"Block of the deeper model ({deep}), per stage")
    ax.set_ylabel(f"Block of the shallower\nmodel ({shallow}), per stage")
    colourbar = fig.colorbar(image, cax=fig.add_axes((0.0, 0.0, 1.0, 1.0)))
    colourbar.set_label("Linear CKA")
    legend = (
        fig.legend(handles=handles, loc="center left", title="Strategy: rows", alignment="left") if handles else None
    )
    _place(fig, ax, colourbar.ax, legend, n_deep, n_shallow)
    return fig


def _place(fig: Figure, ax: Axes, bar: Axes, legend: Legend | None, n_deep: int, n_shallow: int) -> None:
    """Square cells as large as the text width (less labels, colour bar and legend) allows, up to _CELL_IN, the
    figure no wider than its content and no taller than wide."""
    fig.canvas.draw()
    inches = fig.dpi_scale_trans.inverted()
    around, bar_reach = reach(ax), reach(bar)
    legend_size = legend.get_window_extent().transformed(inches).size if legend else np.zeros(2)
    fixed_width = 2 * PAD_IN + around.left + 2 * _GAP_IN + _BAR_IN + bar_reach.right + legend_size[0]
    fixed_height = 2 * PAD_IN + around.bottom + around.top
    widest = (TEXT_WIDTH_IN - fixed_width) / n_deep
    cell = min(widest, (TEXT_WIDTH_IN - fixed_height) / n_shallow, _CELL_IN)
    # Few blocks: grow the cells until the axes are as long as their labels (where the width allows); a label
    # still longer than its axis overhangs it on both ends, so keep room for the overhang.
    label_x = ax.xaxis.label.get_window_extent().transformed(inches).width
    label_y = ax.yaxis.label.get_window_extent().transformed(inches).height
    cell = max(cell, min(widest, label_x / n_deep, label_y / n_shallow))
    overhang_x = max(0.0, label_x - cell * n_deep) / 2
    overhang_y = max(0.0, label_y - cell * n_shallow) / 2
    width = fixed_width + cell * n_deep + 2 * overhang_x
    height = max(fixed_height + cell * n_shallow + 2 * overhang_y, 2 * PAD_IN + legend_size[1])
    fig.set_size_inches(width, height)
    x0 = PAD_IN + around.left + overhang_x
    y0 = (height - fixed_height - cell * n_shallow) / 2 + PAD_IN + around.bottom
    place(ax, (x0, y0, cell * n_deep, cell * n_shallow))
    place(bar, (x0 + cell * n_deep + _GAP_IN, y0, _BAR_IN, cell * n_shallow))
    if legend is not None:
        anchor = (width - PAD_IN - legend_size[0]) / width, (y0 + cell * n_shallow / 2) / height
        legend.set_bbox_to_anchor(anchor, transform=fig.transFigure)


@register_layout
class AlignmentFigure(Layout):
    """Per experiment with depth-aligned rows: the CKA map and the alignments of its first seed."""

    name = "alignment_figure"

    def outputs(self, spec: Mapping[str, Any]) -> list[Output]:
        return experiment_figure_outputs(spec, ANALYSIS, stem, "alignment.rst", "Depth alignment")

    def write(self, data: ReportData, out_dir: Path) -> list[Artifact]:
        section = dataset_label(data.spec)
        artifacts = []
        for experiment in experiments_with(data.spec, ANALYSIS):
            seed, path, alignment = first_analysis(data, experiment, ANALYSIS)
            curves = alignment_curves(experiment, alignment, path)
            names = experiment["model_labels"]
            deep_model = int(alignment["deep_model"])
            deep, shallow = names[deep_model], names[1 - deep_model]
            with figure_style():
                fig = alignment_figure(alignment, curves, deep, shallow, path)
                pdf, png = save_figure(fig, out_dir, stem(experiment))
            caption = (
                rf"{latex_escape(section)}, {latex_escape(experiment['label'])}: depth alignment of the model pair "
                f"of seed {latex_escape(seed)}. Heat map: minibatch linear CKA on the merge slice between the output "
                f"of every block of the deeper model ({latex_escape(deep)}, x axis) and of the shallower one "
                f"({latex_escape(shallow)}, y axis), its grey scale spanning the values' range; lines mark the stage "
                "boundaries, tick labels count blocks within their stage. Markers: the deep block at which each "
                "strategy places every shallow block (positions without one become identity blocks); rows that "
                "share a strategy share one alignment."
            )
            if len(curves) > 1:
                caption += " Strategies are shifted slightly apart so that coinciding alignments stay visible."
            label = f"fig:alignment-{slug(experiment['key'])}"
            artifacts.append(Artifact("figure", section, pdf, (pdf, png), caption, label))
        return artifacts
