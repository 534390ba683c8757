"""Tests for the same-task split kinds (full / iid / non_iid / sharded) of the Neuron Interpolation paper."""

from __future__ import annotations

import hashlib
import string
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, reject, settings
from hypothesis import strategies as st

from hetmerge.data import (
    SAME_TASK_KINDS,
    SPLIT_KINDS,
    TaskSplit,
    load_split,
    make_class_disjoint_split,
    make_same_task_split,
    save_split,
)


def shuffled_labels(per_class: list[int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(len(per_class)), per_class))


TRAIN = shuffled_labels([40] * 6)
TEST = shuffled_labels([10] * 6, seed=1)


def split_of(kind: str, seed: int = 0, **kwargs: object) -> TaskSplit:
    args: dict = {
        "train_labels": TRAIN,
        "test_labels": TEST,
        "num_classes": 6,
        "num_models": 3,
        "kind": kind,
        "seed": seed,
        "fusion_size": 12,
        "train_total": None,
        "test_total": None,
        "dataset": "toy",
    }
    return make_same_task_split(**(args | kwargs))


def share_matrix(split: TaskSplit) -> np.ndarray:
    return np.array([split.shares[letter] for letter in sorted(split.shares)])


def class_counts(labels: np.ndarray, indices: tuple[int, ...], num_classes: int) -> np.ndarray:
    return np.bincount(labels[list(indices)], minlength=num_classes)


def check_invariants(split: TaskSplit, train: np.ndarray, test: np.ndarray, num_classes: int) -> None:
    """Everything a same-task split promises, recomputed from the labels."""
    letters = list(string.ascii_uppercase[: split.num_models])
    assert sorted(split.partitions) == letters and sorted(split.shares) == letters
    assert split.tasks[0].classes == tuple(range(num_classes))
    parts = [split.partition(letter) for letter in letters]
    pool = split.train_indices["all"]
    assert tuple(sorted(set().union(*parts))) == pool
    counts = np.array([class_counts(train, p, num_classes) for p in parts])
    assert np.allclose(share_matrix(split), counts / counts.sum(axis=0), atol=1e-12)
    assert np.allclose(share_matrix(split).sum(axis=0), 1.0, atol=1e-9)
    if split.kind == "full":
        assert all(p == pool for p in parts)
    else:
        assert sum(len(p) for p in parts) == len(pool)  # disjoint: sizes add up to the union's
    if split.kind == "sharded":
        assert ((counts > 0).sum(axis=0) == 1).all()  # each class held by exactly one model
    if split.kind == "iid":
        assert (counts.max(axis=0) - counts.min(axis=0) <= 1).all()
    # Fusion set: inside model A's partition and water-filled over A's classes.
    merge = split.merge_indices
    assert set(merge) <= set(split.partition("A"))
    got, available = class_counts(train, merge, num_classes), counts[0]
    short = got < available  # a class not drawn dry is at most one below the largest count
    assert got.sum() == len(merge) and (got[short] >= got.max() - 1).all()
    assert set(test[list(split.test_indices["all"])]) <= set(range(num_classes))


@pytest.mark.parametrize("kind", SAME_TASK_KINDS)
def test_kinds_basics(kind: str) -> None:
    split = split_of(kind)
    check_invariants(split, TRAIN, TEST, 6)
    assert split.kind == kind and split.num_models == 3 and len(split.merge_indices) == 12
    assert len(split.train_indices["all"]) == 240 and len(split.test_indices["all"]) == 60
    merge_counts = np.bincount(TRAIN[list(split.merge_indices)], minlength=6)
    assert merge_counts[merge_counts > 0].tolist() == ([2] * 6 if kind != "sharded" else [6, 6])
    shares = share_matrix(split)
    if kind == "full":
        assert (shares == 1 / 3).all()
    if kind == "iid":
        assert np.allclose(shares, [[14 / 40] * 6, [13 / 40] * 6, [13 / 40] * 6])
    if kind == "sharded":
        assert sorted(shares.sum(axis=1).tolist()) == [2.0, 2.0, 2.0] and set(shares.flat) == {0.0, 1.0}


