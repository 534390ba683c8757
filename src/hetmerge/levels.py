"""Levels: the sub-networks that KF-Gradient (the Neuron Interpolation paper's ALF, algorithms.md §5.6) and last-layer
KD train one at a time, and the trainer they share.

A level is a run of body units that ends at a unit writing a feature space, as the paper's levels end at a
conv/linear output: on the MLP each `fc` unit; on VGG each conv unit, with the max-pools before it (the paper's
level_i = [ReLU, (MaxPool), Conv]: our ReLU closes the previous unit, which changes no parameter); on the ViT the
patch embedding, then each block. The last, "head" level is whatever units remain (pooling, the final norm) plus
the head Linear. A unit writes a space when it holds a producing weight matrix or kernel (≥ 2-D) of the space at
the cut after it, so norms, pools and flattens join the next level instead of forming their own.

A level's output is observed at its space's pre-activation when the space's nonlinearity lies inside the level
(MLP/VGG: the paper's levels end before the ReLU), else it is the level's output tensor itself (the ViT's residual
stream); the head level's output is the logits. `Level.observed` is the space re-pointed at that observation, so
`hetmerge.observe` and `hetmerge.importance` see the level's own output, not the stream's last writer.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from hetmerge.fitting import FitSettings, fit
from hetmerge.models import MultiTaskNet
from hetmerge.observe import as_rows, observing
from hetmerge.spaces import FeatureSpace

Optimizer = Literal["adam", "sgd"]
LevelLoss = Literal["mse", "kl", "paper_mse"]

BATCH_SIZE = 32  # the paper's `train_batch_size`
PATIENCE = 15  # the paper's `max_patience_epochs`
VAL_FRACTION = 0.2  # the paper's 80/20 random split of the fusion set
CHUNK = 256  # samples per no-grad forward pass (memory, not results)


@dataclass(frozen=True)
class Level:
    """Body units `units` (body indices start … stop-1), plus head `head` for the final level.

    `space`: the feature space the level writes (None at the head level); `input_space`: the space at the cut
    before it (None for raw images); `observed`: the space as seen at this level's output (width, unit dim, and
    the module whose input (pre-activation) or output `hetmerge.observe` hooks with point "pre").
    """

    index: int
    units: tuple[str, ...]
    start: int
    head: str | None
    space: str | None
    input_space: str | None
    observed: FeatureSpace

    @property
    def stop(self) -> int:
        return self.start + len(self.units)

    @property
    def width(self) -> int:
        return self.observed.width

    @property
    def unit_dim(self) -> int:
        return self.observed.unit_dim

    def modules(self, model: MultiTaskNet) -> list[nn.Module]:
        own = [model.body.get_submodule(u) for u in self.units]
        return own + ([model.heads[self.head]] if self.head is not None else [])

    def parameters(self, model: MultiTaskNet) -> list[nn.Parameter]:
        return [p for m in self.modules(model) for p in m.parameters()]

    def describe(self) -> dict[str, object]:
        return {"level": self.index, "units": list(self.units), "head": self.head, "space": self.space}


def _writes(model: MultiTaskNet, unit: str, space: FeatureSpace | None) -> bool:
    """Whether body unit `unit` holds a weight matrix/kernel that produces `space` (not just a norm's vector)."""
    if space is None:
        return False
    state = dict(model.named_parameters())
    prefix = f"body.{unit}."
    return any(
        ref.param.startswith(prefix) and ref.param in state and state[ref.param].dim() >= 2 for ref in space.producers
    )


def _own_act(model: MultiTaskNet, space: FeatureSpace, units: tuple[str, ...]) -> str | None:
    """The nonlinearity closing this level's output, if the level holds it: the space's `act`, or the module of the
    same name in the level's last unit (a residual stream's `act` names only its last writer's, e.g. a ResNet
    block's `act2`, but every block writing the stream ends in its own)."""
    if space.act is None:
        return None
    if any(space.act.startswith(f"body.{u}.") for u in units):
        return space.act
    own = f"body.{units[-1]}.{space.act.split('.', 2)[2]}" if space.act.startswith("body.") else None
    names = dict(model.named_modules())
    return own if own is not None and own in names else None


def levels(model: MultiTaskNet, join_first: bool = False) -> list[Level]:
    """The model's levels in forward order, the head level last; `join_first` joins the first two (the paper's ViT
    trains the patch embedding together with block 0)."""
    if len(model.heads) != 1:
        raise ValueError(f"levels end in a same-task model's one head, but the model has heads {list(model.heads)}")
    graph = model.space_graph()
    if len(graph.cuts) != len(model.body) + 1:
        raise ValueError(f"{type(model).__name__}: {len(graph.cuts)} cuts for {len(model.body)} body units")
    names = list(model.body._modules)
    runs: list[tuple[int, int]] = []  # (start, stop) body indices of each non-head level
    start = 0
    for k, name in enumerate(names):
        space = graph[graph.cuts[k + 1]] if graph.cuts[k + 1] is not None else None
        if _writes(model, name, space):
            runs.append((start, k + 1))
            start = k + 1
    if join_first:
        if len(runs) < 2:
            raise ValueError(f"join_first needs two levels before the head level, but the model has {len(runs)}")
        runs[:2] = [(runs[0][0], runs[1][1])]
    head = next(iter(model.heads))
    found = []
    for index, (a, b) in enumerate(runs):
        units = tuple(names[a:b])
        space = graph[str(graph.cuts[b])]  # `_writes` saw a space there
        observed = dataclasses.replace(
            space, name=f"level{index}", observe=f"body.{units[-1]}", act=_own_act(model, space, units)
        )
        found.append(Level(index, units, a, None, space.name, graph.cuts[a], observed))
    a = runs[-1][1] if runs else 0
    logits = FeatureSpace(f"level{len(runs)}", model.heads[head].out_features, (), (), observe=f"heads.{head}")
    found.append(Level(len(runs), tuple(names[a:]), a, head, None, graph.cuts[a], logits))
    return found


@torch.no_grad()
def level_input(model: MultiTaskNet, x: torch.Tensor, level: Level) -> torch.Tensor:
    """The tensor entering `level` when `model` runs on images `x` (no gradient)."""
    return model.run_body(x, 0, level.start)


def level_forward(model: MultiTaskNet, h: torch.Tensor, level: Level) -> torch.Tensor:
    """`level`'s observed output from its input `h`, with gradients to the level's parameters."""
    with observing(model, [level.observed], "pre") as seen:
        out = model.run_body(h, level.start, level.stop)
        if level.head is not None:
            model.heads[level.head](out)
    return seen[level.observed.name]


def chunked(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """`fn` over `x` in chunks of samples, concatenated: the same result with a bounded peak memory."""
    return torch.cat([fn(part) for part in x.split(chunk)])


@torch.no_grad()
def level_rows(model: MultiTaskNet, x: torch.Tensor, level: Level) -> torch.Tensor:
    """`level`'s output on images `x` as (samples·positions, units) rows (no gradient)."""

    def rows(part: torch.Tensor) -> torch.Tensor:
        return as_rows(level_forward(model, level_input(model, part, level), level), level.unit_dim)

    return chunked(rows, x)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Draw from torch's global generators (e.g. in `reset_parameters`) with `seed`, leaving their state as found."""
    devices = []
    if device.type == "cuda" and torch.cuda.is_initialized():  # the device's generator exists once CUDA runs
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def reinitialise(modules: Sequence[nn.Module], perturbation: float = 1.0) -> None:
    """θ ← (1 − ε)·θ + ε·θ_random for every parameter of `modules`, θ_random from `reset_parameters()` of EVERY
    submodule that has one (ε = 1: a fresh init). The paper resets only a level's direct children, which on its ViT
    levels re-initialises only the LayerNorms (algorithms.md §9.6); parameters no module resets (a class token, a
    positional embedding) keep their values."""
    with torch.no_grad():
        for module in modules:
            fresh = module if perturbation == 1 else copy.deepcopy(module)
            for sub in fresh.modules():
                reset = getattr(sub, "reset_parameters", None)
                if callable(reset):
                    reset()
            if fresh is not module:
                for p, q in zip(module.parameters(), fresh.parameters(), strict=True):
                    p.mul_(1 - perturbation).add_(q, alpha=perturbation)


@dataclass(frozen=True)
class LevelTraining:
    """How one level is trained: the paper's per-level optimiser (plain torch Adam or SGD, i.e. SGD without momentum,
    as `ALFusion._get_optimizer`), learning rate, weight decay and epochs; the loss against the targets (`mse`, with
    optional per-unit weights; `kl`: τ²·KL(targets ‖ softmax(output/τ)), the corrected KD; `paper_mse`: MSE of the raw
    outputs to target probabilities, the paper's KD as its code runs it, §9.6)."""

    optimizer: Optimizer
    lr: float
    epochs: int
    weight_decay: float
    loss: LevelLoss = "mse"
    temperature: float = 1.0


@dataclass(frozen=True)
class LevelResult:
    """Validation losses (mean over the validation rows) at the start and of the kept weights, epochs run, and the
    epoch whose weights were kept (0: the starting weights)."""

    initial_val_loss: float
    best_val_loss: float
    epochs_run: int
    best_epoch: int

    def record(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def level_loss(
    out: torch.Tensor, target: torch.Tensor, settings: LevelTraining, unit_weights: torch.Tensor | None
) -> torch.Tensor:
    """The mean loss over rows (samples·positions) of `out` against `target`, both (rows, units)."""
    if settings.loss == "kl":
        tau = settings.temperature
        return F.kl_div(F.log_softmax(out / tau, dim=-1), target, reduction="batchmean") * tau**2
    if settings.loss == "mse" and unit_weights is not None:
        return ((out - target) ** 2 * unit_weights).mean()
    return F.mse_loss(out, target)


def _level_fit(settings: LevelTraining) -> FitSettings:
    """The paper's level trainer on `fit`: a constant lr, batches of 32, patience 15, the best weights kept, and
    fp32 on every device (the results stay those of the paper's trainer)."""
    return FitSettings(
        optimizer=settings.optimizer,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        epochs=settings.epochs,
        batch_size=BATCH_SIZE,
        schedule="constant",
        patience=PATIENCE,
        keep_best=True,
        precision="fp32",
    )


def train_level(
    model: MultiTaskNet,
    level: Level,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    settings: LevelTraining,
    generator: torch.Generator,
    unit_weights: torch.Tensor | None = None,
    desc: str = "level",
) -> LevelResult:
    """Fit `level` of `model` (in place, nothing else changes) so its output on `inputs` (samples, …) matches
    `targets` ((samples·positions, units) rows in `as_rows` order), and keep the weights of the best validation loss.

    The samples are split 80/20 at random (`generator`, a CPU generator, also shuffles the batches of 32); training
    stops early after 15 epochs without a lower validation loss, as the paper's, but here the best weights, the
    starting ones included, are restored (the paper keeps the last). The model runs in eval mode: dropout is off, as
    the paper disables it, and BatchNorm keeps its running statistics.
    """
    n = len(inputs)
    if n < 2:
        raise ValueError(f"training {desc} needs at least 2 fusion samples (80/20 split), got {n}")
    if len(targets) % n or targets.shape[-1] != level.width:
        raise ValueError(
            f"training {desc}: targets of shape {tuple(targets.shape)} do not fit {n} samples of {level.width} units"
        )
    if settings.epochs < 0 or settings.lr <= 0 or settings.weight_decay < 0:
        raise ValueError(f"training {desc}: bad settings {settings}")
    per_sample = targets.reshape(n, -1, level.width)
    order = torch.randperm(n, generator=generator).to(inputs.device)
    n_val = max(1, math.floor(n * VAL_FRACTION))
    train, val = order[n_val:], order[:n_val]
    params = level.parameters(model)
    for p in params:
        p.requires_grad_(True)
    was_training = model.training
    model.eval()

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        out = as_rows(level_forward(model, inputs[idx], level), level.unit_dim)
        return level_loss(out, per_sample[idx].reshape(-1, level.width), settings, unit_weights)

    @torch.no_grad()
    def val_loss() -> float:
        total = sum(loss_on(idx) * len(idx) for idx in val.split(CHUNK))
        return float(total) / len(val)

    try:
        if settings.epochs == 0:
            initial = val_loss()
            return LevelResult(initial, initial, 0, 0)
        fitted = fit(params, loss_on, train, val_loss, _level_fit(settings), generator, desc=desc)
    finally:
        model.train(was_training)
    return LevelResult(fitted.initial_val_loss, fitted.best_val_loss, fitted.epochs_run, fitted.best_epoch)
