"""The pipeline's plan: every computation the config asks for, each identified by what determines it.

A split is named by dataset, task count, seed and split settings; a base model by its split, architecture, task
and training settings; statistics, depth alignments, merges and loss landscapes by the dataset, split seed,
the ordered list of models, and (for merges) the registered method and its canonical parameters (defaults
filled in). Paths are readable names plus a short hash of everything else, so a computation that several
experiments, tables or figures list runs once, and two configs never write one file with different content.

Labels, table membership and row order go only into the report spec, so editing them reruns the report and
nothing else. Each job carries the version of the code it runs (`hetmerge.code_version`), so a code edit reruns
exactly the stages whose code changed.

Everything the pipeline must know about a method comes from its registry entry (statistics, precomputed inputs,
offered analyses, a parameter it chooses on the merge slice, whether it is scored from stored predictions): this
module, the rules and the report name no method.
"""

from __future__ import annotations

import hashlib
import json
import string
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hetmerge.code_version import code_version

SPLIT_CODE = ("hetmerge.data.splits",)
TRAIN_CODE = ("hetmerge.training", "hetmerge.evaluation")
STATISTICS_CODE = ("hetmerge.statistics",)
LANDSCAPE_CODE = ("hetmerge.landscape", "hetmerge.evaluation")
MERGE_CODE = ("hetmerge.evaluation",)


CLASS_DISJOINT = "class_disjoint"
"""The split setting of the ZipIt! family: one task per model, disjoint classes. The others (full, iid, non_iid,
sharded) give N models one task over every class, each trained on its own partition of the data."""


class ConfigError(ValueError):
    """The config asks for something that cannot run; the message names the key."""


