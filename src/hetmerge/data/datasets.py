"""Image datasets read from their official release files, verified, and cached as one safetensors file.

Everything is held in memory as uint8 tensors: the datasets used here are small, and keeping raw pixels
lets every consumer normalise and augment on the device of its choice.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from hetmerge.checkpoint import CheckpointError, save_tensors, verify_checksums

if TYPE_CHECKING:
    from torchvision.datasets import CIFAR10, MNIST, VisionDataset

PathLike = str | os.PathLike[str]

PREPARED_FORMAT_VERSION = 1
_TENSOR_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


class DatasetUnavailableError(RuntimeError):
    """No usable copy of a dataset exists locally and it could not (or may not) be downloaded."""


class DatasetCorruptError(ValueError):
    """A dataset file exists but is not the official content (bad checksum, truncated, malformed)."""


@dataclass(frozen=True, eq=False)  # eq=False: tensor `==` is elementwise, so dataclass equality is meaningless
class ImageDataset:
    """A whole image-classification dataset in memory, as raw uint8 pixels plus what is needed to use them."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images: torch.Tensor = getattr(self, f"{split}_images")
            labels: torch.Tensor = getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise ValueError(
                    f"{self.name}: {split}_images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
                )
            if labels.dtype != torch.int64 or labels.dim() != 1 or len(labels) != len(images):
                raise ValueError(
                    f"{self.name}: {split}_labels must be int64 of shape ({len(images)},), "
                    f"got {labels.dtype} {tuple(labels.shape)}"
                )
            if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(self.classes):
                raise ValueError(f"{self.name}: {split}_labels outside 0..{len(self.classes) - 1}")
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(
                f"{self.name}: train images {tuple(self.train_images.shape[1:])} and "
                f"test images {tuple(self.test_images.shape[1:])} differ in shape"
            )
        channels = self.train_images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"{self.name}: mean/std need one value per channel ({channels})")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_images.shape[1:]
        return (c, h, w)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a dataset without loading it (enough to build a model for it)."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    hflip: bool
    label: str  # display name for tables and captions


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("fashion_mnist", (1, 28, 28), 10, hflip=False, label="Fashion-MNIST"),
        DatasetInfo("mnist", (1, 28, 28), 10, hflip=False, label="MNIST"),
        DatasetInfo("cifar10", (3, 32, 32), 10, hflip=True, label="CIFAR-10"),
        DatasetInfo("cifar100", (3, 32, 32), 100, hflip=True, label="CIFAR-100"),
        DatasetInfo("digits", (1, 8, 8), 10, hflip=False, label="Digits"),
    )
}


