"""What the merges that learn share: their training parameters (the FS-Merge paper's trainer by default,
algorithms.md §6.4) and one fit on each task's few-shot slice, checkpointed under the merge's state directory and
recorded in its notes."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from torch import nn

from hetmerge.data.few_shot import TaskImages
from hetmerge.fitting import FitResult, FitSettings, fit
from hetmerge.methods.base import MergeContext, MergeError, MethodParams
from hetmerge.models import MultiTaskNet
from hetmerge.params import ParameterError, Range
from hetmerge.task_targets import CHUNK


@dataclass(frozen=True)
class FitParams(MethodParams):
    """`hetmerge.fitting.FitSettings` as method parameters, at the FS-Merge paper's values: AdamW, lr 1e-4, weight
    decay 1e-3, batches of 128, 100 epochs, the OneCycle warm-up over 30% of the steps, no clipping, no early stop."""

    reset_bn: bool = False
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: Annotated[float, Range(0, open_low=True)] = 1e-4
    weight_decay: Annotated[float, Range(0)] = 1e-3
    momentum: Annotated[float, Range(0, 1, open_high=True)] = 0.0
    epochs: Annotated[int, Range(1)] = 100
    batch_size: Annotated[int, Range(1)] = 128
    schedule: Literal["onecycle", "constant"] = "onecycle"
    warmup: Annotated[float, Range(0, 1)] = 0.3
    clip_grad_norm: Annotated[float, Range(0, open_low=True)] | None = None
    patience: Annotated[int, Range(1)] | None = None
    keep_best: bool = True
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "auto"

    def fit_settings(self) -> FitSettings:
        """The settings `fit` takes; a ParameterError for combinations no single range catches (momentum without
        SGD), which a method's `risk` reports at start-up (parsing accepts each parameter within its range)."""
        try:
            return FitSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FitSettings)})
        except ValueError as err:
            raise ParameterError(str(err)) from err


def digest(tensors: Iterable[torch.Tensor]) -> str:
    """16 hex digits of SHA-256 over the tensors' dtypes, shapes and bytes: what a checkpoint was written for."""
    hashed = hashlib.sha256()
    for t in tensors:
        hashed.update(f"{t.dtype}{tuple(t.shape)}".encode())
        hashed.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return hashed.hexdigest()[:16]


def fit_on_tasks(
    method: str,
    models: Sequence[MultiTaskNet],
    params: Sequence[nn.Parameter],
    loss_for: Callable[[TaskImages], Callable[[torch.Tensor], torch.Tensor]],
    ctx: MergeContext,
    settings: FitSettings,
    desc: str,
    identity: Mapping[str, Any],
) -> FitResult:
    """Train `params` on the context's few-shot slice (on `ctx.device`) and record the result in `ctx.notes[desc]`.

    `loss_for(data)` prepares the loss on `data` (the training or the validation slice: targets are computed once
    there) and returns `loss_on(idx)`, the mean loss on its rows `idx`; the validation loss is its mean over every
    validation row. Batches are drawn with a generator seeded by `ctx.seed`. With `ctx.state_dir`, the fit's state is
    saved to `{state_dir}/{desc}.safetensors` every epoch and resumed from there, provided it was written for the
    same `identity` (the merge's parameters), source models (`models`, by their weights), few-shot data and seed.
    """
    if not re.fullmatch(r"[\w.-]+", desc):
        raise ValueError(f"fit description {desc!r} names a checkpoint file: use letters, digits, '_', '.', '-'")
    few = ctx.require_few_shot(f"method {method!r}")
    if few.val.names != few.train.names:
        raise MergeError(
            f"method {method!r}: the few-shot training slice has tasks {list(few.train.names)} but the validation "
            f"slice {list(few.val.names)}"
        )
    for part, data in (("training", few.train), ("validation", few.val)):
        data.require_tasks(data.names, f"method {method!r}, few-shot {part} slice")
    checkpoint, run = None, {}
    if ctx.state_dir is not None:
        checkpoint = ctx.state_dir / f"{desc}.safetensors"
        run = {
            "method": method,
            "merge": dict(identity),
            "models": digest(t for m in models for t in m.state_dict().values()),
            "data": digest(t for d in (few.train, few.val) for t in (d.images, d.tasks)),
            "tasks": list(few.train.names),
            "seed": ctx.seed,
        }
    few = few.to(ctx.device)
    train_loss, val_rows = loss_for(few.train), loss_for(few.val)
    val_index = torch.arange(len(few.val.images), device=ctx.device)

    def val_loss() -> float:
        return float(sum(val_rows(idx) * len(idx) for idx in val_index.split(CHUNK))) / len(val_index)

    train_index = torch.arange(len(few.train.images), device=ctx.device)
    generator = torch.Generator().manual_seed(ctx.seed)
    result = fit(
        params, train_loss, train_index, val_loss, settings, generator, desc=desc, checkpoint=checkpoint, identity=run
    )
    ctx.notes[desc] = result.record()
    return result
