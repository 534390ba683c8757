"""Tests for hetmerge.report (figures: tests/test_report_figures.py): loading a report spec and its result files
(ensembles scored from predictions, errors naming the file), aggregation numbers, the table layouts (contents,
unique row labels, width, LaTeX and HTML from the same cells), files written = files declared, label edits,
provenance, the overview, main.tex, determinism and LaTeX compilation."""

from __future__ import annotations

import copy
import csv
import html
import json
import math
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetmerge.report import (
    LatexUnavailableError,
    aggregate,
    build_report,
    compile_latex,
    latex_environment,
    latex_escape,
    load_report_data,
)
from hetmerge.report.data import ensemble_result
from hetmerge.report.hetero_table import ID_COLUMNS, HeteroTable
from hetmerge.report.latex import LATEX_PACKAGES, render_to
from hetmerge.report.layout import Layout, declared_outputs
from hetmerge.report.mudsc_table import MudscTable
from hetmerge.report.overview import Overview
from hetmerge.report.provenance import PROVENANCE_COLUMNS, Provenance
from hetmerge.report.results_csv import ResultsCsv
from hetmerge.report.standard_table import StandardTable
from hetmerge.report.summary_table import SummaryTable, panel_table
from hetmerge.report.tables import (
    TEXT_WIDTH_PT,
    chosen_cells,
    format_accuracy,
    humanize_count,
    text_width,
    unique_labels,
    write_tables,
)

TABLE_LAYOUTS: tuple[Layout, ...] = (
    SummaryTable(),
    StandardTable(),
    MudscTable(),
    HeteroTable(),
    ResultsCsv(),
    Provenance(),
    Overview(),
)
"""The layouts of this part of the report (the figure layouts are tested in tests/test_report_figures.py)."""
COMMIT = "0123456789abcdef0123456789abcdef01234567"


# --- a synthetic run: result JSONs in tmp_path and the spec naming them ------------------------------------------
def spec_row(key: str, label: str, method: str, analyses: Sequence[str] = (), **params: Any) -> dict[str, Any]:
    return {"key": key, "label": label, "kind": "merge", "method": method, "params": params, "analyses": list(analyses)}


EXPERIMENTS: dict[str, dict[str, Any]] = {
    "mlp": {
        "label": "MLP {small}",
        "layout": "standard",
        "rows": [
            spec_row("average", "W.Avg & co", "average"),
            spec_row("zipit", "ZipIt!", "zipit", alpha=0.3, stop_after=None),
            spec_row("zip_half", "ZipIt! 1/2", "zipit", ["partial_zip"], alpha=0.3, stop_after="fc0"),
        ],
        "analyses": {"partial_zip": ["zip_half"]},
    },
    "vit": {
        "label": "ViT-T",
        "layout": "mudsc",
        "rows": [
            spec_row("wm_align", "Git Re-Basin", "chooser", solver="align", lam=0.0),
            spec_row("weight_matching", "Git Re-Basin", "weight_matching"),
            spec_row("act_zip", "ZipIt", "zipit", alpha=0.5, stop_after=None),
            spec_row("zipit", "ZipIt!", "zipit", alpha=0.3, stop_after=None),
            spec_row("chooser", "Chooser (align)", "chooser", ["lambda_curve", "landscape"], solver="align", lam=None),
        ],
        "analyses": {"lambda_curve": ["chooser"], "landscape": {"row": "chooser", "results": {"0": "landscape.json"}}},
    },
    "deep": {
        "label": "VGG19 ⊕ VGG13",
        "layout": "hetero",
        "group": "depth",
        "rows": [spec_row("seg_zip", "SMA, zip", "aligner", ["alignment"], strategy="segment", solver="zip")],
        "analyses": {"alignment": {"rows": ["seg_zip"], "results": {"0": "alignment0.json", "1": "alignment1.json"}}},
    },
    "homo": {
        "label": "VGG19 + VGG19",
        "layout": "hetero",
        "group": "depth",
        "ensemble": False,
        "rows": [spec_row("act_zip", "ZipIt", "zipit", alpha=0.5, stop_after=None)],
    },
}
SEEDS = (0, 1)
SCORES = {
    "model_a": ([2.0, 0.5, 1.0, 0.1], [True, False, False, True]),
    "model_b": ([1.0, 0.7, 1.0, 0.3], [False, True, True, False]),
}
"""Base predictions on 4 test images: the ensemble answers with A, B, A (tie: the first), B: right, right,
wrong, wrong, so its joint accuracy is 0.5."""
DEEP, SHALLOW = [4, 4, 4], [2, 2, 2]


def joint(exp: int, row: int, seed: int) -> float:
    """Row `row` of experiment `exp`: 0.30 + 0.04 per row + 0.01 per experiment + 0.02 per seed."""
    return round(0.30 + 0.04 * row + 0.01 * exp + 0.02 * seed, 4)


def provenance(seed: int) -> dict[str, Any]:
    return {
        "git": {"commit": COMMIT, "dirty": False},
        "packages": {"hetmerge": "0.1.0", "torch": "2.3.1"},
        "python": "3.11.7",
        "cuda": "13.0",  # torch's build, recorded on the CPU run (seed 0) too
        "device": "cuda:0 (NVIDIA H100)" if seed else "cpu",
    }


def result(kind: str, seed: int, value: float, tasks: Mapping[str, float | None], **extra: Any) -> dict[str, Any]:
    scored = [v for v in tasks.values() if v is not None]
    return {
        "kind": kind,
        "dataset": "fashion_mnist",
        "split_seed": seed,
        "tasks": {"A": [0, 1], "B": [2, 3]},
        "metrics": {
            "joint": value,
            "task_avg": sum(scored) / len(scored) if len(scored) == len(tasks) else None,
            "tasks": dict(tasks),
            "n_images": 4,
            "params": 272_474,
            "flops": 41_000_000,
        },
        "timings": {"eval_seconds": 0.1},
        "provenance": provenance(seed),
        **extra,
    }


