"""Tests for hetmerge.data: real file formats written in miniature, splits, and batching."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import re
import struct
import urllib.error
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from hetmerge.data import (
    DATASETS,
    DatasetCorruptError,
    DatasetUnavailableError,
    ImageDataset,
    Task,
    TaskSplit,
    dataset_info,
    iterate_batches,
    load_dataset,
    load_prepared,
    load_split,
    make_class_disjoint_split,
    make_label_map,
    normalize,
    save_prepared,
    save_split,
)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------------------------------------------
# Writers for the official formats, in miniature


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX: two zero bytes, type code 0x08 (unsigned byte), ndim, big-endian uint32 dims, then the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(directory: Path, rng: np.random.Generator, gz: bool) -> dict[str, np.ndarray]:
    """Four tiny IDX files with distinct random content; returns the arrays written."""
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (7, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 7, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 3, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / stem).write_bytes(data)
    return arrays


class _Python2Pickler(pickle._Pickler):  # type: ignore[name-defined]  # the pure-Python pickler can be extended
    """Writes bytes as Python 2 wrote its `str` (SHORT_BINSTRING / BINSTRING), like the official CIFAR files."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_str_py2(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_str_py2


def write_pickle(path: Path, obj: object) -> None:
    """As the official CIFAR files were written: by Python 2 (bytes as its `str`) and numpy 1 (`numpy.core`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    path.write_bytes(buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


Trust = Callable[[type[tvd.CIFAR10], Path], None]


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


@pytest.fixture
def as_official(monkeypatch: pytest.MonkeyPatch) -> Trust:
    """`as_official(cls, directory)`: torchvision takes the tiny files in `directory` for `cls`'s release, as it
    checks every file against the MD5s the class lists before unpickling it; the lists get those files' MD5s."""

    def trust(cls: type[tvd.CIFAR10], directory: Path) -> None:
        for attr in ("train_list", "test_list"):
            monkeypatch.setattr(cls, attr, [[f, md5_of(directory / f)] for f, _ in getattr(cls, attr)])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5_of(directory / cls.meta["filename"])})

    return trust


def write_cifar10(directory: Path, rng: np.random.Generator) -> tuple[np.ndarray, list[int], np.ndarray]:
    """data_batch_1..5 (2 images each), test_batch (3 images) and batches.meta, as in the official release."""
    train = rng.integers(0, 256, (10, 3072), dtype=np.uint8)
    train_labels = [int(v) for v in rng.integers(0, 10, 10)]
    for k in range(5):
        batch = {
            b"batch_label": f"training batch {k + 1} of 5".encode(),
            b"labels": train_labels[2 * k : 2 * k + 2],
            b"data": train[2 * k : 2 * k + 2],
            b"filenames": [b"a.png", b"b.png"],
        }
        write_pickle(directory / f"data_batch_{k + 1}", batch)
    test = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    write_pickle(directory / "test_batch", {b"labels": [1, 2, 3], b"data": test})
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    write_pickle(directory / "batches.meta", {b"label_names": names, b"num_cases_per_batch": 2, b"num_vis": 3072})
    return train, train_labels, test


