"""In-memory mini-batching with vectorised augmentation.

The datasets fit in memory as uint8, so a DataLoader's worker processes would only add start-up cost and
non-determinism; batches are gathered by indexing, moved to the device as uint8 (4x less traffic than
float32) and normalised and augmented there. Every random number comes from the caller's generator, so a
training run is reproduced exactly by reseeding it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F


def channel_stats(
    mean: Sequence[float], std: Sequence[float], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std as (C, 1, 1) float32 tensors on `device`: made once, not per batch (on a GPU
    each is a host-to-device copy that stalls the stream)."""
    if len(mean) != len(std):
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} values")
    mean_t, std_t = (torch.tensor(v, dtype=torch.float32, device=device).view(-1, 1, 1) for v in (mean, std))
    return mean_t, std_t


def normalize(
    images_uint8: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Map uint8 pixels of shape (..., C, H, W) to float32 `(x / 255 - mean) / std` per channel.

    `mean`/`std` are sequences, or tensors from `channel_stats` on the images' device.
    """
    channels = images_uint8.shape[-3]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for {channels} channels")
    if not isinstance(mean, torch.Tensor) or not isinstance(std, torch.Tensor):
        mean, std = channel_stats(mean, std, images_uint8.device)
    return (images_uint8.float() / 255 - mean) / std


def make_label_map(label_map: Mapping[int, int], num_classes: int) -> torch.Tensor:
    """Lookup tensor for `iterate_batches`: original class id -> local label, -1 for classes not mapped."""
    table = torch.full((num_classes,), -1, dtype=torch.int64)
    for original, local in label_map.items():
        if not 0 <= original < num_classes:
            raise ValueError(f"class {original} is outside 0..{num_classes - 1}")
        table[original] = local
    return table


def _random_crop_flip(
    batch: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator | None, mode: str = "constant"
) -> torch.Tensor:
    """Random crop of the original size from the batch padded by `F.pad`'s `mode` (zeros by default; FS-Merge's
    few-shot augmentation reflects), plus optional horizontal flip.

    One gather serves the whole batch: every image gets its own row and column index windows (columns
    reversed for flipped images), so there is no per-image Python loop.
    """
    n, _, h, w = batch.shape
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator).to(batch.device)
    rows = offsets[:, :1] + torch.arange(h, device=batch.device)  # (n, h)
    cols = offsets[:, 1:] + torch.arange(w, device=batch.device)  # (n, w)
    if hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(batch.device)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    padded = F.pad(batch, (padding, padding, padding, padding), mode=mode)
    picked = padded[torch.arange(n, device=batch.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return picked.permute(0, 3, 1, 2)  # advanced indexing puts the (n, h, w) index dims first


AUTOAUGMENT_FILL = 128
"""Pixel value that AutoAugment's geometric ops fill uncovered areas with: the paper's grey (torchvision: 0)."""


@functools.cache
def _cifar10_autoaugment() -> tuple[Any, list[tuple[str, int | None]], torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's AutoAugment with the CIFAR-10 policy, whose policy table and op implementations are reused,
    and that table as tensors: the distinct (op, magnitude index) variants, each sub-policy's two variant ids and
    probabilities, and whether each variant's magnitude takes a random sign.

    Built on first use, since importing torchvision.transforms costs seconds.
    """
    from torchvision.transforms.v2 import AutoAugment, AutoAugmentPolicy

    aa = AutoAugment(AutoAugmentPolicy.CIFAR10, fill=AUTOAUGMENT_FILL)
    variants: dict[tuple[str, int | None], int] = {}
    op_ids = torch.tensor([[variants.setdefault((op, m), len(variants)) for op, _, m in pol] for pol in aa._policies])
    probabilities = torch.tensor([[p for _, p, _ in pol] for pol in aa._policies], dtype=torch.float64)
    signed = torch.tensor([aa._AUGMENTATION_SPACE[op][1] and m is not None for op, m in variants])
    return aa, list(variants), op_ids, probabilities, signed