def test_hand_computed_small_case() -> None:
    """Class 0 has 5 examples, class 1 has 3, class 2 has 1; every count below is worked out by hand."""
    labels = np.array([0, 1, 0, 2, 0, 1, 0, 1, 0])
    iid = make_same_task_split(labels, labels, 3, 2, "iid", 5, 3, None, None, "toy")
    assert [len(iid.partition(k)) for k in "AB"] == [3 + 2 + 1, 2 + 1 + 0]  # array_split: A gets the extra one
    assert iid.shares == {"A": (3 / 5, 2 / 3, 1.0), "B": (2 / 5, 1 / 3, 0.0)}
    assert class_counts(labels, iid.merge_indices, 3).tolist() == [1, 1, 1]
    full = make_same_task_split(labels, labels, 3, 2, "full", 5, 7, None, None, "toy")
    # Water-filling of 7 over available (5, 3, 1): class 2 gives all it has (1), the other two share 6.
    assert class_counts(labels, full.merge_indices, 3).tolist() == [3, 3, 1]
    full6 = make_same_task_split(labels, labels, 3, 2, "full", 5, 6, None, None, "toy")
    assert class_counts(labels, full6.merge_indices, 3).tolist() == [3, 2, 1]  # floor(6/3), remainder to class 0
    assert full.partition("A") == full.partition("B") == tuple(range(9)) and full.shares["B"] == (0.5,) * 3


def test_sharded_fusion_set_balanced_over_model_a_classes() -> None:
    labels = np.repeat(np.arange(4), 10)
    split = make_same_task_split(labels, labels, 4, 2, "sharded", 0, 5, None, None, "toy")
    held = np.flatnonzero(np.array(split.shares["A"]) == 1.0)
    got = class_counts(labels, split.merge_indices, 4)
    assert len(held) == 2 and sorted(got[held].tolist()) == [2, 3] and got.sum() == got[held].sum() == 5


def test_subsampled_pool_and_test_set_are_balanced_and_nested() -> None:
    small = split_of("iid", train_total=33, test_total=13)
    counts = class_counts(TRAIN, small.train_indices["all"], 6)
    assert counts.sum() == 33 and counts.max() - counts.min() <= 1
    test_counts = class_counts(TEST, small.test_indices["all"], 6)
    assert test_counts.sum() == 13 and test_counts.max() - test_counts.min() <= 1
    large = split_of("iid", train_total=120)
    assert set(small.train_indices["all"]) <= set(large.train_indices["all"])
    # The pool and test set do not depend on the kind or on N: the kind's draws come last.
    assert split_of("sharded", train_total=33, num_models=2).train_indices == small.train_indices
    assert split_of("non_iid", test_total=13).test_indices == small.test_indices


@pytest.mark.parametrize("kind", SAME_TASK_KINDS)
def test_seeded(kind: str, tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}.json" for i in range(3)]
    for path, seed in zip(paths, (4, 4, 5), strict=True):
        save_split(split_of(kind, seed=seed), path)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()
    other = split_of(kind, seed=5)
    if kind != "full":  # full has the same partitions for every seed: the whole pool
        assert other.partitions != split_of(kind, seed=4).partitions
    assert load_split(paths[2]) == other


def test_non_iid_concentration_statistics() -> None:
    """Per class p ~ Dir(shuffled linspace(lo, hi, N)); with 500 examples per class the shares are p to 1/500.

    E[sum_k p_k^2] = sum_i a_i (a_i + 1) / (a0 (a0 + 1)) does not depend on the per-class shuffle, so its
    mean over 200 classes tests the concentration; the mean share of every model is 1/N only if alpha is
    shuffled per class (unshuffled, model A would average lo / a0).
    """
    labels = np.repeat(np.arange(200), 500)
    for n, concentration, other in (
        (2, (1.0, 5.0), (1.0, 1.0)),
        (4, (1.0, 5.0), (5.0, 5.0)),
        (4, (5.0, 5.0), (1.0, 5.0)),
    ):
        shares = share_matrix(
            make_same_task_split(labels, labels, 200, n, "non_iid", 1, 10, None, None, "t", concentration)
        )
        squares = (shares**2).sum(axis=0)
        se = squares.std() / np.sqrt(len(squares)) + 1 / 500

        def expected(conc: tuple[float, float], n: int = n) -> float:
            a = np.linspace(*conc, n)
            return float((a * (a + 1)).sum() / (a.sum() * (a.sum() + 1)))

        assert abs(squares.mean() - expected(concentration)) < 4 * se
        assert abs(squares.mean() - expected(other)) > 6 * se
        assert np.allclose(shares.mean(axis=1), 1 / n, atol=4 * shares.std(axis=1).max() / np.sqrt(200))
    # The sorted shares of a class are the order statistics of Dir(alpha); compare with a Monte-Carlo of them.
    shares = share_matrix(make_same_task_split(labels, labels, 200, 4, "non_iid", 2, 10, None, None, "t"))
    ordered = np.sort(shares, axis=0)
    reference = np.sort(np.random.default_rng(99).dirichlet(np.linspace(1, 5, 4), size=200_000), axis=1).mean(axis=0)
    se = ordered.std(axis=1) / np.sqrt(200) + 1 / 500
    assert (np.abs(ordered.mean(axis=1) - reference) < 4 * se).all()


