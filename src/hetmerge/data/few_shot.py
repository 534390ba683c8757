"""Few-shot task data for the merges that learn (FS-Merge, knowledge distillation, RegMean's Gram matrices).

FS-Merge (algorithms.md §6.4) sees a small slice of every task's training images, tagged with the task each image
belongs to and never with its label: `n` original images per task, plus `aug_factor` augmented copies of each, and a
held-out set per task for the validation loss that early stopping and model selection read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hetmerge.data.batches import _random_crop_flip, channel_stats


@dataclass(frozen=True)
class TaskImages:
    """Images with the index (into `names`) of the task each one comes from; `labels` (class index in its task's
    head) are kept for the methods that may use them, FS-Merge never does."""

    images: torch.Tensor  # (n, C, H, W), normalised model inputs
    tasks: torch.Tensor  # (n,) int64 index into `names`
    names: tuple[str, ...]
    labels: torch.Tensor | None = None  # (n,) int64

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.tasks.shape != (n,) or (self.labels is not None and self.labels.shape != (n,)):
            raise ValueError(
                f"{n} images but task ids of shape {tuple(self.tasks.shape)}"
                + ("" if self.labels is None else f" and labels of shape {tuple(self.labels.shape)}")
            )
        if n and (int(self.tasks.min()) < 0 or int(self.tasks.max()) >= len(self.names)):
            raise ValueError(f"task ids outside 0..{len(self.names) - 1} (tasks {list(self.names)})")

    def of(self, task: str) -> torch.Tensor:
        """The images of `task`."""
        return self.images[self.tasks == self.names.index(task)]

    def to(self, device: torch.device) -> TaskImages:
        labels = None if self.labels is None else self.labels.to(device)
        return TaskImages(self.images.to(device), self.tasks.to(device), self.names, labels)

    def require_tasks(self, tasks: tuple[str, ...], why: str) -> None:
        """Every task in `tasks` has at least one image, else an error naming the task without any."""
        counts = dict(zip(self.names, torch.bincount(self.tasks, minlength=len(self.names)).tolist(), strict=True))
        for task in tasks:
            if counts.get(task, 0) == 0:
                raise ValueError(f"{why}: task {task!r} has no images (images per task: {counts})")


@dataclass(frozen=True)
class FewShot:
    """The training slice (originals then their augmented copies) and the held-out validation slice."""

    train: TaskImages
    val: TaskImages
    originals: int  # original images per task in `train`
    aug_factor: int  # augmented copies per original in `train`

    def to(self, device: torch.device) -> FewShot:
        return FewShot(self.train.to(device), self.val.to(device), self.originals, self.aug_factor)


AUGMENT_KINDS = ("grayscale", "solarize", "blur")
"""The photometric augmentations of FS-Merge's few-shot copies; each copy gets exactly one, drawn uniformly."""
CROP_PADDING = 4  # reflect padding of the random crop, in pixels
SOLARIZE_THRESHOLD = 0.5  # in [0, 1] pixels; on k/255 pixels the same as PIL's solarize at its default 128
BLUR_KERNEL = 3  # side of the Gaussian blur kernel
BLUR_SIGMA = (0.1, 2.0)  # range of each copy's blur sigma (torchvision's GaussianBlur default, the paper's radius)
_PIXEL_SLACK = 1e-3  # how far outside [0, 1] un-normalised pixels may stray by rounding before they are an error


def _grayscale(pixels: torch.Tensor) -> torch.Tensor:
    """torchvision's `rgb_to_grayscale` with 3 output channels; the identity on 1-channel images, which are
    already grey."""
    channels = pixels.shape[1]
    if channels == 1:
        return pixels
    if channels != 3:
        raise ValueError(f"grayscale needs 1- or 3-channel images, got {channels} channels")
    weights = torch.tensor([0.2989, 0.587, 0.114], dtype=pixels.dtype, device=pixels.device)
    return torch.einsum("nchw,c->nhw", pixels, weights)[:, None].expand_as(pixels)


def _solarize(pixels: torch.Tensor) -> torch.Tensor:
    """torchvision's `solarize` of [0, 1] pixels: every pixel at or above the threshold is inverted."""
    return torch.where(pixels >= SOLARIZE_THRESHOLD, 1.0 - pixels, pixels)


