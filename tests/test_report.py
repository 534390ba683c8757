"""Tests for hetmerge.report: aggregation numbers, table contents (LaTeX and HTML), provenance, determinism and
LaTeX compilation."""

from __future__ import annotations

import csv
import html
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jinja2
import pytest

from hetmerge.cli import main as cli_main
from hetmerge.report import (
    LatexUnavailableError,
    aggregate,
    build_report,
    compile_latex,
    latex_environment,
    latex_escape,
)
from hetmerge.report.aggregate import STATS, methods_in
from hetmerge.report.figures import (
    LAMBDA_COLUMNS,
    STRATEGY_STYLES,
    _alignment_map,
    alignment_curves,
    global_positions,
)
from hetmerge.report.latex import (
    HETERO_ID_COLUMNS,
    LATEX_PACKAGES,
    format_accuracy,
    format_lams,
    humanize_count,
    latex_to_html,
)
from hetmerge.report.provenance import PROVENANCE_COLUMNS

METHODS = {
    "base_a": ("Model A", "base"),
    "base_b": ("Model B", "base"),
    "ensemble": ("Ensemble", "base"),
    "weight_avg": ("W.Avg & co", "merge"),
    "zipit": ("ZipIt!_{13/20}", "merge"),
    "mudsc_align": ("MuDSC (align)", "merge"),
    "mudsc_zip": ("MuDSC (zip)", "merge"),
    "het_sma_zip": ("SMA, zip", "merge"),
    "het_lma_zip": ("LMA, zip", "merge"),
    "het_head_zip": ("head, zip", "merge"),
    "het_sma_align": ("SMA, permute", "merge"),
}
ARCHS = {
    "resnet": "ResNet-20",
    "vgg": "VGG-11 #4",
    "vit": "ViT-T",
    "vgg_depth": "VGG19 ⊕ VGG13",
    "vgg19_homo": "VGG19 + VGG19",
    "vgg13_solo": "VGG13 + VGG13",
}


def record(
    method: str,
    pair: int,
    joint: float | None,
    a: float | None = 0.9,
    b: float | None = 0.8,
    *,
    arch: str = "resnet",
    dataset: str = "fashion_mnist",
    layout: str | None = None,
    lam: float | None = None,
) -> dict[str, Any]:
    label, kind = METHODS[method]
    known = [x for x in (a, b) if x is not None]
    extra: dict[str, Any] = {} if layout is None else {"layout": layout}
    if lam is not None:
        extra["source"] = {"method": "mudsc", "params": {"lam": None}, "notes": {"lam": lam, "sweeps": {}}}
    return {
        "dataset": dataset,
        "arch": arch,
        "arch_label": ARCHS[arch],
        "pair": pair,
        "method": method,
        "label": label,
        "kind": kind,
        "metrics": {
            "joint": joint,
            "tasks": {"A": a, "B": b},
            "task_avg": sum(known) / len(known) if known else None,
            "params": 272_474,
            "flops": 41_000_000,
        },
        "provenance": {"note": "anything"},
        **extra,
    }


# Hand-computed expectations (sample std, ddof=1): joint 0.50/0.60 -> 55.0 ± 7.1; 0.70/0.74 -> 72.0 ± 2.8.
RECORDS = [
    record("base_a", 0, 0.50, 0.90, None),
    record("base_a", 1, 0.60, 0.92, None),
    record("base_b", 0, 0.52, None, 0.88),
    record("base_b", 1, 0.58, None, 0.86),
    record("ensemble", 0, 0.80, 0.91, 0.87),
    record("ensemble", 1, 0.82, 0.93, 0.85),
    record("weight_avg", 0, 0.40, 0.60, 0.62),
    record("weight_avg", 1, 0.44, 0.64, 0.66),
    record("zipit", 0, 0.70, 0.85, 0.80),
    record("zipit", 1, 0.74, 0.87, 0.82),
    record("zipit", 0, 0.61, arch="vgg"),
    record("zipit", 1, 0.65, arch="vgg"),
    record("base_a", 0, 0.55, 0.9, None, arch="vgg"),
    record("base_a", 1, 0.57, 0.9, None, arch="vgg"),
]


def vit(method: str, pair: int, joint: float, a: float | None, b: float | None, lam: float | None = None) -> dict:
    return record(method, pair, joint, a, b, arch="vit", layout="mudsc", lam=lam)


# A "mudsc"-layout experiment. By hand (mean ± sample std over the two pairs, in %):
# MuDSC (align): joint 72.0 ± 2.8, avg 83.0 ± 1.4, A 81.0 ± 1.4, B 85.0 ± 1.4, λ 0.4 then 0.6;
# MuDSC (zip):   joint 74.0 ± 2.8, avg 84.0 ± 1.4, A 87.0 ± 1.4, B 81.0 ± 1.4, λ 0.3 both times.
MUDSC_RECORDS = [
    vit("base_a", 0, 0.50, 0.90, None),
    vit("base_a", 1, 0.60, 0.92, None),
    vit("base_b", 0, 0.52, None, 0.88),
    vit("base_b", 1, 0.58, None, 0.86),
    vit("ensemble", 0, 0.80, 0.91, 0.87),
    vit("ensemble", 1, 0.82, 0.93, 0.85),
    vit("weight_avg", 0, 0.40, 0.60, 0.62),
    vit("weight_avg", 1, 0.44, 0.64, 0.66),
    vit("mudsc_align", 0, 0.70, 0.80, 0.84, lam=0.4),
    vit("mudsc_align", 1, 0.74, 0.82, 0.86, lam=0.6),
    vit("mudsc_zip", 0, 0.72, 0.86, 0.80, lam=0.3),
    vit("mudsc_zip", 1, 0.76, 0.88, 0.82, lam=0.3),
]
MUDSC_ORDER = ["base_a", "base_b", "ensemble", "weight_avg", "zipit", "mudsc_align", "mudsc_zip"]


def sweep(method: str, solver: str, pair: int, peak: int, offset: float) -> dict[str, Any]:
    """A λ sweep whose test accuracy peaks at λ = peak / 10; the merge slice reads 1 point higher."""

    def accuracy(joint: float) -> dict[str, Any]:
        return {"joint": joint, "task_avg": joint, "tasks": {"A": joint, "B": joint}}

    points = []
    for i in range(11):
        test = 0.5 + offset + 0.002 * i * (2 * peak - i)
        points.append({"lam": i / 10, "selectable": 0 < i < 10, "merge": accuracy(test + 0.01), "test": accuracy(test)})
    return {
        "kind": "lambda_sweep",
        "dataset": "fashion_mnist",
        "arch": "vit",
        "arch_label": "ViT-T",
        "pair": pair,
        "method": method,
        "label": METHODS[method][0],
        "solver": solver,
        "points": points,
        "chosen": peak / 10,
    }


SWEEPS = [
    sweep("mudsc_zip", "zip", 0, 5, 0.01),
    sweep("mudsc_zip", "zip", 1, 6, 0.01),
    sweep("mudsc_align", "align", 0, 5, 0.0),
    sweep("mudsc_align", "align", 1, 6, 0.0),
]


