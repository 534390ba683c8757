"""Tests for hetmerge.report: aggregation numbers, table contents, determinism and LaTeX compilation."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import jinja2
import pytest

from hetmerge.report import (
    LatexUnavailableError,
    aggregate,
    build_report,
    compile_latex,
    latex_environment,
    latex_escape,
)
from hetmerge.report.aggregate import methods_in
from hetmerge.report.latex import LATEX_PACKAGES, format_accuracy, humanize_count

METHODS = {
    "base_a": ("Model A", "base"),
    "base_b": ("Model B", "base"),
    "ensemble": ("Ensemble", "base"),
    "weight_avg": ("W.Avg & co", "merge"),
    "zipit": ("ZipIt!_{13/20}", "merge"),
}
ARCHS = {"resnet": "ResNet-20", "vgg": "VGG-11 #4"}


def record(
    method: str,
    pair: int,
    joint: float | None,
    a: float | None = 0.9,
    b: float | None = 0.8,
    *,
    arch: str = "resnet",
    dataset: str = "fashion_mnist",
) -> dict[str, Any]:
    label, kind = METHODS[method]
    known = [x for x in (a, b) if x is not None]
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
    expected = {
        "results.csv",
        "main.tex",
        "tables/accuracy_fashion_mnist_resnet.tex",
        "tables/accuracy_fashion_mnist_vgg.tex",
        "tables/summary_fashion_mnist.tex",
        "figures/joint_accuracy_fashion_mnist.pdf",
        "figures/joint_accuracy_fashion_mnist.png",
    }
    assert {path.relative_to(out_dir).as_posix() for path in written} == expected
    assert all(path.stat().st_size > 0 for path in written)
    main = (out_dir / "main.tex").read_text()
    assert "\\title{Results \\& more}" in main and "\\section{fashion\\_mnist}" in main
    for name in expected - {"results.csv", "main.tex", "figures/joint_accuracy_fashion_mnist.png"}:
        assert f"{{{name}}}" in main
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


@pytest.mark.slow
def test_compile_latex(tmp_path: Path) -> None:
    build_report(RECORDS, tmp_path, title="Results & more")
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
