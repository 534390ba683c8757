"""Metrics of the ZipIt! family: per-task accuracy, joint accuracy over all classes, parameters and FLOPs."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hetmerge.data import ImageDataset, TaskSplit, iterate_batches
from hetmerge.metrics import macro_f1
from hetmerge.progress import track

Model = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]
Part = Literal["test", "merge"]


@torch.no_grad()
def predict(
    model: Model,
    images: torch.Tensor,
    indices: torch.Tensor,
    data: ImageDataset,
    batch_size: int,
    device: torch.device,
    desc: str = "prediction",
) -> dict:
    """Logits of every head on `images[indices]`, concatenated over batches; `desc` names the pass in the progress."""
    outputs: dict[str, list[torch.Tensor]] = {}
    labels = torch.zeros(len(images), dtype=torch.long)  # unused: batches carry labels we do not need
    batches = iterate_batches(images, labels, indices, batch_size, data.mean, data.std, device=device)
    for x, _ in track(batches, desc=desc, total=math.ceil(len(indices) / batch_size), unit="batch"):
        for task, logits in model(x).items():
            outputs.setdefault(task, []).append(logits.float().cpu())
    return {task: torch.cat(chunks) for task, chunks in outputs.items()}


def task_indices(data: ImageDataset, split: TaskSplit, part: Part) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Images, labels and per-task indices of the test set or of the held-out merge slice."""
    if part == "test":
        return data.test_images, data.test_labels, split.test_indices
    merge = torch.as_tensor(split.merge_indices, dtype=torch.long)
    labels = data.train_labels[merge]
    per_task = {t.name: tuple(merge[torch.isin(labels, torch.as_tensor(t.classes))].tolist()) for t in split.tasks}
    return data.train_images, data.train_labels, per_task


def accuracies(
    model: Model,
    data: ImageDataset,
    split: TaskSplit,
    batch_size: int,
    device: torch.device,
    part: Part = "test",
    *,
    predictions: bool = False,
    logits: bool = False,
) -> dict[str, Any]:
    """Task accuracy (argmax within the task's own head) and joint accuracy, on the test set or merge slice.

    Joint: the logits of all heads the model has are concatenated and the argmax must hit the true class
    among all classes of all tasks; a model without a head for an image's task can only get it wrong.
    Task accuracy is None for tasks the model has no head for.

    `f1` is the macro F1 of the joint answer over the classes that occur as a true or predicted class
    (scikit-learn's `f1_score(average="macro", zero_division=0)`), which the same-task papers report.

    With `predictions`, also each image's top logit over all heads and whether the joint answer is right
    (`predictions: {score, correct}`, images in split order): enough to score an ensemble of such models
    exactly, since its joint answer is the member with the highest top logit (the first on ties). With `logits`
    as well, every image's logits over all classes and its true class (`logits`, `labels`, classes in the order of
    the tasks' classes), which a same-task ensemble that weights its members per class needs.
    """
    images, labels, per_task = task_indices(data, split, part)
    order = [t.name for t in split.tasks]
    indices = torch.as_tensor([i for t in order for i in per_task[t]], dtype=torch.long)
    true_class = labels[indices]
    where = "test set" if part == "test" else "merge slice"
    outputs = predict(model, images, indices, data, batch_size, device, desc=f"evaluation on the {where}")
    unknown = sorted(set(outputs) - set(order))
    if unknown:
        raise ValueError(f"model answers tasks {unknown} that the split does not define ({order})")
    task_acc: dict[str, float | None] = {}
    offset = 0
    for task in split.tasks:
        n = len(per_task[task.name])
        rows = slice(offset, offset + n)
        offset += n
        if task.name not in outputs:
            task_acc[task.name] = None
            continue
        head = outputs[task.name]
        if head.shape[1] != len(task.classes):
            raise ValueError(
                f"head {task.name!r} has {head.shape[1]} outputs but the task has {len(task.classes)} classes"
            )
        local = torch.as_tensor(task.classes)[head[rows].argmax(1)]
        task_acc[task.name] = (local == true_class[rows]).float().mean().item()
    present = [t for t in split.tasks if t.name in outputs]
    joint_classes = torch.as_tensor([c for t in present for c in t.classes])
    joint_logits = torch.cat([outputs[t.name] for t in present], dim=1)
    joint_pred = joint_classes[joint_logits.argmax(1)]
    scored = [a for a in task_acc.values() if a is not None]
    result: dict[str, Any] = {
        "joint": (joint_pred == true_class).float().mean().item(),
        "f1": macro_f1(true_class.numpy(), joint_pred.numpy()),
        "tasks": task_acc,
        "task_avg": sum(scored) / len(scored) if len(scored) == len(task_acc) else None,
        "n_images": len(indices),
    }
    if predictions:
        top = joint_logits.max(1).values
        result["predictions"] = {"score": top.tolist(), "correct": (joint_pred == true_class).tolist()}
        if logits:
            result["predictions"].update(logits=joint_logits.tolist(), labels=true_class.tolist())
    return result


@torch.no_grad()
def cost(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Parameters and multiply-accumulates of one forward pass on one input.

    Only modules that actually run are counted, so a partial zip's unused trunk layers cost nothing.
    FLOPs follow the papers' (fvcore) convention of one FLOP per multiply-accumulate of convolutions and
    linear layers (and of UnitMap's matrices): torch's FlopCounterMode counts the matrix products and
    convolutions that run (2 FLOPs per multiply-accumulate), and only those run inside a layer (a module
    without submodules) are kept, which leaves out the products a ViT's Attention computes in its own
    forward (q·kᵀ and weights·v).
    """
    ran: dict[int, nn.Module] = {}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
        ran[id(module)] = module

    # every module, not only leaves: a ViT's class token and position table belong to a container
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with counter:
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    # FlopCounterMode's ModuleTracker names a module by one of its paths below the root's class name: every
    # path of a layer is listed (a shared layer has several), and each layer's count sits under one of them
    root = type(model).__name__
    paths = model.named_modules(remove_duplicate=False)
    layers = [f"{root}.{name}" if name else root for name, m in paths if not any(m.children())]
    counts = counter.get_flop_counts()
    flops = sum(sum(counts.get(name, {}).values()) for name in layers)
    params = sum(p.numel() for m in ran.values() for p in m.parameters(recurse=False))
    return {"params": int(params), "flops": flops // 2}