def landscape() -> dict[str, Any]:
    """Task A's loss is lowest at Model A (0, 0), task B's at Model B (1, 0); ZipIt! lies off the plane."""
    xs = [-0.5 + 0.25 * i for i in range(9)]
    ys = [-0.5 + 0.25 * j for j in range(7)]

    def loss(cx: float, cy: float) -> list[list[float]]:
        return [[0.05 + 4 * ((x - cx) ** 2 + (y - cy) ** 2) for x in xs] for y in ys]

    def point(method: str, x: float, y: float, off_plane: float) -> dict[str, Any]:
        label = METHODS[method][0]
        return {"method": method, "label": label, "x": x, "y": y, "off_plane": off_plane, "loss": {"A": 1, "B": 1}}

    return {
        "kind": "landscape",
        "dataset": "fashion_mnist",
        "arch": "vit",
        "arch_label": "ViT-T",
        "pair": 0,
        "plane": {"origin": "base_a", "u": "base_b", "v": "mudsc_align"},
        "images": "test (100 per task)",
        "bn_reset": True,
        "x": xs,
        "y": ys,
        "loss": {"A": loss(0, 0), "B": loss(1, 0)},
        "points": [
            point("base_a", 0.0, 0.0, 0.0),
            point("base_b", 1.0, 0.0, 0.0),
            point("mudsc_align", 0.5, 1.0, 1e-9),
            point("zipit", 0.4, 0.3, 0.25),
        ],
    }


ANALYSIS = [*SWEEPS, landscape()]


# Heterogeneous merging: deep model (A) with stages of 3 blocks, shallow model (B) with stages of 2.
CKA = [
    [0.9, 0.2, 0.1, 0.0],
    [0.5, 0.4, 0.2, 0.1],
    [0.3, 0.8, 0.2, 0.1],
    [0.1, 0.2, 0.9, 0.3],
    [0.1, 0.1, 0.6, 0.7],
    [0.0, 0.1, 0.3, 0.5],
]
STRATEGIES = {"het_sma_zip": "segment", "het_lma_zip": "layer", "het_head_zip": "head", "het_sma_align": "segment"}
POSITIONS = {"segment": [[0, 2], [0, 1]], "layer": [[0, 2], [0, 1]], "head": [[0, 1], [0, 1]]}


def het(
    method: str,
    pair: int,
    joint: float,
    a: float | None,
    b: float | None,
    *,
    arch: str = "vgg_depth",
    group: str | None = "vgg_depth",
) -> dict[str, Any]:
    """A "hetero"-layout record; het_* rows carry the depth alignment notes (pair 1's SMA differs from pair 0's)."""
    item = {**record(method, pair, joint, a, b, arch=arch, layout="hetero"), "group": group}
    if method in STRATEGIES:
        strategy = STRATEGIES[method]
        positions = [[0, 1], [0, 2]] if pair == 1 and strategy == "segment" else POSITIONS[strategy]
        solver = "align" if method.endswith("align") else "zip"
        notes = {
            "deep_model": 0,
            "deep_blocks": [3, 3],
            "shallow_blocks": [2, 2],
            "positions": positions,
            "alignment_score": 1.0,
            "cka": CKA,
            "single_model_spaces": [],
            "sweeps": 3,
        }
        item["source"] = {"method": "hetero", "params": {"strategy": strategy, "solver": solver}, "notes": notes}
    return item


# By hand (mean ± sample std over the two pairs, in %); columns Joint, A, B, Avg:
# VGG19 ⊕ VGG13: SMA, zip      62.0 ± 2.8, 71.0 ± 1.4, 75.0 ± 1.4, 73.0 ± 1.4
#                LMA, zip      60.0 ± 2.8, 72.0 ± 2.8, 71.0 ± 1.4, 71.5 ± 2.1
#                head, zip     42.0 ± 2.8, 51.0 ± 1.4, 51.0 ± 1.4, 51.0 ± 1.4
#                SMA, permute  57.0 ± 1.4, 77.0 ± 1.4, 67.0 ± 1.4, 72.0 ± 1.4
# VGG19 + VGG19: ZipIt!        68.0 ± 2.8, 82.0 ± 2.8, 79.0 ± 1.4, 80.5 ± 2.1 (beats every merge of the block above)
#                W.Avg         32.0 ± 2.8, 40.0 ± 0.0, 40.0 ± 0.0, 40.0 ± 0.0
# Pair 1 comes first, so the figure must pick the lowest pair rather than the first record.
HETERO_RECORDS = [
    *(
        het(method, pair, *values[pair])
        for pair in (1, 0)
        for method, values in {
            "base_a": [(0.50, 0.90, None), (0.60, 0.92, None)],
            "base_b": [(0.52, None, 0.88), (0.58, None, 0.86)],
            "ensemble": [(0.80, 0.91, 0.87), (0.82, 0.93, 0.85)],
            "het_sma_zip": [(0.60, 0.70, 0.74), (0.64, 0.72, 0.76)],
            "het_lma_zip": [(0.58, 0.70, 0.70), (0.62, 0.74, 0.72)],
            "het_head_zip": [(0.40, 0.50, 0.50), (0.44, 0.52, 0.52)],
            "het_sma_align": [(0.56, 0.76, 0.66), (0.58, 0.78, 0.68)],
        }.items()
    ),
    *(
        het(method, pair, *values[pair], arch="vgg19_homo")
        for pair in (0, 1)
        for method, values in {
            "base_a": [(0.70, 0.95, None), (0.72, 0.95, None)],
            "base_b": [(0.68, None, 0.94), (0.70, None, 0.96)],
            "weight_avg": [(0.30, 0.40, 0.40), (0.34, 0.40, 0.40)],
            "zipit": [(0.66, 0.80, 0.78), (0.70, 0.84, 0.80)],
        }.items()
    ),
    # No group: a table of its own.
    het("base_a", 0, 0.55, 0.9, None, arch="vgg13_solo", group=None),
    {k: v for k, v in het("zipit", 0, 0.5, arch="vgg13_solo", a=0.6, b=0.7).items() if k != "group"},
]
HETERO_ORDER = [
    "base_a",
    "base_b",
    "ensemble",
    "zipit",
    "weight_avg",
    "het_sma_zip",
    "het_lma_zip",
    "het_head_zip",
    "het_sma_align",
]


@pytest.fixture(scope="module")
def hetero_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    out_dir = tmp_path_factory.mktemp("hetero_report")
    return out_dir, build_report(RECORDS + HETERO_RECORDS, out_dir, title="Hetero", method_order=HETERO_ORDER)


@pytest.fixture(scope="module")
def mudsc_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    out_dir = tmp_path_factory.mktemp("mudsc_report")
    written = build_report(RECORDS + MUDSC_RECORDS, out_dir, title="MuDSC", method_order=MUDSC_ORDER, analysis=ANALYSIS)
    return out_dir, written


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    out_dir = tmp_path_factory.mktemp("report")
    return out_dir, build_report(RECORDS, out_dir, title="Results & more", method_order=["zipit", "base_a"])


