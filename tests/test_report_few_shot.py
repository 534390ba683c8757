"""Tests for the few-shot (FS-Merge) part of the report: the table (one block per few-shot size, rows in
configuration order, per-task / average / joint columns with mean ± std by hand, dashes, CSV), the validation of a
group, the joint-accuracy-against-size figure (which rows become lines, their plotted means, log axis, files) and a
whole report with few-shot groups next to a class-disjoint experiment."""

from __future__ import annotations

import copy
import csv
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_report import SCORES, make_run, result, tabulars, write

from hetmerge.report import build_report, load_report_data
from hetmerge.report.few_shot_figure import FewShotFigure, few_shot_figure, figure_lines, line_styles, sheets
from hetmerge.report.few_shot_table import FewShotTable, few_shot_groups
from hetmerge.report.figures import figure_style
from hetmerge.report.layout import declared_outputs

SEEDS = (0, 1)
MERGES = [
    ("average", "Average", "average"),
    ("regmean", "RegMean", "regmean"),
    ("kd", "KD", "distill"),
    ("fs_diagonal", "FS-Merge diagonal", "fs_merge"),
    ("fs_low_rank", "FS-Merge low-rank (r = 12)", "fs_merge"),
    ("zipit", "ZipIt!", "zipit"),
]
"""Configured merge rows (key, label, method); the row's index is its rank in `merge_joint`."""
OFFSET = {16: 0.0, 50: 0.02, 100: 0.04, 300: 0.06}
FULL = ("average", "regmean", "kd", "fs_diagonal", "fs_low_rank")
ROWS = {16: (*FULL, "zipit"), 100: FULL, 50: ("kd", "fs_low_rank"), 300: ("kd", "fs_low_rank")}
"""Merge rows per size: all at 16 and 100 (ZipIt! only at 16: one point, no line), KD and FS-Merge at 50 and 300."""
SIZES = (100, 16, 300, 50)
"""Experiments in spec order: not sorted, so the blocks' order is the table's doing."""


def merge_joint(row: int, size: int, seed: int) -> float:
    """Merge row `row` (index into MERGES): 0.30 + 0.05 per row + OFFSET[size] + 0.02 per seed."""
    return round(0.30 + 0.05 * row + OFFSET[size] + 0.02 * seed, 4)


def merge_tasks(joint: float, seed: int) -> dict[str, float]:
    """Task A 0.2 above joint and 0.04 more at seed 1, task B 0.1 above, so that seed 1 adds 0.06 to A, 0.02 to B and
    0.04 to their average (std 0.06/√2, 0.02/√2, 0.04/√2: 4.2, 1.4 and 2.8 points)."""
    return {"A": round(joint + 0.2 + 0.04 * seed, 4), "B": round(joint + 0.1, 4)}


def few_shot_experiments(
    root: Path,
    groups: Mapping[str, tuple[str, Sequence[int]]],
    rows: Mapping[int, Sequence[str]] = ROWS,
    seeds: Sequence[int] = SEEDS,
) -> list[dict[str, Any]]:
    """Result JSONs under `root` and the spec experiments of few-shot groups {group: (model label, sizes)}."""
    merges = {key: (r, label, method) for r, (key, label, method) in enumerate(MERGES)}
    experiments = []
    for group, (model_label, sizes) in groups.items():
        for size in sizes:
            key = f"{group}_{size}"
            spec_rows: list[dict[str, Any]] = []
            for t in "ab":
                results = {}
                for seed in seeds:
                    value = round(0.45 - 0.01 * "ab".index(t) + 0.02 * seed, 4)
                    tasks = {task: (0.9 + 0.02 * seed if task == t.upper() else None) for task in "AB"}
                    content = result("base", seed, value, tasks, source={"task": t.upper()})
                    score, correct = SCORES[f"model_{t}"]
                    content["predictions"] = {"score": score, "correct": correct}
                    results[str(seed)] = write(root, f"{key}/s{seed}/model_{t}.json", content)
                base = {"key": f"model_{t}", "label": f"Model {t.upper()}", "kind": "base"}
                spec_rows.append({**base, "results": results})
            if size in (16, 100):
                members = {str(seed): [spec_rows[i]["results"][str(seed)] for i in (0, 1)] for seed in seeds}
                ensemble = {"key": "ensemble", "label": "Ensemble", "kind": "ensemble", "method": "ensemble"}
                spec_rows.append({**ensemble, "params": {}, "analyses": [], "members": members})
            for row_key in rows[size]:
                r, label, method = merges[row_key]
                results = {}
                for seed in seeds:
                    joint = merge_joint(r, size, seed)
                    content = result("merge", seed, joint, merge_tasks(joint, seed), source={"method": method})
                    results[str(seed)] = write(root, f"{key}/s{seed}/{row_key}.json", content)
                merge = {"key": row_key, "label": label, "kind": "merge", "method": method}
                spec_rows.append({**merge, "params": {}, "analyses": [], "results": results})
            experiments.append(
                {
                    "key": key,
                    "label": f"{model_label}, {size} images per task",
                    "layout": "few_shot",
                    "group": group,
                    "few_shot": size,
                    "n_models": 2,
                    "models": [group, group],
                    "model_labels": [model_label, model_label],
                    "rows": spec_rows,
                    "analyses": {},
                }
            )
    return experiments


