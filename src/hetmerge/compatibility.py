"""Do the files a command reads belong together? One place for the checks every CLI command makes.

A model file records what it was trained on (`hetmerge train` writes `dataset`, `split_seed`, `task` and
`classes`; `hetmerge merge` writes `dataset`, `split_seed` and `tasks`) and what it takes (`input_shape`,
its heads). A statistics file records a fingerprint of the models it was computed from. These functions
compare such records with the split, the prepared dataset and each other, and refuse a mismatch with a
message naming both files: a model of another split scores a plausible but meaningless accuracy.

`nonfinite` is the shared check for NaN and infinities in tensors (weights, statistics, merges).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from hetmerge.data import ImageDataset, TaskSplit

PathLike = str | os.PathLike[str]


class CompatibilityError(ValueError):
    """Files that do not belong together (a model of another split, statistics of other models...)."""


def nonfinite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity.

    One reduction per tensor where it lives and one host sync per device, so it is cheap on a GPU too.
    """
    flags: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        if t.is_floating_point() or t.is_complex():
            flags.setdefault(t.device, []).append((name, torch.isfinite(t).all()))
    bad = []
    for named in flags.values():
        ok = torch.stack([flag for _, flag in named])
        if not bool(ok.all()):
            bad += [name for (name, _), good in zip(named, ok.tolist(), strict=True) if not good]
    return bad


def first_names(names: Sequence[str], shown: int = 5) -> str:
    """The first few of many tensor names, and how many more there are (for one-line errors)."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{list(names[:shown])}{more}"


@dataclass(frozen=True)
class Origin:
    """What a model file says it was trained on: dataset, split seed, and the classes of each task it knows."""

    dataset: str
    split_seed: int
    tasks: dict[str, tuple[int, ...]]


def _descriptions(meta: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The architecture descriptions in a checkpoint: the network, or a merge's trunk and branches."""
    desc = meta["model"]
    if meta.get("kind") == "merged":
        return [d for d in (desc["trunk"], *desc["branches"]) if d is not None]
    return [desc]


def model_origin(path: PathLike, meta: Mapping[str, Any]) -> Origin:
    """The training record of a base model or merge; a file without one cannot be checked, so it is refused."""
    info = meta.get("info", {})
    merged = meta.get("kind") == "merged"
    needed = ("dataset", "split_seed", "tasks") if merged else ("dataset", "split_seed", "task", "classes")
    missing = [k for k in needed if k not in info]
    if missing:
        fix = (
            "it predates this record: merge again with `hetmerge merge`"
            if merged
            else "train it with `hetmerge train`, or pass these fields in save_model's `info`"
        )
        raise CompatibilityError(
            f"{path} does not record {missing}, so it cannot be checked against the split and dataset; {fix}"
        )
    tasks = info["tasks"] if merged else {info["task"]: info["classes"]}
    return Origin(str(info["dataset"]), int(info["split_seed"]), {t: tuple(c) for t, c in tasks.items()})


def merged_origin(split: TaskSplit, tasks: Iterable[str]) -> dict[str, Any]:
    """The training record a merge keeps: its sources' split (checked with `check_model`) and the tasks it answers."""
    wanted = set(tasks)
    classes = {t.name: list(t.classes) for t in split.tasks if t.name in wanted}
    return {"dataset": split.dataset, "split_seed": split.seed, "tasks": classes}


def check_split_data(split_path: PathLike, split: TaskSplit, data_path: PathLike, data: ImageDataset) -> None:
    """The split must have been drawn from the prepared dataset it is used with."""
    if split.dataset != data.name:
        raise CompatibilityError(
            f"--split {split_path} is a split of {split.dataset}, but --data {data_path} holds {data.name}"
        )


