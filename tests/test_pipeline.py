"""End to end: real Snakemake runs of config/test/tiny.yaml, rerun behaviour, config checks, interrupted jobs.

Every run happens in a copy of Snakefile, rules/ and config/ under a temporary directory.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml

from hetmerge.checkpoint import load_tensors, save_model
from hetmerge.data import save_prepared, save_split

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {k: v for k, v in os.environ.items() if k != "HETMERGE_DEBUG"} | {
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    "HETMERGE_WORKER_IDLE": "60",  # the warm worker (hetmerge.worker) of these runs goes soon after them
}
TINY = "config/test/tiny.yaml"
ALL_JOBS = {
    "dataset": 1,
    "split": 6,  # class-disjoint 5+5, and the non-IID partitions for 2 and 3 models, per seed
    "train": 22,
    "statistics": 2,  # the mlp pair's, shared by experiments mlp (zipit) and mlp_mudsc (mudsc) of each seed
    "precompute": 10,  # the depth pair's alignment; conductance (OTF) and DeepLIFT (KF) of both fusion model sets
    "merge": 42,  # ... and fs_8/fs_16's RegMean, KD and FS-Merge rows (average is mlp's job): 5 per seed
    "landscape": 1,
    "report": 1,
    "all": 1,
}
PAPER = "results/paper/tiny"
# config/fashion_mnist_gpu.yaml: the default experiments with three model pairs
GPU_JOBS = {**ALL_JOBS, "split": 18, "train": 141, "statistics": 39, "precompute": 60, "merge": 609, "landscape": 3}


def workdir(root: Path, *, src: bool = False) -> Path:
    """A copy of the workflow under `root`; with `src`, of the package too, which the run then uses (its
    Snakefile puts ./src first on the path of the planner and the jobs), so that a test may edit the code."""
    root.mkdir(parents=True, exist_ok=True)
    if src:
        shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "Snakefile", root / "Snakefile")
    shutil.copytree(REPO / "rules", root / "rules")
    shutil.copytree(REPO / "config", root / "config")
    shutil.copytree(REPO / "envs", root / "envs")
    shutil.copytree(REPO / "report", root / "report")
    return root


def snakemake(cwd, *args, configfile=TINY, timeout=120, env=ENV):
    """Run snakemake in `cwd`; returns (returncode, stdout and stderr together)."""
    proc = subprocess.run(
        [str(BIN / "snakemake"), *args, "--cores", "2", "--configfile", configfile],  # --configfile takes nargs
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout


def job_stats(output: str) -> dict[str, int]:
    """The 'Job stats' table of a (dry) run, without the total."""
    block = output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    rows = (line.split() for line in block.strip().splitlines()[2:])
    return {row[0]: int(row[1]) for row in rows if len(row) == 2 and row[0] != "total"}


def edited_config(cwd: Path, name: str, edit) -> str:
    config = yaml.safe_load((cwd / TINY).read_text())
    edit(config)
    path = cwd / "config" / "test" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))  # method order is the tables' row order
    return str(path.relative_to(cwd))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    cwd = workdir(tmp_path_factory.mktemp("dry"))
    code, out = snakemake(cwd, "-n", "all")
    assert code == 0, out
    return out


@pytest.fixture(scope="module")
def completed(tmp_path_factory):
    """A directory where `snakemake all` on the tiny config has run to completion."""
    cwd = workdir(tmp_path_factory.mktemp("run"))
    code, out = snakemake(cwd, "all", timeout=600)
    assert code == 0, out[-5000:]
    return cwd


def test_dry_run_plans_every_rule(dry_run):
    assert job_stats(dry_run) == ALL_JOBS
    # --configfile replaces config/config.yaml: none of its architectures or experiments leak in
    assert "fashion_mnist" not in dry_run


@pytest.mark.parametrize(("device", "slots"), [("cpu", 0), ("auto", 1), ("cuda:1", 1)])
def test_torch_stages_ask_for_a_device_slot_unless_on_the_cpu(tmp_path, device, slots):
    """Statistics, precomputed inputs, merges and landscapes take a `gpu` slot wherever they may use a GPU."""
    cwd = workdir(tmp_path)
    config = edited_config(cwd, "device", lambda c: c["compute"].update(device=device, train_gpus=1))
    code, out = snakemake(cwd, "-n", "all", configfile=config)
    assert code == 0, out
    jobs = re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n)+)", out, flags=re.M)
    gpu = {rule: re.search(r"gpu=(\d+)", body) for rule, body in jobs}
    for rule in ("statistics", "precompute", "merge", "landscape"):
        assert (int(gpu[rule].group(1)) if gpu[rule] else 0) == slots, rule
    assert int(gpu["train"].group(1)) == 1 and gpu["report"] is None


def test_schema_is_validated_without_warnings(dry_run):
    assert "No validator found" not in dry_run


def test_gpu_config_validates_and_mirrors_the_default_experiments(tmp_path):
    """config/fashion_mnist_gpu.yaml passes the schema and builds its DAG, with the job counts its header sizes."""
    cwd = workdir(tmp_path)
    code, out = snakemake(cwd, "-n", "all", configfile="config/fashion_mnist_gpu.yaml")
    assert code == 0, out
    assert job_stats(out) == GPU_JOBS

    def layout(name):
        experiments = yaml.safe_load((REPO / "config" / name).read_text())["experiments"].values()
        return [(len(e["models"]), e.get("table", "standard"), e["methods"]) for e in experiments]

    assert layout("fashion_mnist_gpu.yaml") == layout("config.yaml")


def results_of(cwd: Path) -> dict[str, dict]:
    """Every result JSON that the train and merge jobs wrote next to their models, by path."""
    found = {}
    for folder in ("models", "merges"):
        for path in sorted((cwd / "results" / folder).rglob("*.json")):
            found[str(path.relative_to(cwd))] = json.loads(path.read_text())
    return found


def test_full_run_writes_paper_and_results(completed):
    paper = completed / PAPER
    assert (paper / "main.tex").stat().st_size > 0 and (paper / "results.csv").stat().st_size > 0
    main = (paper / "main.tex").read_text()
    for pdf in paper.rglob("*.pdf"):
        assert pdf.read_bytes().startswith(b"%PDF"), pdf
        assert pdf.relative_to(paper).with_suffix("").as_posix() in main, pdf
    assert any(paper.rglob("*.png"))

    results = results_of(completed)
    assert len(results) == ALL_JOBS["train"] + ALL_JOBS["merge"]
    for path, rec in results.items():
        m = rec["metrics"]
        assert rec["kind"] == ("base" if "/models/" in path else "merge"), path
        assert 0 <= m["joint"] <= 1, path
        same_task = "/non_iid" in path or "mlp_fuse" in path
        assert set(m["tasks"]) == ({"all"} if same_task else {"A", "B"}), path
        assert 0 <= m["f1"] <= 1, path
        assert isinstance(m["params"], int) and m["params"] > 0, path
        assert isinstance(m["flops"], int) and m["flops"] > 0, path
        assert m["n_images"] == 355, path
        assert {"git", "packages", "device"} <= set(rec["provenance"]), path
        assert rec["provenance"]["device"] == "cpu"
        assert rec["timings"]["eval_seconds"] >= 0, path
        assert ("train_seconds" if rec["kind"] == "base" else "merge_seconds") in rec["timings"], path
        if rec["kind"] == "base":  # what ensembles are scored from, one entry per test image
            assert len(rec["predictions"]["score"]) == len(rec["predictions"]["correct"]) == m["n_images"]
            assert abs(sum(rec["predictions"]["correct"]) / m["n_images"] - m["joint"]) < 1e-6
            if same_task:  # the share-weighted ensemble needs every logit and the model's share of each class
                assert len(rec["predictions"]["logits"]) == m["n_images"] and len(rec["data_share"]) == 10
    curves = [rec["curve"] for rec in results.values() if rec.get("curve")]
    assert len(curves) == 2  # mudsc_align of each seed: its λ grid and the figure's values, in one job
    for curve in curves:
        assert [p["lam"] for p in curve["points"]] == [0.0, 0.25, 0.75, 1.0]
        assert [p["selectable"] for p in curve["points"]] == [False, True, True, False]
        best = max((p for p in curve["points"] if p["selectable"]), key=lambda p: p["merge"]["joint"])
        assert curve["chosen"] == best["lam"]

    rows = {(r["arch"], r["method"], r["pair"]): r for r in csv_records(paper / "results.csv")}
    assert {arch for arch, _, _ in rows} == {"mlp", "vgg", "mlp_mudsc", "depth", "fuse_2", "fuse_3", "fs_8", "fs_16"}
    # same-task fusion: the share-weighted ensemble of N models, every row of the paper's table with its F1
    for exp, n in (("fuse_2", 2), ("fuse_3", 3)):
        fused = {method: row for (arch, method, _), row in rows.items() if arch == exp}
        assert {f"model_{c}" for c in "abc"[:n]} | {"ensemble", "average", "kf", "kfg", "otf"} <= set(fused)
        assert ("hf" in fused) == (n == 2)
        assert all(0 <= row["f1_mean"] <= 1 for row in fused.values())
    assert (paper / "tables" / "fusion_fuse.tex").exists()
    # FS-Merge's table: one block per few-shot size; the rows that learn are merged per size, the others shared
    assert set(csv_methods(rows, "fs_8")) >= {"regmean", "kd", "fs", "average", "ensemble"}
    assert set(csv_methods(rows, "fs_16")) == {"model_a", "model_b", "kd", "fs"}
    assert rows[("fs_8", "average", "mean")]["joint_mean"] == rows[("mlp", "average", "mean")]["joint_mean"]
    fs_infos = [rec["source"] for path, rec in results.items() if "/fs_merge-" in path]
    assert sorted(i["few_shot"]["originals"] for i in fs_infos) == [8, 8, 16, 16]
    assert all(i["few_shot"]["train_images"] == 2 * 3 * i["few_shot"]["originals"] for i in fs_infos)  # aug_factor 2
    assert all(i["notes"]["steps"][0]["fold_error"]["max_rel"] < 1e-5 for i in fs_infos)
    assert (paper / "tables" / "few_shot_fs.tex").exists() and (paper / "figures" / "few_shot_accuracy.pdf").exists()
    for exp in ("mlp", "vgg"):
        a, b, ens = (rows[(exp, row, "mean")] for row in ("model_a", "model_b", "ensemble"))
        # The ensemble answers each task with that task's own model, and costs both models.
        assert ens["tasks.A_mean"] == a["tasks.A_mean"] and ens["tasks.B_mean"] == b["tasks.B_mean"]
        assert ens["params_mean"] == a["params_mean"] + b["params_mean"]
        assert ens["flops_mean"] == a["flops_mean"] + b["flops_mean"]
        assert a["tasks.A_mean"] > 0.5, exp  # two epochs on 5 digit classes do learn something


def csv_methods(rows: dict, experiment: str) -> list[str]:
    return [method for arch, method, pair in rows if arch == experiment and pair == "mean"]


def csv_records(path: Path) -> list[dict]:
    import csv

    with open(path) as handle:
        return [
            {**row, "pair": "mean", **{k: float(v) for k, v in row.items() if k.endswith("_mean") and v}}
            for row in csv.DictReader(handle)
        ]


def test_computations_shared_by_experiments_run_once(completed):
    """The mlp pair's statistics serve ZipIt! (experiment mlp) and MuDSC (mlp_mudsc); its base models are trained
    and evaluated once for both experiments."""
    stats = sorted((completed / "results" / "stats").rglob("*.safetensors"))
    assert len(stats) == 2
    models = sorted((completed / "results" / "models").rglob("*.safetensors"))
    pairs = [p for p in models if p.parent.name.startswith("t2-")]
    assert sorted(p.name.split("-")[0] for p in pairs if p.parent == pairs[0].parent) == [
        "mlp",
        "mlp",
        "resnet_deep",
        "resnet_shallow",
        "vgg",
        "vgg",
    ]  # per seed: the two mlp models serve experiments mlp and mlp_mudsc
    assert len(models) == 22  # and 2 + 3 same-task models per seed


def test_second_run_is_a_no_op_and_stays_light(completed):
    """A no-op rerun reads the cached plan: the scheduler never imports torch."""
    probe = (
        "import atexit, sys; atexit.register(lambda: print('torch imported:', 'torch' in sys.modules)); "
        "from snakemake.cli import main; sys.argv[0] = 'snakemake'; main()"
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", probe, "all", "--cores", "2", "--configfile", TINY],
        cwd=completed,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Nothing to be done" in proc.stdout + proc.stderr
    assert "torch imported: False" in proc.stdout
    assert seconds < 10, seconds  # ~1 s here; generous for slow CI machines


@pytest.mark.skipif(shutil.which("latexmk") is None, reason="needs latexmk (run.sh installs it with apt)")
def test_paper_pdf_compiles_with_scalable_fonts(completed):
    code, out = snakemake(completed, "paper_pdf", timeout=300)
    assert code == 0, out + (completed / "results/logs/paper_pdf/tiny.log").read_text()[-3000:]
    pdf = completed / PAPER / "main.pdf"
    assert pdf.read_bytes().startswith(b"%PDF")
    assert "Overfull" not in (completed / PAPER / "main.log").read_text()
    if shutil.which("pdffonts"):
        fonts = subprocess.run(["pdffonts", str(pdf)], capture_output=True, text=True, check=True).stdout
        assert "Type 3" not in fonts, fonts


def dry_jobs(cwd: Path, config: str) -> tuple[dict[str, int], str]:
    code, out = snakemake(cwd, "-n", "all", configfile=config)
    assert code == 0, out
    return (job_stats(out) if "Job stats:" in out else {}), out


def test_label_edit_reruns_only_the_report(completed):
    def relabel(config):
        config["methods"]["average"]["label"] = "Weight averaging"
        config["architectures"]["mlp"]["label"] = "Perceptron"
        config["experiments"]["vgg"]["label"] = "A VGG"

    jobs, _ = dry_jobs(completed, edited_config(completed, "labels", relabel))
    assert jobs == {"report": 1, "all": 1}


def test_row_order_and_table_membership_edits_rerun_only_the_report(completed):
    def reorder(config):
        config["experiments"]["mlp"]["methods"] = ["zipit", "ensemble"]  # average dropped, order changed

    jobs, _ = dry_jobs(completed, edited_config(completed, "order", reorder))
    assert jobs == {"report": 1, "all": 1}


def test_method_parameter_change_reruns_only_that_method(completed):
    config = edited_config(completed, "no_reset", lambda c: c["methods"]["average"]["params"].update(reset_bn=False))
    jobs, out = dry_jobs(completed, config)
    assert jobs == {"merge": 8, "report": 1, "all": 1}  # mlp (also fs_8's row), vgg, fuse_2 and fuse_3, two seeds
    merges = re.findall(r"output: (results/merges/\S+)", out)
    assert all("/average-" in m for m in merges), merges


def test_training_change_reruns_training_and_downstream(completed):
    jobs, _ = dry_jobs(completed, edited_config(completed, "epochs", lambda c: c["training"].update(epochs=3)))
    assert jobs == {k: v for k, v in ALL_JOBS.items() if k not in ("dataset", "split")}


def test_one_architecture_change_reruns_only_what_reads_it(completed):
    config = edited_config(completed, "wider", lambda c: c["architectures"]["mlp"]["spec"].update(hidden=[24]))
    jobs, out = dry_jobs(completed, config)
    assert jobs == {"train": 4, "statistics": 2, "merge": 16, "landscape": 1, "report": 1, "all": 1}
    assert "vgg" not in " ".join(re.findall(r"output: (results/(?:models|merges)/\S+)", out))


@pytest.fixture
def editable(completed, tmp_path):
    """A copy of the completed run with its own copy of the package, which the run uses: code may be edited."""
    cwd = tmp_path / "run"
    shutil.copytree(completed, cwd, symlinks=True)
    shutil.copytree(REPO / "src", cwd / "src", ignore=shutil.ignore_patterns("__pycache__"))
    return cwd


@pytest.mark.parametrize(
    ("module", "rerun"),
    [
        # a method's code: that method's merges (hetero: one per seed) and what reads them
        ("hetmerge/methods/hetero.py", {"merge": 2, "report": 1, "all": 1}),
        # mudsc and regmean (its zipit alignment) import zipit: their merges rerun, and the landscape of mudsc's
        ("hetmerge/methods/zipit.py", {"merge": 6, "landscape": 1, "report": 1, "all": 1}),
        # training: every model and everything after it
        ("hetmerge/training.py", {k: v for k, v in ALL_JOBS.items() if k not in ("dataset", "split")}),
        # the report's code: the report alone
        ("hetmerge/report/summary_table.py", {"report": 1, "all": 1}),
    ],
    ids=["method", "imported-method", "training", "report"],
)
def test_code_edit_reruns_the_stages_that_run_it(editable, module, rerun):
    path = editable / "src" / module
    path.write_text(path.read_text() + "\n# an edit\n")
    jobs, _ = dry_jobs(editable, TINY)
    assert jobs == rerun


# What `snakemake --report` shows for the tiny config: category -> subcategory -> files (under its report folder).
REPORTED = {
    "Tables": {
        "Summary": ["tables/summary.html"],
        "Accuracy": ["tables/standard_mlp.html", "tables/standard_vgg.html"],
        "MuDSC": ["tables/mudsc_mlp_mudsc.html"],
        "Heterogeneous merging": ["tables/hetero_depth.html"],
        "Same-task fusion": ["tables/fusion_fuse.html"],
        "Few-shot merging": ["tables/few_shot_fs.html"],
    },
    "Figures": {
        "Summary": ["figures/summary_hetero.png", "figures/summary_mudsc.png", "figures/summary_standard.png"],
        "λ curve": ["figures/lambda_mlp_mudsc.png"],
        "Loss landscape": ["figures/landscape_mlp_mudsc.png"],
        "Depth alignment": ["figures/alignment_depth.png"],
        "Same-task fusion": ["figures/fusion_accuracy.png"],
        "Few-shot merging": ["figures/few_shot_accuracy.png"],
    },
    "Data": {
        "Results": ["results.csv"],
        "Heterogeneous merging": ["tables/hetero_depth.csv"],
        "Same-task fusion": ["tables/fusion_fuse.csv"],
        "Few-shot merging": ["tables/few_shot_fs.csv"],
        "λ curve": ["figures/lambda_mlp_mudsc.csv"],
        "Provenance": ["provenance.csv"],
    },
    "Provenance": {"Evaluation records": ["provenance.html"]},
    "Overview": {"Experiments and configuration": ["overview.html"]},
}


def report_variable(page: str, name: str, script: str):
    """A JSON variable that Snakemake's HTML report defines in its own <script id=...> element."""
    match = re.search(rf'<script id="{script}">\s*var {name} = (.*?);\s*</script>', page, flags=re.S)
    assert match, f"no {name} in the report"
    return json.loads(match.group(1))