def few_shot_spec(root: Path, groups: Mapping[str, tuple[str, Sequence[int]]] | None = None) -> dict[str, Any]:
    """A spec of few-shot experiments only (the default: an MLP group at four sizes, a ViT group at 16 and 100)."""
    spec = make_run(root / "old", ["mlp"])  # the spec's frame; its one class-disjoint experiment is dropped
    groups = groups or {"mlp": ("MLP", SIZES), "vit": ("ViT", (16, 100))}
    return {**spec, "experiments": few_shot_experiments(root / "few_shot", groups)}


def blocks_of(tex: str) -> list[tuple[str, list[str]]]:
    """(block title, row labels) of a table's LaTeX, in order."""
    blocks: list[tuple[str, list[str]]] = []
    for line in tex.split("\\midrule", 1)[1].split("\\bottomrule")[0].splitlines():
        title = re.search(r"\\textit\{(.*?)\}", line)
        if title:
            blocks.append((title.group(1), []))
        elif line.strip().endswith("\\\\"):
            blocks[-1][1].append(line.split(" &")[0].strip())
    return blocks


def cells_of(tex: str) -> list[list[str]]:
    return [row for rows in tabulars(tex) for row in rows]


# --- the table -------------------------------------------------------------------------------------------------
def test_few_shot_table_blocks_rows_and_cells(tmp_path: Path) -> None:
    spec = few_shot_spec(tmp_path)
    data = load_report_data(spec)
    artifacts = FewShotTable().write(data, tmp_path / "out")
    assert [artifact.path.name for artifact in artifacts] == ["few_shot_mlp.tex", "few_shot_vit.tex"]
    for artifact in artifacts:
        assert all(path.is_file() for path in artifact.files)
    table = (tmp_path / "out/tables/few_shot_mlp.tex").read_text()
    assert "\\caption{Fashion-MNIST, MLP, 2 models: accuracy (\\%) of merging models trained" in table
    assert "mean $\\pm$ std over 2 seeds" in table
    cells = cells_of(table)
    assert cells[0] == ["Method", "Task A", "Task B", "Avg", "Joint"]
    full = ["Model A", "Model B", "Ensemble", "Average", "RegMean", "KD", "FS-Merge diagonal"]
    assert blocks_of(table) == [
        ("16 images per task", [*full, "FS-Merge low-rank (r = 12)", "ZipIt!"]),
        ("50 images per task", ["Model A", "Model B", "KD", "FS-Merge low-rank (r = 12)"]),
        ("100 images per task", [*full, "FS-Merge low-rank (r = 12)"]),
        ("300 images per task", ["Model A", "Model B", "KD", "FS-Merge low-rank (r = 12)"]),
    ]
    body = cells[1:]
    kd_16, kd_50 = [row for row in body if row[0] == "KD"][:2]
    # KD (row 2) at 16: joint 0.40/0.42, A 0.60/0.66, B 0.50/0.52, Avg 0.55/0.59.
    assert kd_16 == ["KD", "63.0 ± 4.2", "51.0 ± 1.4", "57.0 ± 2.8", "41.0 ± 1.4"]
    # at 50 (+0.02): joint 0.42/0.44, A 0.62/0.68, B 0.52/0.54, Avg 0.57/0.61.
    assert kd_50 == ["KD", "65.0 ± 4.2", "53.0 ± 1.4", "59.0 ± 2.8", "43.0 ± 1.4"]
    # Base models: their own task's accuracy (0.90/0.92), a dash for the other task and the average.
    assert body[0] == ["Model A", "91.0 ± 1.4", "–", "–", "46.0 ± 1.4"]
    assert body[1] == ["Model B", "–", "91.0 ± 1.4", "–", "45.0 ± 1.4"]
    # The ensemble: the head owners' task accuracies; joint from the predictions (right, right, wrong, wrong).
    assert body[2] == ["Ensemble", "91.0 ± 1.4", "91.0 ± 1.4", "91.0 ± 1.4", "50.0 ± 0.0"]
    # Best merge per column within each block: ZipIt! (row 5) at 16, FS-Merge low-rank (row 4) elsewhere.
    assert "ZipIt! & \\textbf{" in table and table.count("FS-Merge low-rank (r = 12) & \\textbf{") == 3
    assert table.count("\\textbf") == 4 * 4