def dataset_info(name: str) -> DatasetInfo:
    """Look up a registered dataset; unknown names fail with the list of known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}") from None


# ---------------------------------------------------------------------------------------------------------
# Where the files live and what their checksums must be


@dataclass(frozen=True)
class _Source:
    """The official files of one dataset, the layouts they may be found in, and how to fetch them."""

    torchvision_class: type[VisionDataset]
    subdirs: tuple[str, ...]  # searched under every root before the root itself (flat layout)
    files: dict[str, tuple[str, ...]]  # logical file -> accepted names (first = the name torchvision uses)
    md5: dict[str, str]  # accepted file name -> official MD5 (IDX only: torchvision checks CIFAR's itself)
    mean: tuple[float, ...]
    std: tuple[float, ...]


_IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# MD5s of the *uncompressed* IDX files. torchvision only lists the MD5s of the .gz archives, but a copy
# recompressed by a distribution (Debian's dataset-fashion-mnist differs in the gzip header) or unpacked by
# torchvision itself is just as official, so its decompressed content is checked against these instead.
_IDX_RAW_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}


def _idx_source(name: str, cls: type[MNIST], extra_subdir: str, mean: float, std: float) -> _Source:
    md5 = {filename: digest for filename, digest in cls.resources} | _IDX_RAW_MD5[name]
    return _Source(
        torchvision_class=cls,
        subdirs=(f"{cls.__name__}/raw", extra_subdir),
        files={stem: (f"{stem}.gz", stem) for stem in _IDX_STEMS},
        md5=md5,
        mean=(mean,),
        std=(std,),
    )


def _cifar_source(cls: type[CIFAR10], mean: tuple[float, ...], std: tuple[float, ...]) -> _Source:
    listed = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
    return _Source(
        torchvision_class=cls,
        subdirs=(cls.base_folder,),
        files={filename: (filename,) for filename, _ in listed},
        md5={},
        mean=mean,
        std=std,
    )


@functools.cache
def _sources() -> dict[str, _Source]:
    """Built on first use: importing torchvision costs seconds, and most jobs only read prepared data."""
    import torchvision.datasets as tvd

    return {
        # "fashion-mnist"/"mnist" subdirectories: Debian installs /usr/share/datasets/fashion-mnist.
        "fashion_mnist": _idx_source("fashion_mnist", tvd.FashionMNIST, "fashion-mnist", 0.2860, 0.3530),
        "mnist": _idx_source("mnist", tvd.MNIST, "mnist", 0.1307, 0.3081),
        "cifar10": _cifar_source(tvd.CIFAR10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        "cifar100": _cifar_source(tvd.CIFAR100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    }


@functools.cache
def _known_md5() -> dict[str, tuple[str, str]]:
    """Every official checksum -> (dataset, file), so a mismatch can say "this is MNIST, not Fashion-MNIST"."""
    return {digest: (name, filename) for name, src in _sources().items() for filename, digest in src.md5.items()}


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _check_md5(path: Path, data: bytes, expected: str, what: str) -> None:
    got = _md5(data)
    if got == expected:
        return
    if got in _known_md5():
        (other, filename), (wanted, wanted_file) = _known_md5()[got], _known_md5()[expected]
        raise DatasetCorruptError(
            f"{path}: {what} is the official {other} file {filename}, not {wanted}'s {wanted_file}: the "
            "files are mixed up or this directory holds a different dataset; give each dataset its own."
        )
    raise DatasetCorruptError(
        f"{path}: MD5 of {what} is {got}, expected the official {expected}; the file is corrupt or "
        "incomplete (e.g. an interrupted download). Delete it and download it again, "
        "or pass verify=False at your own risk."
    )


def _read_verified(path: Path, src: _Source, verify: bool) -> bytes:
    """Read a file (decompressing .gz) and, if asked, check it against the official MD5s."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        archive_ok = verify and _md5(data) == src.md5[path.name]
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetCorruptError(f"{path}: not a valid gzip file ({exc}); it is corrupt or incomplete") from exc
        if verify and not archive_ok:
            _check_md5(path, data, src.md5[path.name.removesuffix(".gz")], "its decompressed content")
    elif verify:
        _check_md5(path, data, src.md5[path.name], "the file")
    return data


# ---------------------------------------------------------------------------------------------------------
# File formats


