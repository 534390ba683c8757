# Target lists and per-rule config slices, all derived from the validated config (never from globbing results/).
import json
import os
import string

from snakemake.exceptions import WorkflowError

from hetmerge.methods import REGISTRY, build_method
from hetmerge.data import dataset_info
from hetmerge.models import build_model
from hetmerge.params import ParameterError, as_dict, parse_params
from hetmerge.training import TrainSettings

# Rules run `python -m hetmerge` from this checkout (no install needed, e.g. in the conda env). This sets
# PYTHONPATH for the jobs rather than requiring it, so it is no `envvars:` requirement.
os.environ.update(
    PYTHONPATH=os.pathsep.join(p for p in (os.path.join(workflow.basedir, "src"), os.environ.get("PYTHONPATH")) if p)
)

RESULTS = "results"
DATASET = config["dataset"]["name"]
COMPUTE = config["compute"]
SEEDS = config["split"]["seeds"]


wildcard_constraints:
    seed=r"\d+",
    ntasks=r"\d+",
    task=r"[A-Z]",


def tasks_of(experiment):
    """One task per model of the experiment: A, B, C, ..."""
    return list(string.ascii_uppercase[: len(config["experiments"][experiment]["models"])])


def _check_config():
    """Fail at start-up, naming the key, for anything the JSON schema cannot know (registered names)."""
    try:
        shape = dataset_info(DATASET).input_shape
        for name, arch in config["architectures"].items():
            build_model(arch["family"], arch["spec"], shape, {"A": 2})
            train_settings(name)
        for name, entry in config["methods"].items():
            build_method(entry["method"], entry["params"])
    except ParameterError as err:
        raise WorkflowError(f"config error in {name!r}: {err}") from err
    except ValueError as err:
        raise WorkflowError(f"config error in architectures.{name}: {err}") from err
    for name, exp in config["experiments"].items():
        for arch in exp["models"]:
            if arch not in config["architectures"]:
                raise WorkflowError(f"experiments.{name}.models: unknown architecture {arch!r}")
        for method in exp["methods"]:
            if method not in config["methods"]:
                raise WorkflowError(f"experiments.{name}.methods: unknown method {method!r}")


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


def eval_path(seed, experiment, entry):
    return f"{RESULTS}/eval/{DATASET}/s{seed}/{experiment}/{entry}.json"


def all_eval_paths():
    return [
        eval_path(seed, exp, entry)
        for exp in config["experiments"]
        for seed in SEEDS
        for entry in eval_entries(exp)
    ]


def report_outputs():
    paper = f"{RESULTS}/paper"
    outputs = [f"{paper}/main.tex", f"{paper}/results.csv", f"{paper}/tables/summary_{DATASET}.tex"]
    outputs += [f"{paper}/tables/accuracy_{DATASET}_{exp}.tex" for exp in config["experiments"]]
    outputs += [f"{paper}/figures/joint_accuracy_{DATASET}.{ext}" for ext in ("pdf", "png")]
    outputs += [
        f"{paper}/figures/partial_zip_{DATASET}_{exp}.{ext}"
        for exp, entry in config["experiments"].items()
        if any(config["methods"][m]["method"] == "zipit" for m in entry["methods"])
        for ext in ("pdf", "png")
    ]
    return outputs


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


def evaluated_model(wc):
    """A merge output, or for the model_a/model_b/... rows the source model itself."""
    if wc.entry.startswith("model_"):
        task = wc.entry.removeprefix("model_").upper()
        models = config["experiments"][wc.experiment]["models"]
        return model_path(len(models), wc.seed, models[tasks_of(wc.experiment).index(task)], task)
    return f"{RESULTS}/merges/{DATASET}/s{wc.seed}/{wc.experiment}/{wc.entry}.safetensors"


def eval_record(wc):
    """Fields the report needs, plus this row's config slice (so a label edit re-labels the row)."""
    exp = config["experiments"][wc.experiment]
    if wc.entry.startswith("model_"):
        task = wc.entry.removeprefix("model_").upper()
        kind, label, slice_ = "base", f"Model {task}", {"architecture": exp["models"][tasks_of(wc.experiment).index(task)]}
    else:
        entry = config["methods"][wc.entry]
        kind = "ensemble" if entry["method"] == "ensemble" else "merge"
        label, slice_ = entry.get("label", wc.entry), entry
    return as_json(
        {
            "dataset": DATASET,
            "arch": wc.experiment,
            "arch_label": experiment_label(wc.experiment),
            "pair": int(wc.seed),
            "method": wc.entry,
            "label": label,
            "kind": kind,
            "config": slice_,
        }
    )


_check_config()