def test_larger_concentration_gives_more_even_shares() -> None:
    labels = np.repeat(np.arange(100), 200)
    spread = {
        conc: share_matrix(make_same_task_split(labels, labels, 100, 3, "non_iid", 0, 10, None, None, "t", conc)).var()
        for conc in ((0.2, 0.2), (1.0, 5.0), (20.0, 20.0))
    }
    assert spread[(0.2, 0.2)] > 2 * spread[(1.0, 5.0)] > 4 * spread[(20.0, 20.0)]


@pytest.mark.parametrize("kind", SAME_TASK_KINDS)
def test_json_round_trip(kind: str, tmp_path: Path) -> None:
    split = split_of(kind, train_total=90)
    assert TaskSplit.from_json(split.to_json()) == split
    save_split(split, tmp_path / "s.json")
    assert load_split(tmp_path / "s.json") == split


def test_class_disjoint_json_unchanged(tmp_path: Path) -> None:
    """Bytes pinned from the code before same-task kinds existed: old split files must stay valid and equal."""
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 50))
    test = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 20))
    split = make_class_disjoint_split(labels, test, 10, 2, 7, 5, 30, 12, "toy")
    assert set(split.to_json()) == {
        "format_version",
        "dataset",
        "seed",
        "kind",
        "tasks",
        "train_indices",
        "merge_indices",
        "test_indices",
    }
    save_split(split, tmp_path / "cd.json")
    digest = hashlib.sha256((tmp_path / "cd.json").read_bytes()).hexdigest()
    assert digest == "5fa968c39cea6f150020b398a4c7d21564eaa8f29f2e1a76a80116e0aa827ab8"
    assert split.num_models == 2 and split.partitions == {} and split.shares == {}
    with pytest.raises(ValueError, match="class_disjoint split has no partitions"):
        split.partition("A")