def row_of(table: str, label: str) -> str:
    return next(line.strip() for line in table.splitlines() if line.strip().startswith(label + " &"))


def test_aggregate_mean_std_and_nulls() -> None:
    frame = aggregate(RECORDS).set_index(["arch", "method"])
    base_a = frame.loc[("resnet", "base_a")]
    assert base_a["joint_mean"] == pytest.approx(0.55)
    assert base_a["joint_std"] == pytest.approx(math.sqrt(0.005))  # ((0.05² + 0.05²) / (2 - 1))^½
    assert (base_a["joint_n"], base_a["n_pairs"]) == (2, 2)
    assert base_a["tasks.B_n"] == 0 and math.isnan(base_a["tasks.B_mean"])
    assert format_accuracy(base_a["joint_mean"], base_a["joint_std"], base_a["joint_n"]) == "55.0 $\\pm$ 7.1"


def test_aggregate_single_value_has_no_std() -> None:
    frame = aggregate([record("zipit", 0, 0.5), record("zipit", 1, 0.6, b=None)])
    row = frame.iloc[0]
    assert row["tasks.B_n"] == 1 and math.isnan(row["tasks.B_std"])
    assert format_accuracy(row["tasks.B_mean"], row["tasks.B_std"], row["tasks.B_n"]) == "80.0"
    assert format_accuracy(math.nan, math.nan, 0) == "--"


def test_aggregate_orders_methods_and_ignores_record_order() -> None:
    frame = aggregate(RECORDS[::-1], method_order=["ensemble", "unused"])
    resnet = frame[frame["arch"] == "resnet"]
    assert list(resnet["method"]) == ["ensemble", "base_a", "zipit", "weight_avg", "base_b"]
    # Same numbers whatever order the records arrive in (only first-seen ranks may differ).
    forward = aggregate(RECORDS, method_order=["ensemble"])
    assert (
        forward.drop(columns="method_rank")
        .set_index(["arch", "method"])
        .sort_index()
        .equals(frame.drop(columns="method_rank").set_index(["arch", "method"]).sort_index())
    )


def test_methods_in_follows_method_order_across_architectures() -> None:
    records = [record("base_a", 0, 0.5), record("zipit", 0, 0.5), record("ensemble", 0, 0.5, arch="vgg")]
    frame = aggregate(records, method_order=["base_a", "ensemble", "zipit"])
    assert methods_in(frame) == ["base_a", "ensemble", "zipit"]


def test_aggregate_rejects_duplicates_and_conflicts() -> None:
    with pytest.raises(ValueError, match="duplicate evaluation record"):
        aggregate([record("zipit", 0, 0.5), record("zipit", 0, 0.6)])
    relabelled = {**record("zipit", 1, 0.6), "label": "Other"}
    with pytest.raises(ValueError, match="disagree on 'label'"):
        aggregate([record("zipit", 0, 0.5), relabelled])
    with pytest.raises(ValueError, match="lacks field 'metrics'"):
        aggregate([{k: v for k, v in record("zipit", 0, 0.5).items() if k != "metrics"}])


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1_200_000, "1.2M"),
        (680_000_000, "0.68G"),
        (272_474, "0.27M"),
        (41e6, "41M"),
        (50, "50"),
        (math.nan, "--"),
    ],
)
def test_humanize_count(value: float, text: str) -> None:
    assert humanize_count(value) == text


def test_latex_escape() -> None:
    assert latex_escape("W.Avg & co") == r"W.Avg \& co"
    assert latex_escape("ZipIt!_{13/20}") == r"ZipIt!\_\{13/20\}"
    assert latex_escape(r"50% $x$ #1 a~b^c \d") == (
        r"50\% \$x\$ \#1 a\textasciitilde{}b\textasciicircum{}c \textbackslash{}d"
    )


def test_accuracy_table(report: tuple[Path, list[Path]]) -> None:
    out_dir, _ = report
    table = (out_dir / "tables" / "accuracy_fashion_mnist_resnet.tex").read_text()
    assert "Method & Params & FLOPs & Joint & Task A & Task B & Avg \\\\" in table
    assert "mean $\\pm$ std over 2 model pairs" in table
    assert "\\label{tab:accuracy-fashion_mnist-resnet}" in table
    labels = ["ZipIt!\\_\\{13/20\\}", "Model A", "Model B", "Ensemble", "W.Avg \\& co"]
    positions = [table.index(row_of(table, label)) for label in labels]
    assert positions == sorted(positions)
    assert (
        row_of(table, "Model A")
        == "Model A & 0.27M & 41M & 55.0 $\\pm$ 7.1 & 91.0 $\\pm$ 1.4 & -- & 91.0 $\\pm$ 1.4 \\\\"
    )
    # The ensemble (81.0) beats every merge, but only merges compete for bold, and only on Joint.
    assert table.count("\\textbf") == 1
    assert "& \\textbf{72.0 $\\pm$ 2.8} &" in row_of(table, "ZipIt!\\_\\{13/20\\}")


def test_summary_table(report: tuple[Path, list[Path]]) -> None:
    out_dir, _ = report
    table = (out_dir / "tables" / "summary_fashion_mnist.tex").read_text()
    assert "Method & ResNet-20 & VGG-11 \\#4 \\\\" in table
    assert row_of(table, "ZipIt!\\_\\{13/20\\}").endswith("\\textbf{72.0 $\\pm$ 2.8} & \\textbf{63.0 $\\pm$ 2.8} \\\\")
    assert row_of(table, "Model B") == "Model B & 55.0 $\\pm$ 4.2 & -- \\\\"


def test_single_pair_table_has_no_std(tmp_path: Path) -> None:
    build_report([record("zipit", 0, 0.5), record("base_a", 0, 0.9)], tmp_path, title="t")
    table = (tmp_path / "tables" / "accuracy_fashion_mnist_resnet.tex").read_text()
    assert "single model pair" in table
    assert (
        row_of(table, "ZipIt!\\_\\{13/20\\}")
        == "ZipIt!\\_\\{13/20\\} & 0.27M & 41M & \\textbf{50.0} & 90.0 & 80.0 & 85.0 \\\\"
    )


