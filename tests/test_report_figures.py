"""Tests for the figure layouts of the report: files written equal files declared, every figure fits the text
width and is no taller than wide, fonts are embedded as TrueType, styles tell apart what they must, the CKA
colour scale spans the data, the λ CSV holds the plotted numbers, and reruns give identical bytes.

Report data are built directly (spec, records, their aggregate and analysis contents) from synthetic results.
"""

from __future__ import annotations

import csv
import math
import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from matplotlib.colors import to_hex
from PIL import Image

from hetmerge.report import figures
from hetmerge.report.aggregate import aggregate
from hetmerge.report.alignment_figure import AlignmentFigure, alignment_curves, alignment_figure, global_positions
from hetmerge.report.data import ReportData
from hetmerge.report.lambda_figure import COLUMNS, LambdaFigure, curve_table
from hetmerge.report.landscape_figure import LandscapeFigure
from hetmerge.report.partial_zip_figure import PartialZipFigure, full_counterparts, partial_figure
from hetmerge.report.summary_figure import SummaryFigure, panels, plan, sheets

FIGURE_LAYOUTS = (SummaryFigure(), PartialZipFigure(), LambdaFigure(), LandscapeFigure(), AlignmentFigure())
GRID = (0.1, 0.3, 0.5, 0.7, 0.9)
LAMS = (0.0, *GRID, 1.0)
DEEP, SHALLOW = [4, 4, 4], [2, 2, 2]
STRATEGIES = {"segment": [[0, 2], [1, 3], [0, 3]], "layer": [[0, 1], [1, 2], [2, 3]], "head": [[0, 1], [0, 1], [0, 1]]}


# --- synthetic report data -------------------------------------------------------------------------------------
def row(key: str, label: str, method: str, **params: Any) -> dict[str, Any]:
    kind = "ensemble" if method == "ensemble" else "merge"
    return {"key": key, "label": label, "kind": kind, "method": method, "params": params, "analyses": []}


