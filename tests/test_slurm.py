"""A real SLURM run: config/test/slurm.yaml through profiles/slurm on a throwaway single-node cluster.

Where the machine allows it (root, Debian's slurmctld slurmd slurm-client munge installed, /etc/slurm free
for us, no SLURM daemon running), tests/slurm/cluster.sh starts slurmctld and slurmd on loopback with two
placeholder GPUs; Snakemake submits every job with `--executor slurm`; the results must equal those of a
local run of the same config. Elsewhere the tests skip, saying why. Every wait has a deadline, and the
daemons are stopped by PID (and /etc cleaned) in the fixture's teardown. `pytest -s` prints the timings.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hetmerge.checkpoint import load_tensors

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "slurm"
BIN = Path(sys.executable).parent
CONFIG = "config/test/slurm.yaml"
PACKAGES = "slurmctld slurmd slurm-client munge"
MARK = "# written by hetmerge tests/slurm/cluster.sh"  # the marker cluster.sh puts in what it writes to /etc
LOCAL_RULES = {"all"}  # rules Snakemake runs itself under --executor slurm (`all` has no action)
ACCOUNT = "hetmergetest"
MEM_MB = 1000  # the profile's memory requests, capped so that jobs fit any test machine
TIMES: dict[str, float] = {}


def say(message: str) -> None:
    print(f"[test_slurm] {message}", flush=True)


def why_not() -> str | None:
    """Why a throwaway SLURM cluster cannot be started here, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root: it starts slurmctld/slurmd as root and writes /etc/slurm/slurm.conf"
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    needed = ["slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel", "munged", "munge", "runuser"]
    missing = [name for name in needed if shutil.which(name, path=path) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install {PACKAGES}; .ci/run does)"
    if find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed in this environment"
    for name in ("slurm.conf", "gres.conf"):
        conf = Path("/etc/slurm") / name
        if conf.exists() and MARK not in conf.read_text(errors="replace"):
            return f"{conf} exists and is not ours: this machine has a SLURM setup we must not overwrite"
    etc = Path("/etc/slurm") if Path("/etc/slurm").exists() else Path("/etc")
    if not os.access(etc, os.W_OK):
        return f"{etc} is not writable"
    running = sorted(
        {p.read_text().strip() for p in Path("/proc").glob("[0-9]*/comm") if _comm(p) in ("slurmctld", "slurmd")}
    )
    if running:
        return f"{' and '.join(running)} already running: one SLURM cluster per machine"
    for port in (6817, 6818):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as slurmctld does: TIME_WAIT is no clash
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                return f"port {port} (SLURM) is in use"
    if torch.cuda.is_available():
        return "a CUDA device is visible: the placeholder GPUs would map to real ones and change the results"
    return None


def _comm(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:  # the process ended meanwhile
        return ""


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run `cmd` in its own process group; on timeout end that group (TERM, then KILL) and fail."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 30)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                out, _ = proc.communicate(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                out = ""
        pytest.fail(f"{' '.join(cmd[:3])} ... did not finish within {timeout:.0f}s:\n{out[-8000:]}")
    return proc.returncode, out


def workdir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "Snakefile", root / "Snakefile")
    for name in ("rules", "config", "envs", "profiles"):
        shutil.copytree(REPO / name, root / name)
    return root


def pipeline_env(root: Path) -> dict[str, str]:
    """PATH with tests/slurm/bin/python first: it logs each job's SLURM job id and CUDA_VISIBLE_DEVICES."""
    shim = root / "shim"
    shim.mkdir()
    shutil.copy(HERE / "bin" / "python", shim / "python")
    (shim / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SNAKEMAKE_", "HETMERGE_DEBUG"))}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env | {
        "PATH": os.pathsep.join([str(shim), str(BIN), os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]),
        "HETMERGE_TEST_JOBLOG": str(root / "joblog.tsv"),
        "HETMERGE_TEST_PYTHON": sys.executable,
    }


def job_log(root: Path) -> list[tuple[str, str, list[str]]]:
    """(SLURM job id, CUDA_VISIBLE_DEVICES, argv) of every `python -m hetmerge` a job ran."""
    rows = [line.split("\t") for line in (root / "joblog.tsv").read_text().splitlines()]
    return [(job, cuda, args.split()) for job, cuda, args in rows if args.startswith("-m hetmerge ")]