def test_build_report_files_and_main_tex(report: tuple[Path, list[Path]]) -> None:
    out_dir, written = report
    in_main = {
        "tables/accuracy_fashion_mnist_resnet.tex",
        "tables/accuracy_fashion_mnist_vgg.tex",
        "tables/summary_fashion_mnist.tex",
        "figures/joint_accuracy_fashion_mnist.pdf",
    }
    expected = in_main | {
        "results.csv",
        "provenance.csv",
        "provenance.html",
        "main.tex",
        "tables/accuracy_fashion_mnist_resnet.html",
        "tables/accuracy_fashion_mnist_vgg.html",
        "tables/summary_fashion_mnist.html",
        "figures/joint_accuracy_fashion_mnist.png",
    }
    assert {path.relative_to(out_dir).as_posix() for path in written} == expected
    assert all(path.stat().st_size > 0 for path in written)
    main = (out_dir / "main.tex").read_text()
    assert "\\title{Results \\& more}" in main and "\\section{fashion\\_mnist}" in main
    for name in in_main:
        assert f"{{{name}}}" in main
    assert ".html" not in main and "provenance" not in main  # the HTML twins are for the HTML report only
    assert "\\includegraphics{figures/joint_accuracy_fashion_mnist.pdf}" in main
    pdf = (out_dir / "figures" / "joint_accuracy_fashion_mnist.pdf").read_bytes()
    assert b"/FontFile2" in pdf and b"/Type3" not in pdf  # TrueType (fonttype 42), as venues require


def test_build_report_is_byte_identical_on_rerun(report: tuple[Path, list[Path]]) -> None:
    out_dir, written = report
    before = {path: path.read_bytes() for path in written}
    again = build_report(RECORDS, out_dir, title="Results & more", method_order=["zipit", "base_a"])
    assert again == written
    assert {path: path.read_bytes() for path in again} == before


def test_environment_delimiters_and_strict_undefined() -> None:
    env = latex_environment()
    template = env.from_string("\\BLOCK{for x in xs}\\textbf{\\VAR{x|latex_escape}}\\BLOCK{endfor}\\#{ note }")
    assert template.render(xs=["a_b", "c&d"]) == "\\textbf{a\\_b}\\textbf{c\\&d}"
    with pytest.raises(jinja2.UndefinedError, match="missing"):
        env.from_string("\\caption{\\VAR{missing}}").render()


def test_report_does_not_import_torch() -> None:
    code = "import sys, hetmerge.report; assert 'torch' not in sys.modules, 'report imports torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def compile_or_skip(main_tex: Path) -> Path:
    try:
        return compile_latex(main_tex)
    except LatexUnavailableError:
        pytest.skip(f"no LaTeX engine; install {LATEX_PACKAGES}")


def test_mudsc_table(mudsc_report: tuple[Path, list[Path]]) -> None:
    out_dir, _ = mudsc_report
    table = (out_dir / "tables" / "mudsc_fashion_mnist_vit.tex").read_text()
    assert "Method & Joint & Per-Task Avg & Task A & Task B & $\\lambda$ \\\\" in table
    assert "\\label{tab:mudsc-fashion_mnist-vit}" in table and "mean $\\pm$ std over 2 model pairs" in table
    labels = ["Model A", "Model B", "Ensemble", "W.Avg \\& co", "MuDSC (align)", "MuDSC (zip)"]
    positions = [table.index(row_of(table, label)) for label in labels]
    assert positions == sorted(positions)
    # Best merge per column: zip on Joint, Avg and A, align on B; base models and the ensemble never bold.
    assert row_of(table, "MuDSC (align)") == (
        "MuDSC (align) & 72.0 $\\pm$ 2.8 & 83.0 $\\pm$ 1.4 & 81.0 $\\pm$ 1.4 & \\textbf{85.0 $\\pm$ 1.4} & 0.4/0.6 \\\\"
    )
    assert row_of(table, "MuDSC (zip)") == (
        "MuDSC (zip) & \\textbf{74.0 $\\pm$ 2.8} & \\textbf{84.0 $\\pm$ 1.4} & \\textbf{87.0 $\\pm$ 1.4} & "
        "81.0 $\\pm$ 1.4 & 0.3/0.3 \\\\"
    )
    assert row_of(table, "Model A") == "Model A & 55.0 $\\pm$ 7.1 & 91.0 $\\pm$ 1.4 & 91.0 $\\pm$ 1.4 & -- & -- \\\\"
    assert row_of(table, "Ensemble").endswith("& -- \\\\") and "\\textbf" not in row_of(table, "Ensemble")
    assert table.count("\\textbf") == 4
    assert "chosen by joint accuracy on the merge slice" in table


def test_mudsc_layout_replaces_only_the_accuracy_table(mudsc_report: tuple[Path, list[Path]]) -> None:
    out_dir, written = mudsc_report
    names = {path.relative_to(out_dir).as_posix() for path in written}
    assert "tables/accuracy_fashion_mnist_vit.tex" not in names
    assert not (out_dir / "tables" / "accuracy_fashion_mnist_vit.tex").exists()
    assert {"tables/accuracy_fashion_mnist_resnet.tex", "tables/mudsc_fashion_mnist_vit.tex"} <= names
    assert not any(name.startswith("tables/mudsc_") and "vit" not in name for name in names)
    summary = (out_dir / "tables" / "summary_fashion_mnist.tex").read_text()
    assert "Method & ResNet-20 & VGG-11 \\#4 & ViT-T \\\\" in summary
    assert row_of(summary, "MuDSC (zip)") == "MuDSC (zip) & -- & -- & \\textbf{74.0 $\\pm$ 2.8} \\\\"
    main = (out_dir / "main.tex").read_text()
    assert "\\input{tables/mudsc_fashion_mnist_vit.tex}" in main