def test_few_shot_table_csv(tmp_path: Path) -> None:
    spec = few_shot_spec(tmp_path, {"mlp": ("MLP", SIZES)})
    FewShotTable().write(load_report_data(spec), tmp_path / "out")
    with open(tmp_path / "out/tables/few_shot_mlp.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames is not None and reader.fieldnames[:10] == [
        "dataset",
        "group",
        "experiment",
        "few_shot",
        "n_models",
        "arch_label",
        "method",
        "label",
        "kind",
        "n_pairs",
    ]
    assert reader.fieldnames[10:] == [
        f"{metric}_{stat}" for metric in ("tasks.A", "tasks.B", "task_avg", "joint") for stat in ("mean", "std", "n")
    ]
    assert [row["few_shot"] for row in rows] == ["16"] * 9 + ["50"] * 4 + ["100"] * 8 + ["300"] * 4
    fs = next(row for row in rows if (row["few_shot"], row["method"]) == ("300", "fs_low_rank"))
    # FS-Merge low-rank (row 4) at 300: joint 0.56/0.58, task average 0.71/0.75.
    assert (fs["group"], fs["experiment"], fs["n_pairs"]) == ("mlp", "mlp_300", "2")
    assert float(fs["joint_mean"]) == pytest.approx(0.57) and float(fs["task_avg_mean"]) == pytest.approx(0.73)
    assert float(fs["joint_std"]) == pytest.approx(0.02 / 2**0.5)
    model_b = next(row for row in rows if row["method"] == "model_b")
    assert model_b["tasks.A_mean"] == "" and model_b["tasks.A_n"] == "0"


def test_few_shot_groups_refuse_what_would_mislabel(tmp_path: Path) -> None:
    spec = few_shot_spec(tmp_path, {"g": ("MLP", (16, 100))})

    def fails(edit: dict[str, Any], match: str) -> None:
        edited = copy.deepcopy(spec)
        edited["experiments"][1].update(edit)
        with pytest.raises(ValueError, match=match):
            few_shot_groups(edited)
        with pytest.raises(ValueError, match=match):
            declared_outputs(edited)

    fails({"few_shot": 16}, r"few-shot group 'g' has several experiments of the same few_shot: \[16, 16\]")
    fails({"models": ["vit", "vit"]}, r"few-shot group 'g' mixes the models \[\('g', 'g'\), \('vit', 'vit'\)\]")
    fails({"n_models": 3}, r"few-shot experiment 'g_100' has n_models 3 but 2 models")
    for bad in (None, 0, -16, 16.0, "16", True):
        fails({"few_shot": bad}, rf"few-shot experiment 'g_100' has few_shot {re.escape(repr(bad))}, not a positive")
    assert [(group.key, group.sizes) for group in few_shot_groups(spec)] == [("g", [16, 100])]
    assert FewShotTable().outputs({**spec, "experiments": []}) == []


