"""Tests for the same-task fusion part of the report: the share-weighted ensemble (accuracy and macro F1 by hand and
against scikit-learn), F1 in the aggregate, the fusion table (columns by N, dashes where a row or model is missing,
rules between method families, CSV), the accuracy-against-N figure (styles, sheets) and a whole report that mixes
class-disjoint and fusion experiments."""

from __future__ import annotations

import copy
import csv
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from sklearn.metrics import f1_score
from test_report import compile_or_skip, make_run, provenance, tabulars, write

from hetmerge.report import build_report, load_report_data
from hetmerge.report.data import ensemble_result, macro_f1, weighted_ensemble
from hetmerge.report.fusion_figure import FusionFigure, family_name, importance_linestyle, row_styles, sheets
from hetmerge.report.fusion_table import FusionTable, fusion_groups
from hetmerge.report.grouped import grid
from hetmerge.report.layout import declared_outputs

SEEDS = (0, 1)
CLASSES = 3
LABELS = [0, 1, 2, 0]
BASE_LOGITS = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [0.0, 1.0, 0.5]]
"""Every base model of the fake runs answers 0, 1, 2, 1 on the four test images: the ensemble gets 3 of 4."""
MERGES = [
    ("average", "Vanilla averaging", "average", None),
    ("last_layer_kd", "Last-layer KD", "last_layer_kd", None),
    ("otf_uniform", "OTF, Uniform", "otfusion", "uniform"),
    ("otf_conductance", "OTF, Conductance", "otfusion", "conductance"),
    ("hf_uniform", "HF, Uniform", "hf", "uniform"),
    ("kf_uniform", "KF, Uniform", "kf", "uniform"),
    ("kf_deeplift", "KF, DeepLIFT", "kf", "deeplift"),
]
"""Configured rows after the ensemble: (key, label, method, importance); HF runs at N = 2 only."""


# --- a synthetic same-task run ---------------------------------------------------------------------------------
def same_task_result(kind: str, seed: int, joint: float, f1: float | None, **extra: Any) -> dict[str, Any]:
    metrics = {"joint": joint, "tasks": {"all": joint}, "task_avg": joint, "n_images": 4, "params": 1000, "flops": 9000}
    return {
        "kind": kind,
        "dataset": "fashion_mnist",
        "split_seed": seed,
        "tasks": {"all": list(range(CLASSES))},
        "metrics": {**metrics, **({} if f1 is None else {"f1": f1})},
        "timings": {},
        "provenance": provenance(seed),
        **extra,
    }


def base_joint(model: int, seed: int) -> float:
    return round(0.80 - 0.05 * model + 0.02 * seed, 4)


def merge_joint(n_models: int, row: int, seed: int) -> float:
    """Merge row `row` (index into MERGES) at N: later rows are better, larger N worse, seed 1 better by 0.02."""
    return round(0.50 + 0.03 * row - 0.01 * n_models + 0.02 * seed, 4)


