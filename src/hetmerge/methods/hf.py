"""HF, Hungarian fusion of two same-task models (Neuron Interpolation paper, algorithms.md §5.5).

Layer by layer, every neuron of both parents is refitted by least squares from the fused network's own inputs
(`hetmerge.interpolation`); each pair (i of model 0, j of model 1) would become w̄_ij = (s0_i w0_i + s1_j w1_j) /
(s0_i + s1_j), at the cost s0_i‖Xw̄_ij − a0_i‖ + s1_j‖Xw̄_ij − a1_j‖ of missing both parents' pre-activations. A
minimum-cost assignment π picks the pairs; new neuron i = w̄_{i,π(i)}, so the fused units stay in model 0's order.
The class layer pairs class c with class c. Importance scores are not normalised (as the paper's HF).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hetmerge.importance import Importance, importance_input
from hetmerge.interpolation import Layer, Refits, common_chain, interpolate, layer_importance
from hetmerge.matching.assignment import best_permutation
from hetmerge.merged import MergedModel
from hetmerge.methods.base import MergeContext, MergeError, MergeMethod, MethodParams, register
from hetmerge.models import MultiTaskNet


@dataclass(frozen=True)
class HFParams(MethodParams):
    """`importance` weighs each neuron in the pair averages and costs."""

    reset_bn: bool = False
    importance: Importance = "uniform"


def pair_costs(refits: Refits, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
    """(n0, n1) HF costs of all pairs at once, from the refits' features and misfits (no rows needed).

    With D_ij = ‖X(w0_i − w1_j)‖ and S = s0_i + s1_j, Xw̄_ij − Xw0_i = s1_j/S·X(w1_j − w0_i), and the parent's own
    misfit is orthogonal to anything X produces, so ‖Xw̄_ij − a0_i‖² = (s1_j·D_ij/S)² + misfit0_i (and likewise for 1).
    """
    f0, f1 = refits.features
    m0, m1 = refits.misfit
    dist = torch.cdist(f0.T, f1.T)
    a, b = s0[:, None], s1[None, :]
    total = a + b
    return (
        a * ((b * dist / total).square() + m0[:, None]).sqrt() + b * ((a * dist / total).square() + m1[None, :]).sqrt()
    )


@register
class HungarianFusion(MergeMethod):
    """Hungarian fusion of two same-task models: refitted neurons paired by a LAP on their pre-activations."""

    name = "hf"
    paper = "Neuron Interpolation"
    Params = HFParams
    params: HFParams
    min_models = 2
    max_models = 2
    same_task = True

    def keeps_first_basis(self) -> bool:
        return True

    def check(self, models: Sequence[MultiTaskNet]) -> None:
        if len(models) != 2:
            raise MergeError(
                f"method 'hf' fuses exactly 2 models, but got {len(models)}: its Hungarian matching pairs the neurons "
                "of two models; for more models use 'kf' (k-means fusion)"
            )
        super().check(models)

    def risk(self, models: Sequence[MultiTaskNet]) -> str | None:
        chain = common_chain(self.name, models)
        for layer in chain:
            widths = [m.get_submodule(layer.module).weight.shape[0] for m in models]
            if widths[0] != widths[1]:
                raise MergeError(
                    f"method 'hf' pairs neurons one to one, but layer {layer.module!r} has widths {widths}; "
                    "use 'kf' for parents of different widths"
                )
        return None

    def precomputed_inputs(self) -> tuple[str, ...]:
        return importance_input(self.params.importance)

    def combine(self, models: Sequence[MultiTaskNet], ctx: MergeContext) -> MergedModel:
        chain = common_chain(self.name, models)
        scores = layer_importance(models, chain, ctx, self.params.importance, normalise=False)
        notes: list[dict[str, Any]] = []

        def fuse_layer(index: int, layer: Layer, refits: Refits) -> torch.Tensor:
            s0, s1 = scores[index]
            ids = torch.arange(len(s0), device=s0.device)
            if layer.space is None:
                perm = ids
            else:
                cost = pair_costs(refits, s0, s1)
                perm = best_permutation(-cost).to(s0.device)
                notes.append({"layer": layer.module, "lap_cost": float(cost[ids, perm].sum())})
            partner = torch.empty_like(perm)
            partner[perm] = ids  # model 1's neuron perm[i] joins model 0's neuron i
            return refits.combined([s0, s1], torch.cat([ids, partner]), len(ids))

        fused = interpolate(copy.deepcopy(models[0]), models, chain, ctx.require_batches("method 'hf'"), fuse_layer)
        ctx.notes["layers"] = notes
        return MergedModel(fused)