def embedded(result: dict) -> bytes:
    """The bytes of a file that the report embeds as a base64 data URI."""
    assert result["data_uri"].startswith(f"data:{result['mime_type']};"), result["data_uri"][:80]
    return base64.b64decode(result["data_uri"].split(";base64,", 1)[1])


def test_html_report_shows_every_table_figure_and_provenance(completed):
    code, out = snakemake(completed, "--report", "report.html")
    assert code == 0, out
    assert "Report created" in out
    # One self-contained file: nothing written next to it, nothing loaded from elsewhere.
    assert sorted(p.name for p in completed.iterdir() if p.name.startswith("report")) == ["report", "report.html"]
    page = (completed / "report.html").read_text()
    assert not re.search(r"<(script|link)\b[^>]*\b(src|href)=", page)  # scripts and styles inline; results below

    paper = completed / PAPER
    categories = report_variable(page, "categories", "categories")
    expected = {
        category: {sub: [f"{PAPER}/{name}" for name in names] for sub, names in subs.items()}
        for category, subs in REPORTED.items()
    }
    assert {c: {s: sorted(f) for s, f in subs.items()} for c, subs in categories.items()} == expected
    # Exactly what a reader wants of the report rule's outputs: every HTML table, PNG figure and CSV file.
    wanted = {f"{PAPER}/{p.relative_to(paper)}" for p in paper.rglob("*") if p.suffix in (".html", ".png", ".csv")}
    results = report_variable(page, "results", "results")
    assert set(results) == wanted and len(wanted) == 23

    captions = {Path(path).name: " ".join(result["caption"].split()) for path, result in results.items()}
    for path, result in results.items():
        assert embedded(result) == (completed / path).read_bytes(), path
        assert result["labels"], path
        caption = captions[Path(path).name]
        assert "{{" not in caption and "system-message" not in caption and "digits" not in caption, (path, caption)
    labels = {Path(path).name: result["labels"] for path, result in results.items()}
    assert labels["standard_vgg.html"] == {"experiment": "vgg", "models": "VGG-11 (x1/16)"}
    assert labels["hetero_depth.html"] == {"group": "depth", "experiments": "ResNet-14 (x1/4) + ResNet-8 (x1/4)"}
    assert labels["results.csv"] == {"dataset": "Digits"}

    # The start page fits one screen; the experiments and the whole configuration are the Overview item.
    description = report_variable(page, "workflow_desc", "workflow-desc")
    assert "hetmerge: tiny digits test" in description and "mlp_mudsc" not in description
    assert len(re.sub(r"<[^>]+>", "", description)) < 1500
    overview = embedded(results[f"{PAPER}/overview.html"]).decode()
    assert "mlp_mudsc" in overview and "landscape_per_task" in overview and "eval_batch_size" in overview

    table = embedded(results[f"{PAPER}/tables/standard_mlp.html"]).decode()
    for label in ("Model A", "Model B", "Ensemble", "W.Avg", "ZipIt!"):
        assert f"<td>{label}</td>" in table or f">{label}<" in table, label
    assert " ± " in table

    provenance = embedded(results[f"{PAPER}/provenance.html"]).decode()
    assert f"<code>{metadata.version('torch')}</code>" in provenance
    records = results_of(completed)
    assert {rec["split_seed"] for rec in records.values()} == {0, 1}
    assert all(rec["source"]["seed"] >= 0 for rec in records.values() if rec["kind"] == "base")
    commits = {rec["provenance"]["git"]["commit"] for rec in records.values()}
    assert len(commits) == 1
    if None not in commits:  # a checkout of hetmerge ran the jobs
        assert commits.pop() in provenance
    assert "<code>cpu</code>" in provenance


