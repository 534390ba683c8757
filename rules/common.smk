# Target lists and per-rule config slices, all derived from the validated config (never from globbing results/).
import json
import os
import string
import sys
import warnings

from snakemake.exceptions import WorkflowError

from hetmerge.methods import REGISTRY, MergeError, MethodWarning, build_method
from hetmerge.data import dataset_info
from hetmerge.models import build_model
from hetmerge.params import as_dict, parse_params
from hetmerge.training import TrainSettings

# Rules run `python -m hetmerge` from this checkout (no install needed, e.g. in the conda env). This sets
# PYTHONPATH for the jobs rather than requiring it, so it is no `envvars:` requirement.
os.environ.update(
    PYTHONPATH=os.pathsep.join(p for p in (os.path.join(workflow.basedir, "src"), os.environ.get("PYTHONPATH")) if p)
)

RESULTS = "results"
DATASET = config["dataset"]["name"]
COMPUTE = config["compute"]
# Jobs per GPU reach the jobs' device choice (devices.py) through the environment, not `params:`: a rule
# parameter is a rerun trigger, and this setting only schedules jobs.
os.environ.update(HETMERGE_JOBS_PER_GPU=str(COMPUTE["jobs_per_gpu"]))
SEEDS = config["split"]["seeds"]
# The `gpu` resource (device slots, see devices.py) of the stages besides training that run torch: one slot
# where they may use a GPU, none where the config pins the CPU. Training asks for compute.train_gpus.
GPU_SLOTS = 0 if COMPUTE["device"] == "cpu" else 1


wildcard_constraints:
    seed=r"\d+",
    ntasks=r"\d+",
    task=r"[A-Z]",
    experiment=r"[^/]+",


def tasks_of(experiment):
    """One task per model of the experiment: A, B, C, ..."""
    return list(string.ascii_uppercase[: len(config["experiments"][experiment]["models"])])


def _check_config():
    """Fail at start-up, naming the key, for anything the JSON schema cannot know: registered names, parameter
    types and ranges, and whether each experiment's methods can merge its models at all, so an experiment that
    can never run is refused before its models are trained."""
    shape = dataset_info(DATASET).input_shape
    nets = {}  # one freshly built network per architecture: what a method's check needs (widths, spaces)
    for name, arch in config["architectures"].items():
        try:
            nets[name] = build_model(arch["family"], arch["spec"], shape, {"A": 2})
            train_settings(name)
        except ValueError as err:
            raise WorkflowError(f"config error in architectures.{name}: {err}") from err
    for name, entry in config["methods"].items():
        try:
            build_method(entry["method"], entry["params"])
        except ValueError as err:
            raise WorkflowError(f"config error in methods.{name}: {err}") from err
    for name, exp in config["experiments"].items():
        for arch in exp["models"]:
            if arch not in config["architectures"]:
                raise WorkflowError(f"experiments.{name}.models: unknown architecture {arch!r}")
        for method in exp["methods"]:
            if method not in config["methods"]:
                raise WorkflowError(f"experiments.{name}.methods: unknown method {method!r}")
            _check_merge(name, method, [nets[arch] for arch in exp["models"]])
        for method in exp["lambda_sweep"]:
            entry = config["methods"].get(method, {})
            if method not in exp["methods"] or entry["method"] != "mudsc" or "lam" in entry["params"]:
                raise WorkflowError(
                    f"experiments.{name}.lambda_sweep: {method!r} must be one of the experiment's mudsc rows "
                    "that choose λ (no fixed lam)"
                )
        plane = exp.get("landscape")
        if plane is not None:
            entry = config["methods"].get(plane, {})
            if plane not in exp["methods"] or entry["method"] == "ensemble" or "stop_after" in entry["params"]:
                raise WorkflowError(f"experiments.{name}.landscape: {plane!r} must be a fully merged row of it")
            if len(exp["models"]) != 2:
                raise WorkflowError(f"experiments.{name}.landscape: the plane needs exactly two models")