def fusion_experiments(
    root: Path, groups: Mapping[str, tuple[str, Sequence[int]]], seeds: Sequence[int] = SEEDS
) -> list[dict[str, Any]]:
    """Result JSONs under `root` and the spec experiments of fusion groups {group: (setting, Ns)}."""
    experiments = []
    for group, (setting, counts) in groups.items():
        for n in counts:
            key = f"{group}_{n}"
            rows: list[dict[str, Any]] = []
            for i in range(n):
                letter = "ABCDEFGH"[i]
                results = {}
                for seed in seeds:
                    predictions = {
                        "score": [max(row) for row in BASE_LOGITS],
                        "correct": [True, True, True, False],
                        "logits": BASE_LOGITS,
                        "labels": LABELS,
                    }
                    content = same_task_result(
                        "base", seed, base_joint(i, seed), 0.7, predictions=predictions, data_share=[1 / n] * CLASSES
                    )
                    results[str(seed)] = write(root, f"{key}/s{seed}/model_{letter.lower()}.json", content)
                rows.append(
                    {"key": f"model_{letter.lower()}", "label": f"Model {letter}", "kind": "base", "results": results}
                )
            members = {str(seed): [row["results"][str(seed)] for row in rows] for seed in seeds}
            rows.append(
                {
                    "key": "ensemble",
                    "label": "Ensemble",
                    "kind": "ensemble",
                    "method": "ensemble",
                    "params": {},
                    "analyses": [],
                    "members": members,
                }
            )
            for r, (row_key, label, method, importance) in enumerate(MERGES):
                if method == "hf" and n != 2:
                    continue
                params = {} if importance is None else {"importance": importance}
                results = {
                    str(seed): write(
                        root,
                        f"{key}/s{seed}/{row_key}.json",
                        same_task_result("merge", seed, merge_joint(n, r, seed), 0.5, source={"method": method}),
                    )
                    for seed in seeds
                }
                rows.append(
                    {
                        "key": row_key,
                        "label": label,
                        "kind": "merge",
                        "method": method,
                        "params": params,
                        "analyses": [],
                        "results": results,
                    }
                )
            experiments.append(
                {
                    "key": key,
                    "label": f"MLP, {setting}, N = {n}",
                    "layout": "fusion",
                    "group": group,
                    "setting": setting,
                    "n_models": n,
                    "models": ["mlp"] * n,
                    "model_labels": ["MLP"] * n,
                    "rows": rows,
                    "analyses": {},
                }
            )
    return experiments


def fusion_spec(root: Path, groups: Mapping[str, tuple[str, Sequence[int]]] | None = None) -> dict[str, Any]:
    """A spec of fusion experiments only (the default: non-IID at N = 2 and 4, sharded at N = 2)."""
    spec = make_run(root / "old", ["mlp"])  # the spec's frame; its one class-disjoint experiment is dropped
    groups = groups or {"mlp_non_iid": ("non_iid", (4, 2)), "mlp_sharded": ("sharded", (2,))}
    return {**spec, "experiments": fusion_experiments(root / "fusion", groups)}


def row_of(table: str, label: str) -> list[str]:
    """The plain cells of the row labelled `label` in a table's LaTeX."""
    return next(row for rows in tabulars(table) for row in rows if row[0] == label)


# --- the share-weighted ensemble -------------------------------------------------------------------------------
def member(probabilities: list[list[float]], share: list[float], labels: list[int]) -> dict[str, Any]:
    """A same-task base result whose softmax probabilities are `probabilities` (logits: their logarithms)."""
    logits = np.log(np.array(probabilities)).tolist()
    predictions = {
        "score": [max(row) for row in logits],
        "correct": [int(np.argmax(row)) == label for row, label in zip(logits, labels, strict=True)],
        "logits": logits,
        "labels": labels,
    }
    result = same_task_result("base", 0, 0.5, 0.5, predictions=predictions, data_share=share)
    result["metrics"]["n_images"] = len(labels)
    return result


HAND_A = [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]]
HAND_B = [[0.1, 0.1, 0.8], [0.8, 0.1, 0.1], [0.6, 0.3, 0.1]]
HAND_LABELS = [2, 1, 0]


def test_weighted_ensemble_by_hand() -> None:
    """Shares A (0.75, 0.5, 0), B (0.25, 0.5, 1). Weighted sums: image 1 (0.475, 0.2, 0.8) → 2, right; image 2
    (0.35, 0.4, 0.1) → 1, right (the unweighted mean would say 0); image 3 (0.225, 0.25, 0.1) → 1, wrong."""
    a = member(HAND_A, [0.75, 0.5, 0.0], HAND_LABELS)
    b = member(HAND_B, [0.25, 0.5, 1.0], HAND_LABELS)
    ensemble = ensemble_result([a, b], ["a.json", "b.json"])
    metrics = ensemble["metrics"]
    assert metrics["joint"] == 0.6666666865348816  # 2/3 rounded through float32, as evaluation does
    assert metrics["tasks"] == {"all": metrics["joint"]} and metrics["task_avg"] == metrics["joint"]
    # Answers 2, 1, 1 for truths 2, 1, 0: F1 of class 0 is 0, of class 1 2/3 (one hit, one false alarm), of class 2 1.
    assert metrics["f1"] == pytest.approx(5 / 9)
    assert metrics["f1"] == pytest.approx(f1_score(HAND_LABELS, [2, 1, 1], average="macro", zero_division=0))
    assert (metrics["params"], metrics["flops"], metrics["n_images"]) == (2000, 18000, 3)
    assert ensemble["kind"] == "ensemble" and ensemble["source"] == {"method": "ensemble"}
    # Equal shares: the plain mean of probabilities, which answers 2, 0, 2 (one right).
    equal = [member(p, [0.5] * 3, HAND_LABELS) for p in (HAND_A, HAND_B)]
    assert ensemble_result(equal, ["a.json", "b.json"])["metrics"]["joint"] == pytest.approx(1 / 3)