@pytest.fixture(scope="module")
def lint_output(tmp_path_factory):
    cwd = workdir(tmp_path_factory.mktemp("lint"))
    proc = subprocess.run(
        [str(BIN / "snakemake"), "--lint", "--configfile", TINY],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout


def test_lint_runs(lint_output):
    code, out = lint_output
    assert "Lints for" in out or code == 0, out  # snakemake's linter itself works on our workflow
    assert "Traceback" not in out, out


@pytest.mark.parametrize(
    "lint",
    [
        "Mixed rules and functions in same snakefile",
        "Shell command directly uses variable",
        "is a prefix of input or output file but hardcoded",
        "Specify a conda environment or container",
    ],
)
def test_lint_has_no_warning_of_this_kind(lint_output, lint):
    assert lint not in lint_output[1]


def test_lint_is_clean(lint_output):
    code, out = lint_output
    assert code == 0 and "Lints for" not in out, out


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda c: c.update(trainin=c.pop("training")), "'trainin' was unexpected"),
        (lambda c: c["split"].update(seedz=c["split"].pop("seeds")), "'seedz' was unexpected"),
        (lambda c: c["methods"]["average"]["params"].update(reset_bnn=True), "['reset_bnn']"),
        (lambda c: c["architectures"]["mlp"]["spec"].update(hiden=[8]), "['hiden']"),
        (lambda c: c["experiments"]["mlp"].update(methods=["ensemble", "avg"]), "'avg'"),
    ],
    ids=["training", "split-seeds", "method-param", "arch-spec", "experiment-method"],
)
def test_config_typo_fails_at_start_up_naming_the_key(tmp_path, edit, named):
    assert_refused_at_start_up(tmp_path, edit, named)


