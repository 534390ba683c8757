"""KF-Gradient, the Neuron Interpolation paper's ALF (algorithms.md §5.6): model 0's copy, trained level by level
(`hetmerge.levels`) to reproduce importance-weighted k-means centroids of all parents' neurons.

At each level the fused model's own input to the level (the output of its already fused levels) is paired with
targets: for a hidden level, the parents' outputs at that level, clustered as columns (one neuron = its values over
samples × positions) into the fused width by importance-weighted k-means, each cluster's target being the weighted
mean of its members; for the head level, the models' mean logits (or, with `head_target="kd"`, their mean
softmax(logits/τ)). The level is then trained by Adam or plain SGD with early stopping on an 80/20 split of the
fusion set, so later levels learn to correct what earlier ones could not match.

Parameters left None take the paper's value for the model family (`PAPER`, from `fuse_all_{mlps,vggs,vits}.py` on
MNIST/CIFAR-10; set CIFAR-100's yourself), recorded with the merge. VGG's `optimizer` follows the paper's rule: Adam
(lr 1e-3, 100 epochs per level) when N = 2 or the split is sharded (every class held by one model, as the context's
class shares tell) and SGD (lr 1e-4, 50 epochs) otherwise; without class shares and N > 2 it must be set.

Deviations from the paper's code, deliberate: `reset_level_parameters` and perturbation re-initialise every submodule
of a level (the paper's reach only its direct children, which on the ViT leaves attention and MLP at model 0's
weights, §9.6); a level keeps its weights of the best validation loss (the paper keeps the last); KD at the head is
the corrected τ²·KL (`kd_loss="paper_mse"` runs the paper's MSE on probabilities); the head level trains with plain
MSE (the paper's weighted head loss has uniform class weights, so it only scales the MSE by N); class shares weight
the head target as a weighted mean Σₖ sₖ꜀·zₖ꜀ (the paper's mean over models of sₖ꜀·zₖ꜀ is 1/N of it), and for KD the
share-weighted mean of the models' probabilities (the paper scales logits by shares before the softmax);
`align_skip_connections` applies to levels whose input and output are one feature space (the residual stream), not
to every level whose input and output shapes agree, and reorders the cluster weights with the targets.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F

from hetmerge.importance import Importance, importance_input, importance_scores
from hetmerge.levels import (
    Level,
    LevelTraining,
    Optimizer,
    chunked,
    level_input,
    level_rows,
    levels,
    reinitialise,
    seeded,
    train_level,
)
from hetmerge.matching.assignment import best_permutation
from hetmerge.matching.kmeans import weighted_kmeans
from hetmerge.merged import MergedModel
from hetmerge.methods.base import MergeContext, MergeError, MergeMethod, MethodParams, register, require_same_task
from hetmerge.models import MultiTaskNet
from hetmerge.observe import as_rows
from hetmerge.params import Range, as_dict
from hetmerge.progress import track

Positive = Annotated[float, Range(0, open_low=True)]
Epochs = Annotated[int, Range(0)]

# The paper's per-family settings (its experiment scripts, MNIST/CIFAR-10). VGG's lr/epochs follow its optimizer.
PAPER: dict[str, dict[str, Any]] = {
    "mlp": {
        "optimizer": "adam",
        "lr": 1e-4,
        "epochs": 25,
        "head_optimizer": "adam",
        "head_lr": 1e-4,
        "head_epochs": 150,
        "weight_decay": 1e-4,
        "class_weighted_head": True,
        "weighted_loss": True,
        "normalize_acts_for_kmeans": False,
        "init_kmeans_with_2nd": True,
        "reset_level_parameters": False,
        "weight_perturbation": 0.0,
        "join_first": False,
    },
    "vgg": {
        "head_optimizer": "adam",
        "head_epochs": 150,
        "weight_decay": 1e-4,
        "class_weighted_head": True,
        "weighted_loss": False,
        "normalize_acts_for_kmeans": False,
        "init_kmeans_with_2nd": True,
        "reset_level_parameters": False,
        "weight_perturbation": 0.0,
        "join_first": False,
    },
    "vit": {
        "optimizer": "adam",
        "lr": 1e-3,
        "epochs": 100,
        "head_optimizer": "adam",
        "head_lr": 1e-3,
        "head_epochs": 100,
        "weight_decay": 1e-5,
        "class_weighted_head": False,
        "weighted_loss": False,
        "normalize_acts_for_kmeans": True,
        "init_kmeans_with_2nd": False,
        "reset_level_parameters": True,
        "weight_perturbation": 1.0,
        "join_first": True,
    },
}
VGG_BY_OPTIMIZER: dict[str, dict[str, Any]] = {
    "adam": {"lr": 1e-3, "epochs": 100, "head_lr": 1e-3},
    "sgd": {"lr": 1e-4, "epochs": 50, "head_lr": 1e-4},
}
VGG_RULE = (
    "the paper trains VGG levels with Adam (lr 1e-3, 100 epochs) when N = 2 or the split is sharded and with SGD "
    "(lr 1e-4, 50 epochs) otherwise"
)


def paper_vgg_optimizer(n_models: int, shares: torch.Tensor | None) -> str | None:
    """The paper's VGG optimizer: Adam for two models or a sharded split (each class held by one model), else SGD;
    None where it cannot tell (more than two models and no class shares)."""
    if n_models == 2:
        return "adam"
    if shares is None:
        return None
    return "adam" if bool(((shares == 0) | (shares == 1)).all()) else "sgd"


def paper_defaults(family: str, optimizer: str | None) -> dict[str, Any]:
    """The paper's settings for `family` (empty for a family it has none for); VGG's lr/epochs need `optimizer`."""
    found = dict(PAPER.get(family, {}))
    if family == "vgg" and optimizer is not None:
        found.update(VGG_BY_OPTIMIZER[optimizer], optimizer=optimizer)
    return found


def resolve(method: str, params: Any, defaults: dict[str, Any], family: str) -> Any:
    """`params` with every None replaced by its value in `defaults` (the paper's for `family`); a MergeError names
    the parameters that have none."""
    unset = {f.name for f in dataclasses.fields(params) if getattr(params, f.name) is None}
    missing = sorted(unset - set(defaults))
    if missing:
        why = VGG_RULE if family == "vgg" else f"the paper has no settings for family {family!r}"
        raise MergeError(f"method {method!r}: set {missing} ({why})")
    return dataclasses.replace(params, **{name: defaults[name] for name in unset})


@dataclass(frozen=True)
class KFGradientParams(MethodParams):
    """None: the paper's value for the model family (see the module docstring).

    `optimizer`/`lr`/`epochs`: every level but the head; `head_*`: the head level; `weight_decay`: all levels.
    `head_target`: the models' mean logits or, `kd`, mean softmax(logits/`kd_temperature`) learnt with `kd_loss`.
    `class_weighted_head`: weight each model's class c by its share of class c's training data (None: as the paper
    for the family where the context gives shares). `weighted_loss`: weight each hidden unit's squared error by its
    cluster's importance. `normalize_acts_for_kmeans`: cluster L2-normalised rows (per parent and sample·position).
    `init_kmeans_with_2nd`: start k-means at model 1's neurons (else model 0's). `align_skip_connections`: reorder a
    residual level's targets onto its input's units (Hungarian) so the stream keeps one basis.
    `reset_level_parameters`: re-initialise each trained level; else `weight_perturbation` ε mixes in ε of a fresh
    init. `join_first`: train the first two levels as one (the paper's ViT: embedding + block 0). `skip_levels`:
    level indices left as model 0's.
    """

    reset_bn: bool = False
    importance: Importance = "uniform"
    optimizer: Optimizer | None = None
    lr: Positive | None = None
    epochs: Epochs | None = None
    head_optimizer: Optimizer | None = None
    head_lr: Positive | None = None
    head_epochs: Epochs | None = None
    weight_decay: Annotated[float, Range(0)] | None = None
    head_target: Literal["logits", "kd"] = "logits"
    kd_temperature: Positive = 2.0
    kd_loss: Literal["kl", "paper_mse"] = "kl"
    class_weighted_head: bool | None = None
    weighted_loss: bool | None = None
    normalize_acts_for_kmeans: bool | None = None
    init_kmeans_with_2nd: bool | None = None
    align_skip_connections: bool = False
    reset_level_parameters: bool | None = None
    weight_perturbation: Annotated[float, Range(0, 1)] | None = None
    join_first: bool | None = None
    skip_levels: tuple[Annotated[int, Range(0)], ...] = ()


def same_levels(method: str, models: Sequence[MultiTaskNet], join_first: bool) -> list[list[Level]]:
    """Every model's levels; a MergeError unless they are the same runs of units (widths may differ)."""
    try:
        found = [levels(m, join_first) for m in models]
    except ValueError as error:
        raise MergeError(f"method {method!r}: {error}") from error
    units = [[lvl.units for lvl in own] for own in found]
    for i, other in enumerate(units[1:], start=1):
        if models[i].family != models[0].family or other != units[0]:
            raise MergeError(
                f"method {method!r} trains the fused model level by level against every model's same level, but model "
                f"0 ({models[0].family}) has levels {units[0]} and model {i} ({models[i].family}) has {other}"
            )
    return found


def class_shares(method: str, ctx: MergeContext, n_models: int, n_classes: int) -> torch.Tensor:
    """ctx.class_shares, checked: (models, classes), on the context's device."""
    shares = ctx.class_shares
    if shares is None:
        raise MergeError(
            f"method {method!r}: class_weighted_head weights each model's classes by its share of their training "
            "data, but the context gives no class_shares; set class_weighted_head to false or give the shares"
        )
    if tuple(shares.shape) != (n_models, n_classes):
        raise MergeError(
            f"method {method!r}: class_shares has shape {tuple(shares.shape)}, expected ({n_models} models, "
            f"{n_classes} classes)"
        )
    return shares.to(ctx.device, torch.float32)


@torch.no_grad()
def head_targets(
    models: Sequence[MultiTaskNet],
    images: torch.Tensor,
    head: str,
    shares: torch.Tensor | None,
    temperature: float | None,
) -> torch.Tensor:
    """(samples, classes): the models' mean logits, or with a `temperature` their mean softmax(logits/τ); with
    `shares` (models, classes) the share-weighted mean per class (probabilities renormalised per sample)."""
    outs = torch.stack([chunked(lambda part, m=m: m(part)[head], images) for m in models])
    if temperature is not None:
        outs = F.softmax(outs / temperature, dim=-1)
    if shares is None:
        return outs.mean(0)
    mixed = (shares[:, None, :] * outs).sum(0)
    return mixed / mixed.sum(-1, keepdim=True) if temperature is not None else mixed


def kmeans_targets(
    acts: Sequence[torch.Tensor], scores: Sequence[torch.Tensor], width: int, *, normalize: bool, init_model: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster all parents' neurons (the columns of their (rows, width_k) activations, weighted by importance) into
    `width` clusters; → (rows, width) targets, each the importance-weighted mean of its members' unnormalised
    activations, and (width,) cluster weights Σ importance. k-means starts at model `init_model`'s first `width`
    neurons and, with `normalize`, clusters each parent's rows scaled to unit L2 norm."""
    if acts[init_model].shape[1] < width:
        raise MergeError(
            f"k-means starts at model {init_model}'s neurons, but it has {acts[init_model].shape[1]} where the fused "
            f"level has {width}"
        )
    features = [F.normalize(a, dim=1) for a in acts] if normalize else list(acts)
    offset = sum(a.shape[1] for a in acts[:init_model])
    points = torch.cat(features, 1).T
    weights = torch.cat(list(scores)).to(points)
    result = weighted_kmeans(points, weights, width, init=points[offset : offset + width])
    members = torch.zeros(len(weights), width, dtype=points.dtype, device=points.device)
    members[torch.arange(len(weights), device=points.device), result.assign] = weights
    cluster_weights = members.sum(0)
    return torch.cat(list(acts), 1) @ members / cluster_weights, cluster_weights


def align_to_input(
    inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder target columns (and their weights) onto the input's units by a min-cost assignment, cost =
    ‖input unit − target unit‖ · the target's cluster weight: a residual level's output keeps its input's basis."""
    cost = torch.cdist(inputs.T, targets.T) * weights[None, :]
    perm = best_permutation(-cost).to(targets.device)
    return targets[:, perm], weights[perm]


@register
class KFGradient(MergeMethod):
    """KF-Gradient: model 0's copy trained level by level towards k-means centroids of all models' outputs."""

    name = "kf_gradient"
    paper = "Neuron Interpolation"
    Params = KFGradientParams
    same_task = True
    params: KFGradientParams

    def risk(self, models: Sequence[MultiTaskNet]) -> str | None:
        family = models[0].family
        if family == "vgg" and paper_vgg_optimizer(len(models), None) is None and self.params.optimizer is None:
            return None  # the paper's VGG settings depend on the split (sharded or not): resolved with the data
        settings = self.resolved(family, len(models))
        found = same_levels(self.name, models, settings.join_first)
        bad = [k for k in settings.skip_levels if k >= len(found[0])]
        if bad:
            raise MergeError(f"method {self.name!r}: skip_levels {bad} do not exist; the models have {len(found[0])}")
        return None

    def resolved(self, family: str, n_models: int, shares: torch.Tensor | None = None) -> KFGradientParams:
        optimizer = self.params.optimizer
        if optimizer is None and family == "vgg":
            optimizer = paper_vgg_optimizer(n_models, shares)
        return resolve(self.name, self.params, paper_defaults(family, optimizer), family)

    def precomputed_inputs(self) -> tuple[str, ...]:
        return importance_input(self.params.importance)

    def combine(self, models: Sequence[MultiTaskNet], ctx: MergeContext) -> MergedModel:
        head = require_same_task(self.name, models)
        p = self.resolved(models[0].family, len(models), ctx.class_shares)
        found = same_levels(self.name, models, p.join_first)
        n_classes = models[0].heads[head].out_features
        # Left to the paper's default, the shares weight the head only where the context has them.
        asked = self.params.class_weighted_head is not None or ctx.class_shares is not None
        use_shares = p.class_weighted_head and asked
        shares = class_shares(self.name, ctx, len(models), n_classes) if use_shares else None
        images = torch.cat([x.to(ctx.device) for x in ctx.require_batches(f"method {self.name!r}")()])
        trained = [lvl for lvl in found[0][:-1] if lvl.index not in p.skip_levels]
        observed = [[own[lvl.index].observed for lvl in trained] for own in found]
        scores = importance_scores(models, observed, ctx, p.importance)
        fused = copy.deepcopy(models[0])
        generator = torch.Generator().manual_seed(ctx.seed)
        records = []
        for lvl in track(levels(fused, p.join_first), desc=f"{self.name} levels", unit="level"):
            if lvl.index in p.skip_levels:
                records.append({**lvl.describe(), "skipped": True})
                continue
            inputs = chunked(lambda part, lvl=lvl: level_input(fused, part, lvl), images)
            weights = None
            if lvl.head is None:
                acts = [level_rows(m, images, own[lvl.index]) for m, own in zip(models, found, strict=True)]
                targets, weights = kmeans_targets(
                    acts,
                    [s[f"level{lvl.index}"] for s in scores],
                    lvl.width,
                    normalize=p.normalize_acts_for_kmeans,
                    init_model=1 if p.init_kmeans_with_2nd else 0,
                )
                if p.align_skip_connections and lvl.input_space == lvl.space:
                    targets, weights = align_to_input(as_rows(inputs, lvl.unit_dim), targets, weights)
                settings = LevelTraining(p.optimizer, p.lr, p.epochs, p.weight_decay)
            else:
                kd = p.head_target == "kd"
                targets = head_targets(models, images, head, shares, p.kd_temperature if kd else None)
                loss = p.kd_loss if kd else "mse"
                settings = LevelTraining(
                    p.head_optimizer, p.head_lr, p.head_epochs, p.weight_decay, loss, p.kd_temperature
                )
            with seeded(int(torch.randint(2**62, (1,), generator=generator)), ctx.device):
                if p.reset_level_parameters:
                    reinitialise(lvl.modules(fused))
                elif p.weight_perturbation > 0:
                    reinitialise(lvl.modules(fused), p.weight_perturbation)
            result = train_level(
                fused,
                lvl,
                inputs,
                targets,
                settings,
                generator,
                weights if p.weighted_loss else None,
                desc=f"{self.name} level {lvl.index + 1}/{len(found[0])}",
            )
            records.append({**lvl.describe(), "skipped": False, **result.record()})
        ctx.notes.update(
            paper_defaults_for=models[0].family,
            settings={**as_dict(p), "class_weighted_head": shares is not None},
            levels=records,
        )
        return MergedModel(fused)