@settings(max_examples=30, deadline=None)
@given(
    logits=hnp.arrays(
        np.float64, st.tuples(st.integers(2, 4), st.integers(1, 6), st.integers(2, 5)), elements=st.floats(-5, 5)
    ),
)
def test_equal_shares_give_the_mean_of_probabilities(logits: np.ndarray) -> None:
    """The full-data setting (shares 1/N) is the plain probability-averaging ensemble."""
    shares = np.full((logits.shape[0], logits.shape[2]), 1 / logits.shape[0])
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    mean = probabilities.mean(axis=0)
    answer = weighted_ensemble(logits, shares)
    # the answer's mean probability is the largest (exactly the argmax, but for rounding between near-ties)
    assert np.allclose(mean[np.arange(len(answer)), answer], mean.max(axis=1), rtol=0, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(pairs=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=30))
def test_macro_f1_is_sklearns(pairs: list[tuple[int, int]]) -> None:
    true, predicted = (np.array(column) for column in zip(*pairs, strict=True))
    assert macro_f1(true, predicted) == pytest.approx(f1_score(true, predicted, average="macro", zero_division=0))


def test_weighted_ensemble_members_must_match() -> None:
    a = member(HAND_A, [0.75, 0.5, 0.0], HAND_LABELS)

    def fails(b: dict[str, Any], match: str) -> None:
        with pytest.raises(ValueError, match=match):
            ensemble_result([a, b], ["a.json", "b.json"])

    fails(member(HAND_B, [0.25, 0.5, 1.0], [2, 1, 1]), r"b\.json has other test labels than a\.json")
    fails(member(HAND_B, [0.25, 0.5], HAND_LABELS), r"b\.json: its data_share has 2 entries, expected 3")
    narrow = member([row[:2] for row in HAND_B], [0.25, 0.5, 1.0], HAND_LABELS)
    fails(narrow, r"b\.json: its logits have shape \(3, 2\), expected \(3 images, 3 classes\)")
    fails(
        {k: v for k, v in member(HAND_B, [0.2] * 3, HAND_LABELS).items() if k != "data_share"},
        r"b\.json has no data_share, but a\.json has one",
    )
    bare = member(HAND_B, [0.25, 0.5, 1.0], HAND_LABELS)
    del bare["predictions"]["logits"]
    fails(bare, r"b\.json has a data_share but no predictions\.logits")


def test_f1_is_aggregated_only_where_results_have_it(tmp_path: Path) -> None:
    old = load_report_data(make_run(tmp_path / "old", ["mlp"])).frame
    assert not any(column.startswith("f1") for column in old.columns)  # results.csv of old runs is unchanged
    frame = load_report_data(fusion_spec(tmp_path)).frame.set_index(["arch", "method"])
    assert list(frame.columns[frame.columns.get_loc("joint_n") + 1 :][:3]) == ["f1_mean", "f1_std", "f1_n"]
    assert frame.loc[("mlp_non_iid_4", "kf_uniform"), "f1_mean"] == pytest.approx(0.5)
    ensemble = frame.loc[("mlp_non_iid_4", "ensemble")]
    # Answers 0, 1, 2, 1 for truths 0, 1, 2, 0: F1 2/3, 2/3 and 1; accuracy 3/4 at both seeds.
    assert ensemble["f1_mean"] == pytest.approx(7 / 9) and ensemble["joint_mean"] == 0.75
    assert ensemble["joint_std"] == 0.0 and ensemble["f1_n"] == 2


