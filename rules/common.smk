# The plan: every job of the config, from `hetmerge plan` (src/hetmerge/plan.py), cached by config and code.
#
# Resolving a config needs torch (the registries check every architecture and method), so it runs in a
# subprocess once per config and code version; this scheduler process stays light, and a no-op rerun reads
# the cached plan. Rules look their jobs up by output name and name no method or layout.
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

SRC = os.path.join(workflow.basedir, "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)
from hetmerge.code_version import source_digest  # standard library only

# Rules run `python -m hetmerge` from this checkout (no install needed, e.g. in the conda env). This sets
# PYTHONPATH for the jobs rather than requiring it, so it is no `envvars:` requirement.
os.environ.update(PYTHONPATH=os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p))

RESULTS = "results"
COMPUTE = config["compute"]
# Jobs per GPU reach the jobs' device choice (devices.py) through the environment, not `params:`: a rule
# parameter is a rerun trigger, and this setting only schedules jobs.
os.environ.update(HETMERGE_JOBS_PER_GPU=str(COMPUTE["jobs_per_gpu"]))
# The `gpu` resource (device slots, see devices.py) of every stage that runs torch besides training: one slot
# where they may use a GPU, none where the config pins the CPU. Training asks for compute.train_gpus.
GPU_SLOTS = 0 if COMPUTE["device"] == "cpu" else 1
# Each config writes its report to its own folder: report.name, else the config file's name.
NAME = config["report"].get("name") or Path(workflow.configfiles[-1] if workflow.configfiles else "config").stem


def load_plan():
    """The cached plan of this config and code, made by `hetmerge plan` where missing (config errors and
    start-up warnings come from there, naming the key)."""
    key = json.dumps([config, NAME, RESULTS, source_digest()], sort_keys=True)
    path = Path(".snakemake", "hetmerge", f"plan-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        given = path.with_suffix(".config.json")
        given.write_text(json.dumps(config))
        command = [sys.executable, "-m", "hetmerge", "plan", "--config", str(given), "--name", NAME]
        proc = subprocess.run([*command, "--results", RESULTS, "--out", str(path)], capture_output=True, text=True)
        given.unlink()
        if proc.returncode:
            raise WorkflowError(proc.stderr.strip().removeprefix("hetmerge plan: error: "))
    plan = json.loads(path.read_text())
    for warning in plan["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return path, plan


PLAN_PATH, PLAN = load_plan()
# The report job reads its spec from the plan; the path travels in the environment, because as a rule
# parameter it would rerun the report on every config edit (the spec itself is the report's parameter).
os.environ.update(HETMERGE_PLAN=str(PLAN_PATH.resolve()))
JOBS = PLAN["jobs"]
REPORT = PLAN["report"]
REPORT_FILES = [f"{REPORT['folder']}/{output['path']}" for output in REPORT["outputs"]]


wildcard_constraints:
    name=r".+",


def job(kind):
    """Input/params function: the plan's entry of this rule's job (by output name)."""

    def lookup(wc):
        try:
            return JOBS[kind][wc.name]
        except KeyError:
            raise WorkflowError(f"no {kind} job {wc.name!r} in the plan of this config") from None

    return lookup


def field(kind, *keys):
    """Params function: one field of the job's entry (e.g. field("train", "args", "seed"))."""

    def get(wc):
        value = job(kind)(wc)
        for key in keys:
            value = value[key]
        return value

    return get


def as_json(kind, *keys):
    return lambda wc: json.dumps(field(kind, *keys)(wc), sort_keys=True)


def stage_log(kind):
    return f"{RESULTS}/logs/{kind}/{{name}}.log"


def stage_benchmark(kind):
    return f"{RESULTS}/benchmarks/{kind}/{{name}}.tsv"


def report_output(output):
    """A declared report file: marked for `snakemake --report` where its layout gives it a caption. The caption
    path is relative to rules/, where the report rule is defined."""
    path = f"{REPORT['folder']}/{output['path']}"
    if output["caption"] is None:
        return path
    return report(
        path,
        caption=f"../report/{output['caption']}",
        category=output["category"],
        subcategory=output["subcategory"],
        labels=output["labels"] or None,
    )


def merge_inputs(wc):
    """A merge's data, split, models, and the statistics and precomputed inputs its method reads."""
    entry = job("merge")(wc)
    inputs = {"data": PLAN["data"]["path"], "split": entry["split"], "models": entry["models"]}
    inputs.update(stats=entry.get("stats", []), precomputed=list(entry.get("precomputed", {}).values()))
    return inputs


def split_options(wc):
    """The split job's arguments as `hetmerge split` options (lists spread, null for "all")."""
    options = []
    for key, value in sorted(job("split")(wc)["args"].items()):
        values = value if isinstance(value, list) else [value]
        options += [f"--{key.replace('_', '-')}", *(json.dumps(v) if v is None else str(v) for v in values)]
    return options


def train_options(wc):
    """`--partition NAME` for a model trained on one partition of a same-task split."""
    partition = job("train")(wc)["args"].get("partition")
    return ["--partition", partition] if partition else []


def merge_options(wc):
    """`--stats PATH`, `--precomputed NAME=PATH ...` and `--few-shot ...` for the inputs the method reads."""
    entry = job("merge")(wc)
    options = ["--stats", entry["stats"]] if "stats" in entry else []
    few = entry["args"].get("few_shot")
    if few:
        options += ["--few-shot", str(few["originals"]), "--aug-factor", str(few["aug_factor"])]
        options += ["--val-per-task", str(few["val_per_task"])]
    if "precomputed" in entry:
        options += ["--precomputed", *(f"{name}={path}" for name, path in entry["precomputed"].items())]
    return options