def experiment(
    key: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    models: int = 2,
    layout: str = "standard",
    group: str | None = None,
    label: str | None = None,
    model_labels: Sequence[str] | None = None,
    analyses: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    base = [
        {"key": f"model_{t.lower()}", "label": f"Model {t}", "kind": "base"} for t in string.ascii_uppercase[:models]
    ]
    return {
        "key": key,
        "label": label or key.upper(),
        "layout": layout,
        "group": group or key,
        "models": [key] * models,
        "model_labels": list(model_labels or [f"{key}-{i}" for i in range(models)]),
        "rows": [*base, *rows],
        "analyses": dict(analyses or {}),
    }


def spec_of(experiments: Sequence[Mapping[str, Any]], seeds: Sequence[int] = (0, 1)) -> dict[str, Any]:
    return {
        "title": "Synthetic",
        "name": "test",
        "dataset": {"name": "fashion_mnist", "label": "Fashion-MNIST"},
        "seeds": list(seeds),
        "config": {},
        "experiments": list(experiments),
    }


def accuracy(*key: Any) -> float:
    """A fixed pseudo-random accuracy per key, so that figures differ by experiment, row and seed."""
    return float(np.random.default_rng([sum(map(ord, str(part))) for part in key]).uniform(0.3, 0.95))


def curve(exp: str, key: str, seed: int) -> dict[str, Any]:
    points = [
        {
            "lam": lam,
            "selectable": lam in GRID,
            "merge": {"joint": accuracy(exp, key, seed, lam, "m"), "task_avg": None, "tasks": {}},
            "test": {"joint": accuracy(exp, key, seed, lam, "t"), "task_avg": None, "tasks": {}},
        }
        for lam in LAMS
    ]
    chosen = max((p for p in points if p["selectable"]), key=lambda p: p["merge"]["joint"])["lam"]
    return {"param": "lam", "chosen": chosen, "points": points}


def records_of(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    records = []
    for exp in spec["experiments"]:
        tasks = string.ascii_uppercase[: len(exp["models"])]
        curves = exp["analyses"].get("lambda_curve", [])
        for spec_row in exp["rows"]:
            for seed in spec["seeds"]:
                joint = accuracy(exp["key"], spec_row["key"]) + 0.1 * accuracy(exp["key"], spec_row["key"], seed) - 0.06
                params = spec_row.get("params") or {}
                cut = {"fc0": 1, "fc1": 2}.get(params.get("stop_after"))
                records.append(
                    {
                        "dataset": spec["dataset"]["name"],
                        "dataset_label": spec["dataset"]["label"],
                        "arch": exp["key"],
                        "arch_label": exp["label"],
                        "pair": seed,
                        "method": spec_row["key"],
                        "label": spec_row["label"],
                        "kind": spec_row["kind"],
                        "layout": exp["layout"],
                        "group": exp["group"],
                        "config": {"method": spec_row.get("method"), "params": params, "analyses": []},
                        "metrics": {
                            "joint": joint,
                            "task_avg": joint,
                            "tasks": {t: joint for t in tasks},
                            "params": 1000,
                            "flops": 2000,
                        },
                        "split_seed": seed,
                        "tasks": {t: [] for t in tasks},
                        "source": {"method": spec_row.get("method"), "params": params, "cut": cut, "units": 4},
                        "timings": {},
                        "provenance": {},
                        "curve": curve(exp["key"], spec_row["key"], seed) if spec_row["key"] in curves else None,
                    }
                )
    return records


def landscape() -> dict[str, Any]:
    xs = [-0.5 + 0.25 * i for i in range(9)]
    ys = [-0.5 + 0.25 * j for j in range(7)]

    def loss(cx: float, cy: float) -> list[list[float]]:
        return [[0.05 + 4 * ((x - cx) ** 2 + (y - cy) ** 2) for x in xs] for y in ys]

    def point(method: str, x: float, y: float, off_plane: float) -> dict[str, Any]:
        return {"method": method, "x": x, "y": y, "off_plane": off_plane, "loss": {"A": 1.0, "B": 1.0}}

    return {
        "kind": "landscape",
        "plane": {"origin": "model_a", "u": "model_b", "v": "chooser"},
        "images": "test (100 per task)",
        "bn_reset": True,
        "x": xs,
        "y": ys,
        "loss": {"A": loss(0, 0), "B": loss(1, 0)},
        "points": [
            point("model_a", 0.0, 0.0, 0.0),
            point("model_b", 1.0, 0.0, 0.0),
            point("chooser", 0.5, 1.0, 1e-9),
            point("average", 0.4, 0.3, 0.25),
        ],
        "seconds": 1.0,
        "provenance": {},
    }


def alignment(seed: int) -> dict[str, Any]:
    """CKA between 12 deep and 6 shallow blocks in 0.52–0.88 (as trained networks give); seed 1 differs."""
    cka = 0.52 + 0.36 * np.random.default_rng(seed).random((sum(DEEP), sum(SHALLOW)))
    cka[0, 0], cka[-1, -1] = 0.52, 0.88
    strategies = {name: {"positions": positions, "score": 1.0} for name, positions in STRATEGIES.items()}
    return {
        "kind": "alignment",
        "deep_model": 0,
        "deep_blocks": DEEP,
        "shallow_blocks": SHALLOW,
        "cka": cka.round(4).tolist(),
        "strategies": strategies,
        "provenance": {},
    }


def full_spec(seeds: Sequence[int] = (0, 1)) -> dict[str, Any]:
    """One experiment per figure: partial merges, a chosen parameter with a landscape, depth alignment."""
    zips = [
        row("ensemble", "Ensemble", "ensemble"),
        row("zipit", "ZipIt!", "zipit", alpha=0.3, beta=0.125, stop_after=None),
        row("zip_2", "ZipIt! 2/4", "zipit", alpha=0.3, beta=0.125, stop_after="fc1"),
        row("zip_1", "ZipIt! 1/4", "zipit", alpha=0.3, beta=0.125, stop_after="fc0"),
        row("other_zip", "ZipIt! other", "zipit", alpha=0.5, beta=0.125, stop_after=None),
    ]
    choosers = [
        row("ensemble", "Ensemble", "ensemble"),
        row("average", "W.Avg", "average"),
        row("chooser", "Chooser (align)", "chooser", solver="align", lam=None),
        row("chooser_zip", "Chooser (zip)", "chooser", solver="zip", lam=None),
    ]
    aligned = [
        row("ensemble", "Ensemble", "ensemble"),
        row("seg_zip", "SMA, zip", "aligner", strategy="segment", solver="zip"),
        row("layer_zip", "LMA, zip", "aligner", strategy="layer", solver="zip"),
        row("seg_align", "SMA, permute", "aligner", strategy="segment", solver="align"),
    ]
    return spec_of(
        [
            experiment("mlp", zips, label="MLP", analyses={"partial_zip": ["zip_2", "zip_1"]}),
            experiment(
                "resnet_choice",
                choosers,
                layout="mudsc",
                label="ResNet-20, choice",
                analyses={
                    "lambda_curve": ["chooser", "chooser_zip"],
                    "landscape": {"row": "chooser", "results": {"0": "landscape.json"}},
                },
            ),
            experiment(
                "depth",
                aligned,
                layout="hetero",
                label="VGG19 + VGG13",
                model_labels=["VGG19", "VGG13"],
                analyses={
                    "alignment": {
                        "rows": ["seg_zip", "layer_zip", "seg_align"],
                        "results": {str(s): f"alignment{s}.json" for s in seeds},
                    }
                },
            ),
        ],
        seeds,
    )


def report_data(spec: Mapping[str, Any]) -> ReportData:
    records = records_of(spec)
    order = list(dict.fromkeys(r["key"] for e in spec["experiments"] for r in e["rows"]))
    analyses = {"landscape.json": landscape(), **{f"alignment{s}.json": alignment(s) for s in spec["seeds"]}}
    return ReportData(spec, tuple(records), aggregate(records, method_order=order), analyses)


def rows(labels: Mapping[str, str]) -> list[dict[str, Any]]:
    return [row(key, label, "ensemble" if key == "ensemble" else key) for key, label in labels.items()]


def default_sized_spec() -> dict[str, Any]:
    """The shape of the default config: 19 experiments in 10 groups (4 standard, 3 MuDSC-like, 3 hetero groups
    of 4), 2–3 base models and up to 8 more rows each."""
    standard = {"ensemble": "Ensemble", "average": "W.Avg", "wm": "Git Re-Basin", "permute": "Permute"}
    experiments = [
        experiment(arch, rows({**standard, "zipit": "ZipIt!", f"{arch}_a": f"ZipIt! {a}", f"{arch}_b": f"ZipIt! {b}"}))
        for arch, a, b in [("mlp", "2/4", "1/4"), ("vgg", "6/9", "3/9"), ("resnet", "13/20", "7/20")]
    ]
    experiments.append(experiment("vgg_3models", rows({**standard, "zip3": "ZipIt! (beta 0.5)"}), models=3))
    mudsc = {**standard, "act_align": "A. Align", "act_zip": "ZipIt", "weight_zip": "W. Zip"}
    mudsc |= {"mudsc_align": "MuDSC (align)", "mudsc_zip": "MuDSC (zip)"}
    experiments += [experiment(key, rows(mudsc), layout="mudsc") for key in ("resnet_mudsc", "resnet_gn", "vit")]
    depth = {"ensemble": "Ensemble", "sma_zip": "SMA, zip", "lma_zip": "LMA, zip", "sma_align": "SMA, permute"}
    depth_all = {**depth, "lmacode": "LMA (code), zip", "head": "head, zip", "uniform": "uniform, zip"}
    depth_all |= {"headtail": "head-tail, zip"}
    homo = {"act_zip": "ZipIt", "act_align": "A. Align"}
    width = {"ensemble": "Ensemble", "act_zip": "ZipIt", "mudsc_zip": "MuDSC (zip)"}
    for group, deep, shallow, first, rev, same in [
        ("vgg_depth", "VGG19", "VGG13", depth_all, depth, homo),
        ("resnet_depth", "ResNet-50", "ResNet-26", depth_all, depth, homo),
        ("resnet_width", "ResNet-20 x1/2", "ResNet-20 x1/4", width, width, {"act_zip": "ZipIt", "mudsc_zip": "MuDSC"}),
    ]:
        for suffix, labels, pair in [
            ("", first, (deep, shallow)),
            ("_rev", rev, (shallow, deep)),
            ("_deep", same, (deep, deep)),
            ("_shallow", same, (shallow, shallow)),
        ]:
            key, label = group + suffix, " + ".join(pair)
            experiments.append(
                experiment(key, rows(labels), layout="hetero", group=group, label=label, model_labels=pair)
            )
    return spec_of(experiments)


# --- checks on written files -----------------------------------------------------------------------------------
def pdf_size_in(path: Path) -> tuple[float, float]:
    box = re.search(rb"/MediaBox \[\s*([\d.]+) ([\d.]+) ([\d.]+) ([\d.]+)\s*\]", path.read_bytes())
    assert box, f"{path} has no MediaBox"
    x0, y0, x1, y1 = map(float, box.groups())
    return (x1 - x0) / 72, (y1 - y0) / 72


def png_size_in(path: Path) -> tuple[float, float]:
    with Image.open(path) as image:
        width, height = image.size
    return width / 300, height / 300


def write_all(data: ReportData, out_dir: Path) -> list[Any]:
    return [artifact for layout in FIGURE_LAYOUTS for artifact in layout.write(data, out_dir)]


def written_files(out_dir: Path) -> set[str]:
    return {str(path.relative_to(out_dir)) for path in out_dir.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[ReportData, Path, list[Any]]:
    data = report_data(full_spec())
    out_dir = tmp_path_factory.mktemp("figures")
    return data, out_dir, write_all(data, out_dir)


# --- tests -----------------------------------------------------------------------------------------------------
def test_written_files_are_the_declared_ones(full: tuple[ReportData, Path, list[Any]]) -> None:
    data, out_dir, artifacts = full
    declared = [output for layout in FIGURE_LAYOUTS for output in layout.outputs(data.spec)]
    assert written_files(out_dir) == {output.path for output in declared}
    assert {output.path for output in declared} == {
        f"figures/{stem}.{ext}"
        for stem in (
            "summary_standard",
            "summary_mudsc",
            "summary_hetero",
            "partial_zip_mlp",
            "lambda_resnet_choice",
            "landscape_resnet_choice",
            "alignment_depth",
        )
        for ext in ("pdf", "png")
    } | {"figures/lambda_resnet_choice.csv"}
    # Shown files carry what `snakemake --report` needs; PDFs (no browser shows them) do not.
    for output in declared:
        shown = not output.path.endswith(".pdf")
        assert (output.caption is not None) == shown, output.path
        if shown:
            assert output.category in {"Figures", "Data"} and output.subcategory and output.labels
            assert (Path(__file__).parents[1] / "report" / output.caption).exists()
    # Every artifact is a figure in the dataset's display name, its PDF first among its files.
    assert [a.path.name for a in artifacts] == [
        "summary_standard.pdf", "summary_mudsc.pdf", "summary_hetero.pdf", "partial_zip_mlp.pdf",
        "lambda_resnet_choice.pdf", "landscape_resnet_choice.pdf", "alignment_depth.pdf",
    ]  # fmt: skip
    for artifact in artifacts:
        assert artifact.kind == "figure" and artifact.section == "Fashion-MNIST" and artifact.files[0] == artifact.path
        assert "fashion_mnist" not in artifact.caption and artifact.caption.startswith("Fashion-MNIST")
        assert artifact.label.startswith("fig:")


def test_no_outputs_where_no_analysis() -> None:
    spec = spec_of([experiment("plain", [row("average", "W.Avg", "average")])])
    assert [o.path for layout in FIGURE_LAYOUTS for o in layout.outputs(spec)] == [
        "figures/summary_standard.pdf",
        "figures/summary_standard.png",
    ]


def test_figures_fit_the_text_width_and_are_not_tall(full: tuple[ReportData, Path, list[Any]]) -> None:
    _, out_dir, _ = full
    for pdf in sorted(out_dir.rglob("*.pdf")):
        for width, height in (pdf_size_in(pdf), png_size_in(pdf.with_suffix(".png"))):
            assert width <= figures.TEXT_WIDTH_IN + 0.01, pdf.name
            assert height <= width + 0.01, pdf.name


def test_fonts_are_embedded_as_truetype(full: tuple[ReportData, Path, list[Any]]) -> None:
    _, out_dir, _ = full
    for pdf in out_dir.rglob("*.pdf"):
        content = pdf.read_bytes()
        assert b"/Type3" not in content, pdf.name
        assert b"/FontFile2" in content, pdf.name  # an embedded TrueType font program


def test_reruns_are_byte_identical(full: tuple[ReportData, Path, list[Any]], tmp_path: Path) -> None:
    data, out_dir, _ = full
    write_all(data, tmp_path)
    for name in written_files(out_dir):
        assert (tmp_path / name).read_bytes() == (out_dir / name).read_bytes(), name


def test_lambda_csv_holds_the_plotted_numbers(full: tuple[ReportData, Path, list[Any]]) -> None:
    _, out_dir, _ = full
    with open(out_dir / "figures" / "lambda_resnet_choice.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(COLUMNS)
    assert [(r["row"], float(r["value"])) for r in rows] == [
        (k, lam) for k in ("chooser", "chooser_zip") for lam in LAMS
    ]
    # By hand: row "chooser" at λ = 0.3, over seeds 0 and 1.
    test = [accuracy("resnet_choice", "chooser", seed, 0.3, "t") for seed in (0, 1)]
    merge = [accuracy("resnet_choice", "chooser", seed, 0.3, "m") for seed in (0, 1)]
    chosen = [curve("resnet_choice", "chooser", seed)["chosen"] for seed in (0, 1)]
    line = next(r for r in rows if r["row"] == "chooser" and float(r["value"]) == 0.3)
    assert line["label"] == "Chooser (align)" and line["param"] == "lam" and line["selectable"] == "True"
    assert float(line["test_joint_mean"]) == pytest.approx((test[0] + test[1]) / 2)
    assert float(line["test_joint_std"]) == pytest.approx(abs(test[0] - test[1]) / math.sqrt(2))
    assert float(line["merge_joint_mean"]) == pytest.approx((merge[0] + merge[1]) / 2)
    assert int(line["n_pairs"]) == 2 and int(line["test_joint_n"]) == 2
    assert int(line["chosen_pairs"]) == chosen.count(0.3)
    assert sum(int(r["chosen_pairs"]) for r in rows if r["row"] == "chooser") == 2
    ends = [r for r in rows if float(r["value"]) in (0.0, 1.0)]
    assert ends and all(r["selectable"] == "False" and r["chosen_pairs"] == "0" for r in ends)


def test_lambda_curve_errors_name_the_row() -> None:
    data = report_data(full_spec())
    exp = data.spec["experiments"][1]
    broken = [{**r, "curve": None} if r["method"] == "chooser_zip" and r["pair"] == 1 else r for r in data.records]
    with pytest.raises(ValueError, match=r"resnet_choice/chooser_zip seed 1 has no curve"):
        curve_table(ReportData(data.spec, tuple(broken), data.frame, data.analyses), exp)


def test_partial_zip_curve_and_reference_styles(full: tuple[ReportData, Path, list[Any]]) -> None:
    data, _, _ = full
    exp = data.spec["experiments"][0]
    # The full zip with the same settings closes the curve at 1; a zip with other settings does not.
    assert full_counterparts(exp, ["zip_2", "zip_1"]) == ["zipit"]
    with figures.figure_style():
        fig = partial_figure(data, exp)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    references = [lines[label] for label in ("Model A", "Model B", "Ensemble")]
    # Each reference line has its own line style and colour, none the curve's.
    assert len({line.get_linestyle() for line in references}) == 3
    assert len({to_hex(line.get_color()) for line in references} | {figures.COLOURS[0]}) == 4
    curve_line = next(line for line in fig.axes[0].get_lines() if line.get_marker() == "o")
    assert list(curve_line.get_xdata()) == [0.25, 0.5, 1.0]


def test_cka_colour_scale_spans_the_data() -> None:
    content = alignment(0)
    exp = full_spec()["experiments"][2]
    with figures.figure_style():
        fig = alignment_figure(content, alignment_curves(exp, content, "x"), "VGG19", "VGG13", "x")
    image = fig.axes[0].get_images()[0]
    cka = np.array(content["cka"])
    assert image.get_clim() == (cka.min(), cka.max()) == (0.52, 0.88)
    assert any(ax.get_ylabel() == "Linear CKA" for ax in fig.axes)  # the colour bar


def test_alignment_curves_follow_the_rows_strategies() -> None:
    exp = full_spec()["experiments"][2]
    curves = alignment_curves(exp, alignment(0), "a.json")
    # SMA rows that differ only in their solver share one curve; styles follow the file's strategy order.
    assert [(c.name, c.style) for c in curves] == [("segment: SMA, zip; SMA, permute", 0), ("layer: LMA, zip", 1)]
    assert curves[0].stages[1] == ((4 + 1, 2), (4 + 3, 3))
    bad = {**exp, "rows": [*exp["rows"][:-1], {**exp["rows"][-1], "params": {"strategy": "diagonal"}}]}
    with pytest.raises(ValueError, match=r"'seg_align' of 'depth' merges with strategy 'diagonal'.*a\.json"):
        alignment_curves(bad, alignment(0), "a.json")


def test_global_positions_rejects_misfits() -> None:
    assert global_positions([[0, 2], [1]], [3, 2], [2, 1]) == [[(0, 0), (2, 1)], [(4, 2)]]
    for positions in ([[2, 0], [1]], [[0, 3], [1]], [[0], [1]], [[0, 1]]):
        with pytest.raises(ValueError):
            global_positions(positions, [3, 2], [2, 1])


def test_landscape_names_rows_by_label(full: tuple[ReportData, Path, list[Any]]) -> None:
    _, _, artifacts = full
    caption = next(a.caption for a in artifacts if a.label == "fig:landscape-resnet_choice")
    assert "plane through Model A (origin), Model B and Chooser (align)" in caption
    assert "W.Avg at distance 0.25" in caption


def test_summary_figures_of_default_size(tmp_path: Path) -> None:
    """The default config's shape: 19 experiments give one figure per table layout, each unsqueezed."""
    spec = default_sized_spec()
    assert len(spec["experiments"]) == 19
    found = sheets(spec)
    assert [(sheet.stem, len(sheet.panels)) for sheet in found] == [
        ("summary_standard", 4),
        ("summary_mudsc", 3),
        ("summary_hetero", 3),
    ]
    depth = found[2].panels[0]
    assert depth.title == "VGG19, VGG13" and len(depth.experiments) == 4 and len(depth.rows) == 12
    data = report_data(spec)
    for sheet, artifact in zip(found, SummaryFigure().write(data, tmp_path), strict=True):
        width, _, scale, columns = plan(sheet.panels)
        assert width == figures.TEXT_WIDTH_IN and scale == 1.0 and len(columns) == 2
        png_width, png_height = png_size_in(artifact.files[1])
        assert width - 0.1 <= png_width <= width and png_height <= png_width


def test_panel_rows_are_the_union_with_unique_labels() -> None:
    a = experiment("a", [row("wm", "Git Re-Basin", "wm"), row("shared", "Shared", "x")], group="g")
    b = experiment("b", [row("shared", "Shared", "x"), row("wm_align", "Git Re-Basin", "y")], group="g")
    (panel,) = panels([a, b])
    assert [label for _, label, _ in panel.rows] == [
        "Model A", "Model B", "Git Re-Basin [wm]", "Shared", "Git Re-Basin [wm_align]",
    ]  # fmt: skip
    assert panel.members == ((0, 1), (0, 1), (0,), (0, 1), (1,))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(1, 4)), min_size=1, max_size=25))
def test_summary_sheets_fit_a_page(groups: list[tuple[int, int]]) -> None:
    """However many groups of however many rows: every figure is at most text wide and square, and holds
    every panel once, in order."""
    spec = spec_of(
        [
            experiment(f"e{i}_{j}", [row(f"r{k}", f"R{k}", "m") for k in range(n_rows)], group=f"g{i}")
            for i, (n_rows, n_experiments) in enumerate(groups)
            for j in range(n_experiments)
        ]
    )
    found = sheets(spec)
    assert [panel.title for sheet in found for panel in sheet.panels] == [p.title for p in panels(spec["experiments"])]
    assert len({sheet.stem for sheet in found}) == len(found)
    for sheet in found:
        width, height, _, columns = plan(sheet.panels)
        assert width <= figures.TEXT_WIDTH_IN and height <= width + 1e-9
        assert [i for column in columns for i in column] == list(range(len(sheet.panels)))


def test_save_figure_refuses_what_would_be_cut_off(tmp_path: Path) -> None:
    with figures.figure_style():
        fig = figures.new_figure(3.0, 2.0, layout=None)
        fig.text(0.9, 0.5, "a label that runs past the figure's right edge")
        with pytest.raises(ValueError, match=r"figure cut: its content .* does not fit its 3.00 x 2.00 in"):
            figures.save_figure(fig, tmp_path, "cut")
        fig.set_size_inches(3.0, 3.5)  # taller than wide
        with pytest.raises(ValueError, match=r"figure tall of 3.00 x 3.50 in is .* taller than wide"):
            figures.save_figure(fig, tmp_path, "tall")
    with pytest.raises(ValueError, match="wider than the text"):
        figures.new_figure(7.0, 3.0)
    assert not list(tmp_path.rglob("*.p*"))