def _blur(pixels: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """torchvision's `gaussian_blur` (BLUR_KERNEL square kernel, reflect padding) with its own `sigma` per image:
    one depthwise convolution with a kernel per (image, channel), since torchvision takes one sigma per call."""
    n, c, h, w = pixels.shape
    lim = (BLUR_KERNEL - 1) / (2.0 * math.sqrt(2.0))  # torchvision's kernel support
    x = torch.linspace(-lim, lim, BLUR_KERNEL, dtype=pixels.dtype, device=pixels.device)
    kernel1d = torch.softmax(-(x / sigma.to(pixels)[:, None]).pow(2), dim=1)  # (n, k)
    kernel2d = kernel1d[:, :, None] * kernel1d[:, None, :]  # (n, k, k)
    half = BLUR_KERNEL // 2
    padded = F.pad(pixels.reshape(1, n * c, h, w), (half, half, half, half), mode="reflect")
    blurred = F.conv2d(padded, kernel2d.repeat_interleave(c, dim=0)[:, None], groups=n * c).reshape(n, c, h, w)
    return blurred.clamp_(0.0, 1.0)  # a convex combination of pixels, but rounding may overshoot 1 by an ulp


def _photometric(pixels: torch.Tensor, kinds: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Apply to every image the augmentation `kinds[i]` (index into AUGMENT_KINDS), blurring with `sigma[i]`:
    a loop over the kinds, each applied once to all the images that drew it."""
    out = pixels.clone()
    for k, kind in enumerate(AUGMENT_KINDS):
        rows = (kinds == k).nonzero().squeeze(1).to(pixels.device)
        if rows.numel() == 0:
            continue
        chosen = pixels[rows]
        if kind == "grayscale":
            out[rows] = _grayscale(chosen)
        elif kind == "solarize":
            out[rows] = _solarize(chosen)
        else:
            out[rows] = _blur(chosen, sigma[rows.cpu()])
    return out


def augment_pixels(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """FS-Merge's augmentation (algorithms.md §6.4) of [0, 1] pixels (N, C, H, W), vectorised over the batch:
    a random crop of the same size from the image reflect-padded by CROP_PADDING, a horizontal flip with
    probability 1/2, then one of AUGMENT_KINDS drawn uniformly per image. Every draw comes from `generator`
    (crop offsets, flips, kinds, then a blur sigma for every image, blurred or not, so the draws do not depend
    on which kinds came up). The result stays in [0, 1]: every step is a crop, an inversion or a convex
    combination of pixels.
    """
    n, c, h, w = pixels.shape
    if c not in (1, 3):  # checked up front, not only when grayscale is drawn
        raise ValueError(f"FS-Merge's augmentation needs 1- or 3-channel images, got {c} channels")
    if min(h, w) <= CROP_PADDING:
        raise ValueError(f"reflect padding by {CROP_PADDING} needs images larger than that, got {h}x{w}")
    cropped = _random_crop_flip(pixels, CROP_PADDING, True, generator, mode="reflect")
    kinds = torch.randint(len(AUGMENT_KINDS), (n,), generator=generator)
    low, high = BLUR_SIGMA
    sigma = low + (high - low) * torch.rand(n, generator=generator)
    return _photometric(cropped, kinds, sigma)


def augment_copies(
    images: torch.Tensor, copies: int, generator: torch.Generator, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """`copies` augmented versions of every normalised image (N, C, H, W), as FS-Merge's few-shot copies.

    The output is copy-major, (copies * N, C, H, W): rows k*N .. (k+1)*N - 1 are copy k of images 0..N-1. The
    images are un-normalised with the per-channel `mean`/`std` they were normalised with (as
    `hetmerge.data.batches.normalize` does), augmented by `augment_pixels`, and normalised again. Pixels that
    un-normalise to more than rounding error outside [0, 1] mean the wrong `mean`/`std` and raise an error.
    The paper flips every dataset, digits included, and so does this.
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be float (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if copies < 0:
        raise ValueError(f"copies must be >= 0, got {copies}")
    mean_t, std_t = channel_stats(mean, std, images.device)
    if len(mean_t) != images.shape[1]:
        raise ValueError(f"mean/std have {len(mean_t)} values for {images.shape[1]} channels")
    pixels = images * std_t + mean_t
    if pixels.numel() and (float(pixels.min()) < -_PIXEL_SLACK or float(pixels.max()) > 1 + _PIXEL_SLACK):
        raise ValueError(
            f"images un-normalise to pixels in [{float(pixels.min()):.3g}, {float(pixels.max()):.3g}], outside "
            f"[0, 1]: were they normalised with mean {list(mean)} and std {list(std)}?"
        )
    augmented = augment_pixels(pixels.clamp_(0.0, 1.0).repeat(copies, 1, 1, 1), generator)
    return (augmented - mean_t) / std_t


def few_shot_indices(
    pool_sizes: Mapping[str, int], originals: int, val_per_task: int, generator: torch.Generator
) -> dict[str, tuple[list[int], list[int]]]:
    """Which rows of each task's pool to take: (training originals, validation), in the order of `pool_sizes`.

    One random permutation per task (drawn in task order from `generator`): its first `originals` entries are the
    training originals, its last `val_per_task` the validation images. A larger `originals` with the same seed
    therefore extends a smaller draw, and the validation rows do not depend on `originals` at all. This is the
    first step of `draw_few_shot`; a caller that loads only the chosen rows calls it and then
    `assemble_few_shot` with the same generator, and gets the same `FewShot`.
    """
    if not pool_sizes:
        raise ValueError("a few-shot slice needs at least one task")
    if originals < 1:
        raise ValueError(f"originals must be >= 1 image per task, got {originals}")
    if val_per_task < 1:
        raise ValueError(f"val_per_task must be >= 1 image per task, got {val_per_task}")
    for task, size in pool_sizes.items():
        if size < originals + val_per_task:
            raise ValueError(
                f"task {task!r} has {size} images, fewer than {originals} originals + {val_per_task} validation"
            )
    drawn = {}
    for task, size in pool_sizes.items():
        order = torch.randperm(size, generator=generator)
        drawn[task] = (order[:originals].tolist(), order[size - val_per_task :].tolist())
    return drawn


def _task_images(images: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor] | None) -> TaskImages:
    """All tasks' images concatenated in task order, with their task ids (and labels)."""
    names = tuple(images)
    stacked = torch.cat(list(images.values()))
    counts = torch.tensor([len(v) for v in images.values()], device=stacked.device)
    tasks = torch.repeat_interleave(torch.arange(len(names), device=stacked.device), counts)
    return TaskImages(stacked, tasks, names, None if labels is None else torch.cat([labels[t] for t in names]))


def _check_labels(what: str, images: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor] | None) -> None:
    if labels is None:
        return
    if list(labels) != list(images):
        raise ValueError(f"{what} labels are for tasks {list(labels)}, the images for tasks {list(images)}")
    for task, values in labels.items():
        if values.shape != (len(images[task]),):
            raise ValueError(f"task {task!r}: {len(images[task])} {what} images but labels of shape {values.shape}")


def assemble_few_shot(
    originals: Mapping[str, torch.Tensor],
    val: Mapping[str, torch.Tensor],
    aug_factor: int,
    generator: torch.Generator,
    mean: Sequence[float],
    std: Sequence[float],
    originals_labels: Mapping[str, torch.Tensor] | None = None,
    val_labels: Mapping[str, torch.Tensor] | None = None,
) -> FewShot:
    """The `FewShot` of already chosen normalised images per task (the same number of originals in every task).

    train = the originals of all tasks in task order, then `aug_factor` augmented copies of that block
    (`augment_copies`, copy-major: train row (k + 1) * n + i is copy k of original i, n originals in all);
    val = the validation images, not augmented.
    """
    if not originals:
        raise ValueError("a few-shot slice needs at least one task")
    if list(val) != list(originals):
        raise ValueError(f"validation images are for tasks {list(val)}, the originals for tasks {list(originals)}")
    if aug_factor < 0:
        raise ValueError(f"aug_factor must be >= 0, got {aug_factor}")
    counts = {task: len(images) for task, images in originals.items()}
    if min(counts.values()) < 1 or len(set(counts.values())) != 1:
        raise ValueError(f"every task needs the same number (>= 1) of original images, got {counts}")
    for task, images in val.items():
        if len(images) < 1:
            raise ValueError(f"task {task!r} has no validation images")
    shapes = {task: tuple(images.shape[1:]) for task, images in (*originals.items(), *val.items())}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"the tasks' images differ in shape: {shapes}")
    _check_labels("original", originals, originals_labels)
    _check_labels("validation", val, val_labels)
    base = _task_images(originals, originals_labels)
    copies = augment_copies(base.images, aug_factor, generator, mean, std)
    train = TaskImages(
        torch.cat([base.images, copies]),
        base.tasks.repeat(aug_factor + 1),
        base.names,
        None if base.labels is None else base.labels.repeat(aug_factor + 1),
    )
    return FewShot(train, _task_images(val, val_labels), next(iter(counts.values())), aug_factor)