# --- the figure ------------------------------------------------------------------------------------------------
def test_figure_lines_are_the_rows_at_every_size(tmp_path: Path) -> None:
    spec = few_shot_spec(tmp_path)
    data = load_report_data(spec)
    [sheet] = sheets(spec)
    assert [group.key for group in sheet.groups] == ["mlp", "vit"]
    lines = figure_lines(data, sheet.groups[0])
    drawn = ["KD", "FS-Merge low-rank (r = 12)"]
    assert list(dict.fromkeys(lines["line"])) == drawn  # no base model, nothing missing a size (Average: 16, 100)
    kd = lines[lines["line"] == "KD"]
    assert kd["few_shot"].tolist() == [16, 50, 100, 300]
    # KD (row 2): joint 0.40 + OFFSET + 0.01 (mean of seeds 0 and 1).
    assert kd["joint_mean"].tolist() == pytest.approx([0.41, 0.43, 0.45, 0.47])
    assert list(dict.fromkeys(figure_lines(data, sheet.groups[1])["line"]))[:2] == ["Ensemble", "Average"]

    styles = line_styles(sheet.groups)
    assert list(styles)[:2] == drawn and styles["Ensemble"].colour == "#000000" and styles["Ensemble"].linestyle == "--"
    assert len({styles[label].colour for label in drawn}) == len(drawn)
    with figure_style():
        fig = few_shot_figure(data, sheet, styles)
    mlp, vit = fig.axes
    plotted = {container.get_label(): container.lines[0].get_xydata() for container in mlp.containers}
    assert list(plotted) == drawn
    assert plotted["FS-Merge low-rank (r = 12)"] == pytest.approx(np.array([[16, 51], [50, 53], [100, 55], [300, 57]]))
    assert mlp.get_xscale() == "log" and [t.get_text() for t in mlp.get_xticklabels()] == ["16", "50", "100", "300"]
    assert [t.get_text() for t in vit.get_xticklabels()] == ["16", "100"]
    assert [text.get_text() for text in fig.legends[0].get_texts()] == list(styles)  # both panels' lines


def test_figure_files_are_the_declared_ones(tmp_path: Path) -> None:
    spec = few_shot_spec(tmp_path)
    [artifact] = FewShotFigure().write(load_report_data(spec), tmp_path / "out")
    written = {path.relative_to(tmp_path / "out").as_posix() for path in artifact.files}
    assert written == {output.path for output in FewShotFigure().outputs(spec)}
    assert written == {"figures/few_shot_accuracy.pdf", "figures/few_shot_accuracy.png"}
    assert all(path.stat().st_size > 0 for path in artifact.files)
    assert "mean $\\pm$ std over 2 seeds" in artifact.caption and "log scale" in artifact.caption


def test_no_figure_without_a_row_at_two_sizes(tmp_path: Path) -> None:
    spec = few_shot_spec(tmp_path, {"mlp": ("MLP", (16,))})
    assert sheets(spec) == [] and FewShotFigure().outputs(spec) == []
    assert FewShotFigure().write(load_report_data(spec), tmp_path / "out") == []


# --- the whole report ------------------------------------------------------------------------------------------
def test_report_with_few_shot_groups(tmp_path: Path) -> None:
    spec = make_run(tmp_path / "results", ["mlp"])
    spec["experiments"] += few_shot_experiments(tmp_path / "results" / "few_shot", {"mlp_fs": ("MLP", SIZES)})
    out_dir = tmp_path / "paper"
    build_report(spec, out_dir)
    declared = declared_outputs(spec)
    assert {output.path for output in declared} == {
        path.relative_to(out_dir).as_posix() for path in out_dir.rglob("*") if path.is_file()
    }
    report = Path(__file__).parents[1] / "report"
    assert all((report / output.caption).is_file() for output in declared if output.caption)
    main = (out_dir / "main.tex").read_text()
    assert "\\input{tables/few_shot_mlp_fs.tex}" in main and "\\includegraphics{figures/few_shot_accuracy.pdf}" in main
    # the few-shot tables set their sizes side by side: the summaries leave them out
    assert "mlp\\_fs" not in (out_dir / "tables/summary.tex").read_text()
