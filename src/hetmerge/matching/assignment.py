"""Alignment by linear assignment: every model's units are permuted onto model 0's (Hungarian/JV via scipy)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def best_permutation(similarity: torch.Tensor) -> torch.Tensor:
    """perm with perm[k] = the column matched to row k, maximising the summed similarity."""
    rows, cols = linear_sum_assignment(np.asarray(similarity.detach().cpu().double()), maximize=True)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def align_to_first(correlation: torch.Tensor, widths: Sequence[int]) -> list[torch.Tensor]:
    """Permutations aligning each model to model 0 from the correlation of their concatenated features."""
    if len(set(widths)) != 1:
        raise ValueError(f"permutation alignment needs equal widths, got {list(widths)} (use zipit for these)")
    d = widths[0]
    perms = [torch.arange(d)]
    for i in range(1, len(widths)):
        perms.append(best_permutation(correlation[:d, i * d : (i + 1) * d]))
    return perms