def job_stats(output: str) -> dict[str, int]:
    block = output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    rows = (line.split() for line in block.strip().splitlines()[2:])
    return {row[0]: int(row[1]) for row in rows if len(row) == 2 and row[0] != "total"}


def adapt_profile(root: Path) -> None:
    """profiles/slurm as a user would edit it (partition, account), memory capped for the test node."""
    path = root / "profiles" / "slurm" / "config.yaml"
    profile = yaml.safe_load(path.read_text())
    assert profile["executor"] == "slurm"
    assert profile["set-resources"]["train"]["gpu"] == 1
    profile["default-resources"] |= {"slurm_partition": "debug", "slurm_account": ACCOUNT}
    for resources in [profile["default-resources"], *profile["set-resources"].values()]:
        if "mem_mb" in resources:
            resources["mem_mb"] = min(resources["mem_mb"], MEM_MB)
    path.write_text(yaml.safe_dump(profile, sort_keys=False))


PROBE = """
import json, sys
from snakemake.cli import parse_args
_, a = parse_args(sys.argv[1:])
print(json.dumps({"cores": a.cores, "gpu": a.resources["gpu"].value if "gpu" in a.resources else None,
                  "executor": a.executor, "latency": a.latency_wait, "jobs": a.jobs,
                  "triggers": sorted(t.name for t in a.rerun_triggers)}))
"""


def cli_settings(cwd: Path, *args: str) -> dict:
    """The settings Snakemake's command line (profiles included) gives a run with `args` in `cwd`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAKEMAKE_")}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_default_profile_is_read_by_a_bare_run_and_flags_win(tmp_path):
    root = workdir(tmp_path / "wf")
    bare = cli_settings(root, "all")
    assert isinstance(bare["cores"], int) and bare["cores"] >= 1  # `cores: all`
    assert isinstance(bare["gpu"], int) and bare["gpu"] >= 1  # a GPU cap is always set
    assert bare["executor"] is None
    assert bare["triggers"] == ["CODE", "INPUT", "MTIME", "PARAMS", "SOFTWARE_ENV"]
    explicit = cli_settings(root, "all", "--cores", "1", "--resources", "gpu=3", "--latency-wait", "9")
    assert (explicit["cores"], explicit["gpu"], explicit["latency"]) == (1, 3, 9)
    assert cli_settings(root, "all", "--workflow-profile", "none")["gpu"] is None


def test_slurm_profile_replaces_the_default_one(tmp_path):
    root = workdir(tmp_path / "wf")
    slurm = cli_settings(root, "all", "--workflow-profile", "profiles/slurm")
    assert slurm["executor"] == "slurm" and slurm["jobs"] == 100 and slurm["latency"] == 60
    assert slurm["gpu"] is None  # no local GPU cap throttling the cluster's GPU jobs


def test_slurm_profile_names_only_existing_rules(tmp_path):
    root = workdir(tmp_path / "wf")
    proc = subprocess.run(
        [str(BIN / "snakemake"), "--list-rules", "--workflow-profile", "none", "--configfile", "config/test/tiny.yaml"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rules = set(proc.stdout.split())
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert set(profile["set-resources"]) <= rules, "set-resources for a rule that does not exist is ignored"
    assert profile["set-resources"]["train"]["gpu"] == 1
    assert "cpus_per_task" not in profile["default-resources"]  # it would override every rule's threads
    for resources in [profile["default-resources"], *profile["set-resources"].values()]:
        extra = str(resources.get("slurm_extra", ""))
        assert "--gres" not in extra and "--gpus" not in extra  # the plugin rejects them: use `gpu`


@pytest.fixture(scope="module", autouse=True)
def timings():
    t0 = time.perf_counter()
    yield TIMES
    if TIMES:
        TIMES["whole module"] = time.perf_counter() - t0
        say("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in TIMES.items()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running single-node cluster (partition debug, 2 placeholder GPUs); its state, logs and PID files."""
    reason = why_not()
    if reason:
        pytest.skip(f"no throwaway SLURM cluster: {reason}")
    base = tmp_path_factory.mktemp("cluster")
    env = os.environ | {"PATH": os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])}
    try:
        t0 = time.perf_counter()
        code, out = run(["bash", str(HERE / "cluster.sh"), "start", str(base)], base, env, timeout=90)
        TIMES["cluster set-up"] = time.perf_counter() - t0
        say(f"cluster set-up {TIMES['cluster set-up']:.1f}s: {out.strip()}")
        assert code == 0, f"cluster.sh start failed ({code}):\n{out}"
        yield base
    finally:
        t0 = time.perf_counter()
        code, out = run(["bash", str(HERE / "cluster.sh"), "stop", str(base)], base, env, timeout=120)
        TIMES["cluster stop"] = time.perf_counter() - t0
        assert code == 0, f"cluster.sh stop failed ({code}):\n{out}"
        for name in ("slurm.conf", "gres.conf"):
            conf = Path("/etc/slurm") / name
            assert not (conf.exists() and MARK in conf.read_text(errors="replace")), f"{conf} left behind"