def write_cifar100(directory: Path, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    train = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    fine = [99, 0, 42, 7]
    write_pickle(directory / "train", {b"data": train, b"fine_labels": fine, b"coarse_labels": [0, 1, 2, 3]})
    write_pickle(directory / "test", {b"data": train[:2], b"fine_labels": [5, 6], b"coarse_labels": [0, 0]})
    names = [f"class{i}".encode() for i in range(100)]
    write_pickle(directory / "meta", {b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20})
    return train, fine


def load(name: str, root: Path, verify: bool = False, download: bool = False) -> ImageDataset:
    return load_dataset(name, [root], download=download, download_root=root / "downloads", verify=verify)


# ---------------------------------------------------------------------------------------------------------
# Datasets


def test_registry_and_unknown_name() -> None:
    assert set(DATASETS) == {"fashion_mnist", "mnist", "cifar10", "cifar100", "digits"}
    assert dataset_info("cifar100").num_classes == 100
    with pytest.raises(ValueError, match="known datasets: cifar10, cifar100, digits, fashion_mnist, mnist"):
        load_dataset("imagenet", [], download=False, download_root=Path("unused"))


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path: Path, name: str, layout: str, gz: bool) -> None:
    subdir = {"flat": ".", "torchvision": {"mnist": "MNIST/raw", "fashion_mnist": "FashionMNIST/raw"}[name]}[layout]
    arrays = write_idx_set(tmp_path / subdir, np.random.default_rng(0), gz)
    ds = load(name, tmp_path)
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10 and ds.hflip is False
    assert torch.equal(ds.train_images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert torch.equal(ds.test_images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert ds.train_labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert ds.test_labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert int(ds.train_images[4, 0, 17, 3]) == int(arrays["train-images-idx3-ubyte"][4, 17, 3])
    assert ds.classes == tuple(tvd.MNIST.classes if name == "mnist" else tvd.FashionMNIST.classes)


def test_cifar10_round_trip(tmp_path: Path, as_official: Trust) -> None:
    train, train_labels, test = write_cifar10(tmp_path / "cifar-10-batches-py", np.random.default_rng(1))
    as_official(tvd.CIFAR10, tmp_path / "cifar-10-batches-py")
    ds = load("cifar10", tmp_path, verify=True)
    assert ds.train_images.shape == (10, 3, 32, 32) and ds.test_images.shape == (3, 3, 32, 32)
    assert ds.train_labels.tolist() == train_labels and ds.test_labels.tolist() == [1, 2, 3]
    # Row-major planes: channel c, row r, column k of image i is byte c*1024 + r*32 + k of its row.
    assert int(ds.train_images[7, 1, 2, 5]) == int(train[7, 1024 + 2 * 32 + 5])
    assert int(ds.test_images[2, 2, 31, 0]) == int(test[2, 2048 + 31 * 32])
    assert torch.equal(ds.train_images.reshape(10, -1), torch.from_numpy(train))
    assert ds.classes[0] == "airplane" and ds.classes[-1] == "truck" and ds.hflip is True
    assert ds.mean == (0.4914, 0.4822, 0.4465)


def test_cifar100_round_trip_flat_layout(tmp_path: Path, as_official: Trust) -> None:
    train, fine = write_cifar100(tmp_path, np.random.default_rng(2))
    as_official(tvd.CIFAR100, tmp_path)
    ds = load("cifar100", tmp_path, verify=True)
    assert ds.num_classes == 100 and ds.classes[99] == "class99"
    assert ds.train_labels.tolist() == fine and ds.test_labels.tolist() == [5, 6]
    assert torch.equal(ds.train_images.reshape(4, -1), torch.from_numpy(train))


def test_verify_rejects_unofficial_file(tmp_path: Path) -> None:
    write_idx_set(tmp_path, np.random.default_rng(0), gz=True)
    with pytest.raises(DatasetCorruptError, match=r"train-images-idx3-ubyte\.gz.*corrupt or incomplete"):
        load("mnist", tmp_path, verify=True)
    write_cifar10(tmp_path / "cifar-10-batches-py", np.random.default_rng(1))
    with pytest.raises(DatasetCorruptError, match=r"data_batch_1, .*test_batch, .*batches\.meta: not the official"):
        load("cifar10", tmp_path, verify=True)


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_idx_names_file(tmp_path: Path, gz: bool) -> None:
    write_idx_set(tmp_path, np.random.default_rng(0), gz=gz)
    path = tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DatasetCorruptError, match=str(path)):
        load("fashion_mnist", tmp_path)


def test_corrupt_cifar_batch_is_refused_naming_it(tmp_path: Path, as_official: Trust) -> None:
    write_cifar10(tmp_path, np.random.default_rng(1))
    as_official(tvd.CIFAR10, tmp_path)
    path = tmp_path / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(
        DatasetCorruptError, match=rf"^{re.escape(str(path))}: not the official CIFAR-10 file .*corrupt"
    ):
        load("cifar10", tmp_path, verify=True)


class _Payload:
    """Unpickling this runs `function(argument)`: what a tampered batch file would do."""

    def __init__(self, function: Callable[[str], object], argument: str) -> None:
        self.function, self.argument = function, argument

    def __reduce__(self) -> tuple[Callable[[str], object], tuple[str]]:
        return self.function, (self.argument,)


def test_tampered_cifar_batch_is_refused_before_unpickling(tmp_path: Path, as_official: Trust) -> None:
    write_cifar10(tmp_path, np.random.default_rng(1))
    as_official(tvd.CIFAR10, tmp_path)
    marker = tmp_path / "pwned"
    payload = _Payload(os.system, f"touch {marker}")
    write_pickle(tmp_path / "data_batch_1", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"x": payload})
    with pytest.raises(DatasetCorruptError, match=re.escape(f"{tmp_path / 'data_batch_1'}: not the official")):
        load("cifar10", tmp_path, verify=True)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_cannot_be_read_unverified(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match=rf"{name}' cannot be read unverified: torchvision checks every CIFAR file"):
        load(name, tmp_path, verify=False, download=True)


