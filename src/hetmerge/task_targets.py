"""What the merges that learn from several tasks reconstruct: each image's features in the model of its own task.

FS-Merge's loss and the KD baseline's (algorithms.md §6.4, §2.8) compare, for an image of task t, the merged
network's output for model t with model t's own output on that image; a model's outputs on other tasks' images are
never used. So every task must belong to exactly one model: the one with a head of that name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hetmerge.data.few_shot import TaskImages
from hetmerge.levels import CHUNK as CHUNK  # re-exported: the merges that learn chunk their no-grad passes alike
from hetmerge.levels import chunked
from hetmerge.methods.base import MergeError
from hetmerge.models import MultiTaskNet


def task_owners(method: str, models: Sequence[MultiTaskNet], names: Sequence[str]) -> tuple[int, ...]:
    """For each task of `names`, the index of the one model with a head of that name."""
    owners = []
    for task in names:
        holders = [i for i, m in enumerate(models) if task in m.heads]
        if len(holders) != 1:
            have = {i: list(m.heads) for i, m in enumerate(models)}
            why = "no model has" if not holders else f"models {holders} all have"
            raise MergeError(
                f"method {method!r} reconstructs each task's features in the model of that task, but {why} a head "
                f"{task!r} (heads per model: {have})"
            )
        owners.append(holders[0])
    return tuple(owners)


@torch.no_grad()
def owner_features(models: Sequence[MultiTaskNet], data: TaskImages, owners: Sequence[int]) -> torch.Tensor:
    """(n, feature_dim): each image's body output (what the heads read) in the model that owns its task."""
    out: torch.Tensor | None = None
    for t, owner in enumerate(owners):
        rows = (data.tasks == t).nonzero().squeeze(1)
        if not len(rows):
            continue
        model = models[owner]
        feats = chunked(model.body, data.images[rows])
        if out is None:
            out = feats.new_zeros((len(data.images), *feats.shape[1:]))
        out[rows] = feats
    if out is None:
        raise MergeError("no images of any task to reconstruct")
    return out