def digest(value: Any, length: int = 8) -> str:
    """Short hash of a JSON value in canonical form (sorted keys; 1 and 1.0 are one number)."""

    def canonical(v: Any) -> Any:
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        if isinstance(v, int | float):
            return float(v)
        if isinstance(v, Mapping):
            return {str(k): canonical(x) for k, x in v.items()}
        return [canonical(x) for x in v]

    text = json.dumps(canonical(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class Row:
    """One configured method row, resolved through the registry."""

    key: str
    label: str
    method: str
    params: dict[str, Any]
    analyses: tuple[str, ...]
    choice: dict[str, Any] | None
    precomputed: tuple[str, ...]
    uses_statistics: bool
    uses_few_shot: bool
    scored_from_predictions: bool


class Planner:
    """Builds the plan of one validated config (see `plan`)."""

    def __init__(self, config: Mapping[str, Any], results: str = "results") -> None:
        from hetmerge.data import dataset_info

        self.config = config
        self.results = results
        self.dataset = config["dataset"]["name"]
        self.info = dataset_info(self.dataset)
        self.compute = config["compute"]
        self.warnings: list[str] = []
        self.report_inputs: list[str] = []  # every result file the report spec names
        self.jobs: dict[str, dict[str, dict[str, Any]]] = {
            kind: {} for kind in ("split", "train", "statistics", "precompute", "merge", "landscape")
        }
        self.architectures = self._architectures()
        self.rows = {key: self._row(key, entry) for key, entry in config["methods"].items()}
        self.code = {
            "split": code_version(*SPLIT_CODE),
            "train": code_version(*TRAIN_CODE),
            "statistics": code_version(*STATISTICS_CODE),
            "landscape": code_version(*LANDSCAPE_CODE),
        }

    # --- resolving the config through the registries -------------------------------------------------------
    def _architectures(self) -> dict[str, dict[str, Any]]:
        from hetmerge.models import build_model
        from hetmerge.params import parse_params
        from hetmerge.training import TrainSettings

        resolved = {}
        for name, arch in self.config["architectures"].items():
            try:
                build_model(arch["family"], arch["spec"], self.info.input_shape, {"A": 2})  # the spec is valid
                merged = {**self.config.get("training", {}), **arch["train"]}
                train = parse_params(TrainSettings, merged, f"training settings of architecture {name!r}").describe()
            except ValueError as err:
                raise ConfigError(f"config error in architectures.{name}: {err}") from err
            resolved[name] = {"model": {"family": arch["family"], "spec": arch["spec"]}, "train": train}
        return resolved

    def _row(self, key: str, entry: Mapping[str, Any]) -> Row:
        from hetmerge.methods import build_method
        from hetmerge.params import as_dict

        try:
            method = build_method(entry["method"], entry["params"])
        except ValueError as err:
            raise ConfigError(f"config error in methods.{key}: {err}") from err
        choice = method.choice()
        return Row(
            key=key,
            label=entry.get("label", key),
            method=entry["method"],
            params=as_dict(method.params),
            analyses=tuple(method.analyses()),
            choice=None if choice is None else as_dict(choice),
            precomputed=method.precomputed_inputs(),
            uses_statistics=method.uses_statistics,
            uses_few_shot=method.uses_few_shot,
            scored_from_predictions=method.scored_from_predictions,
        )

    def _check_experiment(self, name: str, exp: Mapping[str, Any]) -> None:
        from hetmerge.report.layout import table_layouts

        if exp["table"] not in table_layouts():
            raise ConfigError(
                f"experiments.{name}.table: unknown table layout {exp['table']!r}; known: {table_layouts()}"
            )
        for arch in exp["models"]:
            if arch not in self.architectures:
                raise ConfigError(f"experiments.{name}.models: unknown architecture {arch!r}")
        nets = self._nets(exp)
        for key in exp["methods"]:
            if key not in self.rows:
                raise ConfigError(f"experiments.{name}.methods: unknown method {key!r}")
            if self.rows[key].uses_few_shot and exp.get("few_shot") is None:
                raise ConfigError(
                    f"experiments.{name}.few_shot: row {key!r} learns from each task's few-shot slice; set the "
                    "original images per task (few_shot: 16, say)"
                )
            self._check_merge(name, key, nets)
        for key in exp["lambda_sweep"]:
            if key not in exp["methods"] or "lambda_curve" not in self.rows[key].analyses:
                raise ConfigError(
                    f"experiments.{name}.lambda_sweep: {key!r} must be one of the experiment's rows whose method "
                    "offers a λ curve (it chooses λ on the merge slice: no fixed lam)"
                )
        plane = exp.get("landscape")
        if plane is not None:
            if plane not in exp["methods"] or "landscape" not in self.rows[plane].analyses:
                raise ConfigError(
                    f"experiments.{name}.landscape: {plane!r} must be one of its rows whose merge is one network in "
                    "model A's weight space (not an ensemble, partial merge or depth-aligned merge)"
                )
            first, second = ([self.architectures[a]["model"] for a in exp["models"]] + [None])[:2]
            if len(exp["models"]) != 2 or first != second:
                raise ConfigError(
                    f"experiments.{name}.landscape: the plane needs exactly two models of one architecture"
                )

    def _nets(self, exp: Mapping[str, Any]) -> list[Any]:
        """Fresh networks with the experiment's architectures and heads (one per task, or one over every class in a
        same-task setting), for the methods' data-free checks."""
        import numpy as np

        from hetmerge.data.splits import SAME_TASK_NAME
        from hetmerge.models import build_model

        n = len(exp["models"])
        if exp["setting"] == CLASS_DISJOINT:
            sizes = [len(part) for part in np.array_split(np.arange(self.info.num_classes), n)]
            heads = [{task: k} for task, k in zip(string.ascii_uppercase[:n], sizes, strict=True)]
        else:
            heads = [{SAME_TASK_NAME: self.info.num_classes}] * n
        return [
            build_model(**self.architectures[arch]["model"], input_shape=self.info.input_shape, heads=h)
            for arch, h in zip(exp["models"], heads, strict=True)
        ]

    def _check_merge(self, experiment: str, key: str, nets: Sequence[Any]) -> None:
        """The method's own check on freshly built models of the experiment's architectures: model counts,
        structure, and its `risk` (reported, naming the experiment)."""
        from hetmerge.methods import MergeError, MethodWarning, build_method

        row = self.rows[key]
        merger = build_method(row.method, row.params)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MethodWarning)
                merger.check(nets)
            risk = merger.risk(nets)
        except MergeError as err:
            raise ConfigError(
                f"experiments.{experiment}.methods: {key!r} cannot merge its models: {err}; remove the row or "
                f"change the experiment's models {list(self.config['experiments'][experiment]['models'])}"
            ) from err
        if risk is not None:
            self.warnings.append(f"experiments.{experiment}, row {key!r}: {risk}")

    # --- paths and jobs -------------------------------------------------------------------------------------
    def data_path(self) -> str:
        return f"{self.results}/data/{self.dataset}.safetensors"

    def split(self, ntasks: int, seed: int, setting: str = CLASS_DISJOINT, fusion_size: int | None = None) -> str:
        """Class-disjoint tasks (`t<n>`), or `ntasks` models' partitions of one task (`<setting><n>`) with a fusion
        set of `fusion_size` images (default: the config's)."""
        split = self.config["split"]
        args: dict[str, Any] = {"seed": seed, "num_tasks": ntasks}
        if setting == CLASS_DISJOINT:
            args["merge_per_class"] = split["merge_per_class"]
        else:
            args.update(kind=setting, fusion_size=fusion_size or split["fusion_size"])
            if setting == "non_iid":
                args["concentration"] = split["concentration"]
        args["train_per_task"] = split["train_per_task" if setting == CLASS_DISJOINT else "train_total"]
        args["test_per_task"] = split["test_per_task"]
        prefix = "t" if setting == CLASS_DISJOINT else setting
        name = f"{self.dataset}/{prefix}{ntasks}-s{seed}-{digest(args, 6)}"
        self.jobs["split"].setdefault(name, {"args": args, "code": self.code["split"]})
        return f"{self.results}/splits/{name}.json"

    def model(
        self,
        ntasks: int,
        seed: int,
        arch: str,
        task: str,
        setting: str = CLASS_DISJOINT,
        fusion_size: int | None = None,
    ) -> str:
        """A base model: trained on task `task` of the split, or on partition `task` of a same-task split (its
        one head then has every class); its result JSON lies next to it."""
        split = self.split(ntasks, seed, setting, fusion_size)
        resolved = self.architectures[arch]
        args = {
            "model": resolved["model"],
            "train": resolved["train"],
            "seed": 1000 * seed + 100 * ntasks + string.ascii_uppercase.index(task),
            "task": task,
            "eval_batch_size": self.compute["eval_batch_size"],
        }
        if setting != CLASS_DISJOINT:
            from hetmerge.data.splits import SAME_TASK_NAME

            args.update(task=SAME_TASK_NAME, partition=task)
        split_key = split.removeprefix(f"{self.results}/splits/").removesuffix(".json")
        name = f"{split_key}/{arch}-{task}-{digest(args, 6)}"
        self.jobs["train"].setdefault(name, {"split": split, "args": args, "code": self.code["train"]})
        return f"{self.results}/models/{name}.safetensors"

    def models(self, experiment: str, seed: int) -> list[str]:
        exp = self.config["experiments"][experiment]
        tasks = string.ascii_uppercase[: len(exp["models"])]
        n = len(exp["models"])
        setting, fusion = exp["setting"], exp.get("fusion_size")
        return [
            self.model(n, seed, arch, task, setting, fusion) for arch, task in zip(exp["models"], tasks, strict=True)
        ]

    def _folder(self, experiment: str, seed: int) -> tuple[str, list[str], str]:
        """The folder of everything computed from one ordered list of models: readable, plus their hash."""
        models = self.models(experiment, seed)
        exp = self.config["experiments"][experiment]
        archs = exp["models"]
        folder = f"{self.dataset}/s{seed}/{'+'.join(archs)}-{digest(models, 6)}"
        return folder, models, self.split(len(archs), seed, exp["setting"], exp.get("fusion_size"))

    def statistics(self, experiment: str, seed: int) -> str:
        folder, models, split = self._folder(experiment, seed)
        args = {"batch_size": self.compute["merge_batch_size"]}
        name = f"{folder}/statistics-{digest([models, args], 6)}"
        self.jobs["statistics"].setdefault(
            name, {"split": split, "models": models, "args": args, "code": self.code["statistics"]}
        )
        return f"{self.results}/stats/{name}.safetensors"

    def precompute(self, experiment: str, seed: int, name: str) -> str:
        """An input that methods declare in `precomputed`, computed once per model list and seed."""
        from hetmerge.methods import PRECOMPUTE

        folder, models, split = self._folder(experiment, seed)
        args = {"name": name, "batch_size": self.compute["merge_batch_size"]}
        key = f"{folder}/{name}-{digest([models, args], 6)}"
        code = code_version(PRECOMPUTE[name].__module__)
        self.jobs["precompute"].setdefault(key, {"split": split, "models": models, "args": args, "code": code})
        return f"{self.results}/precomputed/{key}.json"

    def merge(self, experiment: str, seed: int, key: str) -> str:
        """The merge of one row; for a method that chooses a parameter, the chosen merge of one job that also
        scores every value of its grid and of the figure's values (the row's curve)."""
        from hetmerge.methods import REGISTRY

        row = self.rows[key]
        folder, models, split = self._folder(experiment, seed)
        curve_values: list[float] = []
        if row.choice is not None:
            # A curve analysis `<x>_curve` is drawn at the values `analysis.<x>_values` besides the method's grid,
            # where some experiment of these models asks for the figure of this method and parameters: decided
            # per (models, method, params), so that every experiment listing the merge names one job.
            models_of = self.config["experiments"][experiment]["models"]
            drawn = any(
                e["models"] == models_of
                and any(
                    (self.rows[k].method, self.rows[k].params) == (row.method, row.params) for k in e["lambda_sweep"]
                )
                for e in self.config["experiments"].values()
            )
            figure = [
                v
                for a in row.analyses
                if drawn and a.endswith("_curve")
                for v in self.config["analysis"][f"{a.removesuffix('_curve')}_values"]
            ]
            curve_values = sorted({float(v) for v in [*row.choice["grid"], *figure]})
        args = {
            "method": row.method,
            "params": row.params,
            "seed": seed,
            "batch_size": self.compute["merge_batch_size"],
            "eval_batch_size": self.compute["eval_batch_size"],
            "curve_values": curve_values,
        }
        if row.uses_few_shot:
            exp = self.config["experiments"][experiment]
            args["few_shot"] = {"originals": exp["few_shot"], **self.config["split"]["few_shot"]}
            if exp.get("aug_factor") is not None:
                args["few_shot"]["aug_factor"] = exp["aug_factor"]
        job: dict[str, Any] = {"split": split, "models": models, "args": args}
        if row.uses_statistics:
            job["stats"] = self.statistics(experiment, seed)
        if row.precomputed:
            job["precomputed"] = {name: self.precompute(experiment, seed, name) for name in row.precomputed}
        job["code"] = code_version(REGISTRY[row.method].__module__, *MERGE_CODE)
        name = f"{folder}/{row.method}-{digest([models, args, sorted(k for k in job if k != 'code')], 8)}"
        self.jobs["merge"].setdefault(name, job)
        return f"{self.results}/merges/{name}.safetensors"

    def landscape(self, experiment: str, seed: int) -> str:
        exp = self.config["experiments"][experiment]
        folder, models, split = self._folder(experiment, seed)
        rows = [k for k in exp["methods"] if "landscape" in self.rows[k].analyses]
        merges = {k: self.merge(experiment, seed, k) for k in rows}
        analysis = self.config["analysis"]
        args = {
            "plane": exp["landscape"],
            "steps": analysis["landscape_steps"],
            "per_task": analysis["landscape_per_task"],
            "batch_size": self.compute["merge_batch_size"],
        }
        name = f"{folder}/landscape-{digest([models, merges, args], 8)}"
        self.jobs["landscape"].setdefault(
            name, {"split": split, "models": models, "merges": merges, "args": args, "code": self.code["landscape"]}
        )
        return f"{self.results}/landscape/{name}.json"

    # --- the report -----------------------------------------------------------------------------------------
    def experiment_label(self, name: str) -> str:
        """The experiment's own label, else its architectures' labels joined by + (one label if homogeneous)."""
        exp = self.config["experiments"][name]
        if "label" in exp:
            return exp["label"]
        labels = [self.config["architectures"][a].get("label", a) for a in exp["models"]]
        return " + ".join(dict.fromkeys(labels))

    def experiment_spec(self, name: str) -> dict[str, Any]:
        exp = self.config["experiments"][name]
        self._check_experiment(name, exp)
        seeds = self.config["split"]["seeds"]
        archs = exp["models"]
        rows: list[dict[str, Any]] = []
        models = {str(s): self.models(name, s) for s in seeds}
        for i, task in enumerate(string.ascii_uppercase[: len(archs)]):
            results = {s: self._input(_result(paths[i])) for s, paths in models.items()}
            rows.append({"key": f"model_{task.lower()}", "label": f"Model {task}", "kind": "base", "results": results})
        for key in exp["methods"]:
            row = self.rows[key]
            entry: dict[str, Any] = {
                "key": key,
                "label": row.label,
                "method": row.method,
                "params": row.params,
                "analyses": list(row.analyses),
            }
            if row.scored_from_predictions:
                members = {str(s): [self._input(_result(m)) for m in self.models(name, s)] for s in seeds}
                entry.update(kind="ensemble", members=members)
            else:
                entry.update(
                    kind="merge", results={str(s): self._input(_result(self.merge(name, s, key))) for s in seeds}
                )
            rows.append(entry)
        analyses: dict[str, Any] = {}
        if exp["lambda_sweep"]:
            analyses["lambda_curve"] = list(exp["lambda_sweep"])
        partial = [k for k in exp["methods"] if "partial_zip" in self.rows[k].analyses]
        if partial:
            analyses["partial_zip"] = partial
        if exp.get("landscape"):
            results = {str(seeds[0]): self._input(self.landscape(name, seeds[0]))}
            analyses["landscape"] = {"row": exp["landscape"], "results": results}
        for analysis in sorted(
            {a for k in exp["methods"] for a in self.rows[k].analyses if a in self.rows[k].precomputed}
        ):
            # an analysis of a precomputed input (e.g. the depth alignment): its figure reads that input
            offering = [k for k in exp["methods"] if analysis in self.rows[k].analyses]
            results = {str(s): self._input(self.precompute(name, s, analysis)) for s in seeds}
            analyses[analysis] = {"rows": offering, "results": results}
        return {
            "key": name,
            "label": self.experiment_label(name),
            "layout": exp["table"],
            "group": exp.get("group", name),
            "setting": exp["setting"],
            "n_models": len(archs),
            "few_shot": exp.get("few_shot"),
            "models": list(archs),
            "model_labels": [self.config["architectures"][a].get("label", a) for a in archs],
            "rows": rows,
            "analyses": analyses,
        }

    def _input(self, path: str) -> str:
        self.report_inputs.append(path)
        return path

    def plan(self, name: str) -> dict[str, Any]:
        from hetmerge.report.layout import declared_outputs
        from hetmerge.report.layouts import ORDER as LAYOUT_MODULES

        spec = {
            "title": self.config["report"]["title"],
            "name": name,
            "dataset": {"name": self.dataset, "label": self.info.label},
            "seeds": list(self.config["split"]["seeds"]),
            "config": _plain(self.config),
            "experiments": [self.experiment_spec(e) for e in self.config["experiments"]],
        }
        folder = f"{self.results}/paper/{name}"
        inputs = sorted(set(self.report_inputs))
        return {
            "data": {"path": self.data_path(), "dataset": self.dataset},
            "jobs": self.jobs,
            "warnings": self.warnings,
            "report": {
                "folder": folder,
                "spec": spec,
                "inputs": inputs,
                "outputs": [o.as_dict() for o in declared_outputs(spec)],
                "code": code_version("hetmerge.report.build", *(f"hetmerge.report.{m}" for m in LAYOUT_MODULES)),
            },
        }


def plan(config: Mapping[str, Any], name: str, results: str = "results") -> dict[str, Any]:
    """The plan of a validated config (JSON-ready): `jobs` per stage, keyed by output name (each with its
    inputs, arguments and code version), the report's spec, inputs and declared outputs, and start-up warnings.
    Raises ConfigError naming the key for anything the config schema cannot know."""
    return Planner(config, results).plan(name)


def _result(model_path: str) -> str:
    """The result JSON that the job making a model writes next to it."""
    return model_path.removesuffix(".safetensors") + ".json"


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))