def curve(chosen: float) -> dict[str, Any]:
    def accuracy(lam: float, offset: float) -> dict[str, Any]:
        return {"joint": 0.5 + offset - abs(lam - chosen) / 4, "task_avg": None, "tasks": {}}

    lams = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    points = [
        {"lam": lam, "selectable": 0 < lam < 1, "merge": accuracy(lam, 0.01), "test": accuracy(lam, 0)} for lam in lams
    ]
    return {"param": "lam", "chosen": chosen, "points": points}


def landscape() -> dict[str, Any]:
    xs, ys = [-0.5 + 0.5 * i for i in range(5)], [-0.5 + 0.5 * j for j in range(4)]

    def loss(cx: float) -> list[list[float]]:
        return [[0.05 + (x - cx) ** 2 + y**2 for x in xs] for y in ys]

    def point(method: str, x: float, y: float) -> dict[str, Any]:
        return {"method": method, "x": x, "y": y, "off_plane": 0.0, "loss": {"A": 1.0, "B": 1.0}}

    points = [point("model_a", 0, 0), point("model_b", 1, 0), point("chooser", 0.5, 1)]
    return {
        "kind": "landscape",
        "plane": {"origin": "model_a", "u": "model_b", "v": "chooser"},
        "images": "test (4 per task)",
        "bn_reset": True,
        "x": xs,
        "y": ys,
        "loss": {"A": loss(0), "B": loss(1)},
        "points": points,
        "seconds": 1.0,
        "provenance": {},
    }


def alignment(seed: int) -> dict[str, Any]:
    cka = [[0.5 + 0.03 * i + 0.01 * j + 0.01 * seed for j in range(sum(SHALLOW))] for i in range(sum(DEEP))]
    return {
        "kind": "alignment",
        "deep_model": 0,
        "deep_blocks": DEEP,
        "shallow_blocks": SHALLOW,
        "cka": cka,
        "strategies": {"segment": {"positions": [[0, 2], [1, 3], [0, 3]], "score": 1.0}},
        "provenance": {},
    }


def write(root: Path, name: str, content: Any) -> str:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return str(path)


def make_run(
    root: Path,
    experiments: Sequence[str] = tuple(EXPERIMENTS),
    seeds: Sequence[int] = SEEDS,
    catalog: Mapping[str, Mapping[str, Any]] = EXPERIMENTS,
) -> dict[str, Any]:
    """Write the result JSONs of `experiments` (keys of `catalog`) under `root`; return the spec naming them."""
    spec_experiments = []
    for e, key in enumerate(experiments):
        config = catalog[key]
        base = [{"key": f"model_{t}", "label": f"Model {t.upper()}", "kind": "base"} for t in "ab"]
        rows: list[dict[str, Any]] = copy.deepcopy(base)
        if config.get("ensemble", True):
            rows.append(
                {"key": "ensemble", "label": "Ensemble", "kind": "ensemble", "method": "ensemble", "params": {}}
            )
        rows += copy.deepcopy(config["rows"])
        for r, row in enumerate(rows):
            files: dict[str, str] = {}
            for seed in seeds:
                value = joint(e, r, seed)
                name = f"{key}/s{seed}/{row['key']}.json"
                if row["kind"] == "base":
                    task = row["key"][-1].upper()
                    tasks = {t: (value + 0.2 if t == task else None) for t in "AB"}
                    score, correct = SCORES[row["key"]]
                    content = result("base", seed, value, tasks, source={"task": task, "seed": 100 * seed + r})
                    content["predictions"] = {"score": score, "correct": correct}
                elif row["kind"] == "merge":
                    params = row["params"]
                    source = {"method": row["method"], "params": params, "units": 2}
                    if params.get("stop_after"):
                        source["cut"] = 1
                    chosen = 0.4 if seed == 0 else 0.6
                    extra = {"curve": curve(chosen)} if "lambda_curve" in row["analyses"] else {}
                    content = result("merge", seed, value, {"A": value + 0.2, "B": value + 0.1}, source=source, **extra)
                else:
                    continue
                files[str(seed)] = write(root, name, content)
            if row["kind"] == "ensemble":
                row["members"] = {str(seed): [f"{root}/{key}/s{seed}/model_{t}.json" for t in "ab"] for seed in seeds}
            else:
                row["results"] = files
        analyses = copy.deepcopy(config.get("analyses", {}))
        if "landscape" in analyses:
            analyses["landscape"]["results"] = {"0": write(root, f"{key}/landscape.json", landscape())}
        if "alignment" in analyses:
            analyses["alignment"]["results"] = {
                str(seed): write(root, f"{key}/alignment{seed}.json", alignment(seed)) for seed in seeds
            }
        spec_experiments.append(
            {
                "key": key,
                "label": config["label"],
                "layout": config["layout"],
                "group": config.get("group", key),
                "models": [key, key],
                "model_labels": [f"{key}-A", f"{key}-B"],
                "rows": rows,
                "analyses": analyses,
            }
        )
    return {
        "title": "hetmerge: Fashion-MNIST & more",
        "name": "default",
        "dataset": {"name": "fashion_mnist", "label": "Fashion-MNIST"},
        "seeds": list(seeds),
        "config": {"dataset": {"name": "fashion_mnist"}, "report": {"title": "hetmerge: Fashion-MNIST & more"}},
        "experiments": spec_experiments,
    }


