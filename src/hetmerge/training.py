"""Training of one base model on one task: seeded, resumable, checkpointed every epoch."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from torch import nn

from hetmerge.checkpoint import CheckpointError, load_tensors, save_tensors
from hetmerge.data import ImageDataset, Task, TaskSplit, iterate_batches, make_label_map
from hetmerge.data.batches import cutmix
from hetmerge.models import MultiTaskNet
from hetmerge.params import Range, as_dict
from hetmerge.progress import Progress, log

Precision = Literal["fp32", "bf16", "fp16"]
_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainSettings:
    """SGD with linear warm-up then linear decay to zero per step, as in the ZipIt!/MuDSC training code, by default.

    The recipe options reproduce the Neuron Interpolation paper's training (algorithms.md §5.3): `optimizer`
    adam (torch's Adam with `beta1`/`beta2`, weight decay as its L2 term; `momentum` is SGD's only, the betas
    Adam's only), `schedule` cosine (the same warm-up, then a half cosine from lr to `min_lr`; the linear
    schedule decays to `min_lr` too), `autoaugment` (CIFAR-10 policy, drawn per image, after the crop and flip
    of `augment`) and `cutmix` (the Beta concentration of CutMix on every batch; 0 = off). At their defaults
    they change nothing, and `describe` leaves them out, so earlier settings keep their fingerprints.

    `precision` is the autocast dtype of the forward pass and the loss (fp16 adds a gradient scaler);
    `auto` is bf16 on a CUDA device with native bf16 and fp32 elsewhere, so default CPU runs stay
    bit-identical fp32. `channels_last` stores convolutional nets and their input batches NHWC, the layout
    tensor cores prefer; `auto` uses it on CUDA only, and nets without Conv2d are never converted.
    """

    epochs: Annotated[int, Range(1)] = 10
    batch_size: Annotated[int, Range(1)] = 128
    lr: Annotated[float, Range(0, open_low=True)] = 0.1
    momentum: Annotated[float, Range(0, 1, open_high=True)] = 0.9
    weight_decay: Annotated[float, Range(0)] = 5e-4
    warmup_epochs: Annotated[float, Range(0)] = 1.0
    augment: bool = False
    label_smoothing: Annotated[float, Range(0, 1)] = 0.0
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"
    optimizer: Literal["sgd", "adam"] = "sgd"
    beta1: Annotated[float, Range(0, 1, open_high=True)] = 0.9
    beta2: Annotated[float, Range(0, 1, open_high=True)] = 0.999
    schedule: Literal["linear", "cosine"] = "linear"
    min_lr: Annotated[float, Range(0)] = 0.0
    autoaugment: bool = False
    cutmix: Annotated[float, Range(0)] = 0.0

    def describe(self) -> dict[str, Any]:
        """`as_dict`, less the recipe options at their defaults: the training fingerprints and the pipeline's
        model paths hashed from it stay what they were before those options existed."""
        return {k: v for k, v in as_dict(self).items() if k not in _RECIPE_DEFAULTS or v != _RECIPE_DEFAULTS[k]}


_RECIPE_DEFAULTS = {
    f.name: f.default
    for f in dataclasses.fields(TrainSettings)
    if f.name in ("optimizer", "beta1", "beta2", "schedule", "min_lr", "autoaugment", "cutmix")
}


def lr_at(step: int, steps_per_epoch: int, settings: TrainSettings) -> float:
    """Linear warm-up 0 → lr, then lr → min_lr at the last step, linearly or along a half cosine."""
    total = settings.epochs * steps_per_epoch
    warmup = settings.warmup_epochs * steps_per_epoch
    if step < warmup:
        return settings.lr * step / warmup
    if settings.schedule == "cosine":
        left = 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1.0, total - warmup))))
    else:
        left = max(0.0, (total - step) / max(1.0, total - warmup))
    return settings.min_lr + (settings.lr - settings.min_lr) * left  # with min_lr 0, exactly lr * left


def make_optimizer(params: list[nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    """The optimizer of `settings`: Adam as in the paper's torch code (L2 weight decay), or SGD with momentum."""
    if settings.optimizer == "adam":
        betas = (settings.beta1, settings.beta2)
        return torch.optim.Adam(params, lr=settings.lr, betas=betas, weight_decay=settings.weight_decay)
    return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