# --- the table -------------------------------------------------------------------------------------------------
def test_fusion_table_cells_rules_and_csv(tmp_path: Path) -> None:
    spec = fusion_spec(tmp_path)
    data = load_report_data(spec)
    for artifact in FusionTable().write(data, tmp_path / "out"):
        assert all(path.is_file() for path in artifact.files)
    table = (tmp_path / "out/tables/fusion_mlp_non_iid.tex").read_text()
    assert "\\caption{Fashion-MNIST, MLP, non-IID: test accuracy (\\%) of fusing N models of one task" in table
    assert "mean $\\pm$ std over 2 seeds" in table and "per-class Dirichlet proportions" in table
    rows = tabulars(table)[0]
    assert rows[0] == ["Method", "N = 2", "N = 4"]  # columns by N, whatever the spec order
    assert [row[0] for row in rows[1:]] == [
        "Model A",
        "Model B",
        "Model C",
        "Model D",
        "Ensemble",
        "Vanilla averaging",
        "Last-layer KD",
        "OTF, Uniform",
        "OTF, Conductance",
        "HF, Uniform",
        "KF, Uniform",
        "KF, DeepLIFT",
    ]
    # Model C: 0.70/0.72, only at N = 4. HF (row 4): 0.50 + 0.12 - 0.02 = 0.60/0.62, only at N = 2.
    assert row_of(table, "Model C") == ["Model C", "–", "71.0 ± 1.4"]
    assert row_of(table, "HF, Uniform") == ["HF, Uniform", "61.0 ± 1.4", "–"]
    assert row_of(table, "Ensemble") == ["Ensemble", "75.0 ± 0.0", "75.0 ± 0.0"]
    # The best merge of each column (KF, DeepLIFT, row 6: 0.66/0.68 at N = 2, 0.64/0.66 at N = 4) in bold, alone.
    assert "KF, DeepLIFT & \\textbf{67.0 $\\pm$ 1.4} & \\textbf{65.0 $\\pm$ 1.4}" in table
    assert table.count("\\textbf") == 2
    # Rules: after the models; around the single-row references (ensemble, averaging, KD); between OTF, HF, KF.
    lines = [line.strip() for line in table.splitlines()]
    ruled = [lines[i + 1].split(" &")[0] for i, line in enumerate(lines) if line == "\\midrule"]
    assert ruled == ["Model A", "Ensemble", "OTF, Uniform", "HF, Uniform", "KF, Uniform"]  # Model A: the header rule
    with open(tmp_path / "out/tables/fusion_mlp_non_iid.csv", newline="") as handle:
        frame = list(csv.DictReader(handle))
    assert [(row["n_models"], row["method"]) for row in frame][:3] == [
        ("2", "model_a"),
        ("2", "model_b"),
        ("2", "ensemble"),
    ]
    hf = next(row for row in frame if row["method"] == "hf_uniform")
    assert (hf["setting"], hf["group"], hf["experiment"]) == ("non_iid", "mlp_non_iid", "mlp_non_iid_2")
    assert float(hf["joint_mean"]) == pytest.approx(0.61) and float(hf["f1_mean"]) == 0.5 and hf["f1_n"] == "2"
    sharded = (tmp_path / "out/tables/fusion_mlp_sharded.tex").read_text()
    assert "MLP, sharded:" in sharded and tabulars(sharded)[0][0] == ["Method", "N = 2"]


def test_fusion_groups_refuse_what_would_mislabel(tmp_path: Path) -> None:
    spec = fusion_spec(tmp_path, {"g": ("non_iid", (2, 4))})

    def fails(edit: dict[str, Any], match: str, index: int = 1) -> None:
        edited = copy.deepcopy(spec)
        edited["experiments"][index].update(edit)
        with pytest.raises(ValueError, match=match):
            fusion_groups(edited)

    fails({"setting": "dirichlet"}, r"fusion experiment 'g_4' has setting 'dirichlet', not one of")
    fails({"n_models": 3}, r"fusion experiment 'g_4' has n_models 3 but 4 models")
    fails({"setting": "sharded"}, r"fusion group 'g' mixes the settings \['non_iid', 'sharded'\]")
    fails({"n_models": 2, "models": ["mlp"] * 2}, r"fusion group 'g' has several experiments of the same N: \[2, 2\]")
    assert [group.key for group in fusion_groups(spec)] == ["g"]
    assert FusionTable().outputs({**spec, "experiments": []}) == []