def test_cifar_unavailable_lists_where_it_looked(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "b" / "cifar-10-batches-py", np.random.default_rng(1))
    (tmp_path / "b" / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("cifar10", [tmp_path / "a", tmp_path / "b"], download=False, download_root=tmp_path / "dl")
    message = str(info.value)
    for directory in ("a/cifar-10-batches-py", "a", "b/cifar-10-batches-py", "b", "dl/cifar-10-batches-py", "dl"):
        assert f"  {tmp_path / directory}\n" in message
    assert "incomplete copy (missing: data_batch_3)" in message and "Downloading is disabled" in message


def test_unavailable_without_download(tmp_path: Path) -> None:
    (tmp_path / "b" / "MNIST" / "raw").mkdir(parents=True)
    (tmp_path / "b" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    roots = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("mnist", roots, download=False, download_root=tmp_path / "dl")
    message = str(info.value)
    for directory in (tmp_path / "a", tmp_path / "b" / "MNIST" / "raw", tmp_path / "dl"):
        assert f"  {directory}\n" in message
    assert "'mnist'" in message and "`dataset.roots`" in message and "network access" in message
    assert "Downloading is disabled" in message
    assert "incomplete copy (missing: train-labels-idx1-ubyte" in message


def test_download_failure_gives_same_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(self: tvd.MNIST) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tvd.FashionMNIST, "download", offline)
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("fashion_mnist", [tmp_path / "a"], download=True, download_root=tmp_path / "dl")
    message = str(info.value)
    assert "URLError" in message and "no network" in message
    assert str(tmp_path / "a") in message and "`dataset.roots`" in message and "network access" in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_download_result_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A successful torchvision download leaves FashionMNIST/raw under download_root; that copy is read."""
    written: dict[str, np.ndarray] = {}

    def fake_download(self: tvd.MNIST) -> None:
        written.update(write_idx_set(Path(self.raw_folder), np.random.default_rng(3), gz=False))

    monkeypatch.setattr(tvd.FashionMNIST, "download", fake_download)
    ds = load_dataset("fashion_mnist", [tmp_path / "a"], True, tmp_path / "dl", verify=False)
    assert ds.train_labels.tolist() == written["train-labels-idx1-ubyte"].tolist()


def test_cifar_download_result_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_official: Trust) -> None:
    """torchvision's download unpacks cifar-10-batches-py under download_root, and that copy is read."""
    written = []

    def fake_download(self: tvd.CIFAR10) -> None:
        directory = Path(self.root) / "cifar-10-batches-py"
        written.append(write_cifar10(directory, np.random.default_rng(4)))
        as_official(tvd.CIFAR10, directory)

    monkeypatch.setattr(tvd.CIFAR10, "download", fake_download)
    ds = load_dataset("cifar10", [tmp_path / "a"], True, tmp_path / "dl")
    assert len(written) == 1 and ds.train_labels.tolist() == written[0][1]


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_debian_fashion_mnist_verified(tmp_path: Path) -> None:
    ds = load_dataset("fashion_mnist", [DEBIAN_FASHION_MNIST], download=False, download_root=tmp_path, verify=True)
    assert ds.train_images.shape == (60000, 1, 28, 28) and ds.test_images.shape == (10000, 1, 28, 28)
    assert ds.train_labels.bincount().tolist() == [6000] * 10
    assert ds.mean == (0.2860,) and abs(ds.train_images.float().mean().item() / 255 - 0.2860) < 5e-4
    with pytest.raises(DatasetCorruptError, match=r"official fashion_mnist file .* different dataset"):
        load_dataset("mnist", [DEBIAN_FASHION_MNIST], download=False, download_root=tmp_path, verify=True)


def test_digits() -> None:
    ds = load_dataset("digits", [], download=False, download_root=Path("unused"))
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert len(ds.train_labels) + len(ds.test_labels) == 1797
    assert int(ds.train_images.max()) == 255 and int(ds.train_images.min()) == 0
    assert set(torch.unique(ds.train_images).tolist()) <= {round(v * 255 / 16) for v in range(17)}
    train_counts, test_counts = ds.train_labels.bincount(), ds.test_labels.bincount()
    assert torch.all((train_counts + test_counts) // 5 == test_counts)  # stratified 1-in-5
    assert ds.mean[0] == pytest.approx(ds.train_images.double().mean().item() / 255)
    again = load_dataset("digits", [], download=False, download_root=Path("unused"))
    assert torch.equal(ds.test_images, again.test_images)


def test_prepared_round_trip(tmp_path: Path) -> None:
    ds = load_dataset("digits", [], download=False, download_root=tmp_path)
    path = tmp_path / "prepared" / "digits.safetensors"
    save_prepared(ds, path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    back = load_prepared(path)
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        assert getattr(back, key).dtype == getattr(ds, key).dtype
        assert torch.equal(getattr(back, key), getattr(ds, key))
    for key in ("name", "classes", "mean", "std", "hflip"):
        assert getattr(back, key) == getattr(ds, key)


def test_prepared_corrupt_files_name_the_file(tmp_path: Path) -> None:
    ds = load_dataset("digits", [], download=False, download_root=tmp_path)
    path = tmp_path / "digits.safetensors"
    save_prepared(ds, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetCorruptError, match=f"{path}: not a readable safetensors file"):
        load_prepared(path)
    save_file({"train_images": ds.train_images}, str(path), metadata={"hetmerge": "{}"})
    with pytest.raises(DatasetCorruptError, match=f"{path}: missing tensors train_labels"):
        load_prepared(path)


def test_prepared_flipped_bytes_are_caught(tmp_path: Path) -> None:
    """Damaged pixels fail with the file and the tensor named instead of training on wrong images."""
    ds = load_dataset("digits", [], download=False, download_root=tmp_path)
    path = tmp_path / "digits.safetensors"
    save_prepared(ds, path)
    raw = bytearray(path.read_bytes())
    start = raw.find(ds.train_images.numpy().tobytes())
    for i in range(start + 1000, start + 1060):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    message = "tensor 'train_images' does not match its checksum; the file is corrupt; delete it and rerun the job"
    with pytest.raises(DatasetCorruptError, match=f"{path}: {message} that made it"):
        load_prepared(path)
    tensors = {key: getattr(ds, key) for key in ("train_images", "train_labels", "test_images", "test_labels")}
    meta = {"format_version": 1, "name": ds.name, "classes": list(ds.classes), "mean": ds.mean, "std": ds.std}
    save_file(tensors, str(path), metadata={"hetmerge": json.dumps({**meta, "hflip": ds.hflip})})  # pre-checksum
    with pytest.raises(DatasetCorruptError, match=f"{path} has no checksums: .*rerun the job that made it"):
        load_prepared(path)


# ---------------------------------------------------------------------------------------------------------
# Splits


def balanced_labels(num_classes: int, per_class: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def split_of(seed: int = 0, **kwargs: object) -> TaskSplit:
    args: dict = {
        "train_labels": balanced_labels(10, 50),
        "test_labels": balanced_labels(10, 20, seed=1),
        "num_classes": 10,
        "num_tasks": 2,
        "seed": seed,
        "merge_per_class": 5,
        "train_per_task": None,
        "test_per_task": None,
        "dataset": "toy",
    }
    return make_class_disjoint_split(**(args | kwargs))


def check_invariants(split: TaskSplit, train_labels: np.ndarray, test_labels: np.ndarray, num_classes: int) -> None:
    classes = [c for t in split.tasks for c in t.classes]
    assert sorted(classes) == list(range(num_classes))
    assert len({len(t.classes) for t in split.tasks}) == 1
    merge = np.array(split.merge_indices, dtype=np.int64)
    for task in split.tasks:
        train = np.array(split.train_indices[task.name], dtype=np.int64)
        assert not set(train) & set(merge)
        assert set(train_labels[train]) <= set(task.classes)
        assert set(test_labels[list(split.test_indices[task.name])]) <= set(task.classes)
        assert list(train) == sorted(set(train))
    counts = np.bincount(train_labels[merge], minlength=num_classes)
    assert len(set(counts.tolist())) == 1  # class-balanced


def test_class_disjoint_split_basics() -> None:
    split = split_of()
    assert [t.name for t in split.tasks] == ["A", "B"] and all(len(t.classes) == 5 for t in split.tasks)
    check_invariants(split, balanced_labels(10, 50), balanced_labels(10, 20, seed=1), 10)
    assert len(split.merge_indices) == 50
    assert all(len(ix) == 5 * 45 for ix in split.train_indices.values())
    assert all(len(ix) == 5 * 20 for ix in split.test_indices.values())
    task = split.task("B")
    assert split.label_maps["B"] == {c: i for i, c in enumerate(task.classes)}
    with pytest.raises(ValueError, match="no task 'Z'"):
        split.task("Z")


def test_split_determinism() -> None:
    assert split_of(seed=3) == split_of(seed=3)
    assignments = {tuple(t.classes for t in split_of(seed=s).tasks) for s in range(6)}
    assert len(assignments) > 1
    # Subsampling must not move the class assignment or the merge slice.
    sub = split_of(seed=3, train_per_task=40)
    assert sub.tasks == split_of(seed=3).tasks and sub.merge_indices == split_of(seed=3).merge_indices


def test_split_subsampling_is_balanced() -> None:
    train = balanced_labels(10, 50)
    split = split_of(train_per_task=23, test_per_task=12)
    for task in split.tasks:
        counts = np.bincount(train[list(split.train_indices[task.name])], minlength=10)[list(task.classes)]
        assert counts.sum() == 23 and counts.max() - counts.min() <= 1
        assert len(split.test_indices[task.name]) == 12


def test_split_subsampling_fills_from_other_classes() -> None:
    """A class short of examples hands its share to the others, keeping the total."""
    labels = np.concatenate([np.full(3, 0), np.full(30, 1), np.full(30, 2), np.full(30, 3)])
    split = make_class_disjoint_split(labels, labels, 4, 2, 0, 1, 20, None, "toy")
    for task in split.tasks:
        counts = np.bincount(labels[list(split.train_indices[task.name])], minlength=4)
        assert counts.sum() == 20
        if 0 in task.classes:
            assert counts[0] == 2  # all that is left after the merge slice


def test_split_uneven_tasks_as_equal_as_possible() -> None:
    sizes = [len(t.classes) for t in split_of(num_tasks=3).tasks]
    assert sizes == [4, 3, 3]


def test_split_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="10 classes cannot be split into 11"):
        split_of(num_tasks=11)
    with pytest.raises(ValueError, match="merge_per_class=50"):
        split_of(merge_per_class=50)
    with pytest.raises(ValueError, match=r"train_per_task.*only 225 are available"):
        split_of(train_per_task=226)


def test_split_json_round_trip(tmp_path: Path) -> None:
    split = split_of(train_per_task=30)
    assert TaskSplit.from_json(split.to_json()) == split
    path = tmp_path / "split.json"
    save_split(split, path)
    assert load_split(path) == split
    first = path.read_bytes()
    save_split(split_of(train_per_task=30), path)
    assert path.read_bytes() == first


def test_split_validation_names_problem(tmp_path: Path) -> None:
    good = split_of().to_json()
    bad_overlap = good | {"merge_indices": sorted({*good["merge_indices"], good["train_indices"]["A"][0]})}
    with pytest.raises(ValueError, match=r"merge_indices overlap train_indices\['A'\]"):
        TaskSplit.from_json(bad_overlap)
    with pytest.raises(ValueError, match="missing 'tasks'"):
        TaskSplit.from_json({k: v for k, v in good.items() if k != "tasks"})
    with pytest.raises(ValueError, match="share classes"):
        TaskSplit.from_json(good | {"tasks": [{"name": "A", "classes": [0, 1]}, {"name": "B", "classes": [1]}]})
    with pytest.raises(ValueError, match="unknown split kind 'bogus'"):
        TaskSplit.from_json(good | {"kind": "bogus"})
    with pytest.raises(ValueError, match="must be a list of integers"):
        TaskSplit.from_json(good | {"merge_indices": [1.5]})
    with pytest.raises(ValueError, match=r"test_indices\['B'\] must be non-negative, sorted"):
        TaskSplit.from_json(good | {"test_indices": {"A": [1], "B": [3, 2]}})
    path = tmp_path / "broken.json"
    path.write_text('{"dataset": ')
    with pytest.raises(ValueError, match=f"{path}: not valid JSON"):
        load_split(path)
    path.write_text("[]")
    with pytest.raises(ValueError, match=f"{path}: invalid task split"):
        load_split(path)


@settings(max_examples=40, deadline=None)
@given(
    num_tasks=st.sampled_from([2, 5]),
    seed=st.integers(0, 2**32 - 1),
    per_class=st.lists(st.integers(3, 25), min_size=10, max_size=10),
    merge_per_class=st.integers(0, 2),
    train_fraction=st.one_of(st.none(), st.floats(0, 1)),
    test_per_task=st.one_of(st.none(), st.integers(0, 8)),
)
def test_split_properties(
    num_tasks: int,
    seed: int,
    per_class: list[int],
    merge_per_class: int,
    train_fraction: float | None,
    test_per_task: int | None,
) -> None:
    train_labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(10), per_class))
    test_labels = np.tile(np.arange(10), 4)  # 8 test examples per task even with 5 tasks
    split = make_class_disjoint_split(
        train_labels, test_labels, 10, num_tasks, seed, merge_per_class, None, test_per_task, "toy"
    )
    check_invariants(split, train_labels, test_labels, 10)
    if train_fraction is not None:
        smallest = min(len(ix) for ix in split.train_indices.values())
        train_per_task = int(train_fraction * smallest)
        sub = make_class_disjoint_split(
            train_labels,
            test_labels,
            10,
            num_tasks,
            seed,
            merge_per_class,
            train_per_task,
            test_per_task,
            "toy",
        )
        check_invariants(sub, train_labels, test_labels, 10)
        assert all(len(ix) == train_per_task for ix in sub.train_indices.values())
        for name, ix in sub.train_indices.items():
            assert set(ix) <= set(split.train_indices[name])
    if test_per_task is not None:
        assert all(len(ix) == test_per_task for ix in split.test_indices.values())
    assert TaskSplit.from_json(split.to_json()) == split


# ---------------------------------------------------------------------------------------------------------
# Batches


@pytest.fixture
def toy() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 6, 6), generator=gen, dtype=torch.uint8)
    return images, torch.arange(20) % 10


MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_normalize() -> None:
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2)
    out = normalize(x, (0.5,), (0.25,))
    assert out.dtype == torch.float32 and out.flatten().tolist() == [-2.0, 2.0]
    with pytest.raises(ValueError, match="for 1 channels"):
        normalize(x, MEAN, STD)


def test_batches_keep_order_without_generator(toy: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = toy
    indices = [5, 1, 17, 3, 9, 0, 12]
    batches = list(iterate_batches(images, labels, indices, 3, MEAN, STD))
    assert [len(y) for _, y in batches] == [3, 3, 1]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert y.dtype == torch.int64 and y.tolist() == labels[indices].tolist()
    assert torch.equal(x, normalize(images[indices], MEAN, STD))
    assert [len(y) for _, y in iterate_batches(images, labels, indices, 3, MEAN, STD, drop_last=True)] == [
        3,
        3,
    ]


def test_batches_shuffle_reproducibly(toy: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = toy
    indices = torch.arange(2, 18)

    def epoch(seed: int, augment: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        return list(iterate_batches(images, labels, indices, 5, MEAN, STD, generator=gen, augment=augment, hflip=True))

    for augment in (False, True):
        first, again = epoch(7, augment), epoch(7, augment)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
        assert all(x.shape[1:] == (3, 6, 6) for x, _ in first)
    order = torch.cat([y for _, y in epoch(7, False)])
    assert sorted(order.tolist()) == sorted(labels[indices].tolist())
    assert not torch.equal(order, torch.cat([y for _, y in epoch(8, False)]))
    with pytest.raises(ValueError, match="needs a generator"):
        next(iterate_batches(images, labels, indices, 5, MEAN, STD, augment=True))


@pytest.mark.parametrize("hflip", [False, True])
def test_augment_is_a_shifted_window(hflip: bool) -> None:
    """Each output is a window of the zero-padded image (mirrored if flipped): zeros enter at the edges."""
    h, w, pad = 5, 6, 2
    image = (torch.arange(h * w, dtype=torch.uint8) + 1).view(1, 1, h, w)  # distinct, non-zero pixels
    images = image.expand(64, 1, h, w).contiguous()
    gen = torch.Generator().manual_seed(0)
    batches = iterate_batches(
        images, torch.zeros(64, dtype=torch.int64), range(64), 64, (0.0,), (1.0,),
        generator=gen, augment=True, hflip=hflip, padding=pad,
    )  # fmt: skip
    x, _ = next(batches)
    padded = torch.nn.functional.pad(image[0, 0], (pad, pad, pad, pad))
    windows = {
        (dy, dx, flipped): normalize(
            (padded[dy : dy + h, dx : dx + w].flip(1) if flipped else padded[dy : dy + h, dx : dx + w])[None],
            (0.0,),
            (1.0,),
        )
        for dy in range(2 * pad + 1)
        for dx in range(2 * pad + 1)
        for flipped in ((False, True) if hflip else (False,))
    }
    seen = {next(key for key, win in windows.items() if torch.equal(win, out)) for out in x}
    assert len(seen) > 10  # offsets really vary
    assert {flipped for _, _, flipped in seen} == ({False, True} if hflip else {False})
    ones = torch.ones(8, 1, 4, 4, dtype=torch.uint8)
    crops, _ = next(iterate_batches(ones, torch.zeros(8), range(8), 8, (0.0,), (1.0,), generator=gen, augment=True))
    assert crops.shape == (8, 1, 4, 4) and set(torch.unique(crops * 255).round().tolist()) <= {0.0, 1.0}


def test_label_map(toy: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = toy
    task = Task("A", (3, 7))
    table = make_label_map(task.label_map, 10)
    assert table.tolist() == [-1, -1, -1, 0, -1, -1, -1, 1, -1, -1]
    indices = [3, 7, 13, 17]
    y = torch.cat([y for _, y in iterate_batches(images, labels, indices, 3, MEAN, STD, label_map=table)])
    assert y.tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match=r"no entry for classes \[5\]"):
        list(iterate_batches(images, labels, [3, 5], 3, MEAN, STD, label_map=table))