def default_sized() -> dict[str, dict[str, Any]]:
    """A catalog shaped like the default config: 4 standard experiments with partial merges, 3 MuDSC-like ones
    with a chosen parameter, 3 hetero groups of 4 experiments; labels as long as the default's."""
    zips = [spec_row(f"zip_{i}", f"ZipIt! {i}/20", "zipit", alpha=0.3, stop_after=f"s{i}") for i in (7, 13)]
    standard = [
        spec_row("average", "W.Avg", "average"),
        spec_row("weight_matching", "Git Re-Basin", "weight_matching"),
        spec_row("permute", "Permute", "permute"),
        spec_row("zipit", "ZipIt!", "zipit", alpha=0.3, beta=0.125),
    ]
    choosers = [
        spec_row("average", "W.Avg", "average"),
        spec_row("wm_align", "Git Re-Basin", "chooser", solver="align", lam=0.0),
        spec_row("act_align", "A. Align", "permute"),
        spec_row("act_zip", "ZipIt", "zipit", alpha=0.5, beta=1.0),
        spec_row("weight_zip", "W. Zip", "chooser", solver="zip", lam=0.0),
        spec_row("chooser", "MuDSC (align)", "chooser", ["lambda_curve"], solver="align", lam=None),
        spec_row("chooser_zip", "MuDSC (zip)", "chooser", ["lambda_curve"], solver="zip", lam=None),
    ]
    depth = [
        spec_row(f"het_{key}", label, "aligner", strategy=key)
        for key, label in [("sma", "SMA, zip"), ("lma", "LMA, zip"), ("code", "LMA (code), zip"), ("head", "head, zip")]
    ]
    catalog: dict[str, dict[str, Any]] = {}
    for key, label in [("mlp", "MLP"), ("vgg", "VGG-11 (x1/8)"), ("resnet", "ResNet-20 (x1/2)")]:
        catalog[key] = {"label": label, "layout": "standard", "rows": [*standard, *zips]}
    catalog["vgg_3models"] = {"label": "VGG-11 (x1/8), 3 models", "layout": "standard", "rows": standard}
    for key, label in [
        ("resnet_mudsc", "ResNet-20 (x1/2), MuDSC"),
        ("resnet_gn", "ResNet-20-GN (x1/2)"),
        ("vit", "ViT (4 blocks, 64 wide, 4 heads)"),
    ]:
        catalog[key] = {"label": label, "layout": "mudsc", "rows": choosers}
    for group, (deep, shallow) in {
        "vgg_depth": ("VGG19 (x1/16)", "VGG13 (x1/16)"),
        "resnet_depth": ("ResNet-50 (x1/4)", "ResNet-26 (x1/4)"),
        "resnet_width": ("ResNet-20 (x1/2)", "ResNet-20 (x1/4)"),
    }.items():
        for suffix, pair, rows in [
            ("", (deep, shallow), depth),
            ("_rev", (shallow, deep), depth[:2]),
            ("_deep", (deep, deep), choosers[2:4]),
            ("_shallow", (shallow, shallow), choosers[2:4]),
        ]:
            catalog[group + suffix] = {
                "label": " + ".join(pair),
                "layout": "hetero",
                "group": group,
                "rows": rows,
                "ensemble": suffix in ("", "_rev"),
            }
    return catalog


def write_layouts(spec: Mapping[str, Any], out_dir: Path, layouts: Sequence[Layout] = TABLE_LAYOUTS) -> set[str]:
    """Run `layouts` alone (no figures: fast) and return the files they wrote, relative to `out_dir`."""
    data = load_report_data(spec)
    for layout in layouts:
        layout.write(data, out_dir)
    return {path.relative_to(out_dir).as_posix() for path in out_dir.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, list[Path]]:
    """The whole synthetic run built by build_report: every table and figure layout."""
    root = tmp_path_factory.mktemp("run")
    spec = make_run(root / "results")
    return spec, root / "report", build_report(spec, root / "report")


def read(out_dir: Path, name: str) -> str:
    return (out_dir / name).read_text(encoding="utf-8")


def row_of(table: str, label: str) -> str:
    return next(line.strip() for line in table.splitlines() if line.strip().startswith(label + " &"))


# --- loading: ensembles, records, errors ----------------------------------------------------------------------
def test_ensemble_is_scored_from_predictions_by_hand() -> None:
    a = result("base", 0, 0.6, {"A": 0.9, "B": None})
    b = result("base", 0, 0.5, {"A": None, "B": 0.8})
    a["metrics"]["n_images"] = b["metrics"]["n_images"] = 3
    a["predictions"] = {"score": [2.0, 0.5, 1.0], "correct": [True, False, False]}
    b["predictions"] = {"score": [1.0, 0.7, 1.0], "correct": [False, True, True]}
    ensemble = ensemble_result([a, b], ["a.json", "b.json"])
    # Image 1: A scores higher and is right; image 2: B scores higher and is right; image 3: a tie, A wins, wrong.
    assert ensemble["metrics"]["joint"] == pytest.approx(2 / 3, rel=1e-7)
    assert ensemble["metrics"]["joint"] == 0.6666666865348816  # rounded through float32, as evaluation does
    assert ensemble["metrics"]["tasks"] == {"A": 0.9, "B": 0.8}
    assert ensemble["metrics"]["task_avg"] == (0.9 + 0.8) / 2
    assert (ensemble["metrics"]["params"], ensemble["metrics"]["flops"]) == (2 * 272_474, 2 * 41_000_000)
    assert ensemble["source"] == {"method": "ensemble"} and ensemble["provenance"] == a["provenance"]
    # The other order: B wins the tie, which it gets right.
    assert ensemble_result([b, a], ["b.json", "a.json"])["metrics"]["joint"] == 1.0


def test_ensemble_members_must_match() -> None:
    a = result("base", 0, 0.6, {"A": 0.9, "B": None}, predictions={"score": [1.0] * 4, "correct": [True] * 4})
    b = {**copy.deepcopy(a), "split_seed": 1}
    with pytest.raises(ValueError, match=r"b\.json has split_seed 1, but a\.json has 0"):
        ensemble_result([a, b], ["a.json", "b.json"])
    with pytest.raises(ValueError, match="all have a head for task 'A'"):
        ensemble_result([a, copy.deepcopy(a)], ["a.json", "b.json"])
    bare = {key: value for key, value in a.items() if key != "predictions"}
    with pytest.raises(ValueError, match=r"ensemble member b\.json has no predictions"):
        ensemble_result([a, bare], ["a.json", "b.json"])
    short = copy.deepcopy(a)
    short["predictions"]["score"] = [1.0]
    with pytest.raises(ValueError, match=r"b\.json: its predictions do not cover the 4 test images"):
        ensemble_result([a, short], ["a.json", "b.json"])