# --- the figure ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("labels", "name"),
    [
        (["KF, Uniform", "KF, DeepLIFT"], "KF"),
        (["KF-Gradient, Uniform", "KF-Gradient, Conductance"], "KF-Gradient"),
        (["OTF (DeepLIFT)", "OTF (Deeper)"], "OTF"),
        (["Vanilla averaging"], "Vanilla averaging"),
        (["Alpha", "Beta"], "Alpha / Beta"),
    ],
)
def test_family_name(labels: list[str], name: str) -> None:
    assert family_name(labels) == name


def test_row_styles_colour_by_method_and_dash_by_importance(tmp_path: Path) -> None:
    groups = fusion_groups(fusion_spec(tmp_path))
    styles = row_styles(groups)
    assert set(styles) == {key for key, *_ in MERGES}  # merges only: the references have styles of their own
    assert styles["kf_uniform"].colour == styles["kf_deeplift"].colour != styles["otf_uniform"].colour
    assert styles["kf_uniform"].marker == styles["kf_deeplift"].marker and styles["kf_uniform"].family == "KF"
    assert (styles["kf_uniform"].linestyle, styles["kf_deeplift"].linestyle) == ("-", ":")
    assert styles["otf_conductance"].linestyle == "-." and styles["average"].linestyle == "-"
    assert styles["average"].family == "Vanilla averaging" and len({s.colour for s in styles.values()}) == 5
    with pytest.raises(ValueError, match="no line style for importance 'featureablation'"):
        importance_linestyle("featureablation")


