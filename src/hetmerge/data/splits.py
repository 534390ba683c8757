"""Task splits: which classes and examples each model is trained on, and which are held out for merging.

A split is pure index bookkeeping, saved as JSON, so every later step (training, merging, evaluation)
works on exactly the same examples. It is drawn only from numpy's `default_rng(seed)` (PCG64), whose streams
are identical on every platform, and only integer operations touch the indices.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from hetmerge.atomic import write_json

SPLIT_FORMAT_VERSION = 1
SPLIT_KINDS = ("class_disjoint",)


@dataclass(frozen=True)
class Task:
    """One task: the original dataset classes its model is trained to tell apart."""

    name: str
    classes: tuple[int, ...]

    @property
    def label_map(self) -> dict[int, int]:
        """Original class id -> local label 0..k-1, in sorted class order (the task model's output units)."""
        return {c: i for i, c in enumerate(self.classes)}


def _check_indices(what: str, indices: Any) -> None:
    if not isinstance(indices, tuple):
        raise ValueError(f"{what} must be a tuple of indices, got {type(indices).__name__}")
    if not indices:
        return
    arr = np.asarray(indices)
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise ValueError(f"{what} must contain only integers")
    if arr[0] < 0 or np.any(np.diff(arr) <= 0):
        raise ValueError(f"{what} must be non-negative, sorted and without duplicates")


@dataclass(frozen=True)
class TaskSplit:
    """Indices defining every task of one experiment; invariants are checked on construction."""

    dataset: str
    seed: int
    kind: str
    tasks: tuple[Task, ...]
    train_indices: dict[str, tuple[int, ...]]
    merge_indices: tuple[int, ...]
    test_indices: dict[str, tuple[int, ...]]

    def __post_init__(self) -> None:
        if self.kind not in SPLIT_KINDS:
            raise ValueError(f"unknown split kind {self.kind!r}; known kinds: {', '.join(SPLIT_KINDS)}")
        if not self.tasks:
            raise ValueError("a split needs at least one task")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate task names in {names}")
        for task in self.tasks:
            if not task.classes or any(type(c) is not int or c < 0 for c in task.classes):
                raise ValueError(f"task {task.name}: classes must be non-negative ints, got {task.classes}")
            if list(task.classes) != sorted(set(task.classes)):
                raise ValueError(f"task {task.name}: classes must be sorted and unique, got {task.classes}")
        if self.kind == "class_disjoint":
            all_classes = [c for t in self.tasks for c in t.classes]
            if len(set(all_classes)) != len(all_classes):
                raise ValueError("class_disjoint split: tasks share classes")
        for field in ("train_indices", "test_indices"):
            per_task = getattr(self, field)
            if not isinstance(per_task, dict) or set(per_task) != set(names):
                got = sorted(per_task) if isinstance(per_task, dict) else type(per_task).__name__
                raise ValueError(f"{field} must have exactly the tasks {names} as keys, got {got}")
            for name, indices in per_task.items():
                _check_indices(f"{field}[{name!r}]", indices)
        _check_indices("merge_indices", self.merge_indices)
        merge = set(self.merge_indices)
        for name, indices in self.train_indices.items():
            overlap = merge.intersection(indices)
            if overlap:
                raise ValueError(
                    f"merge_indices overlap train_indices[{name!r}] ({len(overlap)} shared, e.g. {min(overlap)})"
                )

    def task(self, name: str) -> Task:
        for task in self.tasks:
            if task.name == name:
                return task
        raise ValueError(f"no task {name!r} in this split; tasks: {', '.join(t.name for t in self.tasks)}")

    @property
    def label_maps(self) -> dict[str, dict[int, int]]:
        """Per task name: original class id -> local label 0..k-1 (sorted class order)."""
        return {task.name: task.label_map for task in self.tasks}

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": SPLIT_FORMAT_VERSION,
            "dataset": self.dataset,
            "seed": self.seed,
            "kind": self.kind,
            "tasks": [{"name": t.name, "classes": list(t.classes)} for t in self.tasks],
            "train_indices": {name: list(ix) for name, ix in self.train_indices.items()},
            "merge_indices": list(self.merge_indices),
            "test_indices": {name: list(ix) for name, ix in self.test_indices.items()},
        }

    @classmethod
    def from_json(cls, d: Any) -> TaskSplit:
        """Rebuild a split from `to_json` output; malformed input raises ValueError naming the problem."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a split must be a JSON object, got {type(d).__name__}")
        if d.get("format_version") != SPLIT_FORMAT_VERSION:
            raise ValueError(
                f"split format_version is {d.get('format_version')!r}, this code reads {SPLIT_FORMAT_VERSION}"
            )
        tasks = _field(d, "tasks", list)
        if not all(isinstance(t, Mapping) for t in tasks):
            raise ValueError("'tasks' must be a list of objects with 'name' and 'classes'")
        return cls(
            dataset=_field(d, "dataset", str),
            seed=_field(d, "seed", int),
            kind=_field(d, "kind", str),
            tasks=tuple(
                Task(
                    name=_field(t, "name", str),
                    classes=_ints(t.get("classes"), f"classes of task {t.get('name')!r}"),
                )
                for t in tasks
            ),
            train_indices=_per_task(d, "train_indices"),
            merge_indices=_ints(_field(d, "merge_indices", list), "merge_indices"),
            test_indices=_per_task(d, "test_indices"),
        )


def _field(d: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in d:
        raise ValueError(f"split is missing {key!r}")
    value = d[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"split field {key!r} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        raise ValueError(f"{what} must be a list of integers")
    return tuple(value)


def _per_task(d: Mapping[str, Any], key: str) -> dict[str, tuple[int, ...]]:
    return {str(name): _ints(ix, f"{key}[{name!r}]") for name, ix in _field(d, key, dict).items()}


def _balanced_quota(available: np.ndarray, total: int) -> np.ndarray:
    """Split `total` over classes as evenly as their `available` counts allow (water-filling).

    Classes are served from the scarcest up, each getting an equal share of what is left, so a class
    that is short hands its unused share to the others; ties resolve by class order, deterministically.
    """
    if total > int(available.sum()):
        raise ValueError(f"asked for {total} examples but only {int(available.sum())} are available")
    quota = np.zeros_like(available)
    left = total
    order = np.argsort(available, kind="stable")
    for served, c in enumerate(order):
        quota[c] = min(int(available[c]), left // (len(order) - served))
        left -= int(quota[c])
    return quota


def _per_class_shuffled(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices of every class in random order, drawn class by class so the stream is fixed by the seed."""
    by_class = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[by_class], np.arange(num_classes + 1))
    return [rng.permutation(by_class[bounds[c] : bounds[c + 1]]) for c in range(num_classes)]