def test_records_and_aggregate(tmp_path: Path) -> None:
    spec = make_run(tmp_path)
    data = load_report_data(spec)
    assert len(data.records) == 2 * sum(len(experiment["rows"]) for experiment in spec["experiments"])
    record = next(r for r in data.records if (r["arch"], r["method"], r["pair"]) == ("vit", "chooser", 1))
    assert record["dataset_label"] == "Fashion-MNIST" and record["layout"] == "mudsc" and record["group"] == "vit"
    assert record["config"] == {
        "method": "chooser",
        "params": {"solver": "align", "lam": None},
        "analyses": ["lambda_curve", "landscape"],
    }
    assert record["curve"]["chosen"] == 0.6 and record["split_seed"] == 1
    frame = data.frame.set_index(["arch", "method"])
    # mlp's zipit is row 4 of experiment 0: joint 0.46 and 0.48, so 47.0 ± 1.4 (sample std 0.02 / √2).
    zipit = frame.loc[("mlp", "zipit")]
    assert zipit["joint_mean"] == pytest.approx(0.47) and zipit["joint_std"] == pytest.approx(0.02 / math.sqrt(2))
    assert (zipit["joint_n"], zipit["n_pairs"], zipit["label"], zipit["kind"]) == (2, 2, "ZipIt!", "merge")
    assert frame.loc[("mlp", "ensemble"), "joint_mean"] == 0.5 and frame.loc[("mlp", "ensemble"), "kind"] == "ensemble"
    base = frame.loc[("mlp", "model_a")]
    assert base["tasks.B_n"] == 0 and math.isnan(base["tasks.B_mean"]) and base["tasks.A_mean"] == pytest.approx(0.51)
    # Rows in the order row keys are first seen in the spec (zipit in mlp, before vit's own rows).
    order = ["model_a", "model_b", "ensemble", "zipit", "wm_align", "weight_matching", "act_zip", "chooser"]
    assert list(frame.loc["vit"].index) == order
    assert set(data.analyses) == {
        str(tmp_path / "vit/landscape.json"),
        str(tmp_path / "deep/alignment0.json"),
        str(tmp_path / "deep/alignment1.json"),
    }


