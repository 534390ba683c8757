"""Task splits: which classes and examples each model is trained on, and which are held out for merging.

A split is pure index bookkeeping, saved as JSON, so every later step (training, merging, evaluation)
works on exactly the same examples. Two families of kinds exist: `class_disjoint` (ZipIt!-style tasks over
disjoint classes, one model per task) and the same-task kinds of the Neuron Interpolation paper (`full`, `iid`,
`non_iid`, `sharded`: N models of one task over all classes, each trained on its own partition of the data).
A split is drawn only from numpy's `default_rng(seed)` (PCG64), whose streams are identical on every platform,
and only integer operations touch the indices (non_iid's Dirichlet proportions are floored to counts first).
"""

from __future__ import annotations

import json
import math
import os
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from hetmerge.atomic import write_json

SPLIT_FORMAT_VERSION = 1
SPLIT_KINDS = ("class_disjoint", "full", "iid", "non_iid", "sharded")
SAME_TASK_KINDS = SPLIT_KINDS[1:]
SAME_TASK_NAME = "all"
_SHARE_TOLERANCE = 1e-9


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
    """Indices defining every task of one experiment; invariants are checked on construction.

    Same-task kinds have one task ("all", every class) and add, per model letter, its training `partitions`
    and its per-class `shares` of the training data (what the share-weighted ensemble and the KD head
    weights need). Their `merge_indices` (the fusion set) is drawn from model A's partition, so it overlaps
    training data, as in the paper; class_disjoint merge slices never do.
    """

    dataset: str
    seed: int
    kind: str
    tasks: tuple[Task, ...]
    train_indices: dict[str, tuple[int, ...]]
    merge_indices: tuple[int, ...]
    test_indices: dict[str, tuple[int, ...]]
    partitions: dict[str, tuple[int, ...]] = field(default_factory=dict)
    shares: dict[str, tuple[float, ...]] = field(default_factory=dict)

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
        for name in ("train_indices", "test_indices"):
            per_task = getattr(self, name)
            if not isinstance(per_task, dict) or set(per_task) != set(names):
                got = sorted(per_task) if isinstance(per_task, dict) else type(per_task).__name__
                raise ValueError(f"{name} must have exactly the tasks {names} as keys, got {got}")
            for task_name, indices in per_task.items():
                _check_indices(f"{name}[{task_name!r}]", indices)
        _check_indices("merge_indices", self.merge_indices)
        for name in ("partitions", "shares"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a dict, got {type(getattr(self, name)).__name__}")
        if self.kind == "class_disjoint":
            self._check_class_disjoint()
        else:
            self._check_same_task()

    def _check_class_disjoint(self) -> None:
        all_classes = [c for t in self.tasks for c in t.classes]
        if len(set(all_classes)) != len(all_classes):
            raise ValueError("class_disjoint split: tasks share classes")
        if self.partitions or self.shares:
            raise ValueError("class_disjoint split: partitions and shares belong to same-task kinds only")
        merge = set(self.merge_indices)
        for name, indices in self.train_indices.items():
            overlap = merge.intersection(indices)
            if overlap:
                raise ValueError(
                    f"merge_indices overlap train_indices[{name!r}] ({len(overlap)} shared, e.g. {min(overlap)})"
                )

    def _check_same_task(self) -> None:
        where = f"{self.kind} split"
        if len(self.tasks) != 1 or self.tasks[0].name != SAME_TASK_NAME:
            raise ValueError(
                f"{where}: needs exactly one task named {SAME_TASK_NAME!r}, got {[t.name for t in self.tasks]}"
            )
        num_classes = len(self.tasks[0].classes)
        if self.tasks[0].classes != tuple(range(num_classes)):
            got = self.tasks[0].classes
            raise ValueError(f"{where}: task {SAME_TASK_NAME!r} must hold the classes 0..{num_classes - 1}, got {got}")
        letters = list(string.ascii_uppercase[: len(self.partitions)])
        if len(self.partitions) < 2 or sorted(self.partitions) != letters:
            raise ValueError(
                f"{where}: partitions must be keyed 'A', 'B', ... (at least 2), got {sorted(self.partitions)}"
            )
        train = np.asarray(self.train_indices[SAME_TASK_NAME], dtype=np.int64)
        for letter in letters:
            indices = self.partitions[letter]
            _check_indices(f"partitions[{letter!r}]", indices)
            if not indices:
                raise ValueError(f"{where}: partition of model {letter} is empty")
            if not np.isin(indices, train).all():
                raise ValueError(f"{where}: partitions[{letter!r}] holds indices outside train_indices")
        union = np.unique(np.concatenate([np.asarray(self.partitions[k], dtype=np.int64) for k in letters]))
        if not np.array_equal(union, train):
            raise ValueError(f"{where}: train_indices[{SAME_TASK_NAME!r}] must be the union of the partitions")
        if not self.merge_indices or not np.isin(self.merge_indices, self.partitions["A"]).all():
            raise ValueError(f"{where}: merge_indices (the fusion set) must be a non-empty subset of partitions['A']")
        if sorted(self.shares) != letters:
            raise ValueError(f"{where}: shares must have the partitions' keys {letters}, got {sorted(self.shares)}")
        for letter, share in self.shares.items():
            if not isinstance(share, tuple) or len(share) != num_classes or any(type(v) is not float for v in share):
                raise ValueError(f"{where}: shares[{letter!r}] must be a tuple of {num_classes} floats")
            if not all(0.0 <= v <= 1.0 for v in share):
                raise ValueError(f"{where}: shares[{letter!r}] has values outside [0, 1]")
        totals = np.sum([self.shares[k] for k in letters], axis=0)
        off = np.flatnonzero(np.abs(totals - 1.0) > _SHARE_TOLERANCE)
        if off.size:
            raise ValueError(f"{where}: shares of classes {off.tolist()} do not sum to 1 over the models")

    def task(self, name: str) -> Task:
        for task in self.tasks:
            if task.name == name:
                return task
        raise ValueError(f"no task {name!r} in this split; tasks: {', '.join(t.name for t in self.tasks)}")

    @property
    def label_maps(self) -> dict[str, dict[int, int]]:
        """Per task name: original class id -> local label 0..k-1 (sorted class order)."""
        return {task.name: task.label_map for task in self.tasks}

    @property
    def num_models(self) -> int:
        """Models this split trains: one per task (class_disjoint) or one per partition (same-task kinds)."""
        return len(self.partitions) if self.partitions else len(self.tasks)

    def partition(self, letter: str) -> tuple[int, ...]:
        """Training indices of model `letter` under a same-task split."""
        if self.kind not in SAME_TASK_KINDS:
            raise ValueError(f"a {self.kind} split has no partitions; models train on train_indices[task]")
        if letter not in self.partitions:
            raise ValueError(f"no model {letter!r} in this split; models: {', '.join(self.partitions)}")
        return self.partitions[letter]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format_version": SPLIT_FORMAT_VERSION,
            "dataset": self.dataset,
            "seed": self.seed,
            "kind": self.kind,
            "tasks": [{"name": t.name, "classes": list(t.classes)} for t in self.tasks],
            "train_indices": {name: list(ix) for name, ix in self.train_indices.items()},
            "merge_indices": list(self.merge_indices),
            "test_indices": {name: list(ix) for name, ix in self.test_indices.items()},
        }
        # Only same-task kinds carry these, so class_disjoint files keep their exact bytes.
        if self.partitions:
            out["partitions"] = {letter: list(ix) for letter, ix in self.partitions.items()}
        if self.shares:
            out["shares"] = {letter: list(share) for letter, share in self.shares.items()}
        return out

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
            partitions=_per_task(d, "partitions") if "partitions" in d else {},
            shares=(
                {str(k): _floats(v, f"shares[{k!r}]") for k, v in _field(d, "shares", dict).items()}
                if "shares" in d
                else {}
            ),
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


