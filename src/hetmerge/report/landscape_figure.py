"""Loss landscape of an experiment's first model pair: each task's loss on the plane through the two base
models and a merge, as filled contours on a log colour scale, with every marked model at its (projected) place.

One panel per task side by side at text width (colour bar and legend included), each with equal axis scales
so that the plane's geometry is kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
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
    legend_columns,
    new_figure,
    place,
    reach,
    save_figure,
    spec_row,
)
from hetmerge.report.latex import Artifact, latex_escape
from hetmerge.report.layout import Layout, Output, register_layout

ANALYSIS = "landscape"
OFF_PLANE_TOLERANCE = 1e-3
"""Relative distance from the plane (in units of |B - A|) below which a point counts as on it."""
LOSS_DECADES = 3
"""The colour scale spans at most this many decades above the lowest loss, so low-loss basins keep their
contrast; higher losses share the top colour."""
_GAP_IN = 0.12
"""Between panels, before the colour bar and below the legend."""
_BAR_IN = 0.12
"""Width of the colour bar."""


def stem(experiment: Mapping[str, Any]) -> str:
    return f"landscape_{slug(experiment['key'])}"


def _labels(experiment: Mapping[str, Any], landscape: Mapping[str, Any], path: str) -> dict[str, str]:
    """Row labels of every model the landscape names (plane axes and points)."""
    keys = [*landscape["plane"].values(), *(point["method"] for point in landscape["points"])]
    try:
        return {key: spec_row(experiment, key)["label"] for key in keys}
    except ValueError as err:
        raise ValueError(f"landscape {path}: {err}") from None


def landscape_figure(landscape: Mapping[str, Any], labels: Mapping[str, str], path: str) -> Figure:
    tasks = list(landscape["loss"])
    x = np.array(landscape["x"], dtype=float)
    y = np.array(landscape["y"], dtype=float)
    losses = {task: np.array(landscape["loss"][task], dtype=float) for task in tasks}
    for task, loss in losses.items():
        if loss.shape != (len(y), len(x)):
            raise ValueError(
                f"landscape {path}: loss of task {task} has shape {loss.shape}, expected {(len(y), len(x))}"
            )
    finite = np.concatenate([loss[np.isfinite(loss) & (loss > 0)] for loss in losses.values()])
    if not len(finite):
        raise ValueError(f"landscape {path} has no positive finite loss")
    low = float(finite.min())
    high = float(min(finite.max(), low * 10**LOSS_DECADES))
    if high <= low * 1.01:
        high = low * 10
    norm = LogNorm(low, high)

    points = landscape["points"]
    xs = [*x, *(point["x"] for point in points)]
    ys = [*y, *(point["y"] for point in points)]
    margin = 0.03 * max(max(xs) - min(xs), max(ys) - min(ys))
    xlim = (min(xs) - margin, max(xs) + margin)
    ylim = (min(ys) - margin, max(ys) + margin)
    fig = new_figure(TEXT_WIDTH_IN, TEXT_WIDTH_IN / 2, layout=None)
    axes = [fig.add_axes((0.0, 0.0, 1.0, 1.0)) for _ in tasks]  # placed by _place once their labels are drawn
    for ax in axes[1:]:
        ax.sharex(axes[0])
        ax.sharey(axes[0])
        ax.tick_params(labelleft=False)
    handles = []
    for ax, task in zip(axes, tasks, strict=True):
        # Losses outside the colour range are clamped, not masked, so the plane has no holes.
        contours = ax.contourf(
            x, y, np.clip(losses[task], low, high), levels=np.geomspace(low, high, 16), norm=norm, cmap="viridis"
        )
        for i, point in enumerate(points):
            off = point["off_plane"] > OFF_PLANE_TOLERANCE
            colour = "white" if i == 0 else COLOURS[(i - 1) % len(COLOURS)]
            name = labels[point["method"]] + (f" (off plane by {point['off_plane']:.2g} |B − A|)" if off else "")
            (handle,) = ax.plot(
                point["x"],
                point["y"],
                linestyle="none",
                marker=MARKERS[i % len(MARKERS)],
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
        ax.grid(False)
    axes[0].set_ylabel("y (units of |B − A|)")
    colourbar = fig.colorbar(contours, cax=fig.add_axes((0.0, 0.0, 1.0, 1.0)))
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
    columns = legend_columns([handle.get_label() for handle in handles], TEXT_WIDTH_IN, 3)
    legend = fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1.0), ncol=columns)
    _place(fig, axes, colourbar.ax, legend, (ylim[1] - ylim[0]) / (xlim[1] - xlim[0]))
    return fig


def _place(fig: Figure, axes: list[Axes], bar: Axes, legend: Legend, ratio: float) -> None:
    """Panels side by side with equal axis scales (height = `ratio` x width), the colour bar right of them and
    the legend above, as wide as the text allows and no taller than wide."""
    fig.canvas.draw()
    inches = fig.dpi_scale_trans.inverted()
    left = reach(axes[0]).left
    bottom = max(reach(ax).bottom for ax in axes)
    top = max(reach(ax).top for ax in axes) + legend.get_window_extent().transformed(inches).height + _GAP_IN
    right = reach(bar).right
    fixed_width = 2 * PAD_IN + left + _GAP_IN * len(axes) + _BAR_IN + right
    width = (TEXT_WIDTH_IN - fixed_width) / len(axes)
    height = min(width * ratio, TEXT_WIDTH_IN - 2 * PAD_IN - bottom - top)
    width = height / ratio
    total = (TEXT_WIDTH_IN, 2 * PAD_IN + bottom + height + top)
    fig.set_size_inches(*total)
    x0 = (TEXT_WIDTH_IN - fixed_width - len(axes) * width) / 2 + PAD_IN + left  # centred where height binds
    y0 = PAD_IN + bottom
    for i, ax in enumerate(axes):
        place(ax, (x0 + i * (width + _GAP_IN), y0, width, height))
    place(bar, (x0 + len(axes) * (width + _GAP_IN), y0, _BAR_IN, height))


def caption(
    section: str, experiment: Mapping[str, Any], seed: str, landscape: Mapping[str, Any], labels: Mapping[str, str]
) -> str:
    plane = landscape["plane"]
    origin, u, v = (latex_escape(labels[plane[axis]]) for axis in ("origin", "u", "v"))
    tasks = " and ".join(f"task {latex_escape(task)}" for task in landscape["loss"])
    off = [point for point in landscape["points"] if point["off_plane"] > OFF_PLANE_TOLERANCE]
    if off:
        where = (
            "Hollow markers lie off the plane and are drawn at their projection: "
            + "; ".join(
                f"{latex_escape(labels[point['method']])} at distance {point['off_plane']:.2g}" for point in off
            )
            + r" (relative to $|B - A|$). All other points lie on the plane."
        )
    else:
        where = "All marked points lie on the plane."
    reset = (
        "after resetting the BatchNorm statistics of every model on the plane on the merge slice"
        if landscape.get("bn_reset")
        else "without a BatchNorm reset (the models have no BatchNorm)"
    )
    return (
        rf"{latex_escape(section)}, {latex_escape(experiment['label'])}: loss landscape ({tasks}) of the model "
        f"pair of seed {latex_escape(seed)} on the plane through {origin} (origin), {u} and {v}; coordinates in "
        r"units of $|B - A|$. Each panel: mean cross-entropy of that task's head on that task's images, "
        f"{reset}, on a log colour scale. Images: {latex_escape(landscape['images'])}. {where}"
    )


@register_layout
class LandscapeFigure(Layout):
    """Per experiment with a landscape analysis: the loss landscape of its first seed."""

    name = "landscape_figure"

    def outputs(self, spec: Mapping[str, Any]) -> list[Output]:
        return experiment_figure_outputs(spec, ANALYSIS, stem, "landscape.rst", "Loss landscape")

    def write(self, data: ReportData, out_dir: Path) -> list[Artifact]:
        section = dataset_label(data.spec)
        artifacts = []
        for experiment in experiments_with(data.spec, ANALYSIS):
            seed, path, landscape = first_analysis(data, experiment, ANALYSIS)
            labels = _labels(experiment, landscape, path)
            with figure_style():
                pdf, png = save_figure(landscape_figure(landscape, labels, path), out_dir, stem(experiment))
            text = caption(section, experiment, seed, landscape, labels)
            label = f"fig:landscape-{slug(experiment['key'])}"
            artifacts.append(Artifact("figure", section, pdf, (pdf, png), text, label))
        return artifacts
