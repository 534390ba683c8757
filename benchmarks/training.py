"""Benchmark of `hetmerge.training.train_model` against a plain PyTorch training loop.

    python benchmarks/training.py [--arch JSON] [--images N] [--batch-size B] [--epochs E]
                                  [--device cpu cuda] [--precisions fp32 bf16] [--data FILE] [--json]

Both loops train the same freshly initialised model on the same images, with the same batch size, SGD
settings, per-step learning-rate schedule and loss, augmentation off, and the same memory format (what
`channels_last: auto` picks for `train_model`). The plain loop is what one writes by hand: pre-normalised
float32 images on the device, one shuffled index per epoch, forward, cross-entropy, backward, step, under
autocast for bf16, and no metrics. Each row gives the median over `--epochs` epochs after one warm-up
epoch, and `ratio` = train_model / plain (the goal is at most 1.05). `train_model`'s epochs are cut where it
asks for an epoch's batches. CPU rows count the process's CPU time, so that other load on a shared machine
does not skew them (with `--threads 1`, the default, that is the wall time of an idle machine); CUDA rows
count wall time, the plain loop's with a device sync at the end of each epoch (`train_model` syncs there
itself).

The images are synthetic and Fashion-MNIST-like (28×28 grey, 10 classes, a noisy class template each),
built in memory, so the benchmark needs no files; `--data` takes a prepared dataset file
(`hetmerge data`) instead and trains on all its classes as one task.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import hetmerge.training
from hetmerge.data import ImageDataset, Task, TaskSplit, load_prepared, normalize
from hetmerge.models import MultiTaskNet, build_model
from hetmerge.training import TrainSettings, lr_at, make_deterministic, resolve_channels_last, train_model


def synthetic_dataset(n: int, seed: int) -> ImageDataset:
    """`n` learnable 28×28 grey images: one random template per class, plus per-image noise."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.rand(10, 1, 28, 28, generator=gen) * 255
    labels = torch.randint(0, 10, (n + 10,), generator=gen)
    noise = torch.randn(n + 10, 1, 28, 28, generator=gen) * 60
    images = (templates[labels] + noise).clamp(0, 255).to(torch.uint8)
    pixels = images[:n].float() / 255
    return ImageDataset(
        name="synthetic",
        train_images=images[:n],
        train_labels=labels[:n],
        test_images=images[n:],
        test_labels=labels[n:],
        classes=tuple(str(c) for c in range(10)),
        mean=(pixels.mean().item(),),
        std=(pixels.std().item(),),
        hflip=False,
    )


def one_task_split(data: ImageDataset, n: int) -> TaskSplit:
    """A single task "A" over all classes, training on the first `n` images."""
    return TaskSplit(
        dataset=data.name,
        seed=0,
        kind="class_disjoint",
        tasks=(Task("A", tuple(range(data.num_classes))),),
        train_indices={"A": tuple(range(n))},
        merge_indices=(),
        test_indices={"A": ()},
    )


def _clock(device: torch.device) -> Callable[[], float]:
    return time.process_time if device.type == "cpu" else time.perf_counter


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_train_model(
    model: MultiTaskNet, data: ImageDataset, n: int, settings: TrainSettings, device: torch.device, seed: int
) -> list[float]:
    """Seconds per epoch of `train_model`: from one request for an epoch's batches to the next, or the end."""
    clock = _clock(device)
    marks = []
    real = hetmerge.training.iterate_batches

    def marked(*args: Any, **kwargs: Any) -> Any:
        marks.append(clock())
        return real(*args, **kwargs)

    hetmerge.training.iterate_batches = marked
    try:
        train_model(model, data, one_task_split(data, n), "A", settings, seed, device)
    finally:
        hetmerge.training.iterate_batches = real
    marks.append(clock())
    return [end - start for start, end in itertools.pairwise(marks)]