def test_kinds_listed() -> None:
    assert SPLIT_KINDS == ("class_disjoint", "full", "iid", "non_iid", "sharded")
    assert SPLIT_KINDS[1:] == SAME_TASK_KINDS


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "dirichlet"}, "kind must be one of full, iid, non_iid, sharded, got 'dirichlet'"),
        ({"kind": "class_disjoint"}, "kind must be one of"),
        ({"num_models": 1}, "num_models must be between 2 and 26, got 1"),
        ({"num_models": 27}, "num_models must be between 2 and 26, got 27"),
        ({"kind": "sharded", "num_models": 7}, "num_models=7 > num_classes=6"),
        ({"fusion_size": 0}, "fusion_size must be >= 1, got 0"),
        ({"kind": "iid", "fusion_size": 85}, "fusion_size=85 exceeds the 84 training examples of model A"),
        ({"concentration": (0.0, 5.0)}, r"concentration must be \(lo, hi\) with 0 < lo <= hi"),
        ({"concentration": (5.0, 1.0)}, "concentration must be"),
        ({"concentration": (1.0, float("inf"))}, "concentration must be"),
        ({"concentration": (1.0, 2.0, 3.0)}, "concentration must be"),
        ({"train_total": 241}, "train_total: asked for 241 examples but only 240"),
        ({"train_total": -1}, "train_total must be >= 0"),
        ({"train_total": 5}, r"classes \[0\] have no training examples in the pool"),
        ({"test_total": 61}, "test_total: asked for 61"),
        ({"train_labels": TRAIN + 1}, r"train_labels must be a 1-d array of integers in 0..5"),
        ({"test_labels": TEST.astype(float)}, "test_labels must be"),
        ({"train_labels": TRAIN[TRAIN != 3]}, r"classes \[3\] have no training examples"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    args = dict(kwargs)
    with pytest.raises(ValueError, match=message):
        split_of(args.pop("kind", "non_iid"), **args)


def test_empty_partition_names_the_model() -> None:
    one = np.array([0])
    # non_iid floors p_k * 1 to 0 for every model but the last; iid's array_split leaves B nothing.
    with pytest.raises(ValueError, match=r"non_iid split leaves model\(s\) A with no training.*fewer models"):
        make_same_task_split(one, one, 1, 2, "non_iid", 0, 1, None, None, "toy")
    with pytest.raises(ValueError, match=r"iid split leaves model\(s\) B, C with no.*concentration"):
        make_same_task_split(one, one, 1, 3, "iid", 0, 1, None, None, "toy")


def test_validation_names_problem() -> None:
    good = split_of("non_iid").to_json()
    a, b = good["partitions"]["A"], good["partitions"]["B"]
    cases = [
        (
            good
            | {
                "tasks": [{"name": "A", "classes": list(range(6))}],
                "train_indices": {"A": good["train_indices"]["all"]},
                "test_indices": {"A": good["test_indices"]["all"]},
            },
            "needs exactly one task named 'all'",
        ),
        (good | {"tasks": [{"name": "all", "classes": [0, 2, 5]}]}, r"must hold the classes 0..2, got \(0, 2, 5\)"),
        (good | {"partitions": {"A": a, "C": b}, "shares": {}}, r"partitions must be keyed 'A', 'B'"),
        (good | {"partitions": {"A": a}}, "at least 2"),
        (good | {"partitions": good["partitions"] | {"B": b[::-1]}}, r"partitions\['B'\] must be non-negative, sorted"),
        (good | {"partitions": good["partitions"] | {"B": [*b, 10**6]}}, r"partitions\['B'\] holds indices outside"),
        (good | {"partitions": good["partitions"] | {"B": b[1:]}}, "must be the union of the partitions"),
        (good | {"partitions": good["partitions"] | {"B": []}}, "partition of model B is empty"),
        (good | {"merge_indices": sorted({*good["merge_indices"], b[0]})}, r"must be a non-empty subset of partitions"),
        (good | {"merge_indices": []}, "must be a non-empty subset"),
        ({k: v for k, v in good.items() if k != "shares"}, "shares must have the partitions' keys"),
        (good | {"shares": good["shares"] | {"A": [0.5]}}, r"shares\['A'\] must be a tuple of 6 floats"),
        (good | {"shares": good["shares"] | {"A": ["x"] * 6}}, r"shares\['A'\] must be a list of numbers"),
        (good | {"shares": {"A": [1.5] * 6, "B": [-0.5] * 6, "C": [0.0] * 6}}, r"shares\['A'\] has values outside"),
        (good | {"shares": good["shares"] | {"A": [1.0] * 6}}, r"shares of classes \[0, 1, 2, 3, 4, 5\] do not sum"),
    ]
    for data, message in cases:
        with pytest.raises(ValueError, match=message):
            TaskSplit.from_json(data)
    disjoint = make_class_disjoint_split(TRAIN, TEST, 6, 2, 0, 1, None, None, "toy").to_json()
    with pytest.raises(ValueError, match="partitions and shares belong to same-task kinds only"):
        TaskSplit.from_json(disjoint | {"partitions": {"A": [1], "B": [2]}})
    # The fusion set overlaps model A's training data by design; class_disjoint still forbids any overlap.
    assert set(split_of("iid").merge_indices) <= set(split_of("iid").train_indices["all"])
    with pytest.raises(ValueError, match="no model 'D' in this split; models: A, B, C"):
        split_of("iid").partition("D")


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(SAME_TASK_KINDS),
    num_models=st.integers(2, 5),
    seed=st.integers(0, 2**32 - 1),
    per_class=st.lists(st.integers(1, 20), min_size=5, max_size=8),
    fusion_fraction=st.floats(0, 1),
    train_fraction=st.one_of(st.none(), st.floats(0.7, 1)),
    concentration=st.tuples(st.floats(0.1, 3), st.floats(0, 5)).map(lambda t: (t[0], t[0] + t[1])),
)
def test_split_properties(
    kind: str,
    num_models: int,
    seed: int,
    per_class: list[int],
    fusion_fraction: float,
    train_fraction: float | None,
    concentration: tuple[float, float],
) -> None:
    train = shuffled_labels(per_class, seed=seed % 1000)
    test = np.tile(np.arange(len(per_class)), 2)
    num_classes = len(per_class)
    train_total = None if train_fraction is None else max(num_classes, int(train_fraction * len(train)))

    def build(fusion_size: int) -> TaskSplit:
        return make_same_task_split(
            train, test, num_classes, num_models, kind, seed, fusion_size, train_total, 7, "toy", concentration
        )

    try:
        first = build(1)
    except ValueError as exc:  # tiny classes can leave a model nothing under iid / non_iid: a documented error
        assert kind in ("iid", "non_iid") and "with no training examples" in str(exc)
        reject()
    check_invariants(first, train, test, num_classes)
    assert len(first.test_indices["all"]) == 7 and first.num_models == num_models
    if train_total is not None:
        assert len(first.train_indices["all"]) == train_total
    fusion_size = max(1, int(fusion_fraction * len(first.partition("A"))))
    split = build(fusion_size)
    check_invariants(split, train, test, num_classes)
    assert len(split.merge_indices) == fusion_size
    assert split.partitions == first.partitions and split.shares == first.shares  # fusion draws nothing
    assert split == build(fusion_size)
    assert TaskSplit.from_json(split.to_json()) == split