def squeue_jobs(env: dict[str, str]) -> list[dict]:
    proc = subprocess.run(
        ["squeue", "--states=all", "--json"], env=env, capture_output=True, text=True, timeout=30, check=True
    )
    return json.loads(proc.stdout)["jobs"]


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    """`snakemake all --workflow-profile profiles/slurm` on the test cluster; (workdir, output, SLURM's jobs)."""
    root = workdir(tmp_path_factory.mktemp("slurm-run"))
    adapt_profile(root)
    env = pipeline_env(root)
    code, out = run(
        [str(BIN / "snakemake"), "-n", "all", "--cores", "1", "--workflow-profile", "none", "--configfile", CONFIG],
        root,
        env,
        timeout=120,
    )
    assert code == 0, out
    planned = job_stats(out)
    cmd = [str(BIN / "snakemake"), "all", "--workflow-profile", "profiles/slurm", "--configfile", CONFIG]
    # test-cluster settings: poll squeue (no accounting database) and keep the per-job logs. The plugin polls
    # `init` s after submitting, then adds 10 s to the interval after each poll that finds nothing finished
    # (until one does): with init 6 it polls 6, 22, 48 s after a submission, and a job takes 10-20 s here.
    cmd += ["--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "6"]
    cmd += ["--slurm-keep-successful-logs"]
    t0 = time.perf_counter()
    code, out = run(cmd, root, env, timeout=600)
    TIMES["SLURM run"] = time.perf_counter() - t0
    say(f"SLURM run {TIMES['SLURM run']:.1f}s ({sum(planned.values())} jobs)")
    (root / "snakemake.log").write_text(out)
    assert code == 0, out[-8000:]
    return root, out, planned, squeue_jobs(env)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The same config run locally (with the default profile, as a bare `snakemake all` would)."""
    root = workdir(tmp_path_factory.mktemp("local-run"))
    env = pipeline_env(root)
    t0 = time.perf_counter()
    code, out = run([str(BIN / "snakemake"), "all", "--configfile", CONFIG], root, env, timeout=600)
    TIMES["local run"] = time.perf_counter() - t0
    say(f"local run {TIMES['local run']:.1f}s")
    assert code == 0, out[-8000:]
    assert "Using workflow specific profile profiles/default" in out
    return root


def rule_of(job: dict) -> str:
    match = re.fullmatch(r"rule_(\w+?)(?:_wildcards_.*)?", job["comment"])
    assert match, job["comment"]
    return match.group(1)


@pytest.mark.slow
def test_every_job_went_through_sbatch(slurm_run, cluster):
    root, out, planned, jobs = slurm_run
    assert "Using workflow specific profile profiles/slurm" in out
    total = sum(planned.values())
    assert f"{total} of {total} steps (100%) done" in out
    # slurmctld's record: one SLURM job per Snakemake job except the local ones, all from this run
    ours = [j for j in jobs if j["comment"].startswith("rule_")]
    assert Counter(rule_of(j) for j in ours) == {r: n for r, n in planned.items() if r not in LOCAL_RULES}
    assert len({j["name"] for j in ours}) == 1  # the run's id, which the plugin uses as every job's name
    assert {j["job_state"] for j in ours} == {"COMPLETED"}
    assert {(j["partition"], j["account"]) for j in ours} == {("debug", ACCOUNT)}  # the profile's settings
    ids = {str(j["job_id"]) for j in ours}
    # slurmctld's job completion log names the same jobs
    done = re.findall(r"JobId=(\d+) .*?JobState=COMPLETED", (cluster / "log" / "jobcomp.txt").read_text())
    assert set(done) == ids
    # the plugin's per-job logs (kept with --slurm-keep-successful-logs): one per job, named by SLURM job id
    logs = list((root / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert {p.stem for p in logs} == ids
    # and every rule's command ran inside its own SLURM job
    assert sorted(job for job, _, _ in job_log(root)) == sorted(ids)


@pytest.mark.slow
def test_training_requests_a_gpu_and_falls_back_to_the_cpu(slurm_run):
    root, _, _, jobs = slurm_run
    ours = [j for j in jobs if j["comment"].startswith("rule_")]
    gpu_jobs = {str(j["job_id"]) for j in ours if "gpu" in (j.get("tres_per_job") or "")}
    assert gpu_jobs == {str(j["job_id"]) for j in ours if rule_of(j) == "train"}
    assert {j["tres_per_job"] for j in ours if str(j["job_id"]) in gpu_jobs} == {"gres:gpu:1"}
    seen = {job: (cuda, args[2]) for job, cuda, args in job_log(root)}
    for job in gpu_jobs:  # SLURM handed the job a (placeholder) GPU...
        assert seen[job][0] in ("0", "1"), seen[job]
        assert seen[job][1] == "train"
    for job, (cuda, command) in seen.items():
        if job not in gpu_jobs:
            assert not cuda.isdigit(), (job, command, cuda)
    models = sorted((root / "results" / "models").rglob("*.safetensors"))
    assert len(models) == 2
    for model in models:  # ...and, as torch finds no CUDA device, training ran on the CPU
        assert load_tensors(model)[1]["info"]["provenance"]["device"] == "cpu"


def without_timings(value):
    """A result with its "timings" entries (wall-clock, the only thing allowed to differ) removed."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k != "timings"}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def metrics_in(value) -> list:
    """Every "metrics" block (accuracies, parameters, FLOPs) in a result file, in order."""
    if isinstance(value, dict):
        return ([value["metrics"]] if "metrics" in value else []) + [m for v in value.values() for m in metrics_in(v)]
    if isinstance(value, list):
        return [m for v in value for m in metrics_in(v)]
    return []


@pytest.mark.slow
def test_slurm_results_equal_local_results(slurm_run, local_run):
    slurm_root = slurm_run[0]

    def files(root, pattern):
        return {p.relative_to(root): p for p in sorted((root / "results").rglob(pattern))}

    remote, local = files(slurm_root, "*.json"), files(local_run, "*.json")
    assert remote.keys() == local.keys()
    evaluations = [name for name in remote if name.parts[1] in ("models", "merges")]  # result JSON next to each
    assert evaluations
    n_metrics = 0
    for name in evaluations:
        a, b = json.loads(remote[name].read_text()), json.loads(local[name].read_text())
        assert metrics_in(a) == metrics_in(b), name  # the accuracies
        n_metrics += len(metrics_in(a))
        assert without_timings(a) == without_timings(b), name
    assert n_metrics >= 4  # two base models, two merges (the ensemble is scored by the report)

    remote, local = files(slurm_root, "*.safetensors"), files(local_run, "*.safetensors")
    assert remote.keys() == local.keys()
    assert {"models", "merges"} <= {name.parts[1] for name in remote}
    for name, path in remote.items():  # trained and merged checkpoints (and statistics): bit for bit
        a, b = load_file(path), load_file(local[name])
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)

    remote, local = files(slurm_root, "*.csv"), files(local_run, "*.csv")
    assert remote.keys() == local.keys()
    for name, path in remote.items():
        assert path.read_text() == local[name].read_text(), name
