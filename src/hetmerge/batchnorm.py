"""Recompute BatchNorm statistics after a merge ("REPAIR-lite"), without which BN merges collapse."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def reset_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace every BN layer's running statistics by exact averages over `batches`.

    momentum=None makes PyTorch keep a cumulative average, so the result does not depend on batch order.
    Returns the number of BN layers reset (0 means there was nothing to do and no data was read).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    saved = [(m, m.momentum) for m in norms]
    was_training = model.training
    for m in norms:
        m.momentum = None
        m.reset_running_stats()
    model.train()
    seen = 0
    for x in batches:
        model(x)
        seen += 1
    if seen == 0:
        raise ValueError("BatchNorm reset got no data")
    for m, momentum in saved:
        m.momentum = momentum
    model.train(was_training)
    return len(norms)
