"""Last-layer KD, the Neuron Interpolation paper's "Last-layer KD" row (`alf-…-logit-kd`, algorithms.md §5.6): model
0's copy with only its head level (the units after the last hidden level, then the classifier) distilled from all
models on the fusion set.

The teacher is the mean over models of softmax(logits/τ) with τ = 1, as the paper's experiment scripts
(`fuse_all_utils.fuse_alf_func`, no class-share weighting); the loss is the corrected τ²·KL, or with
`kd_loss="paper_mse"` the paper's MSE of the raw logits to those probabilities (§9.6). It trains as a KF-Gradient
level (`hetmerge.levels`): 80/20 split, batches of 32, early stopping with patience 15, the best weights kept. Neuron
importance plays no part, so there is no `importance` parameter.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from hetmerge.levels import LevelTraining, Optimizer, levels, train_level
from hetmerge.merged import MergedModel
from hetmerge.methods.base import MergeContext, MergeMethod, MethodParams, register, require_same_task
from hetmerge.methods.kf_gradient import Epochs, Positive, head_targets, paper_defaults, paper_vgg_optimizer, resolve
from hetmerge.models import MultiTaskNet
from hetmerge.params import Range, as_dict


@dataclass(frozen=True)
class LastLayerKDParams(MethodParams):
    """None: the paper's head-level value for the model family (KF-Gradient's `head_optimizer`, `head_lr`,
    `head_epochs`, `weight_decay`); VGG's `lr` follows KF-Gradient's rule (1e-3 when N = 2 or the split is sharded,
    else 1e-4), so with more than two VGGs and no class shares it must be set."""

    reset_bn: bool = False
    optimizer: Optimizer | None = None
    lr: Positive | None = None
    epochs: Epochs | None = None
    weight_decay: Annotated[float, Range(0)] | None = None
    temperature: Positive = 1.0
    kd_loss: Literal["kl", "paper_mse"] = "kl"


@register
class LastLayerKD(MergeMethod):
    """Model 0's copy with only its classifier distilled from the mean of all same-task models' softmax."""

    name = "last_layer_kd"
    paper = "Neuron Interpolation"
    Params = LastLayerKDParams
    same_task = True
    params: LastLayerKDParams

    def keeps_first_basis(self) -> bool:
        return True

    def resolved(self, family: str, n_models: int, shares: torch.Tensor | None = None) -> LastLayerKDParams:
        """The paper's head-level settings of `family` where a parameter is None."""
        paper = paper_defaults(family, paper_vgg_optimizer(n_models, shares) if family == "vgg" else None)
        head = {"optimizer": "head_optimizer", "lr": "head_lr", "epochs": "head_epochs", "weight_decay": "weight_decay"}
        return resolve(self.name, self.params, {own: paper[key] for own, key in head.items() if key in paper}, family)

    def risk(self, models: Sequence[MultiTaskNet]) -> str | None:
        if models[0].family != "vgg" or paper_vgg_optimizer(len(models), None) is not None or self.params.lr:
            self.resolved(models[0].family, len(models))  # else resolved with the data's class shares
        return None

    def combine(self, models: Sequence[MultiTaskNet], ctx: MergeContext) -> MergedModel:
        head = require_same_task(self.name, models)
        p = self.resolved(models[0].family, len(models), ctx.class_shares)
        images = torch.cat([x.to(ctx.device) for x in ctx.require_batches(f"method {self.name!r}")()])
        fused = copy.deepcopy(models[0])
        level = levels(fused)[-1]
        with torch.no_grad():
            inputs = fused.run_body(images, 0, level.start)
        targets = head_targets(models, images, head, None, p.temperature)
        settings = LevelTraining(p.optimizer, p.lr, p.epochs, p.weight_decay, p.kd_loss, p.temperature)
        generator = torch.Generator().manual_seed(ctx.seed)
        result = train_level(fused, level, inputs, targets, settings, generator, desc=self.name)
        ctx.notes.update(
            paper_defaults_for=models[0].family, settings=as_dict(p), levels=[{**level.describe(), **result.record()}]
        )
        return MergedModel(fused)
