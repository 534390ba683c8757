"""One fit loop for every merge that learns (FS-Merge, knowledge distillation, KF-Gradient's levels).

The caller owns the model and the data; `fit` only sees the parameters to train, a loss over a batch of row
indices and a held-out loss. It shuffles with a seeded CPU generator, steps the optimiser and its schedule, stops
early on the held-out loss, keeps the best parameters, and with a checkpoint saves its whole state after every
epoch, so that a rerun after an interruption continues where it stopped and ends bit for bit where an uninterrupted
run ends. The FS-Merge paper's trainer (algorithms.md §6.4) is AdamW under torch's OneCycleLR with a linear anneal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from hetmerge.checkpoint import load_tensors, save_tensors
from hetmerge.progress import Progress, log
from hetmerge.training import _HALF, _load_optimizer_state, _optimizer_state, resolve_precision


@dataclass(frozen=True)
class FitSettings:
    """How `fit` trains. `adam`/`sgd` are torch's plain Adam/SGD (weight decay as an L2 term), `adamw` decouples it;
    `momentum` is SGD's only. `onecycle` is the paper's "warmup" schedule: torch's OneCycleLR with max_lr `lr`, over
    every step of every epoch, a linear anneal and `warmup` as pct_start; it cycles Adam's β1 as torch does by default,
    but leaves SGD's momentum as set (torch would replace it by its 0.85–0.95 cycle). `patience`: stop after this many
    epochs without a lower held-out loss (None: never); `keep_best`: end with the parameters of the lowest held-out
    loss, the starting ones included. `precision` is the autocast dtype of the training steps (hetmerge.training's
    `resolve_precision`: auto is bf16 on CUDA where native, else fp32, so CPU runs stay bit-identical)."""

    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-3
    momentum: float = 0.0
    epochs: int = 100
    batch_size: int = 128
    schedule: Literal["onecycle", "constant"] = "onecycle"
    warmup: float = 0.3
    clip_grad_norm: float | None = None
    patience: int | None = None
    keep_best: bool = True
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "auto"

    def __post_init__(self) -> None:
        choices = {
            "optimizer": ("adamw", "adam", "sgd"),
            "schedule": ("onecycle", "constant"),
            "precision": ("fp32", "bf16", "fp16", "auto"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"fit settings: {name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        rules = (
            ("lr", self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("warmup", 0 <= self.warmup <= 1, "in [0, 1]"),
            ("clip_grad_norm", self.clip_grad_norm is None or self.clip_grad_norm > 0, "> 0 or None"),
            ("patience", self.patience is None or self.patience >= 1, ">= 1 or None"),
        )
        for name, ok, want in rules:
            if not ok:
                raise ValueError(f"fit settings: {name} must be {want}, got {getattr(self, name)!r}")
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(
                f"fit settings: momentum {self.momentum} is SGD's, but the optimizer is {self.optimizer!r}"
            )


@dataclass(frozen=True)
class FitResult:
    """Held-out losses at the start and at the best epoch, epochs run, the best epoch (0: the starting parameters)
    and the epoch a checkpoint resumed from (0: a fresh run)."""

    initial_val_loss: float
    best_val_loss: float
    epochs_run: int
    best_epoch: int
    resumed_from: int

    def record(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def _make_optimizer(params: list[nn.Parameter], s: FitSettings) -> torch.optim.Optimizer:
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)


def _groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The optimiser's hyperparameters per group (lr, betas, …): OneCycleLR rewrites them at every step."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def _as_json(value: Any) -> Any:
    """`value` as JSON gives it back (lists, not tuples), so a saved identity compares to a new one key by key."""
    return json.loads(json.dumps(value, sort_keys=True))


def _mismatch(saved: Mapping[str, Any], ours: Mapping[str, Any]) -> str:
    keys = sorted(k for k in saved.keys() | ours.keys() if saved.get(k) != ours.get(k))
    return "; ".join(f"{k} {saved.get(k)!r} (now {ours.get(k)!r})" for k in keys)


def fit(
    params: Sequence[nn.Parameter],
    loss_on: Callable[[torch.Tensor], torch.Tensor],
    train_index: torch.Tensor,
    val_loss: Callable[[], float],
    settings: FitSettings,
    generator: torch.Generator,
    *,
    desc: str,
    checkpoint: Path | None = None,
    identity: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train `params` (in place) to lower `loss_on(idx)`, the scalar loss on the rows `idx` of the caller's data.

    Each epoch shuffles `train_index` (1-D, on the data's device) with `generator` (a CPU generator) and steps once
    per batch of `batch_size` rows; `val_loss()` is measured without gradients, in full precision, before training
    and after every epoch. With `checkpoint`, the state is written there after every epoch (safetensors + JSON) and
    a run finding it resumes from it, provided it was written for the same `identity`, settings, parameter shapes
    and row count; else a ValueError names the file, which is never silently replaced.
    """
    params = list(params)
    if not params:
        raise ValueError(f"fit {desc}: no parameters to train")
    frozen = [i for i, p in enumerate(params) if not p.requires_grad]
    if frozen:
        raise ValueError(f"fit {desc}: parameter(s) {frozen} do not require gradients")
    if train_index.dim() != 1 or len(train_index) == 0:
        raise ValueError(f"fit {desc}: train_index must be a non-empty 1-D index tensor, got shape {train_index.shape}")
    s = settings
    device = params[0].device
    precision = resolve_precision(s.precision, device)
    autocast = torch.autocast(device.type, dtype=_HALF[precision]) if precision in _HALF else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    optimizer = _make_optimizer(params, s)
    steps = math.ceil(len(train_index) / s.batch_size)
    scheduler = None
    if s.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=s.lr,
            total_steps=s.epochs * steps,
            pct_start=s.warmup,
            anneal_strategy="linear",
            cycle_momentum=s.optimizer != "sgd",
        )
    run = _as_json(
        {
            "identity": dict(identity or {}),
            "settings": dataclasses.asdict(s),
            "precision": precision,
            "shapes": [list(p.shape) for p in params],
            "rows": len(train_index),
        }
    )

    start = best_epoch = waited = 0
    best_state: list[torch.Tensor] | None = None
    if checkpoint is not None and checkpoint.exists():
        state, meta = load_tensors(checkpoint)
        saved = meta.get("fit", {})
        if saved.get("run") != run:
            raise ValueError(
                f"fit {desc}: the checkpoint {checkpoint} was written for another run "
                f"({_mismatch(saved.get('run') or {}, run)}); delete it to start afresh"
            )
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(state[f"param.{i}"])
        if s.keep_best:
            best_state = [state[f"best.{i}"].to(p.device) for i, p in enumerate(params)]
        _load_optimizer_state(optimizer, params, state)
        for group, hyper in zip(optimizer.param_groups, saved["groups"], strict=True):
            group.update({k: tuple(v) if isinstance(v, list) else v for k, v in hyper.items()})
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        if scaler.is_enabled():
            scaler.load_state_dict(saved["grad_scaler"])
        generator.set_state(state["generator"])
        start, best_epoch, waited = saved["epoch"], saved["best_epoch"], saved["waited"]
        initial, best = saved["initial_val_loss"], saved["best_val_loss"]
        print(f"{desc}: resuming from {checkpoint} after epoch {start}", file=sys.stderr)
    else:
        with torch.no_grad():
            initial = best = float(val_loss())
        if s.keep_best:
            best_state = [p.detach().clone() for p in params]

    resumed_from, epoch = start, start
    stopped = s.patience is not None and waited >= s.patience
    with Progress(desc, total=s.epochs, unit="epoch", initial=start) as progress:
        while epoch < s.epochs and not stopped:
            shuffled = train_index[torch.randperm(len(train_index), generator=generator).to(train_index.device)]
            total = torch.zeros((), device=device)
            lr = 0.0
            for idx in shuffled.split(s.batch_size):
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    loss = loss_on(idx)
                scaler.scale(loss).backward()
                if s.clip_grad_norm is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(params, s.clip_grad_norm)
                lr = float(optimizer.param_groups[0]["lr"])
                scaler.step(optimizer)
                scaler.update()
                if scheduler is not None:
                    scheduler.step()
                total = total + loss.detach().float() * len(idx)
            epoch += 1
            train_loss = float(total) / len(train_index)
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"fit {desc}: the training loss is {train_loss} in epoch {epoch}; lower lr")
            with torch.no_grad():
                current = float(val_loss())
            if current < best:
                best, best_epoch, waited = current, epoch, 0
                if s.keep_best:
                    best_state = [p.detach().clone() for p in params]
            else:
                waited += 1
                stopped = s.patience is not None and waited >= s.patience
            if checkpoint is not None:
                tensors = {f"param.{i}": p.detach() for i, p in enumerate(params)}
                if best_state is not None:
                    tensors.update({f"best.{i}": b for i, b in enumerate(best_state)})
                tensors.update(_optimizer_state(optimizer, params))
                tensors["generator"] = generator.get_state()
                saved = {
                    "run": run,
                    "epoch": epoch,
                    "best_epoch": best_epoch,
                    "waited": waited,
                    "initial_val_loss": initial,
                    "best_val_loss": best,
                    "groups": _groups(optimizer),
                    "scheduler": None if scheduler is None else scheduler.state_dict(),
                    "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
                }
                save_tensors(checkpoint, tensors, {"fit": saved})
            progress.update()
            log(f"{desc} epoch {epoch}/{s.epochs}: train {train_loss:.4g} val {current:.4g} lr {lr:.3g}")
    if best_state is not None:
        with torch.no_grad():
            for p, kept in zip(params, best_state, strict=True):
                p.copy_(kept)
    return FitResult(initial, best, epoch, best_epoch, resumed_from)