def _parse_idx(path: Path, data: bytes, ndim: int) -> np.ndarray:
    """Parse an IDX file (big-endian header: 0, 0, type code, ndim, then ndim uint32 dims) to uint8."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetCorruptError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08 or data[3] != ndim:
        raise DatasetCorruptError(
            f"{path}: expected an IDX file of unsigned bytes with {ndim} dimensions, "
            f"got type code {data[2]:#04x} with {data[3]} dimensions"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetCorruptError(f"{path}: IDX header truncated")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if len(data) != header + int(np.prod(dims)):
        raise DatasetCorruptError(
            f"{path}: IDX header announces shape {dims} ({header + int(np.prod(dims))} bytes) but the file "
            f"has {len(data)} bytes; it is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _read_idx_dataset(name: str, directory: Path, names: dict[str, str], verify: bool) -> ImageDataset:
    src = _sources()[name]
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images_path = directory / names[f"{prefix}-images-idx3-ubyte"]
        labels_path = directory / names[f"{prefix}-labels-idx1-ubyte"]
        images = _parse_idx(images_path, _read_verified(images_path, src, verify), ndim=3)
        labels = _parse_idx(labels_path, _read_verified(labels_path, src, verify), ndim=1)
        if len(images) != len(labels):
            raise DatasetCorruptError(f"{images_path} has {len(images)} images but {labels_path} {len(labels)} labels")
        splits[split] = (torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long())
    return ImageDataset(
        name=name,
        train_images=splits["train"][0],
        train_labels=splits["train"][1],
        test_images=splits["test"][0],
        test_labels=splits["test"][1],
        classes=tuple(src.torchvision_class.classes),
        mean=src.mean,
        std=src.std,
        hflip=DATASETS[name].hflip,
    )


def _read_cifar_dataset(name: str, directory: Path, names: dict[str, str], verify: bool) -> ImageDataset:
    """torchvision's CIFAR reader, which checks every file's MD5 before unpickling it, on the directory found."""
    from torchvision.datasets.utils import check_integrity

    src = _sources()[name]
    cls = cast("type[CIFAR10]", src.torchvision_class)  # CIFAR100 derives from CIFAR10
    # torchvision reads root/base_folder; an empty base_folder reads the directory found, in either layout
    here = type(cls.__name__, (cls,), {"base_folder": ""})
    try:
        train, test = here(root=directory, train=True), here(root=directory, train=False)
    except RuntimeError as exc:  # torchvision only says "not found or corrupted": name the file
        listed = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
        bad = [directory / f for f, md5 in listed if not check_integrity(str(directory / f), md5)]
        if not bad:
            raise DatasetCorruptError(f"{directory}: torchvision cannot read {DATASETS[name].label} ({exc})") from exc
        raise DatasetCorruptError(
            f"{', '.join(map(str, bad))}: not the official {DATASETS[name].label} file (MD5 differs); "
            "it is corrupt or incomplete (e.g. an interrupted download). Delete it and download it again."
        ) from exc
    return ImageDataset(
        name=name,
        train_images=torch.from_numpy(train.data).permute(0, 3, 1, 2).contiguous(),  # torchvision gives HWC
        train_labels=torch.tensor(train.targets, dtype=torch.int64),
        test_images=torch.from_numpy(test.data).permute(0, 3, 1, 2).contiguous(),
        test_labels=torch.tensor(test.targets, dtype=torch.int64),
        classes=tuple(train.classes),
        mean=src.mean,
        std=src.std,
        hflip=DATASETS[name].hflip,
    )


_READERS: dict[str, Callable[[str, Path, dict[str, str], bool], ImageDataset]] = {
    "fashion_mnist": _read_idx_dataset,
    "mnist": _read_idx_dataset,
    "cifar10": _read_cifar_dataset,
    "cifar100": _read_cifar_dataset,
}


def _load_digits() -> ImageDataset:
    """scikit-learn's bundled 8x8 digits: tiny and always available, so pipelines can be tested offline.

    Within each class, every 5th sample (in file order) is a test sample: a stratified 80/20 split that
    depends on nothing but the data, so it is identical on every platform and library version.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)[:, None]  # values 0..16 -> 0..255
    labels = bunch.target.astype(np.int64)
    order = np.argsort(labels, kind="stable")
    first_of_class = np.searchsorted(labels[order], labels[order])
    rank = np.empty_like(labels)
    rank[order] = np.arange(len(labels)) - first_of_class
    is_test = rank % 5 == 4
    train = images[~is_test]
    scaled = train.astype(np.float64) / 255
    return ImageDataset(
        name="digits",
        train_images=torch.from_numpy(train),
        train_labels=torch.from_numpy(labels[~is_test]),
        test_images=torch.from_numpy(images[is_test]),
        test_labels=torch.from_numpy(labels[is_test]),
        classes=tuple(str(int(c)) for c in bunch.target_names),
        mean=(float(scaled.mean()),),
        std=(float(scaled.std()),),
        hflip=False,
    )


# ---------------------------------------------------------------------------------------------------------
# Locating, downloading, loading


def _candidate_dirs(name: str, roots: Sequence[Path]) -> list[Path]:
    src = _sources()[name]
    return [directory for root in roots for directory in (*(root / sub for sub in src.subdirs), root)]


def _find_files(name: str, directory: Path) -> tuple[dict[str, str], list[str]]:
    """Map each logical file of `name` to the accepted name present in `directory`; list those absent."""
    found, missing = {}, []
    for logical, accepted in _sources()[name].files.items():
        present = next((n for n in accepted if (directory / n).is_file()), None)
        if present is None:
            missing.append(logical)
        else:
            found[logical] = present
    return found, missing


def _search(name: str, roots: Sequence[Path]) -> tuple[Path | None, dict[str, str], list[str]]:
    """First directory holding all files of `name`, with the names found; else notes on partial copies."""
    notes = []
    for directory in _candidate_dirs(name, roots):
        found, missing = _find_files(name, directory)
        if not missing:
            return directory, found, []
        if found:
            notes.append(f"{directory} holds an incomplete copy (missing: {', '.join(missing)})")
    return None, {}, notes


def _download(name: str, download_root: Path) -> None:
    """Fetch the official archives with torchvision, which checks their MD5s before unpacking."""
    download_root.mkdir(parents=True, exist_ok=True)
    _sources()[name].torchvision_class(root=str(download_root), train=True, download=True)