def test_sheets_hold_at_most_nine_panels() -> None:
    assert [grid(n) for n in (1, 2, 3, 4, 5, 7, 9)] == [(1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (3, 3), (3, 3)]
    experiment = {"layout": "fusion", "setting": "iid", "models": ["mlp"] * 2, "n_models": 2, "model_labels": ["MLP"]}
    spec = {"experiments": [{**experiment, "key": f"e{i}", "group": f"g{i}"} for i in range(10)]}
    assert [(sheet.stem, sheet.part, len(sheet.groups)) for sheet in sheets(spec)] == [
        ("fusion_accuracy_1", 1, 9),
        ("fusion_accuracy_2", 2, 1),
    ]
    assert [sheet.stem for sheet in sheets({"experiments": spec["experiments"][:9]})] == ["fusion_accuracy"]


def test_figure_of_five_groups_fits_the_text_width(tmp_path: Path) -> None:
    """Five panels on a 2 x 3 grid (the sixth cell left empty), each group at N = 2 only: lone markers."""
    groups = {f"g{i}": (setting, (2,)) for i, setting in enumerate(["full", "iid", "non_iid", "sharded", "iid"])}
    spec = fusion_spec(tmp_path, groups)
    [artifact] = FusionFigure().write(load_report_data(spec), tmp_path / "out")
    assert {path.relative_to(tmp_path / "out").as_posix() for path in artifact.files} == {
        output.path for output in FusionFigure().outputs(spec)
    }
    with Image.open(tmp_path / "out/figures/fusion_accuracy.png") as image:
        width, height = image.size
    assert width == round(6.75 * 300) and height <= width
    assert "(solid Uniform, dash-dotted Conductance, dotted DeepLIFT)" in artifact.caption


# --- the whole report ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """A report of class-disjoint experiments (standard, MuDSC-like, hetero) and fusion groups, built whole."""
    root = tmp_path_factory.mktemp("mixed")
    spec = make_run(root / "results", ["mlp", "vit", "deep", "homo"])
    groups = {"mlp_non_iid": ("non_iid", (2, 4)), "mlp_sharded": ("sharded", (2, 4)), "mlp_full": ("full", (2,))}
    spec["experiments"] += fusion_experiments(root / "results" / "fusion", groups)
    build_report(spec, root / "paper")
    return spec, root / "paper"


def test_mixed_report_writes_every_declared_file(mixed: tuple[dict[str, Any], Path]) -> None:
    spec, out_dir = mixed
    declared = declared_outputs(spec)
    paths = {output.path for output in declared}
    assert paths == {path.relative_to(out_dir).as_posix() for path in out_dir.rglob("*") if path.is_file()}
    fusion = {output.path for output in FusionTable().outputs(spec) + FusionFigure().outputs(spec)}
    assert fusion == {
        *(f"tables/fusion_mlp_{g}.{ext}" for g in ("non_iid", "sharded", "full") for ext in ("tex", "html", "csv")),
        "figures/fusion_accuracy.pdf",
        "figures/fusion_accuracy.png",
    }
    report = Path(__file__).parents[1] / "report"
    assert all((report / output.caption).is_file() for output in declared if output.caption)
    main = (out_dir / "main.tex").read_text()
    assert "\\input{tables/fusion_mlp_non_iid.tex}" in main and "\\includegraphics{figures/fusion_accuracy.pdf}" in main
    # main.tex order: the fusion tables after the hetero ones, the figure after the other figures
    assert main.index("hetero_depth") < main.index("fusion_mlp_non_iid") < main.index("figures/summary_standard")
    assert main.index("figures/alignment_deep") < main.index("figures/fusion_accuracy")
    assert "line style: its neuron importance (solid Uniform, dash-dotted Conductance, dotted DeepLIFT)" in main
    # the class-disjoint tables are as without the fusion experiments
    alone = make_run(out_dir.parent / "results", ["mlp", "vit", "deep", "homo"])
    build_report(alone, out_dir.parent / "alone")
    for name in ("standard_mlp.tex", "mudsc_vit.tex", "hetero_depth.tex", "hetero_depth.csv"):
        assert (out_dir / "tables" / name).read_text() == (out_dir.parent / "alone/tables" / name).read_text()


def test_mixed_report_lists_fusion_rows_everywhere(mixed: tuple[dict[str, Any], Path]) -> None:
    spec, out_dir = mixed
    with open(out_dir / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    kf = next(row for row in rows if (row["arch"], row["method"]) == ("mlp_sharded_4", "kf_deeplift"))
    assert float(kf["joint_mean"]) == pytest.approx(0.65) and float(kf["f1_mean"]) == 0.5
    zipit = next(row for row in rows if (row["arch"], row["method"]) == ("mlp", "zipit"))
    assert zipit["f1_mean"] == "" and zipit["f1_n"] == "0"  # results without F1: no value, not zero
    with open(out_dir / "provenance.csv", newline="") as handle:
        experiments = {row["experiment"] for row in csv.DictReader(handle)}
    assert {"mlp_full_2", "mlp_sharded_4"} <= experiments
    overview = (out_dir / "overview.html").read_text()
    assert "MLP, full, N = 2" in overview and "KF, DeepLIFT" in overview
    # the summaries leave out what the fusion tables and figure already compare
    summary = (out_dir / "tables/summary.tex").read_text()
    assert "summary of the group depth" in summary and "mlp\\_sharded" not in summary and "N = 2" not in summary
    assert not (out_dir / "figures/summary_fusion.png").exists()
    fusion_only = {**spec, "experiments": [e for e in spec["experiments"] if e["layout"] == "fusion"]}
    assert not [output.path for output in declared_outputs(fusion_only) if "summary" in output.path]


@pytest.mark.slow
def test_mixed_report_compiles(mixed: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    shutil.copytree(mixed[1], tmp_path / "paper")
    pdf = compile_or_skip(tmp_path / "paper" / "main.tex")
    log = (tmp_path / "paper" / "main.log").read_text(errors="replace")
    assert pdf.read_bytes().startswith(b"%PDF") and "Overfull \\hbox" not in log and "Float too large" not in log
    assert not re.search(r"LaTeX Warning: Reference .* undefined", log)