def assert_refused_at_start_up(tmp_path, edit, named):
    """The edited tiny config fails before any job is planned, with `named` in the message."""
    cwd = workdir(tmp_path)
    code, out = snakemake(cwd, "-n", "all", configfile=edited_config(cwd, "refused", edit))
    assert code != 0
    assert named in out, out
    assert "Job stats" not in out and not (cwd / "results").exists()


def three_models(experiment, **zipit):
    """An edit giving `experiment` a third model of its first architecture (and the `zipit` row these params)."""

    def edit(config):
        exp = config["experiments"][experiment]
        exp["models"].append(exp["models"][0])
        config["methods"]["zipit"]["params"].update(zipit)

    return edit


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        # hetero merges two models: this failed after training, in the merge job
        (
            three_models("depth"),
            "experiments.depth.methods: 'het_sma_zip' cannot merge its models: "
            "method 'hetero' merges exactly 2 models, but got 3",
        ),
        # α = 0 never merges a merged unit again: three models can never be zipped
        (
            three_models("mlp", alpha=0.0),
            "experiments.mlp.methods: 'zipit' cannot merge its models: "
            "method 'zipit': α = 0.0 never merges a merged unit again",
        ),
        (
            lambda c: c["methods"]["zipit"]["params"].update(beta=5),
            "config error in methods.zipit: method 'zipit', parameter 'beta': 5.0 is outside the allowed range [0, 1]",
        ),
        (
            lambda c: c["training"].update(momentum=1.0),
            "config error in architectures.mlp: training settings of "
            "architecture 'mlp', parameter 'momentum': 1.0 is outside the allowed range [0, 1)",
        ),
    ],
    ids=["hetero-3-models", "zipit-alpha-0-3-models", "zipit-beta-range", "momentum-range"],
)
def test_experiment_that_can_never_run_fails_at_start_up(tmp_path, edit, named):
    assert_refused_at_start_up(tmp_path, edit, named)