def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    spec = make_run(tmp_path, ["mlp"])
    path = Path(spec["experiments"][0]["rows"][4]["results"]["1"])  # zipit, seed 1
    good = path.read_text()

    def fails(content: str | None, match: str) -> None:
        if content is None:
            path.unlink()
        else:
            path.write_text(content)
        with pytest.raises(ValueError, match=match):
            load_report_data(spec)
        path.write_text(good)

    fails(None, f"{re.escape(str(path))} does not exist")
    fails(good[: len(good) // 2], f"{re.escape(str(path))} is not valid JSON")
    fails("[1, 2]", f"{re.escape(str(path))}: expected a JSON object, found list")
    content = json.loads(good)
    fails(
        json.dumps({**content, "split_seed": 0}),
        f"{re.escape(str(path))} has split_seed 0, but the report spec expects 1",
    )
    fails(json.dumps({**content, "kind": "base"}), "has kind 'base', but the report spec expects 'merge'")
    fails(json.dumps({**content, "dataset": "cifar10"}), "has dataset 'cifar10'")
    del content["metrics"]["flops"]
    fails(json.dumps(content), f"{re.escape(str(path))} lacks metrics.flops")
    landscape_spec = make_run(tmp_path / "l", ["vit"])
    analysis = Path(landscape_spec["experiments"][0]["analyses"]["landscape"]["results"]["0"])
    analysis.write_text(json.dumps({"kind": "alignment"}))
    with pytest.raises(ValueError, match=f"{re.escape(str(analysis))} has kind 'alignment'.*as 'landscape'"):
        load_report_data(landscape_spec)
    del spec["experiments"][0]["rows"][4]["results"]["1"]
    with pytest.raises(ValueError, match="experiment 'mlp', row 'zipit', seed 1 has no 'results' entry"):
        load_report_data(spec)


def test_aggregate_single_value_has_no_std_and_rejects_conflicts(tmp_path: Path) -> None:
    records = [dict(r) for r in load_report_data(make_run(tmp_path, ["mlp"])).records]
    single = [r for r in records if r["pair"] == 0]
    row = aggregate(single).set_index("method").loc["zipit"]
    assert row["joint_n"] == 1 and math.isnan(row["joint_std"])
    assert format_accuracy(*(pd.Series([row[f"joint_{s}"]]) for s in ("mean", "std", "n")))[0] == "46.0"
    with pytest.raises(ValueError, match="duplicate evaluation record"):
        aggregate([*records, records[0]])
    with pytest.raises(ValueError, match="disagree on 'label'"):
        aggregate([*records[:-1], {**records[-1], "label": "Other"}])


# --- formatting and labels -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "text"),
    [(1_200_000, "1.2M"), (680_000_000, "0.68G"), (272_474, "0.27M"), (41e6, "41M"), (50, "50"), (math.nan, "–")],
)
def test_humanize_count(value: float, text: str) -> None:
    assert humanize_count(value) == text


def test_format_accuracy() -> None:
    texts = format_accuracy(
        pd.Series([0.55, 0.5, math.nan]), pd.Series([math.sqrt(0.005), math.nan, math.nan]), pd.Series([2, 1, 0])
    )
    assert list(texts) == ["55.0 ± 7.1", "50.0", "–"]


def test_latex_escape() -> None:
    assert latex_escape("W.Avg & co") == r"W.Avg \& co"
    assert latex_escape("ZipIt!_{13/20}") == r"ZipIt!\_\{13/20\}"
    assert latex_escape("48.2 ± 1.0 – λ") == r"48.2 $\pm$ 1.0 -- $\lambda$"
    assert latex_escape(r"50% $x$ #1 a~b^c \d") == (
        r"50\% \$x\$ \#1 a\textasciitilde{}b\textasciicircum{}c \textbackslash{}d"
    )


def test_unique_labels_tell_apart_rows_that_read_alike() -> None:
    rows = [
        {"key": "model_a", "label": "Model A", "kind": "base"},
        {"key": "weight_matching", "label": "Git Re-Basin", "kind": "merge", "method": "weight_matching", "params": {}},
        {"key": "wm_align", "label": "Git Re-Basin", "kind": "merge", "method": "mudsc", "params": {"lam": 0.0}},
        {
            "key": "zipit",
            "label": "ZipIt!",
            "kind": "merge",
            "method": "zipit",
            "params": {"alpha": 0.3, "beta": 0.125},
        },
        {
            "key": "act_zip",
            "label": "ZipIt",
            "kind": "merge",
            "method": "zipit",
            "params": {"alpha": 0.5, "beta": 0.125},
        },
        {"key": "same_a", "label": "Same", "kind": "merge", "method": "m", "params": {"x": [1, 2]}},
        {"key": "same_b", "label": "same", "kind": "merge", "method": "m", "params": {"x": [1, 2]}},
    ]
    assert unique_labels(rows) == [
        "Model A",
        "Git Re-Basin (weight_matching)",
        "Git Re-Basin (mudsc)",
        "ZipIt! (alpha 0.3)",
        "ZipIt (alpha 0.5)",
        "Same (same_a)",
        "same (same_b)",
    ]


# --- tables ----------------------------------------------------------------------------------------------------
def test_standard_table(run: tuple[dict[str, Any], Path, list[Path]]) -> None:
    _, out_dir, _ = run
    table = read(out_dir, "tables/standard_mlp.tex")
    assert "Method & Params & FLOPs & Joint & Task A & Task B & Avg \\\\" in table
    assert (
        "\\caption{Fashion-MNIST, MLP \\{small\\}: accuracy (\\%), mean $\\pm$ std over 2 model pairs (seeds)." in table
    )
    assert "\\label{tab:standard_mlp}" in table
    # Model A: joint 0.30/0.32, task A 0.50/0.52; only its own task's head, so no task average.
    assert row_of(table, "Model A") == "Model A & 0.27M & 41M & 31.0 $\\pm$ 1.4 & 51.0 $\\pm$ 1.4 & -- & -- \\\\"
    assert row_of(table, "Ensemble").startswith("Ensemble & 0.54M & 82M & 50.0 $\\pm$ 0.0 &")
    # Only merges compete for bold, and only on Joint: the last row (ZipIt! 1/2, 0.50/0.52) has the best.
    assert table.count("\\textbf") == 1
    assert row_of(table, "ZipIt! 1/2").startswith("ZipIt! 1/2 & 0.27M & 41M & \\textbf{51.0 $\\pm$ 1.4} &")
    assert "W.Avg \\& co &" in table
    lines = [line.strip() for line in table.splitlines()]
    # Rules where the kind changes: base models | ensemble | merges.
    assert lines[lines.index(row_of(table, "Ensemble")) - 1] == "\\midrule"
    assert lines[lines.index(row_of(table, "W.Avg \\& co")) - 1] == "\\midrule"


def test_mudsc_table_shows_chosen_values_and_unique_labels(run: tuple[dict[str, Any], Path, list[Path]]) -> None:
    _, out_dir, _ = run
    table = read(out_dir, "tables/mudsc_vit.tex")
    assert "Method & Joint & Per-Task Avg & Task A & Task B & $\\lambda$ \\\\" in table
    assert "$\\lambda$: the value each seed's merge chose by joint accuracy on the held-out merge slice" in table
    # The chooser is row 7 of experiment 1: joint 0.59/0.61, A +0.2, B +0.1; it chose 0.4, then 0.6.
    assert row_of(table, "Chooser (align)") == (
        "Chooser (align) & \\textbf{60.0 $\\pm$ 1.4} & \\textbf{75.0 $\\pm$ 1.4} & \\textbf{80.0 $\\pm$ 1.4} & "
        "\\textbf{70.0 $\\pm$ 1.4} & 0.4/0.6 \\\\"
    )
    for label in (
        "Git Re-Basin (chooser)",
        "Git Re-Basin (weight\\_matching)",
        "ZipIt (alpha 0.5)",
        "ZipIt! (alpha 0.3)",
    ):
        assert row_of(table, label).endswith("& -- \\\\")
    assert row_of(table, "Ensemble").endswith("& -- \\\\") and "\\textbf" not in row_of(table, "Ensemble")


def test_chosen_values_in_seed_order(tmp_path: Path) -> None:
    spec = make_run(tmp_path, ["vit"])
    path = Path(spec["experiments"][0]["rows"][-1]["results"]["0"])  # the chooser, seed 0
    path.write_text(json.dumps({**json.loads(path.read_text()), "curve": None}))
    cells = chosen_cells(load_report_data(spec), spec["experiments"][0])
    assert list(cells.columns) == ["λ"] and cells.loc["chooser", "λ"] == "–/0.6" and cells.loc["model_a", "λ"] == "–"


def test_hetero_table_and_csv(run: tuple[dict[str, Any], Path, list[Path]]) -> None:
    _, out_dir, _ = run
    table = read(out_dir, "tables/hetero_depth.tex")
    assert "Method & Joint & Task A & Task B & Avg \\\\" in table and "\\label{tab:hetero_depth}" in table
    assert "as the row's alignment strategy chooses by minibatch linear CKA" in table
    lines = [line.strip() for line in table.splitlines()]
    deep = lines.index("\\multicolumn{5}{@{}l}{\\textit{VGG19 $\\oplus$ VGG13}} \\\\")
    homo = lines.index("\\multicolumn{5}{@{}l}{\\textit{VGG19 + VGG19}} \\\\")
    assert deep < homo and lines[homo - 1] == "\\midrule"
    # Best merge per column within each block: each block's only merge.
    assert row_of(table[table.index("VGG19 $\\oplus$") :], "SMA, zip").startswith("SMA, zip & \\textbf{")
    assert row_of(table[table.index("VGG19 + VGG19") :], "ZipIt").startswith("ZipIt & \\textbf{")
    with open(out_dir / "tables/hetero_depth.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0])[: len(ID_COLUMNS)] == ID_COLUMNS and "task_avg_std" in rows[0]
    assert [(row["experiment"], row["method"]) for row in rows] == [
        ("deep", "model_a"), ("deep", "model_b"), ("deep", "ensemble"), ("deep", "seg_zip"),
        ("homo", "model_a"), ("homo", "model_b"), ("homo", "act_zip"),
    ]  # fmt: skip
    # homo's act_zip is row 2 of experiment 3: joint 0.41/0.43 (fractions, like results.csv).
    assert float(rows[-1]["joint_mean"]) == pytest.approx(0.42) and rows[-1]["group"] == "depth"


def test_summary_table_panels(run: tuple[dict[str, Any], Path, list[Path]]) -> None:
    _, out_dir, _ = run
    text = read(out_dir, "tables/summary.tex")
    assert text.count("\\begin{table}") == 3  # standard experiments, mudsc experiments, group depth
    assert "Fashion-MNIST, summary of the group depth: joint accuracy (\\%)" in text
    depth = text[text.index("\\label{tab:summary_group-depth}") :]
    assert "Method & VGG19 $\\oplus$ VGG13 & VGG19 + VGG19 \\\\" in depth
    # References first; a dash where the experiment lacks the row; best merge of each experiment in bold.
    assert row_of(depth, "Ensemble") == "Ensemble & 50.0 $\\pm$ 0.0 & -- \\\\"
    assert row_of(depth, "SMA, zip") == "SMA, zip & \\textbf{45.0 $\\pm$ 1.4} & -- \\\\"
    assert row_of(depth, "ZipIt") == "ZipIt & -- & \\textbf{42.0 $\\pm$ 1.4} \\\\"


def test_summary_of_default_size_fits_the_text_width(tmp_path: Path) -> None:
    """Twenty experiments of about ten rows, long labels: every tabular stays within the text width."""
    data = load_report_data(make_run(tmp_path, ["vit"]))
    labels = [
        "ResNet-20 (x1/2), MuDSC",
        "ViT (4 blocks, 64 wide, 4 heads)",
        "ResNet-20-GN (x1/2)",
        "VGG-11 (x1/8), 3 models",
    ]
    experiment = data.spec["experiments"][0]
    many = [{**experiment, "label": f"{labels[i % 4]} #{i}"} for i in range(20)]
    table = panel_table(data, "mudsc experiments", many)
    chunks = table.chunks()
    assert len(chunks) > 1 and [column for chunk in chunks for column in chunk] == table.columns
    assert all(table.width(chunk) <= TEXT_WIDTH_PT for chunk in chunks)
    assert max(text_width(line) for column in table.columns for line in table.header_lines(column)) <= 84


def tabulars(tex: str) -> list[list[list[str]]]:
    """The cells of every tabular of a table file, as plain text: LaTeX markup turned back into characters."""
    found = []
    for body in re.findall(r"\\toprule\n(.*?)\\bottomrule", tex, flags=re.S):
        rows = []
        for line in body.splitlines():
            line = line.strip()
            if not line.endswith("\\\\") or line.startswith("\\multicolumn"):
                continue
            line = re.sub(r"\\begin\{tabular\}\[b\]\{@\{\}r@\{\}\}(.*?)\\end\{tabular\}", r"\1", line[:-2])
            rows.append([plain(cell) for cell in re.split(r"(?<!\\)&", line)])
        found.append(rows)
    return found


def plain(cell: str) -> str:
    text = re.sub(r"\\textbf\{(.*)\}", r"\1", cell.strip())
    for latex, char in (
        ("$\\pm$", "±"),
        ("$\\oplus$", "⊕"),
        ("$\\lambda$", "λ"),
        ("--", "–"),
        ("\\&", "&"),
        ("\\_", "_"),
        ("\\{", "{"),
        ("\\}", "}"),
        ("\\%", "%"),
    ):
        text = text.replace(latex, char)
    return text


@pytest.fixture(scope="module")
def default_tables(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The table layouts' files for a run shaped like the default config (no figures: fast)."""
    root = tmp_path_factory.mktemp("default")
    catalog = default_sized()
    spec = make_run(root / "results", list(catalog), catalog=catalog)
    write_layouts(spec, root / "paper")
    render_to(root / "paper" / "main.tex", "main.tex.j2", title=spec["title"], sections={"Tables": [
        {"kind": "table", "path": f"tables/{path.name}"} for path in sorted((root / "paper" / "tables").glob("*.tex"))
    ]})  # fmt: skip
    return root / "paper"


def test_every_tabular_is_within_the_text_width(default_tables: Path) -> None:
    """An estimate from the written LaTeX (the widest cell of each column, bold or not, header lines
    included), so that it holds without a LaTeX installation; the compiled report's log checks with one."""
    assert (default_tables / "tables" / "summary.tex").read_text().count("\\begin{table}") == 5
    for path in sorted((default_tables / "tables").glob("*.tex")):
        for rows in tabulars(path.read_text()):
            columns = list(zip(*[row for row in rows if len(row) == len(rows[0])], strict=True))
            widths = [
                max(text_width(part, bold=True) for cell in column for part in cell.split(" \\\\ "))
                for column in columns
            ]
            assert sum(widths) + 12 * (len(widths) - 1) <= TEXT_WIDTH_PT, path.name


def test_row_labels_are_unique_within_each_block(default_tables: Path) -> None:
    """Within a table (or a hetero block, whose title tells it apart) no two rows read alike."""
    checked = 0
    for path in sorted((default_tables / "tables").glob("*.tex")):
        for block in re.split(r"\\multicolumn|\\begin\{table\}", path.read_text()):
            labels = [row[0] for rows in tabulars(f"\\toprule\n{block}\\bottomrule") for row in rows[1:]]
            normalized = [re.sub(r"[\W_]+", "", label).casefold() for label in labels]
            assert len(set(normalized)) == len(normalized), (path.name, labels)
            checked += len(labels)
    assert checked > 150  # every row of every table was looked at


def test_wide_tables_are_split_into_column_chunks(tmp_path: Path) -> None:
    spec = make_run(tmp_path / "r", ["vit"])
    experiment = spec["experiments"][0]
    experiment["label"] = "A very long experiment label that is wider than any number"
    data = load_report_data(spec)
    table = panel_table(data, "x", [{**experiment, "label": f"{experiment['label']} {i}"} for i in range(12)])
    assert len(table.chunks()) >= 2
    tex, page = write_tables(tmp_path / "out", "wide", [table], title="wide")
    text = tex.read_text()
    assert text.count("\\begin{tabular}{") == len(table.chunks()) and "\\par\\medskip" in text
    assert page.read_text().count("<table") == 1  # a browser scrolls: one HTML table


def html_tables(text: str) -> list[list[list[str]]]:
    """The cells of every HTML table of a page (header row first), as plain text."""
    found = []
    for body in re.findall(r"<table id=.*?</table>", text, flags=re.S):
        rows = []
        for line in re.findall(r"<tr[^>]*>(.*?)</tr>", body):
            if "colspan" in line:
                continue
            cells = re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", line)
            rows.append([html.unescape(re.sub(r"</?strong>", "", cell)) for cell in cells])
        found.append(rows)
    return found


def test_html_and_latex_tables_have_the_same_cells(run: tuple[dict[str, Any], Path, list[Path]]) -> None:
    _, out_dir, _ = run
    names = sorted(path.stem for path in (out_dir / "tables").glob("*.tex"))
    assert names == ["hetero_depth", "mudsc_vit", "standard_mlp", "summary"]
    for name in names:
        latex = tabulars(read(out_dir, f"tables/{name}.tex"))
        page = read(out_dir, f"tables/{name}.html")
        assert len(latex) == len(html_tables(page)), name  # no chunks at this size
        for tex_rows, html_rows in zip(latex, html_tables(page), strict=True):
            assert [[cell.replace(" \\\\ ", " ") for cell in row] for row in tex_rows] == html_rows, name
        # Bold in both, in the same number of cells.
        assert read(out_dir, f"tables/{name}.tex").count("\\textbf{") == page.count("<strong>"), name


def test_html_table_is_a_standalone_page(run: tuple[dict[str, Any], Path, list[Path]]) -> None:
    _, out_dir, _ = run
    text = read(out_dir, "tables/standard_mlp.html")
    assert text.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in text
    assert not re.search(r"<script|<link|\b(src|href)=|https?:", text)  # nothing to load, nothing to run
    assert "Fashion-MNIST, MLP {small}: accuracy (%), mean ± std over 2 model pairs (seeds)." in text
    assert '<tr class="rule"><td>W.Avg &amp; co</td>' in text  # labels escaped; a rule where the kind changes
    assert "<td><strong>51.0 ± 1.4</strong></td>" in text


# --- the whole report ------------------------------------------------------------------------------------------
def test_build_report_writes_the_declared_files(run: tuple[dict[str, Any], Path, list[Path]]) -> None:
    spec, out_dir, written = run
    declared = [output.path for output in declared_outputs(spec)]
    assert written == [out_dir / path for path in declared]
    on_disk = {path.relative_to(out_dir).as_posix() for path in out_dir.rglob("*") if path.is_file()}
    assert on_disk == set(declared)  # and no staging folder left behind
    assert {
        "main.tex", "results.csv", "provenance.csv", "provenance.html", "overview.html",
        "tables/summary.tex", "tables/summary.html", "tables/standard_mlp.html", "tables/mudsc_vit.html",
        "tables/hetero_depth.tex", "tables/hetero_depth.html", "tables/hetero_depth.csv",
    } <= set(declared)  # fmt: skip
    shown = {output.path: output for output in declared_outputs(spec) if output.caption}
    assert shown["tables/standard_mlp.html"].labels == {"experiment": "mlp", "models": "MLP (small)"}
    assert shown["tables/hetero_depth.csv"].labels == {"group": "depth", "experiments": "VGG19 ⊕ VGG13; VGG19 + VGG19"}
    assert shown["overview.html"].category == "Overview" and "tables/summary.tex" not in shown
    report = Path(__file__).parents[1] / "report"
    assert all((report / output.caption).is_file() for output in shown.values())


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    experiments=st.lists(st.sampled_from(list(EXPERIMENTS)), min_size=1, max_size=4, unique=True),
    seeds=st.sampled_from([(0,), (0, 1)]),
)
def test_table_layouts_write_what_they_declare(
    tmp_path_factory: pytest.TempPathFactory, experiments: list[str], seeds: tuple[int, ...]
) -> None:
    root = tmp_path_factory.mktemp("declared")
    spec = make_run(root / "results", experiments, seeds)
    declared = {output.path for layout in TABLE_LAYOUTS for output in layout.outputs(spec)}
    assert write_layouts(spec, root / "out") == declared


def test_build_report_refuses_undeclared_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = make_run(tmp_path / "results", ["mlp"])
    monkeypatch.setattr(ResultsCsv, "outputs", lambda self, spec: [])
    with pytest.raises(ValueError, match=r"did not declare \(\['results.csv'\]\)"):
        build_report(spec, tmp_path / "out")
    assert not (tmp_path / "out" / "main.tex").exists() and not list((tmp_path / "out").iterdir())


def test_main_tex(run: tuple[dict[str, Any], Path, list[Path]]) -> None:
    _, out_dir, _ = run
    main = read(out_dir, "main.tex")
    assert "\\usepackage[T1]{fontenc}" in main and "\\usepackage{lmodern}" in main
    assert "\\title{hetmerge: Fashion-MNIST \\& more}" in main and "\\section{Fashion-MNIST}" in main
    for name in ("summary", "standard_mlp", "mudsc_vit", "hetero_depth"):
        assert f"\\input{{tables/{name}.tex}}" in main
    # figures are drawn at their printed size (at most the text width): included unscaled
    assert re.findall(r"\\includegraphics\{figures/", main) and "\\includegraphics[" not in main
    assert ".html" not in main and "provenance" not in main
    tables = "".join(path.read_text() for path in (out_dir / "tables").glob("*.tex"))
    assert "fashion" not in main.lower().replace("fashion-mnist", "") and "fashion\\_mnist" not in tables


def test_label_edit_changes_only_labels(tmp_path: Path) -> None:
    spec = make_run(tmp_path / "results", ["mlp", "deep", "homo"])
    before = write_layouts(spec, tmp_path / "a")
    edited = copy.deepcopy(spec)
    edited["experiments"][0]["rows"][3]["label"] = "Wavg relabelled"
    edited["experiments"][1]["label"] = "Deep pair"
    assert write_layouts(edited, tmp_path / "b") == before
    for name in sorted(before):
        old = read(tmp_path / "a", name)
        for label, new in (("W.Avg & co", "Wavg relabelled"), ("VGG19 ⊕ VGG13", "Deep pair")):
            for escaped in (label, html.escape(label, quote=False), latex_escape(label)):
                old = old.replace(escaped, new)
        assert read(tmp_path / "b", name) == old, name


def test_results_csv(run: tuple[dict[str, Any], Path, list[Path]]) -> None:
    _, out_dir, _ = run
    with open(out_dir / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:8] == ["dataset", "arch", "method", "arch_label", "label", "kind", "method_rank", "n_pairs"]
    assert list(rows[0])[8:11] == ["joint_mean", "joint_std", "joint_n"]
    zipit = next(row for row in rows if (row["arch"], row["method"]) == ("mlp", "zipit"))
    assert float(zipit["joint_mean"]) == pytest.approx(0.47) and zipit["dataset"] == "fashion_mnist"


def test_provenance(run: tuple[dict[str, Any], Path, list[Path]]) -> None:
    spec, out_dir, _ = run
    with open(out_dir / "provenance.csv", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert tuple(reader.fieldnames or ()) == PROVENANCE_COLUMNS
    # Experiments in spec order, then seed, then the experiment's row order.
    mlp = [(row["pair"], row["method"]) for row in rows if row["experiment"] == "mlp"]
    keys = [row["key"] for row in spec["experiments"][0]["rows"]]
    assert mlp == [("0", key) for key in keys] + [("1", key) for key in keys]
    assert [row["experiment"] for row in rows] == sorted(
        (row["experiment"] for row in rows), key=list(EXPERIMENTS).index
    )
    assert rows[0] == {
        "dataset": "fashion_mnist",
        "experiment": "mlp",
        "method": "model_a",
        "label": "Model A",
        "pair": "0",
        "split_seed": "0",
        "seed": "0",
        "device": "cpu",
        "git_commit": COMMIT,
        "git_dirty": "false",
        "hetmerge": "0.1.0",
        "torch": "2.3.1",
        "python": "3.11.7",
        "torch_cuda_build": "13.0",
        "config": "{}",
    }
    zipit = next(row for row in rows if (row["experiment"], row["method"], row["pair"]) == ("mlp", "zipit", "1"))
    assert json.loads(zipit["config"]) == {
        "method": "zipit",
        "params": {"alpha": 0.3, "stop_after": None},
        "analyses": [],
    }
    page = read(out_dir, "provenance.html")
    assert page.startswith("<!DOCTYPE html>") and f"of the {len(rows)} records" in page
    assert f"<dt>Git commit</dt>\n<dd><code>{COMMIT}</code> ({len(rows)} records)</dd>" in page
    # torch's CUDA build is no device: a CPU run records it too, under its own label
    assert f"<dt>torch CUDA build</dt>\n<dd><code>13.0</code> ({len(rows)} records)</dd>" in page
    devices = Counter(row["device"] for row in rows)
    assert f"<dt>Device</dt>\n<dd><code>cpu</code> ({devices['cpu']} records);" in page
    assert "<dt>CUDA</dt>" not in page and "torch CUDA build: the CUDA version the installed torch was built" in page


def test_overview(run: tuple[dict[str, Any], Path, list[Path]]) -> None:
    _, out_dir, _ = run
    page = read(out_dir, "overview.html")
    assert "<h1>hetmerge: Fashion-MNIST &amp; more</h1>" in page and "Dataset: Fashion-MNIST." in page
    assert '<td><code>vit</code></td><td class="text">ViT-T</td><td class="text">vit-A + vit-B</td>' in page
    assert (
        "lambda_curve, landscape" in page and "Model A, Model B, Ensemble, W.Avg &amp; co, ZipIt!, ZipIt! 1/2" in page
    )
    assert "&#34;report&#34;: {\n    &#34;title&#34;" in page  # the configuration, indented


def test_rebuild_is_byte_identical(run: tuple[dict[str, Any], Path, list[Path]], tmp_path: Path) -> None:
    spec, out_dir, written = run
    again = build_report(spec, tmp_path / "again")
    assert [path.relative_to(tmp_path / "again") for path in again] == [path.relative_to(out_dir) for path in written]
    for path in written:
        assert (tmp_path / "again" / path.relative_to(out_dir)).read_bytes() == path.read_bytes(), path.name


def test_environment_delimiters_and_strict_undefined() -> None:
    env = latex_environment()
    template = env.from_string("\\BLOCK{for x in xs}\\textbf{\\VAR{x|latex_escape}}\\BLOCK{endfor}\\#{ note }")
    assert template.render(xs=["a_b", "c&d"]) == "\\textbf{a\\_b}\\textbf{c\\&d}"
    with pytest.raises(jinja2.UndefinedError, match="missing"):
        env.from_string("\\caption{\\VAR{missing}}").render()


def test_report_does_not_import_torch() -> None:
    code = "import sys, hetmerge.report.build, hetmerge.report.layouts; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- LaTeX -----------------------------------------------------------------------------------------------------
def compile_or_skip(main_tex: Path) -> Path:
    try:
        return compile_latex(main_tex)
    except LatexUnavailableError:
        pytest.skip(f"no LaTeX engine; install {LATEX_PACKAGES}")


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["run", "default_tables"])
def test_compiled_report_has_no_overfull_tables_and_no_type3_fonts(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The synthetic run (tables and figures) and the default-sized tables, compiled: nothing sticks out into
    the margin, no float is taller than the page, every font is scalable."""
    built = request.getfixturevalue(fixture)
    shutil.copytree(built[1] if fixture == "run" else built, tmp_path / "paper")
    pdf = compile_or_skip(tmp_path / "paper" / "main.tex")
    assert pdf.read_bytes().startswith(b"%PDF") and not list((tmp_path / "paper").glob(".latex-*"))
    log = (tmp_path / "paper" / "main.log").read_text(errors="replace")
    assert "Overfull \\hbox" not in log and "Float too large" not in log
    if shutil.which("pdffonts"):
        fonts = subprocess.run(["pdffonts", str(pdf)], capture_output=True, text=True, check=True).stdout
        assert "Type 3" not in fonts, fonts


@pytest.mark.slow
def test_compile_latex_failure_reports_log(tmp_path: Path) -> None:
    main_tex = tmp_path / "main.tex"
    main_tex.write_text("\\documentclass{article}\n\\begin{document}\n\\nosuchmacro\n\\end{document}\n")
    with pytest.raises(RuntimeError, match="Undefined control sequence"):
        compile_or_skip(main_tex)
    assert not (tmp_path / "main.pdf").exists()
