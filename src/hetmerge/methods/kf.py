"""KF, k-means fusion of N same-task models (Neuron Interpolation paper, algorithms.md §5.5).

Layer by layer, every neuron of every parent is refitted by least squares from the fused network's own inputs
(`hetmerge.interpolation`), and all Σ n_k refits are clustered by importance-weighted k-means in pre-activation
space into the fused width (`hetmerge.matching.kmeans.weighted_kmeans`: farthest-point init, Lloyd, empty-cluster
repair, early stop at < 5 % gain over 3 iterations, best of `restarts`). A fused neuron is its cluster's weighted
mean refit; the class layer averages each class's refits. Parents may differ in width: the fused model takes parent
`like`'s architecture. Uniform scores are normalised to sum 1 per parent and layer, as the paper's KF does.

The clustering runs on the refits' pre-activations Xw, which differ from the parents' actual a by a misfit that no
centroid can reduce: Lloyd's assignments and centroids are the same either way, the farthest-point seeds and the
repair ignore that unreachable part (the paper measures it), and the recorded cost adds it back.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import torch

from hetmerge.importance import Importance, importance_input
from hetmerge.interpolation import Layer, Refits, common_chain, interpolate, layer_importance
from hetmerge.matching.kmeans import weighted_kmeans
from hetmerge.merged import MergedModel
from hetmerge.methods.base import MergeContext, MergeError, MergeMethod, MethodParams, register
from hetmerge.models import MultiTaskNet
from hetmerge.params import Range

PATIENCE = 3  # the paper's early stop: the cost compared with 3 iterations earlier ...
MIN_IMPROVEMENT = 0.05  # ... must have fallen by 5 %


@dataclass(frozen=True)
class KFParams(MethodParams):
    """`importance` weighs the neurons in k-means; `restarts` farthest-point seedings per layer (the lowest cost is
    kept); `max_iter` bounds the Lloyd iterations; `like` is the parent whose widths the fused model takes."""

    reset_bn: bool = False
    importance: Importance = "uniform"
    restarts: Annotated[int, Range(1)] = 10
    max_iter: Annotated[int, Range(1)] = 100
    like: Annotated[int, Range(0)] = 0


@register
class KMeansFusion(MergeMethod):
    """K-means fusion of N same-task models: refitted neurons clustered, importance-weighted, into one width."""

    name = "kf"
    paper = "Neuron Interpolation"
    Params = KFParams
    params: KFParams
    same_task = True

    def risk(self, models: Sequence[MultiTaskNet]) -> str | None:
        if self.params.like >= len(models):
            raise MergeError(f"method 'kf': like={self.params.like} names no parent of the {len(models)} models")
        common_chain(self.name, models)
        return None

    def precomputed_inputs(self) -> tuple[str, ...]:
        return importance_input(self.params.importance)

    def combine(self, models: Sequence[MultiTaskNet], ctx: MergeContext) -> MergedModel:
        chain = common_chain(self.name, models)
        kind = self.params.importance
        scores = layer_importance(models, chain, ctx, kind, normalise=kind == "uniform")
        # The only draws are the restarts' first seed points, indices: drawn on the CPU, one seed gives one fusion
        # on every device.
        generator = torch.Generator().manual_seed(ctx.seed)
        notes: list[dict[str, Any]] = []

        def fuse_layer(index: int, layer: Layer, refits: Refits) -> torch.Tensor:
            s = scores[index]
            if layer.space is None:
                classes = len(s[0])
                assign = torch.arange(classes, device=s[0].device).repeat(len(s))
                return refits.combined(s, assign, classes)
            width = fused.get_submodule(layer.module).weight.shape[0]
            weights = torch.cat(s)
            result = weighted_kmeans(
                torch.cat(refits.features, 1).T,
                weights,
                width,
                generator=generator,
                max_iter=self.params.max_iter,
                patience=PATIENCE,
                min_improvement=MIN_IMPROVEMENT,
                restarts=self.params.restarts,
            )
            misfit = float((weights * torch.cat(refits.misfit)).sum())
            notes.append({"layer": layer.module, "cost": result.cost + misfit, "iterations": len(result.history)})
            return refits.combined(s, result.assign, width)

        fused = copy.deepcopy(models[self.params.like])
        interpolate(fused, models, chain, ctx.require_batches("method 'kf'"), fuse_layer)
        ctx.notes["layers"] = notes
        return MergedModel(fused)