def load_dataset(
    name: str,
    roots: Sequence[PathLike],
    download: bool,
    download_root: PathLike,
    verify: bool = True,
) -> ImageDataset:
    """Load a registered dataset from the first local copy found, downloading it only as a last resort.

    Local roots come first so that offline machines and shared read-only copies (e.g. Debian's
    /usr/share/datasets/fashion-mnist) are used as they are; `download_root` is searched next because it
    holds earlier downloads. With `verify`, every file is checked against the official MD5 before parsing.
    CIFAR is read by torchvision, which always checks, so verify=False is refused for it: hetmerge does not
    unpickle an unchecked file (unpickling can run code).
    """
    dataset_info(name)
    if name == "digits":
        return _load_digits()
    if not verify and _READERS[name] is _read_cifar_dataset:
        raise ValueError(
            f"dataset {name!r} cannot be read unverified: torchvision checks every CIFAR file's MD5 before "
            "unpickling it, and an unchecked pickle could run code. Set `dataset.verify: true` (drop --no-verify)."
        )
    download_dir = Path(download_root)
    search_roots = list(dict.fromkeys([*(Path(r) for r in roots), download_dir]))
    directory, found, notes = _search(name, search_roots)
    if directory is None and download:
        try:
            _download(name, download_dir)
        except Exception as exc:  # network, DNS, HTTP and checksum errors all mean the same thing here
            notes.append(f"Downloading it into {download_dir} failed: {type(exc).__name__}: {exc}")
            raise _unavailable(name, search_roots, download_dir, notes) from exc
        directory, found, _ = _search(name, [download_dir])
        if directory is None:
            notes.append(f"The download into {download_dir} finished but did not produce all files.")
    if directory is None:
        if not download:
            notes.append("Downloading is disabled.")
        raise _unavailable(name, search_roots, download_dir, notes)
    return _READERS[name](name, directory, found, verify)


def _unavailable(
    name: str, roots: Sequence[Path], download_root: Path, notes: Sequence[str]
) -> DatasetUnavailableError:
    searched = "\n".join(f"  {d}" for d in _candidate_dirs(name, roots))
    files = ", ".join(" or ".join(accepted) for accepted in _sources()[name].files.values())
    return DatasetUnavailableError(
        "\n".join(
            [
                f"dataset {name!r} is not available locally. Searched these directories:",
                searched,
                *notes,
                "To fix this, either:",
                f"  1. put the official files ({files}) into one of the directories above, "
                "or add the directory holding them to `dataset.roots` in the config; or",
                "  2. enable the download (`dataset.download: true` in the config, `--download` on the command "
                f"line) on a machine with network access; the files are then saved under {download_root}.",
            ]
        )
    )


# ---------------------------------------------------------------------------------------------------------
# Prepared (cached) datasets


def save_prepared(ds: ImageDataset, path: PathLike) -> None:
    """Save a dataset as one checksummed safetensors file: no pickle, memory-mappable, and atomic on disk."""
    meta = {
        "format_version": PREPARED_FORMAT_VERSION,
        "name": ds.name,
        "classes": list(ds.classes),
        "mean": list(ds.mean),
        "std": list(ds.std),
        "hflip": ds.hflip,
    }
    save_tensors(path, {key: getattr(ds, key) for key in _TENSOR_KEYS}, meta)


def load_prepared(path: PathLike) -> ImageDataset:
    """Load a file written by `save_prepared`; anything unexpected raises DatasetCorruptError naming it."""
    path = Path(path)
    advice = "delete it and rerun the step that prepares it"
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except SafetensorError as exc:
        raise DatasetCorruptError(f"{path}: not a readable safetensors file ({exc}); {advice}") from exc
    missing = [key for key in _TENSOR_KEYS if key not in tensors]
    if missing:
        raise DatasetCorruptError(f"{path}: missing tensors {', '.join(missing)}; {advice}")
    try:
        verify_checksums(path, tensors, header)
    except CheckpointError as exc:
        raise DatasetCorruptError(str(exc)) from exc
    try:
        meta = json.loads(header["hetmerge"])
        version = meta["format_version"]
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetCorruptError(f"{path}: no valid hetmerge metadata ({exc!r}); {advice}") from exc
    if version != PREPARED_FORMAT_VERSION:
        raise DatasetCorruptError(
            f"{path}: prepared-dataset format version {version}, this code reads {PREPARED_FORMAT_VERSION}; {advice}"
        )
    try:
        return ImageDataset(
            name=str(meta["name"]),
            **{key: tensors[key] for key in _TENSOR_KEYS},
            classes=tuple(str(c) for c in meta["classes"]),
            mean=tuple(float(m) for m in meta["mean"]),
            std=tuple(float(s) for s in meta["std"]),
            hflip=bool(meta["hflip"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetCorruptError(f"{path}: invalid prepared dataset ({exc!r}); {advice}") from exc