def check_model(
    path: PathLike,
    model: torch.nn.Module,
    meta: Mapping[str, Any],
    split_path: PathLike,
    split: TaskSplit,
    data_path: PathLike,
    data: ImageDataset,
) -> None:
    """A model (or merge) fits a split and dataset: same dataset, split seed, task classes, input shape, heads;
    and its weights are finite (NaN in, NaN out: a meaningless accuracy or merge)."""
    for desc in _descriptions(meta):
        shape = tuple(desc["input_shape"])
        if shape != tuple(data.input_shape):
            raise CompatibilityError(
                f"{path} takes inputs of shape {shape}, but --data {data_path} ({data.name}) has images of shape "
                f"{tuple(data.input_shape)}; use the dataset it was trained on"
            )
    origin = model_origin(path, meta)
    if origin.dataset != split.dataset:
        raise CompatibilityError(
            f"{path} was trained on {origin.dataset}, but --split {split_path} is a split of {split.dataset}; "
            f"use the split it was trained on"
        )
    if origin.split_seed != split.seed:
        raise CompatibilityError(
            f"{path} was trained on split seed {origin.split_seed} of {origin.dataset}, but --split {split_path} "
            f"is seed {split.seed}; use the split it was trained on"
        )
    known = {t.name: t.classes for t in split.tasks}
    for task, classes in origin.tasks.items():
        if task not in known:
            raise CompatibilityError(
                f"{path} knows task {task!r}, but --split {split_path} has tasks {list(known)}; use the split it "
                "was trained on"
            )
        if classes != known[task]:
            raise CompatibilityError(
                f"{path} learned task {task!r} as classes {list(classes)}, but --split {split_path} gives it "
                f"classes {list(known[task])}; use the split it was trained on"
            )
    for desc in _descriptions(meta):
        for task, n in desc["heads"].items():
            if task not in origin.tasks:
                raise CompatibilityError(
                    f"{path} has a head for task {task!r} but records training only on {list(origin.tasks)}: its "
                    "metadata contradicts its weights; train or merge it again"
                )
            if n != len(origin.tasks[task]):
                raise CompatibilityError(
                    f"{path}: head {task!r} has {n} outputs, but it records {len(origin.tasks[task])} classes for task "
                    f"{task!r}: its metadata contradicts its weights; train or merge it again"
                )
    bad = nonfinite(model.state_dict())
    if bad:
        raise CompatibilityError(f"{path} holds NaN or inf in {first_names(bad)}; train or merge it again")


def check_models(
    paths: Sequence[PathLike],
    models: Sequence[torch.nn.Module],
    metas: Sequence[Mapping[str, Any]],
    split_path: PathLike,
    split: TaskSplit,
    data_path: PathLike,
    data: ImageDataset,
) -> None:
    """`check_split_data`, then `check_model` for every model of a command."""
    check_split_data(split_path, split, data_path, data)
    for path, model, meta in zip(paths, models, metas, strict=True):
        check_model(path, model, meta, split_path, split, data_path, data)


def file_sha256(path: PathLike) -> str:
    """Checksum of a file's bytes: the fingerprint statistics and merges keep of their source models."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# what a fingerprint keeps of a model's training record
_TRAINING = ("dataset", "split_seed", "task", "partition", "seed")


def source_records(paths: Sequence[PathLike], metas: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Fingerprints of source model files (path, checksum and training record), in the order given."""
    return [
        {"path": str(p), "sha256": file_sha256(p), **{k: m["info"][k] for k in _TRAINING if k in m.get("info", {})}}
        for p, m in zip(paths, metas, strict=True)
    ]


def _describe(record: Mapping[str, Any]) -> str:
    trained = ", ".join(f"{k} {record[k]}" for k in _TRAINING if k in record)
    return f"{record['path']} ({trained})" if trained else str(record["path"])


def check_sources(
    what: str, recorded: Sequence[Mapping[str, Any]] | None, current: Sequence[Mapping[str, Any]]
) -> None:
    """`what` (a statistics or merge file) must have been computed from exactly these model files, in this order.

    `recorded` is None for files written before the record existed: those are refused, to be regenerated.
    """
    if recorded is None:
        raise CompatibilityError(
            f"{what} does not record which models it was computed from (written by an older hetmerge, or by "
            "save_statistics without `sources`); regenerate it with this version"
        )
    if [r["sha256"] for r in recorded] != [c["sha256"] for c in current]:
        was = ", ".join(_describe(r) for r in recorded)
        now = ", ".join(_describe(c) for c in current)
        raise CompatibilityError(
            f"{what} was computed from models [{was}], not from [{now}] (file contents differ); regenerate it from "
            "these models, or pass the models it was computed from"
        )
