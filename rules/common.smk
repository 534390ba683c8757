# Target lists and per-rule config slices, all derived from the validated config (never from globbing results/).
import json
import string

from snakemake.exceptions import WorkflowError

from hetmerge.methods import build_method
from hetmerge.models import parse_spec
from hetmerge.params import ParameterError, as_dict, parse_params
from hetmerge.training import TrainSettings

RESULTS = "results"
DATASET = config["dataset"]["name"]
COMPUTE = config["compute"]
SEEDS = config["split"]["seeds"]
TASKS = list(string.ascii_uppercase[: config["split"]["num_tasks"]])


def _check_config():
    """Fail at start-up, naming the key, for anything the JSON schema cannot know (registered names)."""
    try:
        for name, arch in config["architectures"].items():
            parse_spec(arch["family"], arch["spec"])
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
        if len(exp["models"]) != len(TASKS):
            raise WorkflowError(
                f"experiments.{name}.models lists {len(exp['models'])} models for {len(TASKS)} tasks"
            )


def train_settings(arch):
    """Global training defaults overridden by the architecture's own `train` block."""
    merged = {**config.get("training", {}), **config["architectures"][arch]["train"]}
    return as_dict(parse_params(TrainSettings, merged, f"training settings of architecture {arch!r}"))


def as_json(value):
    return json.dumps(value, sort_keys=True)


def data_path():
    return f"{RESULTS}/data/{DATASET}.safetensors"


def split_path(seed):
    return f"{RESULTS}/splits/{DATASET}/seed{seed}.json"


def model_path(seed, arch, task):
    return f"{RESULTS}/models/{DATASET}/seed{seed}/{arch}-{task}.safetensors"


def experiment_models(wildcards):
    exp = config["experiments"][wildcards.experiment]
    return [model_path(wildcards.seed, arch, task) for arch, task in zip(exp["models"], TASKS)]


def experiment_label(experiment):
    """The experiment's own label, else its architectures' labels joined by + (one label if homogeneous)."""
    exp = config["experiments"][experiment]
    if "label" in exp:
        return exp["label"]
    labels = [config["architectures"][a].get("label", a) for a in exp["models"]]
    return " + ".join(dict.fromkeys(labels))


def base_entries():
    """Evaluation rows for the source models themselves: model_a, model_b, ..."""
    return [f"model_{t.lower()}" for t in TASKS]


def eval_entries(experiment):
    return base_entries() + list(config["experiments"][experiment]["methods"])


def eval_path(seed, experiment, entry):
    return f"{RESULTS}/eval/{DATASET}/seed{seed}/{experiment}/{entry}.json"


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
    return outputs


def method_order():
    order = base_entries()
    for exp in config["experiments"].values():
        order += [m for m in exp["methods"] if m not in order]
    return order


_check_config()