def _autocast_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether autocast on `device` computes in `dtype`: an unsupported dtype only warns and runs fp32."""
    x = torch.ones(2, 2, device=device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device.type, dtype=dtype):
                return (x @ x).dtype == dtype
    except RuntimeError:  # e.g. bf16 on a CUDA device without it
        return False


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """The precision that `precision` (a TrainSettings value) trains with on `device`.

    `auto` never picks a half precision on the CPU, where the default must reproduce fp32 runs bit for bit;
    an explicit half precision that autocast cannot run on `device` is an error rather than a silent fp32.
    """
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    if precision == "fp32":
        return "fp32"
    if precision not in _HALF:
        raise ValueError(f"precision must be one of fp32, bf16, fp16, auto; got {precision!r}")
    if not _autocast_runs(device, _HALF[precision]):
        raise ValueError(
            f"precision {precision!r}: torch {torch.__version__} has no {precision} autocast on {device}; use fp32"
        )
    return precision  # type: ignore[return-value]


def resolve_channels_last(setting: bool | str, model: MultiTaskNet, device: torch.device) -> bool:
    """Whether training stores `model` and its inputs channels-last: only conv bodies gain from it.

    `auto` keeps the CPU on the default layout, whose results are the reference for determinism.
    """
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.body.modules())
    if setting == "auto":
        return has_conv and device.type == "cuda"
    return setting is True and has_conv


def make_deterministic(seed: int, device: torch.device) -> None:
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def _run_identity(model: MultiTaskNet, task: str, settings: TrainSettings, seed: int, n_train: int) -> dict[str, Any]:
    """What a resume state must have been written for: the model, task, settings, seed and data size, as JSON
    gives it back from the state's metadata (lists, not tuples), so the two compare key by key."""
    run = {"model": model.describe(), "task": task, "train": settings.describe(), "seed": seed, "n": n_train}
    return json.loads(json.dumps(run))


def _fingerprint(run: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:16]


_RUN_PARTS = {"model": "model", "task": "task", "train": "training settings", "seed": "seed", "n": "training images"}


def _mismatch(saved: dict[str, Any], run: dict[str, Any]) -> str:
    """Which parts of the run a resume state was written for differ from this run's, in words."""
    if not isinstance(saved.get("run"), dict):  # a state of an older version records only the fingerprint
        return f"settings with fingerprint {saved.get('fingerprint')!r}, not this run's {_fingerprint(run)!r}"
    parts = []
    for key, words in _RUN_PARTS.items():
        theirs, ours = saved["run"].get(key), run[key]
        if theirs == ours:
            continue
        if isinstance(ours, dict) and isinstance(theirs, dict):
            keys = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            changes = ", ".join(f"{k} {theirs.get(k)!r} (now {ours.get(k)!r})" for k in keys)
            parts.append(f"other {words}: {changes}")
        else:
            parts.append(f"{words} {theirs!r} (now {ours!r})")
    return "; ".join(parts) or "another run"