def auto_augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """AutoAugment (CIFAR-10 policy) of a uint8 (N, C, H, W) batch, a sub-policy drawn per image.

    torchvision's `AutoAugment` draws from the global RNG and applies one sub-policy to whatever tensor it is
    given, so on a batch every image would get the same ops. Here every draw of its `forward` (sub-policy,
    whether each of its two ops applies, the sign of a signed magnitude) is made per image from `generator`
    (the global RNG is untouched), and torchvision's own op implementation then runs once per distinct
    (op, magnitude, sign) on the images that drew it: a loop over the variants drawn, never over images.
    """
    aa, variants, op_ids, probabilities, signed = _cifar10_autoaugment()
    n, h, w = batch.shape[0], batch.shape[-2], batch.shape[-1]
    chosen = torch.randint(len(op_ids), (n,), generator=generator)
    applies = torch.rand(n, 2, generator=generator, dtype=torch.float64) <= probabilities[chosen]
    negative = torch.rand(n, 2, generator=generator) < 0.5
    out = batch.clone()
    for slot in range(2):  # the sub-policy's ops in order, as torchvision applies them
        op = op_ids[chosen, slot]
        key = torch.where(applies[:, slot], 2 * op + (negative[:, slot] & signed[op]), -1)
        for k in torch.unique(key[key >= 0]).tolist():
            name, magnitude_index = variants[k // 2]
            magnitudes = aa._AUGMENTATION_SPACE[name][0](10, h, w)
            magnitude = 0.0 if magnitudes is None else float(magnitudes[magnitude_index]) * (-1 if k % 2 else 1)
            rows = (key == k).nonzero().squeeze(1).to(batch.device)
            out[rows] = aa._apply_image_or_video_transform(
                out[rows], name, magnitude, interpolation=aa.interpolation, fill=aa._fill
            )
    return out


def cutmix_box(lam: float, centre_x: int, centre_y: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The (x1, y1, x2, y2) box of torchvision's CutMix: side sqrt(1 - lam) of the image's, centred at the
    drawn point and clipped to the image."""
    r = 0.5 * math.sqrt(1.0 - lam)
    half_w, half_h = int(r * width), int(r * height)
    return (
        max(centre_x - half_w, 0),
        max(centre_y - half_h, 0),
        min(centre_x + half_w, width),
        min(centre_y + half_h, height),
    )


def cutmix(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CutMix of a batch as torchvision.transforms.v2.CutMix does it, with every draw from `generator`.

    One lam ~ Beta(alpha, alpha) and one box per batch; each image gets the box from its predecessor in the
    batch (roll by one: the batch order is already random). Returns the mixed images, the soft targets
    (lam' one-hot own label + (1 - lam') one-hot neighbour's, lam' = 1 - box area / image area) and the
    dominant label of each image (its own where lam' >= 1/2), against which training accuracy is counted.
    Beta is sampled by inverting its CDF at one uniform draw, since torch's Beta takes no generator.
    """
    if alpha <= 0:
        raise ValueError(f"cutmix needs a Beta concentration alpha > 0, got {alpha}")
    from scipy.special import betaincinv  # here: scipy costs start-up time that most jobs never need

    h, w = images.shape[-2:]
    lam = float(betaincinv(alpha, alpha, torch.rand((), generator=generator, dtype=torch.float64).item()))
    centre_x = int(torch.randint(w, (), generator=generator))
    centre_y = int(torch.randint(h, (), generator=generator))
    x1, y1, x2, y2 = cutmix_box(lam, centre_x, centre_y, h, w)
    kept = 1.0 - (x2 - x1) * (y2 - y1) / (w * h)
    mixed = images.clone()
    mixed[..., y1:y2, x1:x2] = images.roll(1, 0)[..., y1:y2, x1:x2]
    own = F.one_hot(labels, num_classes).float()
    targets = own.roll(1, 0).mul_(1.0 - kept).add_(own.mul(kept))
    return mixed, targets, labels if kept >= 0.5 else labels.roll(1, 0)


def iterate_batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: Sequence[int] | torch.Tensor,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    augment: bool = False,
    autoaugment: bool = False,
    hflip: bool = False,
    drop_last: bool = False,
    device: torch.device | str = "cpu",
    label_map: torch.Tensor | None = None,
    padding: int = 4,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (normalised float32 x, int64 y) batches of `images[indices]` on `device`.

    With a `generator` the indices are reshuffled on every call (one `randperm` per epoch); without one
    their order is kept, as evaluation needs. `augment` applies a random crop of the original size from
    the image zero-padded by `padding` pixels (padding is black in raw pixel space, as torchvision's
    RandomCrop does before normalisation) and, if `hflip`, a random horizontal flip; `autoaugment` then applies
    `auto_augment` to the uint8 batch, as the paper's transforms do after crop and flip. Both need a generator
    so that training stays reproducible. `label_map` (see `make_label_map`) turns original class ids into
    a task's local labels; an example of a class outside the task is an error rather than a silent -1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for flag, on in (("augment", augment), ("autoaugment", autoaugment)):
        if on and generator is None:
            raise ValueError(f"{flag}=True needs a generator, so that the augmentation is reproducible")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    lookup = None if label_map is None else label_map.to(labels.device)
    mean_t, std_t = channel_stats(mean, std, device)
    order = torch.as_tensor(indices, dtype=torch.int64)
    if generator is not None:
        order = order[torch.randperm(len(order), generator=generator)]
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        batch_indices = order[start : start + batch_size]
        y = labels[batch_indices].long()
        if lookup is not None:
            y = lookup[y]
            if bool((y < 0).any()):
                unmapped = sorted(set(labels[batch_indices][y < 0].tolist()))
                raise ValueError(f"label_map has no entry for classes {unmapped} found among the indices")
        x = images[batch_indices].to(device)
        if augment:
            x = _random_crop_flip(x, padding, hflip, generator)
        if autoaugment:
            x = auto_augment(x, generator)
        yield normalize(x, mean_t, std_t), y.to(device)