def draw_few_shot(
    pools: Mapping[str, torch.Tensor],
    originals: int,
    aug_factor: int,
    val_per_task: int,
    generator: torch.Generator,
    mean: Sequence[float],
    std: Sequence[float],
    labels: Mapping[str, torch.Tensor] | None = None,
) -> FewShot:
    """FS-Merge's few-shot slice drawn from each task's pool of normalised training images (tasks in the order
    of `pools`): `originals` images per task for training plus `aug_factor` augmented copies of each, and
    `val_per_task` other images per task, not augmented, for the validation loss. The rows come from
    `few_shot_indices` (nested in `originals`, validation independent of it), the rest from `assemble_few_shot`.
    `labels[task]` are the pool's labels, carried along for the methods that use them.
    """
    _check_labels("pool", pools, labels)
    rows = few_shot_indices({task: len(images) for task, images in pools.items()}, originals, val_per_task, generator)

    def pick(source: Mapping[str, torch.Tensor], which: int) -> dict[str, torch.Tensor]:
        return {task: source[task][torch.tensor(rows[task][which], dtype=torch.int64)] for task in pools}

    return assemble_few_shot(
        pick(pools, 0),
        pick(pools, 1),
        aug_factor,
        generator,
        mean,
        std,
        None if labels is None else pick(labels, 0),
        None if labels is None else pick(labels, 1),
    )