def plain_loop(
    model: MultiTaskNet, data: ImageDataset, n: int, settings: TrainSettings, precision: str, device: torch.device
) -> list[float]:
    """Seconds per epoch of a hand-written loop with what `train_model` must do at least."""
    clock = _clock(device)
    channels_last = resolve_channels_last(settings.channels_last, model, device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    x_all = normalize(data.train_images[:n].to(device), data.mean, data.std)
    y_all = data.train_labels[:n].to(device)
    net = nn.Sequential(model.body, model.heads["A"]).train()
    optimizer = torch.optim.SGD(
        net.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    steps = n // settings.batch_size
    times = []
    for epoch in range(settings.epochs):
        _sync(device)
        t0 = clock()
        order = torch.randperm(n, device=device)
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch * steps + step, steps, settings)
            batch = order[step * settings.batch_size : (step + 1) * settings.batch_size]
            x, y = x_all[batch], y_all[batch]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                loss = criterion(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        _sync(device)
        times.append(clock() - t0)
    return times


def bench(
    arch: dict, data: ImageDataset, n: int, precision: str, device: torch.device, args: argparse.Namespace
) -> dict:
    settings = TrainSettings(
        epochs=args.epochs + 1, batch_size=args.batch_size, lr=args.lr, augment=False, precision=precision
    )

    def fresh() -> MultiTaskNet:
        make_deterministic(args.seed, device)  # as `hetmerge train` does: the same backend flags for both
        return build_model(arch["family"], arch.get("spec"), data.input_shape, {"A": data.num_classes})

    model = fresh()
    channels_last = resolve_channels_last(settings.channels_last, model, device)
    ours = timed_train_model(model, data, n, settings, device, args.seed)[1:]
    plain = plain_loop(fresh(), data, n, settings, precision, device)[1:]
    ours_s, plain_s = statistics.median(ours), statistics.median(plain)
    return {
        "device": str(device),
        "precision": precision,
        "channels_last": channels_last,
        "arch": arch,
        "images": n,
        "batch_size": args.batch_size,
        "steps_per_epoch": n // args.batch_size,
        "threads": args.threads,
        "clock": "cpu" if device.type == "cpu" else "wall",
        "train_model_s": ours_s,
        "plain_s": plain_s,
        "ratio": ours_s / plain_s,
        "train_model_epochs_s": ours,
        "plain_epochs_s": plain,
    }


def print_table(rows: list[dict]) -> None:
    header = ["device", "precision", "channels_last", "steps", "clock", "train_model s/epoch", "plain s/epoch", "ratio"]
    lines = [
        [
            r["device"],
            r["precision"],
            "yes" if r["channels_last"] else "no",
            str(r["steps_per_epoch"]),
            r["clock"],
            f"{r['train_model_s']:.3f}",
            f"{r['plain_s']:.3f}",
            f"{r['ratio']:.3f}",
        ]
        for r in rows
    ]
    sizes = [max(len(h), *(len(line[k]) for line in lines)) for k, h in enumerate(header)]
    print("  ".join(h.rjust(s) for h, s in zip(header, sizes, strict=True)))
    for line in lines:
        print("  ".join(c.rjust(s) for c, s in zip(line, sizes, strict=True)))
    if rows:
        r = rows[0]
        print(f"{json.dumps(r['arch'])}, {r['images']} images, batch {r['batch_size']}, {r['threads']} CPU thread(s)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--arch", type=json.loads, default={"family": "resnet", "spec": {"depth": 20, "width": 0.5}}, help="model JSON"
    )
    parser.add_argument("--images", type=int, default=2048, help="training images (default 2048)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch (default 3)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument(
        "--device", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"], help="cpu, cuda..."
    )
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--data", default=None, help="a prepared dataset file instead of the synthetic images")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1, as the pipeline's training jobs)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows instead of a table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = synthetic_dataset(args.images, args.seed) if args.data is None else load_prepared(args.data)
    n = min(args.images, len(data.train_labels))
    if n < args.batch_size:
        parser.error(f"--images {n} is fewer than one batch of {args.batch_size}")
    print(f"torch threads {args.threads}, load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    rows = []
    try:
        for name in args.device:
            for precision in args.precisions:
                rows.append(bench(args.arch, data, n, precision, torch.device(name), args))
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