def _floats(value: Any, what: str) -> tuple[float, ...]:
    if not isinstance(value, list) or not all(type(v) in (int, float) for v in value):
        raise ValueError(f"{what} must be a list of numbers")
    return tuple(float(v) for v in value)


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


def _balanced_pools(
    shuffled: Sequence[np.ndarray], classes: Sequence[int], total: int | None, what: str
) -> list[np.ndarray]:
    """Per class of `classes`, all its examples, or its part of a class-balanced random `total` of them (the head
    of its shuffled order)."""
    pools = [shuffled[c] for c in classes]
    if total is None:
        return pools
    if total < 0:
        raise ValueError(f"{what} must be >= 0, got {total}")
    try:
        quota = _balanced_quota(np.array([len(p) for p in pools]), total)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc} for classes {list(classes)}") from None
    return [p[:q] for p, q in zip(pools, quota, strict=True)]


def _take_balanced(
    shuffled: Sequence[np.ndarray], classes: Sequence[int], total: int | None, what: str
) -> tuple[int, ...]:
    """All examples of `classes`, or a class-balanced random `total` of them, as a sorted tuple."""
    return tuple(np.sort(np.concatenate(_balanced_pools(shuffled, classes, total, what))).tolist())


def _checked_labels(train_labels: ArrayLike, test_labels: ArrayLike, num_classes: int) -> dict[str, np.ndarray]:
    labels = {}
    for split, raw in (("train", train_labels), ("test", test_labels)):
        arr = np.asarray(raw)
        if arr.ndim != 1 or arr.dtype.kind not in "iu" or (arr.size and not 0 <= arr.min() <= arr.max() < num_classes):
            raise ValueError(f"{split}_labels must be a 1-d array of integers in 0..{num_classes - 1}")
        labels[split] = arr.astype(np.int64)
    return labels


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
    labels = _checked_labels(train_labels, test_labels, num_classes)

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