def _optimizer_state(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter tensors: SGD's momentum buffer as `optimizer.{i}` (the key of states written
    before Adam existed), any other (Adam's exp_avg, exp_avg_sq, step) as `optimizer.{i}.{name}`."""
    state = {}
    for i, p in enumerate(params):
        for name, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                state[f"optimizer.{i}" if name == "momentum_buffer" else f"optimizer.{i}.{name}"] = value
    return state


def _load_optimizer_state(
    optimizer: torch.optim.Optimizer, params: list[nn.Parameter], state: dict[str, torch.Tensor]
) -> None:
    """Put back what `_optimizer_state` saved, on each parameter's device; Adam's step stays a CPU scalar, as
    Adam keeps it."""
    for key, value in state.items():
        if key.startswith("optimizer."):
            index, _, name = key.removeprefix("optimizer.").partition(".")
            p = params[int(index)]
            optimizer.state[p][name or "momentum_buffer"] = value if name == "step" else value.to(p.device)


def _task_data(
    data: ImageDataset, indices: torch.Tensor, task: Task, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's training images and local labels, on `device` once, so no step copies or remaps labels."""
    labels = data.train_labels[indices]
    local = make_label_map(task.label_map, data.num_classes)[labels]
    if bool((local < 0).any()):
        unmapped = sorted(set(labels[local < 0].tolist()))
        raise ValueError(f"task {task.name!r} has training images of classes {unmapped} outside the task")
    return data.train_images[indices].to(device), local.to(device)


def train_model(
    model: MultiTaskNet,
    data: ImageDataset,
    split: TaskSplit,
    task: str,
    settings: TrainSettings,
    seed: int,
    device: torch.device,
    resume_path: Path | None = None,
    partition: str | None = None,
) -> list[dict[str, Any]]:
    """Train `model`'s head for `task` (and its body) on that task's training indices, or on the training
    partition `partition` of a same-task split (one model's share of the data, e.g. "B").

    With `resume_path`, the full training state is written there atomically after every epoch and
    picked up again on restart, provided the run's fingerprint (model, task, settings, seed, data) matches;
    a state of another run, or an unreadable one, is reported on stderr and training starts from epoch 1.
    Returns the per-epoch history. Steps read nothing back from the device: the epoch's losses and hits
    stay there until its end.
    """
    if task not in model.heads:
        raise ValueError(f"model has no head for task {task!r} (heads: {list(model.heads)})")
    task_info = split.task(task)
    if partition is None:
        indices = torch.as_tensor(split.train_indices[task], dtype=torch.long)
    elif partition in split.partitions:
        indices = torch.as_tensor(split.partitions[partition], dtype=torch.long)
    else:
        raise ValueError(f"the split has no training partition {partition!r}; it has {sorted(split.partitions)}")
    images, labels = _task_data(data, indices, task_info, device)
    num_classes = len(task_info.classes)
    positions = torch.arange(len(indices), device=device)  # into `images`: shuffled as `indices` were before
    precision = resolve_precision(settings.precision, device)
    channels_last = resolve_channels_last(settings.channels_last, model, device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    if settings.min_lr > settings.lr:
        raise ValueError(f"training settings: min_lr {settings.min_lr} is above lr {settings.lr}; the schedule decays")
    optimizer = make_optimizer(params, settings)
    generator = torch.Generator().manual_seed(seed)
    criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    autocast = torch.autocast(device.type, dtype=_HALF[precision]) if precision in _HALF else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    steps_per_epoch = len(indices) // settings.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"task {task!r} has {len(indices)} training images, fewer than one batch")
    run = _run_identity(model, task, settings, seed, len(indices))
    fingerprint = _fingerprint(run)
    start_epoch, history = 0, []
    if resume_path is not None and resume_path.exists():
        try:
            state, meta = load_tensors(resume_path)
        except CheckpointError as err:
            print(f"ignoring unreadable resume state: {err}; starting from epoch 1", file=sys.stderr)
        else:
            if meta.get("fingerprint") != fingerprint:
                print(
                    f"ignoring resume state {resume_path}: it was written for {_mismatch(meta, run)}; "
                    "starting from epoch 1 (it is overwritten)",
                    file=sys.stderr,
                )
            else:
                model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
                _load_optimizer_state(optimizer, params, state)
                generator.set_state(state["generator"])
                if "grad_scaler" in meta:
                    scaler.load_state_dict(meta["grad_scaler"])
                start_epoch, history = meta["epoch"], meta["history"]
                print(f"resuming from {resume_path} after epoch {start_epoch}", file=sys.stderr)

    head = model.heads[task]
    steps = settings.epochs * steps_per_epoch
    done = start_epoch * steps_per_epoch
    with Progress(f"training {task}", total=steps, unit="batch", initial=done) as progress:
        for epoch in range(start_epoch, settings.epochs):
            model.train()
            t0 = time.perf_counter()
            losses = torch.empty(steps_per_epoch, device=device)
            hits = torch.empty(steps_per_epoch, dtype=torch.long, device=device)
            batches = iterate_batches(
                images,
                labels,
                positions,
                settings.batch_size,
                data.mean,
                data.std,
                generator=generator,
                augment=settings.augment,
                autoaugment=settings.autoaugment,
                hflip=data.hflip,
                drop_last=True,
                device=device,
            )
            for step_in_epoch, (x, y) in enumerate(batches):
                lr = lr_at(epoch * steps_per_epoch + step_in_epoch, steps_per_epoch, settings)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                target = y
                if settings.cutmix > 0:  # soft targets; y becomes each image's dominant label, for the accuracy
                    x, target, y = cutmix(x, y, num_classes, settings.cutmix, generator)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast:
                    logits = head(model.body(x))
                    loss = criterion(logits, target)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                losses[step_in_epoch] = loss.detach()
                hits[step_in_epoch] = (logits.argmax(1) == y).sum()
                progress.update()
            total_loss = 0.0
            for batch_loss in losses.tolist():  # the epoch's one sync; float64 in step order, as per-step .item() was
                total_loss += batch_loss * settings.batch_size
            correct, seen = sum(hits.tolist()), steps_per_epoch * settings.batch_size
            if not math.isfinite(total_loss):
                raise FloatingPointError(f"training diverged in epoch {epoch + 1} (loss {total_loss}); lower the lr")
            record = {
                "epoch": epoch + 1,
                "loss": total_loss / seen,
                "train_acc": correct / seen,
                "seconds": round(time.perf_counter() - t0, 3),
            }
            history.append(record)
            log(
                f"[{task}] epoch {epoch + 1}/{settings.epochs} loss {record['loss']:.4f} "
                f"train acc {record['train_acc']:.4f} ({record['seconds']:.1f}s)"
            )
            if resume_path is not None:
                state = {f"model.{k}": v for k, v in model.state_dict().items()}
                state.update(_optimizer_state(optimizer, params))
                state["generator"] = generator.get_state()
                meta = {"epoch": epoch + 1, "fingerprint": fingerprint, "run": run, "history": history}
                if scaler.is_enabled():
                    meta["grad_scaler"] = scaler.state_dict()
                save_tensors(resume_path, state, meta)
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    model.eval()
    return history
