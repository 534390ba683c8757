"""Git Re-Basin weight matching: every model permuted onto model 0 from weights alone, then averaged."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import torch

from hetmerge.matching.transforms import SpaceMerge
from hetmerge.matching.weight_matching import weight_matching
from hetmerge.merged import MergedModel
from hetmerge.methods.base import MergeContext, MergeMethod, MethodParams, register, require_same_architecture
from hetmerge.methods.spacewise import assemble, reject_groups
from hetmerge.models import MultiTaskNet
from hetmerge.params import Range


@dataclass(frozen=True)
class WeightMatchingParams(MethodParams):
    """`max_iter` ≥ 1 bounds the sweeps over all spaces (each model against model 0) until nothing changes."""

    max_iter: Annotated[int, Range(1)] = 100


@register
class WeightMatching(MergeMethod):
    """Weight matching: permutations aligning the weights, swept over the spaces until none changes, then averaged."""

    name = "weight_matching"
    paper = "Git Re-Basin"

    def keeps_first_basis(self) -> bool:
        return True

    Params = WeightMatchingParams

    def combine(self, models: Sequence[MultiTaskNet], ctx: MergeContext) -> MergedModel:
        require_same_architecture(self.name, models)
        reject_groups(self.name, models, "method 'mudsc' with solver 'align' and lam 0 (weight-only group matching)")
        graph = models[0].space_graph()
        reference = models[0].state_dict()
        perms: dict[str, list[torch.Tensor]] = {s.name: [torch.arange(s.width)] for s in graph.spaces}
        for i, model in enumerate(models[1:], start=1):
            found, _ = weight_matching(reference, model.state_dict(), graph, self.params.max_iter, ctx.seed + i)
            for name, perm in found.items():
                perms[name].append(perm)
        return assemble(models, {n: SpaceMerge.from_permutations(p) for n, p in perms.items()}, None)
