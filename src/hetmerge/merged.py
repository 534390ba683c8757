"""The result of a merge: a shared trunk, then optionally per-source branches (ensembles, partial zips)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hetmerge.models import MultiTaskNet


class UnitMap(nn.Module):
    """A fixed linear map on the unit dimension (dim 1): hands merged features back to one source model."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(matrix.detach().clone(), requires_grad=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.einsum("om,nm...->no...", self.weight, h)


class MergedModel(nn.Module):
    """`trunk` runs the body up to cut `cut`; each branch continues from there in its own basis.

    - a fully merged model: trunk only (cut is ignored, the trunk's own heads answer);
    - an ensemble: no trunk, cut 0, every source model a branch;
    - a partial zip: merged trunk up to `cut`, then each source's remaining layers after its unmerge map.
    A task answered by several branches gets the mean of their logits.
    """

    def __init__(
        self,
        trunk: MultiTaskNet | None,
        branches: Sequence[MultiTaskNet] = (),
        cut: int = 0,
        unmerge: Sequence[torch.Tensor | None] = (),
    ) -> None:
        super().__init__()
        if trunk is None and not branches:
            raise ValueError("a merged model needs a trunk or at least one branch")
        if unmerge and len(unmerge) != len(branches):
            raise ValueError(f"{len(unmerge)} unmerge maps for {len(branches)} branches")
        self.trunk = trunk
        self.cut = cut if branches else 0
        self.branches = nn.ModuleList(branches)
        maps = list(unmerge) or [None] * len(branches)
        self.unmerge = nn.ModuleList(nn.Identity() if m is None else UnitMap(m) for m in maps)

    @property
    def tasks(self) -> tuple[str, ...]:
        if not self.branches:
            assert self.trunk is not None
            return self.trunk.tasks
        return tuple(sorted({t for b in self.branches for t in b.tasks}))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.branches:
            assert self.trunk is not None
            return self.trunk(x)
        h = x if self.trunk is None else self.trunk.run_body(x, 0, self.cut)
        outputs: dict[str, list[torch.Tensor]] = {}
        for branch, unmerge in zip(self.branches, self.unmerge, strict=True):
            for task, logits in branch.forward_from(unmerge(h), self.cut).items():
                outputs.setdefault(task, []).append(logits)
        return {t: v[0] if len(v) == 1 else torch.stack(v).mean(0) for t, v in outputs.items()}

    def describe(self) -> dict[str, Any]:
        return {
            "trunk": None if self.trunk is None else self.trunk.describe(),
            "cut": self.cut,
            "branches": [b.describe() for b in self.branches],
            "unmerge": [isinstance(m, UnitMap) for m in self.unmerge],
        }
