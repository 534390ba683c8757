"""Where a feature space is observed: after its nonlinearity, before it, or where its consumers read it.

- `post`: the output of the space's `observe` module (what ZipIt!-style matching correlates);
- `pre`: the pre-activation, the input of the space's nonlinearity `act` (what HF/KF/OTFusion compare); a space
  that goes through none (a residual stream, an attention head) has pre = post;
- `input`: what the space's first consumer layer receives (after pooling or flattening, say), the inputs a
  least-squares refit of that layer solves from.

Observed tensors are handed out as rows = samples × positions and columns = units (`as_rows`), the one layout
every neuron-level method works in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal, get_args

import torch
from torch import nn

from hetmerge.spaces import FeatureSpace

Point = Literal["post", "pre", "input"]
POINTS: tuple[str, ...] = get_args(Point)


def probe(space: FeatureSpace, point: Point) -> tuple[str, bool]:
    """The module to hook for `space` at `point`, and whether its input (True) or output (False) is wanted."""
    if point == "post":
        return space.observe, False
    if point == "pre":
        return (space.act, True) if space.act is not None else (space.observe, False)
    if point == "input":
        if not space.consumers:
            raise ValueError(f"feature space {space.name!r} has no consumer layer whose input could be observed")
        return space.consumers[0].param.rsplit(".", 1)[0], True
    raise ValueError(f"unknown observation point {point!r}; known: {list(POINTS)}")


def as_rows(h: torch.Tensor, dim: int) -> torch.Tensor:
    """(…, units at `dim`, …) → (samples·positions, units): one row per sample and position."""
    h = h.movedim(dim, -1)
    return h.reshape(-1, h.shape[-1])


@contextlib.contextmanager
def observing(model: nn.Module, spaces: Sequence[FeatureSpace], point: Point) -> Iterator[dict[str, torch.Tensor]]:
    """While open, every forward pass of `model` stores each space's tensor at `point` (as computed, with its
    autograd history) in the yielded dict, keyed by space name."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for space in spaces:
            module, on_input = probe(space, point)
            target = model.get_submodule(module)
            if on_input:

                def pre_hook(mod: nn.Module, args: tuple[torch.Tensor, ...], key: str = space.name) -> None:
                    captured[key] = args[0]

                handles.append(target.register_forward_pre_hook(pre_hook))
            else:

                def hook(mod: nn.Module, args: object, out: torch.Tensor, key: str = space.name) -> None:
                    captured[key] = out

                handles.append(target.register_forward_hook(hook))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def activations(
    model: nn.Module, spaces: Sequence[FeatureSpace], batches: Iterable[torch.Tensor], point: Point = "pre"
) -> dict[str, torch.Tensor]:
    """Each space's observed tensor over all `batches`, as (rows, units) float32 on the data's device.

    Rows follow the batches' order and, within a batch, samples then positions, so two models fed the same
    batches give row-aligned matrices.
    """
    was_training = model.training
    model.eval()
    chunks: dict[str, list[torch.Tensor]] = {space.name: [] for space in spaces}
    try:
        with observing(model, spaces, point) as captured, torch.autocast("cuda", enabled=False):
            for x in batches:
                model(x)
                for space in spaces:
                    chunks[space.name].append(as_rows(captured[space.name], space.unit_dim).float())
    finally:
        model.train(was_training)
    if not all(chunks.values()):
        raise ValueError("activations: got no data")
    return {name: torch.cat(parts) for name, parts in chunks.items()}