def test_layout_must_be_known_and_agree(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown table layout 'fancy'"):
        build_report([record("zipit", 0, 0.5, layout="fancy")], tmp_path, title="t")
    mixed = [record("zipit", 0, 0.5), record("zipit", 1, 0.6, layout="mudsc")]
    with pytest.raises(ValueError, match="disagree on 'layout'"):
        build_report(mixed, tmp_path, title="t")


def test_format_lams() -> None:
    assert format_lams({1: 0.6, 0: 0.4}) == "0.4/0.6"
    assert format_lams({0: 0.30000000000000004, 1: None}) == "0.3/--"
    assert format_lams({0: None}) == "--"


def test_lambda_figure_and_csv(mudsc_report: tuple[Path, list[Path]]) -> None:
    out_dir, written = mudsc_report
    stem = out_dir / "figures" / "lambda_fashion_mnist_vit"
    for ext in ("pdf", "png", "csv"):
        assert stem.with_suffix(f".{ext}") in written
    with open(stem.with_suffix(".csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == LAMBDA_COLUMNS
    # Method order as in the tables (align before zip), then λ ascending.
    assert [(row["method"], float(row["lam"])) for row in rows[:2]] == [("mudsc_align", 0.0), ("mudsc_align", 0.1)]
    assert [row["method"] for row in rows] == ["mudsc_align"] * 11 + ["mudsc_zip"] * 11
    for row in rows:
        of_method = [record for record in SWEEPS if record["method"] == row["method"]]
        points = [next(p for p in record["points"] if p["lam"] == float(row["lam"])) for record in of_method]
        test = [point["test"]["joint"] for point in points]
        merge = [point["merge"]["joint"] for point in points]
        assert float(row["test_joint_mean"]) == pytest.approx(sum(test) / 2, abs=1e-12)
        assert float(row["merge_joint_mean"]) == pytest.approx(sum(merge) / 2, abs=1e-12)
        assert float(row["test_joint_std"]) == pytest.approx(abs(test[0] - test[1]) / math.sqrt(2), abs=1e-12)
        assert row["selectable"] == str(0 < float(row["lam"]) < 1)
        assert int(row["test_joint_n"]) == 2 and int(row["n_pairs"]) == 2
    # By hand: align at λ 0.5 reads 0.55 (pair 0) and 0.57 (pair 1); pair 0 chose 0.5, pair 1 chose 0.6.
    at = {(row["method"], row["lam"]): row for row in rows}
    assert float(at[("mudsc_align", "0.5")]["test_joint_mean"]) == pytest.approx(0.56)
    assert float(at[("mudsc_zip", "0.5")]["merge_joint_mean"]) == pytest.approx(0.58)
    assert {key: int(row["chosen_pairs"]) for key, row in at.items() if int(row["chosen_pairs"])} == {
        ("mudsc_align", "0.5"): 1,
        ("mudsc_align", "0.6"): 1,
        ("mudsc_zip", "0.5"): 1,
        ("mudsc_zip", "0.6"): 1,
    }
    main = (out_dir / "main.tex").read_text()
    assert "\\includegraphics{figures/lambda_fashion_mnist_vit.pdf}" in main
    assert "\\label{fig:lambda-fashion_mnist-vit}" in main and "candidates 0.1 to 0.9" in main


def test_landscape_figure(mudsc_report: tuple[Path, list[Path]]) -> None:
    out_dir, written = mudsc_report
    for ext in ("pdf", "png"):
        path = out_dir / "figures" / f"landscape_fashion_mnist_vit.{ext}"
        assert path in written and path.stat().st_size > 0
    main = (out_dir / "main.tex").read_text()
    assert "\\includegraphics{figures/landscape_fashion_mnist_vit.pdf}" in main
    caption = next(line for line in main.splitlines() if "loss landscape" in line)
    assert "through Model A (origin), Model B and MuDSC (align)" in caption
    # Only ZipIt! is off the plane (MuDSC (align)'s 1e-9 is rounding); the caption names it and its distance.
    assert "ZipIt!\\_\\{13/20\\} at distance 0.25" in caption and "MuDSC (align) at distance" not in caption
    assert "BatchNorm" in caption and "merge slice" in caption and "test (100 per task)" in caption


def test_analysis_report_is_byte_identical_on_rerun(mudsc_report: tuple[Path, list[Path]]) -> None:
    out_dir, written = mudsc_report
    before = {path: path.read_bytes() for path in written}
    again = build_report(
        RECORDS + MUDSC_RECORDS, out_dir, title="MuDSC", method_order=MUDSC_ORDER, analysis=ANALYSIS[::-1]
    )
    assert again == written
    assert {path: path.read_bytes() for path in again} == before


def test_unknown_analysis_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown kind \\['nonsense'\\]"):
        build_report(RECORDS, tmp_path, title="t", analysis=[{"kind": "nonsense"}])


def test_cli_report_reads_analysis(tmp_path: Path) -> None:
    results, analysis = [], []
    for i, item in enumerate(MUDSC_RECORDS):
        results.append(tmp_path / f"result{i}.json")
        results[-1].write_text(json.dumps(item))
    for i, item in enumerate(ANALYSIS):
        analysis.append(tmp_path / f"analysis{i}.json")
        analysis[-1].write_text(json.dumps(item))
    out_dir = tmp_path / "paper"
    argv = ["report", "--results", *map(str, results), "--out-dir", str(out_dir), "--analysis", *map(str, analysis)]
    assert cli_main(argv) == 0
    assert (out_dir / "figures" / "lambda_fashion_mnist_vit.csv").exists()
    assert (out_dir / "figures" / "landscape_fashion_mnist_vit.pdf").exists()
    assert cli_main(["report", "--results", str(results[0]), "--out-dir", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "figures" / "lambda_fashion_mnist_vit.csv").exists()


def test_hetero_table(hetero_report: tuple[Path, list[Path]]) -> None:
    out_dir, _ = hetero_report
    table = (out_dir / "tables" / "hetero_fashion_mnist_vgg_depth.tex").read_text()
    assert "Method & Joint & Task A & Task B & Avg \\\\" in table
    assert "\\label{tab:hetero-fashion_mnist-vgg_depth}" in table and "mean $\\pm$ std over 2 model pairs" in table
    assert "minibatch linear CKA on the merge slice" in table
    # Blocks in the order the experiments' records arrive (not alphabetical), each under its title.
    header = "\\multicolumn{5}{@{}l}{\\textit{VGG19 $\\oplus$ VGG13}} \\\\"
    homo_header = "\\multicolumn{5}{@{}l}{\\textit{VGG19 + VGG19}} \\\\"
    lines = [line.strip() for line in table.splitlines()]
    assert lines.index(header) < lines.index(homo_header)
    assert lines[lines.index(homo_header) - 1] == "\\midrule"
    # Within a block: base models, the ensemble, then merges in method order.
    depth = lines[lines.index(header) + 1 : lines.index(homo_header)]
    labels = [line.split(" & ")[0] for line in depth if " & " in line]
    assert labels == ["Model A", "Model B", "Ensemble", "SMA, zip", "LMA, zip", "head, zip", "SMA, permute"]
    homo = lines[lines.index(homo_header) + 1 :]
    assert [line.split(" & ")[0] for line in homo if " & " in line] == [
        "Model A",
        "Model B",
        "ZipIt!\\_\\{13/20\\}",
        "W.Avg \\& co",
    ]
    # Best merge per column within each block: ZipIt!'s 68.0 does not take SMA's bold in the block above.
    assert depth[depth.index(row_of(table, "SMA, zip"))] == (
        "SMA, zip & \\textbf{62.0 $\\pm$ 2.8} & 71.0 $\\pm$ 1.4 & \\textbf{75.0 $\\pm$ 1.4} & "
        "\\textbf{73.0 $\\pm$ 1.4} \\\\"
    )
    assert row_of(table, "LMA, zip") == (
        "LMA, zip & 60.0 $\\pm$ 2.8 & 72.0 $\\pm$ 2.8 & 71.0 $\\pm$ 1.4 & 71.5 $\\pm$ 2.1 \\\\"
    )
    assert row_of(table, "SMA, permute") == (
        "SMA, permute & 57.0 $\\pm$ 1.4 & \\textbf{77.0 $\\pm$ 1.4} & 67.0 $\\pm$ 1.4 & 72.0 $\\pm$ 1.4 \\\\"
    )
    zipit = next(line for line in homo if line.startswith("ZipIt!"))
    assert zipit == (
        "ZipIt!\\_\\{13/20\\} & \\textbf{68.0 $\\pm$ 2.8} & \\textbf{82.0 $\\pm$ 2.8} & "
        "\\textbf{79.0 $\\pm$ 1.4} & \\textbf{80.5 $\\pm$ 2.1} \\\\"
    )
    model_a = next(line for line in depth if line.startswith("Model A"))
    assert model_a == "Model A & 55.0 $\\pm$ 7.1 & 91.0 $\\pm$ 1.4 & -- & 91.0 $\\pm$ 1.4 \\\\"
    assert table.count("\\textbf") == 8


def test_hetero_layout_replaces_only_the_accuracy_table(hetero_report: tuple[Path, list[Path]]) -> None:
    out_dir, written = hetero_report
    names = {path.relative_to(out_dir).as_posix() for path in written}
    assert {name for name in names if name.startswith("tables/")} == {
        *(
            f"tables/{stem}.{ext}"
            for stem in (
                "summary_fashion_mnist",
                "accuracy_fashion_mnist_resnet",
                "accuracy_fashion_mnist_vgg",
                "hetero_fashion_mnist_vgg_depth",
                "hetero_fashion_mnist_vgg13_solo",
            )
            for ext in ("tex", "html")
        ),
        "tables/hetero_fashion_mnist_vgg_depth.csv",
        "tables/hetero_fashion_mnist_vgg13_solo.csv",
    }
    # An experiment without a group gets a table of its own, from a single pair.
    solo = (out_dir / "tables" / "hetero_fashion_mnist_vgg13_solo.tex").read_text()
    assert "single model pair" in solo and "\\textit{VGG13 + VGG13}" in solo and "VGG19" not in solo
    assert row_of(solo, "ZipIt!\\_\\{13/20\\}") == (
        "ZipIt!\\_\\{13/20\\} & \\textbf{50.0} & \\textbf{60.0} & \\textbf{70.0} & \\textbf{65.0} \\\\"
    )
    assert "CKA" not in solo  # no depth-heterogeneous rows, no word about their alignment
    # Still in the summary table and the joint accuracy figure.
    summary = (out_dir / "tables" / "summary_fashion_mnist.tex").read_text()
    assert "VGG19 $\\oplus$ VGG13" in summary and "VGG19 + VGG19" in summary
    assert row_of(summary, "SMA, zip") == "SMA, zip & -- & -- & -- & -- & \\textbf{62.0 $\\pm$ 2.8} \\\\"
    assert "figures/joint_accuracy_fashion_mnist.pdf" in names
    main = (out_dir / "main.tex").read_text()
    assert "\\input{tables/hetero_fashion_mnist_vgg_depth.tex}" in main
    assert "\\input{tables/hetero_fashion_mnist_vgg13_solo.tex}" in main


def test_hetero_csv(hetero_report: tuple[Path, list[Path]]) -> None:
    out_dir, _ = hetero_report
    with open(out_dir / "tables" / "hetero_fashion_mnist_vgg_depth.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    stats = [f"{metric}_{stat}" for metric in ("joint", "tasks.A", "tasks.B", "task_avg") for stat in STATS]
    assert tuple(rows[0]) == (*HETERO_ID_COLUMNS, *stats)
    # Table order: the VGG19 ⊕ VGG13 block, then VGG19 + VGG19.
    assert [(row["experiment"], row["method"]) for row in rows] == [
        *(("vgg_depth", m) for m in ["base_a", "base_b", "ensemble", *STRATEGIES]),
        *(("vgg19_homo", m) for m in ["base_a", "base_b", "zipit", "weight_avg"]),
    ]
    assert {row["group"] for row in rows} == {"vgg_depth"}
    frame = aggregate(RECORDS + HETERO_RECORDS).set_index(["arch", "method"])
    for row in rows:
        expected = frame.loc[(row["experiment"], row["method"])]
        assert row["label"] == expected["label"] and row["arch_label"] == expected["arch_label"]
        for column in stats:
            if math.isnan(expected[column]):
                assert row[column] == "", column  # no value (a base model's other task), as in results.csv
            else:
                assert float(row[column]) == pytest.approx(float(expected[column]), abs=1e-12), column
    sma = next(row for row in rows if row["method"] == "het_sma_zip")
    assert float(sma["joint_mean"]) == pytest.approx(0.62) and float(sma["task_avg_mean"]) == pytest.approx(0.73)
    assert float(sma["tasks.A_std"]) == pytest.approx(0.02 / math.sqrt(2)) and sma["joint_n"] == "2"
    base_b = next(row for row in rows if row["experiment"] == "vgg_depth" and row["method"] == "base_b")
    assert base_b["tasks.A_mean"] == "" and base_b["tasks.A_n"] == "0"


def test_groups_must_agree(tmp_path: Path) -> None:
    mixed = [het("zipit", 0, 0.5, 0.6, 0.7, group="x"), het("zipit", 1, 0.5, 0.6, 0.7, group="y")]
    with pytest.raises(ValueError, match="disagree on 'group'"):
        build_report(mixed, tmp_path, title="t")


def test_global_positions() -> None:
    # VGG19 ⊕ VGG13 of the brief: stages of 6 deep and 4 shallow blocks.
    positions = [[0, 1, 3, 5], [0, 2, 3, 5], [0, 1, 2, 5]]
    stages = global_positions(positions, [6, 6, 6], [4, 4, 4])
    assert stages == [
        [(0, 0), (1, 1), (2, 3), (3, 5)],
        [(4, 6), (5, 8), (6, 9), (7, 11)],
        [(8, 12), (9, 13), (10, 14), (11, 17)],
    ]
    assert global_positions([[0, 2], [0]], [3, 2], [2, 1]) == [[(0, 0), (1, 2)], [(2, 3)]]
    with pytest.raises(ValueError, match="strictly increasing"):
        global_positions([[0, 0]], [3], [2])
    with pytest.raises(ValueError, match="outside"):
        global_positions([[0, 3]], [3], [2])
    with pytest.raises(ValueError, match="stages"):
        global_positions([[0, 1]], [3, 3], [2, 2])


def test_alignment_curves_draw_each_alignment_once() -> None:
    rows = [item for item in HETERO_RECORDS if item["pair"] == 0 and item["method"] in STRATEGIES]
    rows.sort(key=lambda item: HETERO_ORDER.index(item["method"]))
    curves = alignment_curves(rows)
    # SMA with zip and with permute share one curve; LMA has the same positions but is another strategy.
    assert [(curve.name, curve.methods) for curve in curves] == [
        ("SMA (segment)", ("het_sma_zip", "het_sma_align")),
        ("LMA", ("het_lma_zip",)),
        ("head", ("het_head_zip",)),
    ]
    assert curves[0].stages == (((0, 0), (1, 2)), ((2, 3), (3, 4)))
    assert curves[2].stages == (((0, 0), (1, 1)), ((2, 3), (3, 4)))
    # A strategy seen with two alignments gets two curves, told apart by their rows' labels.
    other = het("het_sma_align", 1, 0.5, 0.5, 0.5)
    two = alignment_curves([rows[0], {**other, "pair": 0}])
    assert [curve.name for curve in two] == ["SMA (segment) (SMA, zip)", "SMA (segment) (SMA, permute)"]
    assert {name for name, _, _ in STRATEGY_STYLES.values()} >= {"SMA (segment)", "LMA", "LMA (code)", "head–tail"}


def test_alignment_figure(hetero_report: tuple[Path, list[Path]]) -> None:
    out_dir, written = hetero_report
    names = {path.relative_to(out_dir).as_posix() for path in written}
    assert {name for name in names if name.startswith("figures/alignment_")} == {
        "figures/alignment_fashion_mnist_vgg_depth.pdf",
        "figures/alignment_fashion_mnist_vgg_depth.png",
    }
    main = (out_dir / "main.tex").read_text()
    assert "\\includegraphics{figures/alignment_fashion_mnist_vgg_depth.pdf}" in main
    assert "\\label{fig:alignment-fashion_mnist-vgg_depth}" in main
    caption = next(line for line in main.splitlines() if "depth alignment of model pair" in line)
    assert "VGG19 $\\oplus$ VGG13: depth alignment of model pair 0" in caption
    assert "minibatch linear CKA on the merge slice" in caption
    assert "deeper model (Model A, y axis)" in caption and "shallower one (Model B, x axis)" in caption
    # What is drawn: one legend entry and one line per distinct alignment, at the first pair's positions.
    rows = sorted(
        (item for item in HETERO_RECORDS if item["pair"] == 0 and item["method"] in STRATEGIES),
        key=lambda item: HETERO_ORDER.index(item["method"]),
    )
    fig = _alignment_map(rows[0]["source"]["notes"], alignment_curves(rows), "Model A", "Model B")
    legend = fig.legends[0]
    assert [text.get_text() for text in legend.get_texts()] == ["SMA (segment)", "LMA", "head"]
    lines = fig.axes[0].get_lines()
    sma = next(line for line in lines if line.get_label() == "SMA (segment)")
    ys = [y for y in sma.get_ydata() if not math.isnan(y)]
    assert ys == [0, 2, 3, 4]


def test_hetero_report_is_byte_identical_on_rerun(hetero_report: tuple[Path, list[Path]]) -> None:
    out_dir, written = hetero_report
    before = {path: path.read_bytes() for path in written}
    again = build_report(RECORDS + HETERO_RECORDS, out_dir, title="Hetero", method_order=HETERO_ORDER)
    assert again == written
    assert {path: path.read_bytes() for path in again} == before


def test_latex_to_html_inverts_latex_escape() -> None:
    text = r"W.Avg & co_{13/20}: 50% $x$ #1 a~b^c \d λ α β ⊕ × − <b>"
    assert latex_to_html(latex_escape(text)) == html.escape(text, quote=False)
    assert latex_to_html(r"\textbf{72.0 $\pm$ 2.8} \& --") == "<strong>72.0 ± 2.8</strong> &amp; –"
    assert latex_to_html(r"\textit{VGG19 $\oplus$ VGG13}: 2--3 pairs (\%)") == "<em>VGG19 ⊕ VGG13</em>: 2–3 pairs (%)"
    # Anything else would show the reader raw LaTeX: refused.
    for latex in (r"\emph{x}", "$x$", r"\textbf{x", "a}b", "{x}", "50%", "a_b"):
        with pytest.raises(ValueError, match=r"LaTeX|unbalanced"):
            latex_to_html(latex)


def table_rows(text: str) -> list[list[str]]:
    """Rows of a table.tex.j2 or table.html.j2 output as cell lists (block titles as one cell), in order;
    LaTeX cells converted with latex_to_html, so that both read the same where they agree."""
    if text.startswith("<!DOCTYPE html>"):
        rows = re.findall(r"<tr[^>]*>(.*?)</tr>", text)
        return [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row) for row in rows]
    lines = [line.strip() for line in text.splitlines() if line.strip().endswith("\\\\")]
    rows = []
    for line in lines:
        block = re.fullmatch(r"\\multicolumn\{\d+\}\{@\{\}l\}\{\\textit\{(.*)\}\} \\\\", line)
        cells = [block.group(1)] if block else line.removesuffix("\\\\").strip().split(" & ")
        rows.append([latex_to_html(cell) for cell in cells])
    return rows


@pytest.mark.parametrize("fixture", ["report", "mudsc_report", "hetero_report"])
def test_html_tables_have_the_latex_tables_cells(fixture: str, request: pytest.FixtureRequest) -> None:
    _, written = request.getfixturevalue(fixture)
    tex_tables = [path for path in written if path.parent.name == "tables" and path.suffix == ".tex"]
    assert tex_tables
    for tex in tex_tables:
        page = tex.with_suffix(".html")
        assert page in written
        latex, text = tex.read_text(), page.read_text(encoding="utf-8")
        assert table_rows(text) == table_rows(latex), tex.name
        caption = re.search(r"\\caption\{(.*)\}\n", latex).group(1)
        assert f'<caption><b class="name">Table.</b> {latex_to_html(caption)}</caption>' in text
        assert latex.count("\\textbf") == text.count("<strong>")
        # Rules between row kinds and blocks: every \midrule but the one under the header.
        assert latex.count("\\midrule") - 1 == len(re.findall(r'<tr class="[^"]*\brule\b', text))
        label = re.search(r"\\label\{(.*)\}", latex).group(1)
        assert f'<table id="{label}">' in text


def test_html_table_is_a_standalone_page(report: tuple[Path, list[Path]]) -> None:
    out_dir, _ = report
    text = (out_dir / "tables" / "accuracy_fashion_mnist_resnet.html").read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in text
    assert not re.search(r"<script|<link|\b(src|href)=|https?:", text)  # nothing to load, nothing to run
    assert "accuracy (%), mean ± std over 2 model pairs. Best merged joint accuracy in bold.</caption>" in text
    assert (
        "<tr><th>Method</th><th>Params</th><th>FLOPs</th><th>Joint</th><th>Task A</th><th>Task B</th><th>Avg</th>"
        in text
    )
    assert (
        '<tr class="rule"><td>Model A</td><td>0.27M</td><td>41M</td><td>55.0 ± 7.1</td><td>91.0 ± 1.4</td>'
        "<td>–</td><td>91.0 ± 1.4</td></tr>"
    ) in text
    assert "<td>ZipIt!_{13/20}</td><td>0.27M</td><td>41M</td><td><strong>72.0 ± 2.8</strong></td>" in text
    assert '<tr class="rule"><td>W.Avg &amp; co</td>' in text  # labels escaped; a rule where the kind changes


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def with_provenance(
    item: dict[str, Any], *, seed: int | None = None, commit: str = COMMIT, dirty: bool = False, config: Any = None
) -> dict[str, Any]:
    """`item` with what `hetmerge evaluate` records: split seed, the model's own seed, provenance, config slice."""
    source = {**item.get("source", {}), **({} if seed is None else {"seed": seed})}
    return {
        **item,
        "split_seed": item["pair"],
        "source": source,
        "config": config if config is not None else {"architecture": item["arch"]},
        "provenance": {
            "git": {"commit": commit, "dirty": dirty},
            "packages": {"hetmerge": "0.1.0", "torch": "2.3.1", "numpy": "2.0.0"},
            "python": "3.11.7",
            "cuda": None,
            "device": "cuda:0 (NVIDIA H100)" if item["pair"] else "cpu",
        },
    }


ZIPIT = {"label": "ZipIt!_{13/20}", "method": "zipit", "params": {"alpha": 0.5, "beta": 1}}
PROVENANCE_RECORDS = [
    with_provenance(record("base_a", 1, 0.6, 0.9, None), seed=1100),
    with_provenance(record("zipit", 0, 0.7), config=ZIPIT, commit="f" * 40, dirty=True),
    {k: v for k, v in record("weight_avg", 1, 0.4).items() if k != "provenance"},  # an older record: none at all
    with_provenance(record("base_a", 0, 0.5, 0.9, None), seed=100),
    with_provenance(record("zipit", 1, 0.7), seed=7, config=ZIPIT),
]


def test_provenance_csv(tmp_path: Path) -> None:
    written = build_report(PROVENANCE_RECORDS, tmp_path, title="t", method_order=["base_a", "zipit"])
    assert {tmp_path / "provenance.csv", tmp_path / "provenance.html"} <= set(written)
    with open(tmp_path / "provenance.csv", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert tuple(reader.fieldnames or ()) == PROVENANCE_COLUMNS
    # One row per record: by experiment, model pair, then method order.
    assert [(row["pair"], row["method"]) for row in rows] == [
        ("0", "base_a"),
        ("0", "zipit"),
        ("1", "base_a"),
        ("1", "zipit"),
        ("1", "weight_avg"),
    ]
    base = rows[0]
    assert base == {
        "dataset": "fashion_mnist",
        "experiment": "resnet",
        "method": "base_a",
        "label": "Model A",
        "pair": "0",
        "split_seed": "0",
        "seed": "100",
        "device": "cpu",
        "git_commit": COMMIT,
        "git_dirty": "false",
        "hetmerge": "0.1.0",
        "torch": "2.3.1",
        "python": "3.11.7",
        "cuda": "",
        "config": '{"architecture":"resnet"}',
    }
    assert rows[1]["git_commit"] == "f" * 40 and rows[1]["git_dirty"] == "true" and rows[1]["seed"] == ""
    assert json.loads(rows[1]["config"]) == ZIPIT and rows[1]["config"] == json.dumps(ZIPIT, separators=(",", ":"))
    assert rows[2]["device"] == "cuda:0 (NVIDIA H100)" and rows[3]["seed"] == "7"
    # A record without provenance, split seed or config slice still gets its row, with those fields empty.
    assert {k: v for k, v in rows[4].items() if v} == {
        "dataset": "fashion_mnist",
        "experiment": "resnet",
        "method": "weight_avg",
        "label": "W.Avg & co",
        "pair": "1",
    }


def test_provenance_html(tmp_path: Path) -> None:
    build_report(PROVENANCE_RECORDS, tmp_path, title="t", method_order=["base_a", "zipit"])
    text = (tmp_path / "provenance.html").read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and not re.search(r"<script|<link|\b(src|href)=|https?:", text)
    assert "of the 5 evaluation records" in text
    # The distinct values first, most common first: one code version would read as a single value each.
    assert (
        f"<dt>Git commit</dt>\n<dd><code>{COMMIT}</code> (3 records); <code>{'f' * 40} (uncommitted changes)</code> "
        "(1 record); <code>–</code> (1 record)</dd>"
    ) in text
    assert "<dt>torch</dt>\n<dd><code>2.3.1</code> (4 records); <code>–</code> (1 record)</dd>" in text
    assert "<dt>CUDA</dt>\n<dd><code>–</code> (5 records)</dd>" in text
    rows = [re.split(r"</td><td[^>]*>", row) for row in re.findall(r"<tr><td>(.*?)</td></tr>", text)]
    assert [row[:4] for row in rows] == [
        ["fashion_mnist", "resnet", "base_a", "0"],
        ["fashion_mnist", "resnet", "zipit", "0"],
        ["fashion_mnist", "resnet", "base_a", "1"],
        ["fashion_mnist", "resnet", "zipit", "1"],
        ["fashion_mnist", "resnet", "weight_avg", "1"],
    ]
    assert rows[0][4:] == [
        "0",
        "100",
        "cpu",
        f"<code>{COMMIT[:12]}</code>",
        "0.1.0",
        "2.3.1",
        "<code>{&#34;architecture&#34;:&#34;resnet&#34;}</code>",
    ]
    assert rows[1][7] == f"<code>{'f' * 12}+</code>"  # + marks uncommitted changes
    assert html.unescape(rows[1][10]) == f"<code>{json.dumps(ZIPIT, separators=(',', ':'))}</code>"
    assert rows[4][4:] == ["–", "–", "–", "<code>–</code>", "–", "–", "<code>–</code>"]


def test_provenance_is_byte_stable(tmp_path: Path) -> None:
    files = ("provenance.csv", "provenance.html")
    build_report(PROVENANCE_RECORDS, tmp_path / "a", title="t", method_order=["base_a", "zipit"])
    before = {name: (tmp_path / "a" / name).read_bytes() for name in files}
    build_report(PROVENANCE_RECORDS, tmp_path / "a", title="t", method_order=["base_a", "zipit"])
    build_report(PROVENANCE_RECORDS[::-1], tmp_path / "b", title="t", method_order=["base_a", "zipit"])
    for out in ("a", "b"):
        assert {name: (tmp_path / out / name).read_bytes() for name in files} == before, out


@pytest.mark.slow
def test_compile_latex(tmp_path: Path) -> None:
    # Every kind of artifact: standard, MuDSC and hetero tables, bar, λ, landscape and alignment figures.
    build_report(RECORDS + MUDSC_RECORDS + HETERO_RECORDS, tmp_path, title="Results & more", analysis=ANALYSIS)
    assert (tmp_path / "tables" / "mudsc_fashion_mnist_vit.tex").exists()
    assert (tmp_path / "tables" / "hetero_fashion_mnist_vgg_depth.tex").exists()
    assert (tmp_path / "figures" / "landscape_fashion_mnist_vit.pdf").exists()
    assert (tmp_path / "figures" / "alignment_fashion_mnist_vgg_depth.pdf").exists()
    pdf = compile_or_skip(tmp_path / "main.tex")
    assert pdf == tmp_path / "main.pdf"
    assert pdf.read_bytes().startswith(b"%PDF")
    assert not list(tmp_path.glob(".latex-*"))  # auxiliary files are cleaned up


@pytest.mark.slow
def test_compile_latex_failure_reports_log(tmp_path: Path) -> None:
    main_tex = tmp_path / "main.tex"
    main_tex.write_text("\\documentclass{article}\n\\begin{document}\n\\nosuchmacro\n\\end{document}\n")
    with pytest.raises(RuntimeError, match="Undefined control sequence"):
        compile_or_skip(main_tex)
    assert not (tmp_path / "main.pdf").exists()
