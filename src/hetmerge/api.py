"""The library entry point: merge your own models without Snakemake."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from hetmerge.merged import MergedModel
from hetmerge.methods import MergeContext, build_method
from hetmerge.models import MultiTaskNet


def _input_batches(data: Iterable[Any], device: torch.device) -> Callable[[], Iterator[torch.Tensor]]:
    """Turn a re-iterable loader of `x` or `(x, y, ...)` batches into fresh passes of `x` on `device`."""

    def passes() -> Iterator[torch.Tensor]:
        for batch in data:
            x = batch[0] if isinstance(batch, list | tuple) else batch
            yield x.to(device)

    return passes


def merge(
    models: Sequence[MultiTaskNet],
    method: str,
    params: Mapping[str, Any] | None = None,
    *,
    data: Iterable[Any] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> MergedModel:
    """Merge `models` with a registered method.

    `data` is a re-iterable loader (e.g. a torch DataLoader) over held-out images used for activation
    statistics and BatchNorm reset; each pass iterates it again. Returns a module mapping an input batch to
    a dict of per-task logits.
    """
    device = torch.device(device)
    ctx = MergeContext(device=device, batches=None if data is None else _input_batches(data, device), seed=seed)
    return build_method(method, params)(list(models), ctx)