def _take_balanced(
    shuffled: Sequence[np.ndarray], classes: Sequence[int], total: int | None, what: str
) -> tuple[int, ...]:
    """All examples of `classes`, or a class-balanced random `total` of them, as a sorted tuple."""
    pools = [shuffled[c] for c in classes]
    if total is not None:
        if total < 0:
            raise ValueError(f"{what} must be >= 0, got {total}")
        try:
            quota = _balanced_quota(np.array([len(p) for p in pools]), total)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc} for classes {list(classes)}") from None
        pools = [p[:q] for p, q in zip(pools, quota, strict=True)]
    return tuple(np.sort(np.concatenate(pools)).tolist())


def make_class_disjoint_split(
    train_labels: ArrayLike,
    test_labels: ArrayLike,
    num_classes: int,
    num_tasks: int,
    seed: int,
    merge_per_class: int,
    train_per_task: int | None,
    test_per_task: int | None,
    dataset: str,
) -> TaskSplit:
    """Give each task a disjoint random set of classes, and hold out a merge slice.

    Tasks get equally many classes where the count divides (10 → 5+5, 100 → 50+50), else as equal as
    possible with the larger tasks first (10 classes into 3 tasks → 4+3+3).

    The rng is consumed in a fixed order (class permutation, then per-class train shuffles, then per-class
    test shuffles), so the class assignment and the merge slice do not change with `train_per_task` or
    `test_per_task`: subsampling only truncates each class's shuffled order.
    """
    if not 1 <= num_tasks <= len(string.ascii_uppercase):
        raise ValueError(f"num_tasks must be between 1 and {len(string.ascii_uppercase)}, got {num_tasks}")
    if num_classes < num_tasks:
        raise ValueError(f"{num_classes} classes cannot be split into {num_tasks} tasks")
    if merge_per_class < 0:
        raise ValueError(f"merge_per_class must be >= 0, got {merge_per_class}")
    labels = {}
    for split, raw in (("train", train_labels), ("test", test_labels)):
        arr = np.asarray(raw)
        if arr.ndim != 1 or arr.dtype.kind not in "iu" or (arr.size and not 0 <= arr.min() <= arr.max() < num_classes):
            raise ValueError(f"{split}_labels must be a 1-d array of integers in 0..{num_classes - 1}")
        labels[split] = arr.astype(np.int64)

    rng = np.random.default_rng(seed)
    groups = np.array_split(rng.permutation(num_classes), num_tasks)
    tasks = tuple(
        Task(name=string.ascii_uppercase[i], classes=tuple(sorted(group.tolist()))) for i, group in enumerate(groups)
    )

    train_shuffled = _per_class_shuffled(labels["train"], num_classes, rng)
    short = [c for c, ix in enumerate(train_shuffled) if len(ix) <= merge_per_class]
    if short:
        raise ValueError(
            f"classes {short} have at most merge_per_class={merge_per_class} training examples, "
            "leaving none to train on"
        )
    merge = np.concatenate([ix[:merge_per_class] for ix in train_shuffled])
    remaining = [ix[merge_per_class:] for ix in train_shuffled]
    test_shuffled = _per_class_shuffled(labels["test"], num_classes, rng)

    return TaskSplit(
        dataset=dataset,
        seed=seed,
        kind="class_disjoint",
        tasks=tasks,
        train_indices={t.name: _take_balanced(remaining, t.classes, train_per_task, "train_per_task") for t in tasks},
        merge_indices=tuple(np.sort(merge).tolist()),
        test_indices={t.name: _take_balanced(test_shuffled, t.classes, test_per_task, "test_per_task") for t in tasks},
    )


def save_split(split: TaskSplit, path: str | os.PathLike[str]) -> None:
    """Write the split as JSON, atomically, with sorted keys so equal splits give identical bytes."""
    write_json(path, split.to_json())


def load_split(path: str | os.PathLike[str]) -> TaskSplit:
    """Read a split written by `save_split`; invalid content raises ValueError naming the file."""
    path = Path(path)
    try:
        with open(path) as handle:
            data = json.load(handle)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); delete it and rerun the step that writes it") from exc
    try:
        return TaskSplit.from_json(data)
    except ValueError as exc:
        raise ValueError(f"{path}: invalid task split: {exc}") from exc
