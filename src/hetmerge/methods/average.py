"""Weight averaging (W.Avg): the elementwise mean of all models' tensors, with no alignment."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hetmerge.merged import MergedModel
from hetmerge.methods.base import MergeContext, MergeMethod, register, require_same_architecture
from hetmerge.models import MultiTaskNet, build_from_description


def union_heads_model(models: Sequence[MultiTaskNet], like: int = 0) -> MultiTaskNet:
    """A fresh network of model `like`'s architecture with every head any of the models has."""
    heads: dict[str, int] = {}
    for model in models:
        heads.update(model.describe()["heads"])
    return build_from_description({**models[like].describe(), "heads": heads})


def mean_state(models: Sequence[MultiTaskNet]) -> dict[str, torch.Tensor]:
    """Average each tensor over the models that have it (a task head is owned by its task's models)."""
    states = [m.state_dict() for m in models]
    keys = sorted({k for s in states for k in s})
    merged = {}
    for key in keys:
        values = [s[key] for s in states if key in s]
        if values[0].is_floating_point():
            merged[key] = torch.stack(values).mean(0)
        else:  # integer counters such as BatchNorm's num_batches_tracked
            merged[key] = values[0]
    return merged


@register
class Average(MergeMethod):
    """Elementwise average of the models' weights, unaligned (W.Avg)."""

    name = "average"

    def keeps_first_basis(self) -> bool:
        return True

    def combine(self, models: Sequence[MultiTaskNet], ctx: MergeContext) -> MergedModel:
        require_same_architecture(self.name, models)
        merged = union_heads_model(models).to(ctx.device)
        merged.load_state_dict(mean_state(models))
        return MergedModel(merged)
