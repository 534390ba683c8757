"""Training of one base model on one task: seeded, resumable, checkpointed every epoch."""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from hetmerge.checkpoint import CheckpointError, load_tensors, save_tensors
from hetmerge.data import ImageDataset, TaskSplit, iterate_batches, make_label_map
from hetmerge.models import MultiTaskNet
from hetmerge.params import as_dict


@dataclass(frozen=True)
class TrainSettings:
    """SGD with linear warm-up then linear decay to zero per step, as in the ZipIt!/MuDSC training code."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    augment: bool = False
    label_smoothing: float = 0.0


def lr_at(step: int, steps_per_epoch: int, settings: TrainSettings) -> float:
    """Piecewise-linear schedule: 0 → lr over the warm-up, then lr → 0 at the last step."""
    total = settings.epochs * steps_per_epoch
    warmup = settings.warmup_epochs * steps_per_epoch
    if step < warmup:
        return settings.lr * step / warmup
    return settings.lr * max(0.0, (total - step) / max(1.0, total - warmup))


def make_deterministic(seed: int, device: torch.device) -> None:
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def _fingerprint(model: MultiTaskNet, task: str, settings: TrainSettings, seed: int, n_train: int) -> str:
    blob = json.dumps(
        {"model": model.describe(), "task": task, "train": as_dict(settings), "seed": seed, "n": n_train},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _optimizer_state(optimizer: torch.optim.SGD, params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    state = {}
    for i, p in enumerate(params):
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            state[f"optimizer.{i}"] = buf
    return state


def train_model(
    model: MultiTaskNet,
    data: ImageDataset,
    split: TaskSplit,
    task: str,
    settings: TrainSettings,
    seed: int,
    device: torch.device,
    resume_path: Path | None = None,
) -> list[dict[str, Any]]:
    """Train `model`'s head for `task` (and its body) on that task's training indices.

    With `resume_path`, the full training state is written there atomically after every epoch and
    picked up again on restart, provided the run's fingerprint (model, task, settings, seed, data) matches.
    Returns the per-epoch history.
    """
    if task not in model.heads:
        raise ValueError(f"model has no head for task {task!r} (heads: {list(model.heads)})")
    task_info = split.task(task)
    indices = torch.as_tensor(split.train_indices[task], dtype=torch.long)
    lut = make_label_map(task_info.label_map, data.num_classes)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    steps_per_epoch = len(indices) // settings.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"task {task!r} has {len(indices)} training images, fewer than one batch")
    fingerprint = _fingerprint(model, task, settings, seed, len(indices))
    start_epoch, history = 0, []
    if resume_path is not None and resume_path.exists():
        try:
            state, meta = load_tensors(resume_path)
        except CheckpointError as err:
            print(f"ignoring unreadable resume state: {err}", file=sys.stderr)
        else:
            if meta.get("fingerprint") == fingerprint:
                model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
                for i, p in enumerate(params):
                    if f"optimizer.{i}" in state:
                        optimizer.state[p]["momentum_buffer"] = state[f"optimizer.{i}"].to(device)
                generator.set_state(state["generator"])
                start_epoch, history = meta["epoch"], meta["history"]
                print(f"resuming from {resume_path} after epoch {start_epoch}", file=sys.stderr)

    head = model.heads[task]
    for epoch in range(start_epoch, settings.epochs):
        model.train()
        t0 = time.perf_counter()
        total_loss = correct = seen = 0.0
        batches = iterate_batches(
            data.train_images,
            data.train_labels,
            indices,
            settings.batch_size,
            data.mean,
            data.std,
            generator=generator,
            augment=settings.augment,
            hflip=data.hflip,
            drop_last=True,
            device=device,
            label_map=lut,
        )
        bar = tqdm(
            batches,
            total=steps_per_epoch,
            desc=f"{task} epoch {epoch + 1}/{settings.epochs}",
            file=sys.stderr,
            mininterval=5.0,
            leave=False,
        )
        for step_in_epoch, (x, y) in enumerate(bar):
            lr = lr_at(epoch * steps_per_epoch + step_in_epoch, steps_per_epoch, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = head(model.body(x))
            loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        if not math.isfinite(total_loss):
            raise FloatingPointError(f"training diverged in epoch {epoch + 1} (loss {total_loss}); lower the lr")
        record = {
            "epoch": epoch + 1,
            "loss": total_loss / seen,
            "train_acc": correct / seen,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        history.append(record)
        print(
            f"[{task}] epoch {epoch + 1}/{settings.epochs} loss {record['loss']:.4f} "
            f"train acc {record['train_acc']:.4f} ({record['seconds']:.1f}s)",
            file=sys.stderr,
        )
        if resume_path is not None:
            state = {f"model.{k}": v for k, v in model.state_dict().items()}
            state.update(_optimizer_state(optimizer, params))
            state["generator"] = generator.get_state()
            save_tensors(resume_path, state, {"epoch": epoch + 1, "fingerprint": fingerprint, "history": history})
    model.eval()
    return history