def test_zip_that_beta_does_not_guarantee_is_reported_at_start_up(tmp_path):
    """ZipIt!'s default β = 0.125 with three models may run out of admissible pairs after training: said up front,
    with the β that always works (the zip may still finish, so the run goes on)."""
    cwd = workdir(tmp_path)
    code, out = snakemake(cwd, "-n", "all", configfile=edited_config(cwd, "beta", three_models("mlp")))
    assert code == 0, out
    assert (
        "warning: experiments.mlp, row 'zipit': method 'zipit': β = 0.125 does not guarantee the greedy zip of 3 "
        "models: with widths [16, 16, 16] (space 'fc0') it may run out of admissible pairs" in out
    ), out
    assert "β ≥ 0.5 always zips them" in out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, digits, digits_split):
    root = tmp_path_factory.mktemp("prepared")
    save_prepared(digits, root / "digits.safetensors")
    save_split(digits_split, root / "split.json")
    return root


def hetmerge_cli(*args, timeout=120):
    return subprocess.run(
        [str(BIN / "hetmerge"), *args], env=ENV, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_training_leaves_no_model_file(tmp_path, prepared, sig):
    out = tmp_path / "models" / "mlp-A.safetensors"
    resume = out.parent / "mlp-A.safetensors.resume"  # the training state lives next to the output
    cmd = [str(BIN / "hetmerge"), "train", "--data", str(prepared / "digits.safetensors")]
    cmd += ["--split", str(prepared / "split.json"), "--task", "A", "--seed", "0", "--device", "cpu"]
    cmd += ["--model", json.dumps({"family": "mlp", "spec": {"hidden": [64]}})]
    cmd += ["--train", json.dumps({"epochs": 100_000, "batch_size": 32})]
    proc = subprocess.Popen([*cmd, "--out", str(out)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not resume.exists():  # at least one epoch is done: the job is mid-run
            assert proc.poll() is None, "training ended early"
            assert time.monotonic() < deadline, "no resume state appeared"
            time.sleep(0.1)
        time.sleep(0.3)
        proc.send_signal(sig)
        proc.wait(30)
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -sig
    assert not out.exists()
    # Only the resume state may remain (plus, if the kill hit its atomic rewrite, that write's temp file).
    leftovers = [p.name for p in out.parent.iterdir() if p != resume]
    assert all(re.fullmatch(r"\.mlp-A\.safetensors\.resume\..*\.tmp", n) for n in leftovers), leftovers
    assert load_tensors(resume)[1]["epoch"] >= 1  # complete and readable


def test_evaluate_names_a_corrupt_model_file(tmp_path, prepared, make_model):
    model = tmp_path / "model.safetensors"
    save_model(make_model("mlp", {"hidden": [8]}, {"A": 5}), model, {})
    model.write_bytes(model.read_bytes()[:-100])
    out = tmp_path / "eval.json"
    proc = hetmerge_cli(
        "evaluate",
        "--data",
        str(prepared / "digits.safetensors"),
        "--split",
        str(prepared / "split.json"),
        "--model",
        str(model),
        "--device",
        "cpu",
        "--out",
        str(out),
    )
    assert proc.returncode == 1, proc.stderr
    assert f"checkpoint {model}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def cuda_python(bin_dir: Path) -> Path:
    """A `python` that runs `python -m hetmerge ...` with the emulated CUDA device of tests/fake_cuda.py."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "python"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "-m" ] && [ "$2" = "hetmerge" ]; then shift 2; '
        f'exec {sys.executable} {Path(__file__).parent / "fake_cuda.py"} "$@"; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("device", ["emulated", pytest.param("real", marks=pytest.mark.gpu)])
def test_full_run_on_cuda(tmp_path, completed, device):
    """Every stage of the tiny run with `compute.device: cuda:0`; emulated, its numbers equal the CPU run's."""
    if device == "real" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: the gpu tests need one (the emulated run covers the CPU-only case)")
    cwd = workdir(tmp_path / "run")
    config = edited_config(cwd, "cuda", lambda c: c["compute"].update(device="cuda:0"))
    env = ENV
    if device == "emulated":
        env = {**ENV, "PATH": f"{cuda_python(tmp_path / 'bin')}{os.pathsep}{ENV['PATH']}"}
    code, out = snakemake(cwd, "all", configfile=config, timeout=900, env=env)
    logs = "".join(p.read_text()[-1500:] for p in sorted((cwd / "results" / "logs").rglob("*.log")))
    assert code == 0, out[-3000:] + logs[-6000:]
    results = results_of(cwd)
    assert results and all(rec["provenance"]["device"].startswith("cuda:0") for rec in results.values())
    got = (cwd / "results" / "paper" / "cuda" / "results.csv").read_text()  # the edited config's own folder
    want = (completed / PAPER / "results.csv").read_text()
    if device == "emulated":
        assert got == want
    else:
        assert got.splitlines()[0] == want.splitlines()[0] and len(got.splitlines()) == len(want.splitlines())