def _check_merge(experiment, row, models):
    """The method's own check on freshly built models of the experiment's architectures: model counts,
    structure, and its `risk` (e.g. a zip no similarity can finish is refused; one that β does not guarantee is
    reported, naming the experiment)."""
    merger = build_method(config["methods"][row]["method"], config["methods"][row]["params"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MethodWarning)  # reported below, naming the experiment
            merger.check(models)
        risk = merger.risk(models)
    except MergeError as err:
        raise WorkflowError(
            f"experiments.{experiment}.methods: {row!r} cannot merge its models: {err}; remove the row or change "
            f"the experiment's models {config['experiments'][experiment]['models']}"
        ) from err
    if risk is not None:
        print(f"warning: experiments.{experiment}, row {row!r}: {risk}", file=sys.stderr)


def train_settings(arch):
    """Global training defaults overridden by the architecture's own `train` block."""
    merged = {**config.get("training", {}), **config["architectures"][arch]["train"]}
    return as_dict(parse_params(TrainSettings, merged, f"training settings of architecture {arch!r}"))


def as_json(value):
    return json.dumps(value, sort_keys=True)


def data_path():
    return f"{RESULTS}/data/{DATASET}.safetensors"


def split_path(ntasks, seed):
    return f"{RESULTS}/splits/{DATASET}/t{ntasks}-s{seed}.json"


def model_path(ntasks, seed, arch, task):
    return f"{RESULTS}/models/{DATASET}/t{ntasks}-s{seed}/{arch}-{task}.safetensors"


def stats_path(seed, experiment):
    return f"{RESULTS}/stats/{DATASET}/s{seed}/{experiment}.safetensors"


def experiment_split(wildcards):
    return split_path(len(config["experiments"][wildcards.experiment]["models"]), wildcards.seed)


def experiment_models(wildcards):
    """The experiment's source models of one split seed, in task order."""
    exp = config["experiments"][wildcards.experiment]
    n = len(exp["models"])
    return [model_path(n, wildcards.seed, arch, t) for arch, t in zip(exp["models"], tasks_of(wildcards.experiment))]


def experiment_label(experiment):
    """The experiment's own label, else its architectures' labels joined by + (one label if homogeneous)."""
    exp = config["experiments"][experiment]
    if "label" in exp:
        return exp["label"]
    labels = [config["architectures"][a].get("label", a) for a in exp["models"]]
    return " + ".join(dict.fromkeys(labels))


def base_entries(experiment):
    """Evaluation rows for the source models themselves: model_a, model_b, ..."""
    return [f"model_{t.lower()}" for t in tasks_of(experiment)]


def eval_entries(experiment):
    return base_entries(experiment) + list(config["experiments"][experiment]["methods"])


def eval_path(seed, experiment):
    """One JSON list per experiment and split seed: a record per row (base models, ensemble, merges)."""
    return f"{RESULTS}/eval/{DATASET}/s{seed}/{experiment}.json"


def all_eval_paths():
    return [eval_path(seed, exp) for exp in config["experiments"] for seed in SEEDS]


def lambda_sweep_path(seed, experiment, method):
    return f"{RESULTS}/analysis/{DATASET}/s{seed}/{experiment}/lambda_{method}.json"


def landscape_path(seed, experiment):
    return f"{RESULTS}/analysis/{DATASET}/s{seed}/{experiment}/landscape.json"


def all_analysis_paths():
    """λ sweeps for every pair; the loss landscape for the first pair only (it is one figure)."""
    paths = []
    for exp, entry in config["experiments"].items():
        paths += [lambda_sweep_path(seed, exp, m) for seed in SEEDS for m in entry["lambda_sweep"]]
        if entry.get("landscape"):
            paths.append(landscape_path(SEEDS[0], exp))
    return paths


def landscape_merges(wc):
    """Every fully merged row of the experiment (ensembles and partial zips have no single weight vector)."""
    rows = [
        m
        for m in config["experiments"][wc.experiment]["methods"]
        if config["methods"][m]["method"] != "ensemble" and "stop_after" not in config["methods"][m]["params"]
    ]
    return {m: f"{RESULTS}/merges/{DATASET}/s{wc.seed}/{wc.experiment}/{m}.safetensors" for m in rows}


REPORT_SHOWN = {
    # How `snakemake --report` shows each (kind, extension) of report_items(): category, subcategory and caption
    # (report/<name>.rst). Others (main.tex, PDFs, LaTeX tables) are outputs only: a browser cannot show them;
    # every table has an HTML twin instead.
    ("summary_table", "html"): ("Tables", "Summary", "summary_table.rst"),
    ("accuracy_table", "html"): ("Tables", "Accuracy", "accuracy_table.rst"),
    ("mudsc_table", "html"): ("Tables", "MuDSC", "mudsc_table.rst"),
    ("hetero_table", "html"): ("Tables", "Heterogeneous merging", "hetero_table.rst"),
    ("joint_accuracy", "png"): ("Figures", "Joint accuracy", "joint_accuracy.rst"),
    ("partial_zip", "png"): ("Figures", "Partial zip", "partial_zip.rst"),
    ("lambda", "png"): ("Figures", "λ sweep", "lambda.rst"),
    ("landscape", "png"): ("Figures", "Loss landscape", "landscape.rst"),
    ("alignment", "png"): ("Figures", "Depth alignment", "alignment.rst"),
    ("results", "csv"): ("Data", "Results", "results_csv.rst"),
    ("hetero_table", "csv"): ("Data", "Heterogeneous merging", "hetero_csv.rst"),
    ("lambda", "csv"): ("Data", "λ sweep", "lambda_csv.rst"),
    ("provenance", "csv"): ("Data", "Provenance", "provenance.rst"),
    ("provenance", "html"): ("Provenance", "Evaluation records", "provenance.rst"),
}


def report_items():
    """Every file the report writes, as (path, kind, owner), main.tex first; owner is the experiment (a hetero
    table's: its group) or None for files about the whole dataset. Its builders and this list must agree (a test
    runs both)."""
    paper = f"{RESULTS}/paper"
    items = [(f"{paper}/main.tex", "main", None), (f"{paper}/results.csv", "results", None)]
    items += [(f"{paper}/provenance.{ext}", "provenance", None) for ext in ("csv", "html")]
    items += [(f"{paper}/tables/summary_{DATASET}.{ext}", "summary_table", None) for ext in ("tex", "html")]
    groups = []
    for exp, entry in config["experiments"].items():
        if entry["table"] == "hetero":
            groups += [g for g in [entry.get("group", exp)] if g not in groups]
        else:
            table = "mudsc" if entry["table"] == "mudsc" else "accuracy"
            stem = f"{paper}/tables/{table}_{DATASET}_{exp}"
            items += [(f"{stem}.{ext}", f"{table}_table", exp) for ext in ("tex", "html")]
    for g in groups:
        items += [(f"{paper}/tables/hetero_{DATASET}_{g}.{ext}", "hetero_table", g) for ext in ("tex", "html", "csv")]
    items += [(f"{paper}/figures/joint_accuracy_{DATASET}.{ext}", "joint_accuracy", None) for ext in ("pdf", "png")]
    for exp, entry in config["experiments"].items():
        rows = [config["methods"][m] for m in entry["methods"]]
        figures = []
        if any(r["method"] == "zipit" and "stop_after" in r["params"] for r in rows):
            figures += [("partial_zip", ("pdf", "png"))]
        if entry["lambda_sweep"]:
            figures += [("lambda", ("pdf", "png", "csv"))]
        if entry.get("landscape"):
            figures += [("landscape", ("pdf", "png"))]
        if any(r["method"] == "hetero" for r in rows):
            figures += [("alignment", ("pdf", "png"))]
        for kind, exts in figures:
            items += [(f"{paper}/figures/{kind}_{DATASET}_{exp}.{ext}", kind, exp) for ext in exts]
    return items


def report_outputs():
    """Every file the report writes, main.tex first (plain paths: the targets of `all`)."""
    return [path for path, _, _ in report_items()]


def report_output(path, kind, owner):
    """`path` as an output of the report rule: marked for `snakemake --report` as REPORT_SHOWN says, with labels
    that tell apart the files of one subcategory (the experiment, or the hetero group and its experiments). The
    caption path is relative to rules/, where the report rule is defined."""
    shown = REPORT_SHOWN.get((kind, path.rsplit(".", 1)[-1]))
    if shown is None:
        return path
    category, subcategory, caption = shown
    if owner is None:
        labels = {"dataset": DATASET}
    elif kind == "hetero_table":
        hetero = {e: entry for e, entry in config["experiments"].items() if entry["table"] == "hetero"}
        members = [e for e, entry in hetero.items() if entry.get("group", e) == owner]
        labels = {"group": owner, "experiments": "; ".join(experiment_label(e) for e in members)}
    else:
        labels = {"experiment": owner, "models": experiment_label(owner)}
    # Snakemake fills {name} in label values as a wildcard; configured labels are text, never wildcards.
    labels = {key: value.replace("{", "(").replace("}", ")") for key, value in labels.items()}
    return report(path, caption=f"../report/{caption}", category=category, subcategory=subcategory, labels=labels)


def method_order():
    order = []
    for name, exp in config["experiments"].items():
        order += [m for m in base_entries(name) if m not in order]
    for exp in config["experiments"].values():
        order += [m for m in exp["methods"] if m not in order]
    return order


def uses_statistics(method_key):
    return REGISTRY[config["methods"][method_key]["method"]].uses_statistics


def merge_inputs(wc):
    inputs = {"data": data_path(), "split": experiment_split(wc), "models": experiment_models(wc)}
    if uses_statistics(wc.method):
        inputs["stats"] = stats_path(wc.seed, wc.experiment)
    return inputs


def evaluated_model(seed, experiment, entry):
    """A merge output, or for the model_a/model_b/... rows the source model itself."""
    if entry.startswith("model_"):
        task = entry.removeprefix("model_").upper()
        models = config["experiments"][experiment]["models"]
        return model_path(len(models), seed, models[tasks_of(experiment).index(task)], task)
    return f"{RESULTS}/merges/{DATASET}/s{seed}/{experiment}/{entry}.safetensors"


def evaluated_models(wc):
    return [evaluated_model(wc.seed, wc.experiment, entry) for entry in eval_entries(wc.experiment)]


def eval_record(seed, experiment, entry):
    """Fields the report needs, plus this row's config slice (so a label edit re-labels the row)."""
    exp = config["experiments"][experiment]
    if entry.startswith("model_"):
        task = entry.removeprefix("model_").upper()
        kind, label, slice_ = "base", f"Model {task}", {"architecture": exp["models"][tasks_of(experiment).index(task)]}
    else:
        method = config["methods"][entry]
        kind = "ensemble" if method["method"] == "ensemble" else "merge"
        label, slice_ = method.get("label", entry), method
    return {
        "dataset": DATASET,
        "arch": experiment,
        "arch_label": experiment_label(experiment),
        "pair": int(seed),
        "method": entry,
        "label": label,
        "kind": kind,
        "layout": exp["table"],
        "group": exp.get("group"),
        "config": slice_,
    }


def eval_records(wc):
    return as_json([eval_record(wc.seed, wc.experiment, entry) for entry in eval_entries(wc.experiment)])


def analysis_record(wc, kind):
    exp = config["experiments"][wc.experiment]
    record = {"kind": kind, "dataset": DATASET, "arch": wc.experiment, "arch_label": experiment_label(wc.experiment)}
    record["pair"] = int(wc.seed)
    if kind == "lambda_sweep":
        entry = config["methods"][wc.method]
        record.update(method=wc.method, label=entry.get("label", wc.method), solver=entry["params"].get("solver", "zip"))
    return as_json(record)


_check_config()