def make_same_task_split(
    train_labels: ArrayLike,
    test_labels: ArrayLike,
    num_classes: int,
    num_models: int,
    kind: str,
    seed: int,
    fusion_size: int,
    train_total: int | None,
    test_total: int | None,
    dataset: str,
    concentration: tuple[float, float] = (1.0, 5.0),
) -> TaskSplit:
    """Partition one task's training data over `num_models` models, as the Neuron Interpolation paper does.

    - `full`: every model gets the whole pool (the models then differ only by their training seed);
    - `iid`: each class's examples dealt evenly over the models;
    - `non_iid`: per class, proportions p ~ Dir(alpha), alpha = linspace(lo, hi, N) shuffled per class; each
      model gets floor(p_k n) of the class and the last model the rounding remainder (`create_non_iid_splits`);
    - `sharded`: the classes shuffled and cut into N disjoint class sets; a model gets all of its classes.

    The pool is every training example, or a class-balanced `train_total` of them; the test set likewise with
    `test_total`. The fusion set is a class-balanced `fusion_size` drawn from model A's partition (the
    paper's `fuse_all_*` scripts), balanced over the classes A holds.

    The rng is consumed in a fixed order: per-class train shuffles, per-class test shuffles, then the kind's
    own draws (sharded: one class permutation; non_iid: per class, an alpha permutation then a Dirichlet
    draw). So pool, test set and each class's example order do not depend on the kind or N, and the pool of
    a smaller `train_total` is a subset of a larger one's.
    """
    if kind not in SAME_TASK_KINDS:
        raise ValueError(f"kind must be one of {', '.join(SAME_TASK_KINDS)}, got {kind!r}")
    if not 2 <= num_models <= len(string.ascii_uppercase):
        raise ValueError(f"num_models must be between 2 and {len(string.ascii_uppercase)}, got {num_models}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if kind == "sharded" and num_models > num_classes:
        raise ValueError(f"num_models={num_models} > num_classes={num_classes}: sharded needs a class per model")
    if fusion_size < 1:
        raise ValueError(f"fusion_size must be >= 1, got {fusion_size}")
    if len(concentration) != 2 or not all(math.isfinite(v) and v > 0 for v in concentration):
        raise ValueError(f"concentration must be (lo, hi) with 0 < lo <= hi, finite, got {concentration}")
    lo, hi = (float(v) for v in concentration)
    if lo > hi:
        raise ValueError(f"concentration must be (lo, hi) with 0 < lo <= hi, finite, got {concentration}")
    labels = _checked_labels(train_labels, test_labels, num_classes)

    rng = np.random.default_rng(seed)
    train_shuffled = _per_class_shuffled(labels["train"], num_classes, rng)
    test_shuffled = _per_class_shuffled(labels["test"], num_classes, rng)
    pool = _balanced_pools(train_shuffled, range(num_classes), train_total, "train_total")
    missing = [c for c, ix in enumerate(pool) if not len(ix)]
    if missing:
        raise ValueError(
            f"classes {missing} have no training examples in the pool (train_labels, train_total={train_total}); "
            "every class needs one so that the per-class shares are defined"
        )

    # parts[k][c]: model k's examples of class c, in the class's shuffled order.
    if kind == "full":
        parts = [list(pool) for _ in range(num_models)]
    elif kind == "iid":
        dealt = [np.array_split(ix, num_models) for ix in pool]
        parts = [[dealt[c][k] for c in range(num_classes)] for k in range(num_models)]
    elif kind == "non_iid":
        alpha = np.linspace(lo, hi, num_models)
        dealt = []
        for ix in pool:
            p = rng.dirichlet(rng.permutation(alpha))
            sizes = (p * len(ix)).astype(np.int64)
            sizes[-1] = len(ix) - sizes[:-1].sum()
            dealt.append(np.split(ix, np.cumsum(sizes)[:-1]))
        parts = [[dealt[c][k] for c in range(num_classes)] for k in range(num_models)]
    else:
        owner = np.empty(num_classes, dtype=np.int64)
        for k, group in enumerate(np.array_split(rng.permutation(num_classes), num_models)):
            owner[group] = k
        parts = [[ix if owner[c] == k else ix[:0] for c, ix in enumerate(pool)] for k in range(num_models)]

    letters = string.ascii_uppercase[:num_models]
    counts = np.array([[len(ix) for ix in part] for part in parts], dtype=np.int64)
    empty = [letters[k] for k in np.flatnonzero(counts.sum(axis=1) == 0)]
    if empty:
        raise ValueError(
            f"{kind} split leaves model(s) {', '.join(empty)} with no training examples; use fewer models "
            f"(num_models={num_models}), another seed, a larger train_total or (non_iid) another concentration"
        )
    if fusion_size > counts[0].sum():
        raise ValueError(
            f"fusion_size={fusion_size} exceeds the {counts[0].sum()} training examples of model A's partition"
        )
    shares = counts / counts.sum(axis=0)
    partitions = {letters[k]: tuple(np.sort(np.concatenate(part)).tolist()) for k, part in enumerate(parts)}
    return TaskSplit(
        dataset=dataset,
        seed=seed,
        kind=kind,
        tasks=(Task(name=SAME_TASK_NAME, classes=tuple(range(num_classes))),),
        train_indices={SAME_TASK_NAME: tuple(np.sort(np.concatenate(pool)).tolist())},
        merge_indices=_take_balanced(parts[0], range(num_classes), fusion_size, "fusion_size"),
        test_indices={SAME_TASK_NAME: _take_balanced(test_shuffled, range(num_classes), test_total, "test_total")},
        partitions=partitions,
        shares={letters[k]: tuple(shares[k].tolist()) for k in range(num_models)},
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
