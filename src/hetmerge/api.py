"""The library entry point: merge your own models without Snakemake."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hetmerge.data.few_shot import FewShot
from hetmerge.merged import MergedModel
from hetmerge.methods import MergeContext, MergeError, build_method
from hetmerge.models import FAMILIES, MultiTaskNet


def _input_batches(
    data: Iterable[Any], device: torch.device, shape: tuple[int, ...]
) -> Callable[[], Iterator[torch.Tensor]]:
    """Turn a re-iterable loader of `x` or `(x, y, ...)` batches into fresh passes of `x` on `device`.

    Every `x` must hold inputs of the models' `shape`: other images would fail deep inside a layer, or not at all.
    """

    def passes() -> Iterator[torch.Tensor]:
        for i, batch in enumerate(data):
            x = batch[0] if isinstance(batch, list | tuple) else batch
            if tuple(x.shape[1:]) != shape:
                raise MergeError(f"data batch {i} holds inputs of shape {tuple(x.shape[1:])}, the models take {shape}")
            yield x.to(device)

    return passes


def _labelled_batches(
    data: Iterable[Any], device: torch.device
) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]] | None:
    """Fresh passes of `(x, y)` on `device` where the loader yields labelled batches, else None."""
    first = next(iter(data), None)
    if not isinstance(first, list | tuple) or len(first) < 2:
        return None

    def passes() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in data:
            yield batch[0].to(device), torch.as_tensor(batch[1]).to(device)

    return passes


def _merge_inputs(models: Any, data: Any) -> list[MultiTaskNet]:
    """The models as a list, refusing what would fail obscurely later: a single module, modules that are no
    hetmerge network (they lack the feature-space description every method needs), and one-shot iterators as
    data, which the statistics pass would use up before the BatchNorm reset reads them again."""
    if isinstance(models, torch.nn.Module):
        raise TypeError(f"merge takes a list of models, got a single {type(models).__name__}: pass [model_a, model_b]")
    models = list(models)
    for i, model in enumerate(models):
        if not isinstance(model, MultiTaskNet):
            raise TypeError(
                f"model {i} is a {type(model).__module__}.{type(model).__qualname__}, not a hetmerge MultiTaskNet: "
                f"build it with hetmerge.build_model (families {sorted(FAMILIES)}) and load your weights into it"
            )
    if isinstance(data, Iterator):
        raise TypeError(
            f"data is a one-shot iterator ({type(data).__name__}): merge passes over it once for the statistics "
            "and again for the BatchNorm reset, so the second pass would see nothing; pass a list of batches or a "
            "DataLoader"
        )
    return models


def merge(
    models: Sequence[MultiTaskNet],
    method: str,
    params: Mapping[str, Any] | None = None,
    *,
    data: Iterable[Any] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    class_shares: torch.Tensor | Sequence[Sequence[float]] | None = None,
    few_shot: FewShot | None = None,
    state_dir: str | Path | None = None,
) -> MergedModel:
    """Merge `models` with a registered method.

    `data` is a re-iterable loader (e.g. a torch DataLoader) over held-out images used for activation
    statistics and BatchNorm reset; each pass iterates it again. Where it yields `(images, labels)`, the labels
    (class indices of the models' one head) serve the same-task fusion methods (neuron importance, distillation:
    `merge(models, "kf", {"importance": "conductance"}, data=loader)`). `class_shares[k][c]`, model k's share of
    class c's training data, weights the heads of methods that use it. Returns a module mapping an input batch to
    a dict of per-task logits. Models that take different input shapes or share a head name with different
    class counts, data of another shape, and NaN or inf in the weights, data or result raise a ValueError
    (MergeError where the method refuses) that names the culprit; models that are no hetmerge MultiTaskNet and
    one-shot iterators (generators) as `data` raise a TypeError.

    The merges that learn from several tasks (FS-Merge, distillation, RegMean) read `few_shot`, each task's
    images tagged with the task (`hetmerge.draw_few_shot` draws one from your per-task images, with the paper's
    augmentations): `merge([a, b], "fs_merge", {"rank": 12}, few_shot=few)`. Their training saves its state every
    epoch under `state_dir`, where given, and resumes from it.
    """
    models = _merge_inputs(models, data)
    device = torch.device(device)
    batches = None if data is None or not models else _input_batches(data, device, models[0].input_shape)
    labelled = None if data is None else _labelled_batches(data, device)
    shares = None if class_shares is None else torch.as_tensor(class_shares, dtype=torch.float32, device=device)
    if few_shot is not None and models and tuple(few_shot.train.images.shape[1:]) != models[0].input_shape:
        raise MergeError(
            f"few_shot holds images of shape {tuple(few_shot.train.images.shape[1:])}, the models take "
            f"{models[0].input_shape}"
        )
    ctx = MergeContext(
        device=device,
        batches=batches,
        labelled=labelled,
        class_shares=shares,
        seed=seed,
        few_shot=few_shot,
        state_dir=None if state_dir is None else Path(state_dir),
    )
    return build_method(method, params)(models, ctx)
