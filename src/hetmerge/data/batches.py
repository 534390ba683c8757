"""In-memory mini-batching with vectorised augmentation.

The datasets fit in memory as uint8, so a DataLoader's worker processes would only add start-up cost and
non-determinism; batches are gathered by indexing, moved to the device as uint8 (4x less traffic than
float32) and normalised and augmented there. Every random number comes from the caller's generator, so a
training run is reproduced exactly by reseeding it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

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
    batch: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """Random crop of the original size from the zero-padded batch, plus optional horizontal flip.

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
    padded = F.pad(batch, (padding, padding, padding, padding))
    picked = padded[torch.arange(n, device=batch.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return picked.permute(0, 3, 1, 2)  # advanced indexing puts the (n, h, w) index dims first


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
    RandomCrop does before normalisation) and, if `hflip`, a random horizontal flip; it needs a generator
    so that training stays reproducible. `label_map` (see `make_label_map`) turns original class ids into
    a task's local labels; an example of a class outside the task is an error rather than a silent -1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if augment and generator is None:
        raise ValueError("augment=True needs a generator, so that the augmentation is reproducible")
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
        yield normalize(x, mean_t, std_t), y.to(device)
