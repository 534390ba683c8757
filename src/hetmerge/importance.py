"""Neuron importance: how much each unit of a feature space contributes to the true class's logit.

Same-task fusion weighs units by these scores (OTFusion's marginals, k-means weights). As the Neuron
Interpolation paper's `utils/neuron_importance.py`, a unit's score is |attribution| summed over the samples and
every non-unit dim (positions, tokens), divided by the number of samples, plus 1e-8 so that no unit weighs
nothing; the attribution's target is each sample's true label and its baseline the all-zero image.

- `uniform`: every unit scores 1 (no data needed);
- `conductance`: captum's `LayerConductance` (integrated gradients through the unit, `n_steps` steps), computed
  for every space in ONE pass: captum runs the whole network (n_steps + 1) times per layer, so a VGG's 8 layers
  cost 8 such passes; here one forward over the scaled inputs keeps every space's tensor and one backward gives
  all their gradients, then captum's sum Σₖ (y(αₖ₊₁) − y(αₖ))·∂F/∂y(αₖ) at captum's Gauss-Legendre points
  (tests check the result against `LayerConductance` space by space);
- `deeplift`: captum's `LayerDeepLift` (rescale rule). Captum applies the rule only to the nonlinearity modules
  it knows (ReLU, ELU, LeakyReLU, Sigmoid, Tanh, Softplus, Softmax, MaxPool modules), each of which must be used
  once per forward: the MLP, VGG and ResNet units satisfy that. Anything else passes plain gradients, so on the ViT
  (GELU, the functional attention softmax, the q·k and weights·v products) "deeplift" is DeepLift on the linear
  parts and gradient × (input − baseline) at those operations. The paper's code runs captum on the same kind of
  ViT, so its DeepLIFT rows are this too. A pre-activation is attributed at its nonlinearity's output, where
  the rescale rule gives it the same value (see the code); for the ViT's GELU that is Δoutput × the multiplier
  of the output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from captum.attr import LayerDeepLift
from captum.attr._utils.approximation_methods import approximation_parameters
from torch import nn

from hetmerge.levels import levels
from hetmerge.models import MultiTaskNet
from hetmerge.observe import Point, observing, probe
from hetmerge.precompute import register_precompute
from hetmerge.progress import track
from hetmerge.spaces import FeatureSpace

if TYPE_CHECKING:
    from hetmerge.methods.base import MergeContext

Importance = Literal["uniform", "conductance", "deeplift"]
IMPORTANCES: tuple[str, ...] = get_args(Importance)


def importance_input(kind: Importance) -> tuple[str, ...]:
    """The precomputed input holding the `kind` scores a method reads (none for uniform, which reads no data)."""
    return () if kind == "uniform" else (f"importance_{kind}",)


def importance_scores(
    models: Sequence[MultiTaskNet], spaces: Sequence[Sequence[FeatureSpace]], ctx: MergeContext, kind: Importance
) -> list[dict[str, torch.Tensor]]:
    """`neuron_importance` of each model's `spaces` at their pre-activations: from the pipeline's precomputed input
    where the context has it (computed once for every method of these models), else computed here."""
    name = importance_input(kind)
    if name and name[0] in ctx.precomputed:
        record = ctx.precomputed[name[0]]
        if record.get("importance") != kind or len(record.get("scores", ())) != len(models):
            raise ValueError(f"precomputed {name[0]!r} is not a record of {kind} scores of {len(models)} models")
        found = []
        for model, own, scores in zip(models, spaces, record["scores"], strict=True):
            device = next(model.parameters()).device
            missing = [space.name for space in own if _key(space) not in scores]
            if missing:
                raise ValueError(f"precomputed {name[0]!r} has no scores of {missing}: compute it again")
            found.append({s.name: torch.tensor(scores[_key(s)], dtype=torch.float32, device=device) for s in own})
        return found
    labelled = ctx.require_labelled(f"neuron importance {kind!r}") if name else None
    return [
        neuron_importance(model, own, labelled() if labelled else (), kind)
        for model, own in zip(models, spaces, strict=True)
    ]


def _key(space: FeatureSpace) -> str:
    """Where a space's pre-activation is observed: the spaces of one place score alike, whatever their names."""
    module, on_input = probe(space, "pre")
    return f"{module}:{'input' if on_input else 'output'}"


def _observations(model: MultiTaskNet) -> list[FeatureSpace]:
    """Everything a same-task method weighs: every space and every KF-Gradient level's output (with and without its
    first two levels joined), one per place of observation."""
    spaces = list(model.space_graph().spaces)
    for join in (False, True):
        try:
            spaces += [lvl.observed for lvl in levels(model, join)[:-1]]
        except ValueError:  # too few levels to join
            continue
    return list({_key(space): dataclasses.replace(space, name=_key(space)) for space in spaces}.values())


def _precompute(kind: Importance) -> Any:
    def compute(models: Sequence[MultiTaskNet], ctx: MergeContext) -> dict[str, Any]:
        labelled = ctx.require_labelled(f"neuron importance {kind!r}")
        scores = []
        for model in models:
            observed = _observations(model)
            found = neuron_importance(model, observed, labelled(), kind)
            scores.append({space.name: found[space.name].tolist() for space in observed})
        return {"kind": "importance", "importance": kind, "scores": scores}

    return compute


class _Logits(nn.Module):
    """The one head's logits as a plain tensor: captum attributes a module's tensor output to one target."""

    def __init__(self, model: MultiTaskNet, head: str) -> None:
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[self.head]


def neuron_importance(
    model: MultiTaskNet,
    spaces: Sequence[FeatureSpace],
    labelled: Iterable[tuple[torch.Tensor, torch.Tensor]],
    kind: Importance,
    point: Point = "pre",
    n_steps: int = 10,
) -> dict[str, torch.Tensor]:
    """Per space name, a (width,) float32 score on the model's device, observed at `point` of the space.

    `labelled` yields (images, labels) with labels the class index in the model's one head; it is not read for
    `uniform`.
    """
    if kind not in IMPORTANCES:
        raise ValueError(f"unknown neuron importance {kind!r}; known: {list(IMPORTANCES)}")
    if len(model.heads) != 1:
        raise ValueError(
            f"neuron importance attributes the true class's logit, so it needs a model of one task with exactly "
            f"one head over all classes, but the model has heads {list(model.heads)}"
        )
    device = next(model.parameters()).device
    if kind == "uniform":
        return {space.name: torch.ones(space.width, device=device) for space in spaces}
    if n_steps < 1:
        raise ValueError(f"neuron importance: n_steps must be at least 1, got {n_steps}")
    head = next(iter(model.heads))
    classes = model.heads[head].out_features
    forward = _Logits(model, head)
    deeplift = {}
    if kind == "deeplift":
        for space in spaces:
            module, on_input = probe(space, point)
            if module == space.act:
                # The rescale rule gives a unit the same attribution at an elementwise nonlinearity's input as at its
                # output (its multiplier is Δout/Δin), but captum applies the rule in the module's backward pass,
                # after the gradient at its input has been read: there it would return gradient × Δin instead.
                on_input = False
            deeplift[space.name] = (LayerDeepLift(forward, model.get_submodule(module)), on_input)
    totals = {space.name: torch.zeros(space.width, device=device) for space in spaces}
    samples = 0
    for x, y in track(labelled, desc=f"neuron importance ({kind})", unit="batch"):
        x, y = x.to(device), y.to(device)
        if y.numel() and (y.min() < 0 or y.max() >= classes):
            raise ValueError(
                f"neuron importance: labels must be class indices in [0, {classes}) of head {head!r}, got labels "
                f"from {int(y.min())} to {int(y.max())}"
            )
        if kind == "conductance":
            found = _conductance(forward, spaces, point, x, y, n_steps)
        else:
            found = {}
            for space in spaces:
                method, on_input = deeplift[space.name]
                with warnings.catch_warnings(), _unpool_allowed():
                    # LayerDeepLift announces the temporary hooks it sets on the nonlinearities on every call.
                    warnings.filterwarnings("ignore", message="Setting forward, backward hooks", category=UserWarning)
                    found[space.name] = method.attribute(
                        x, baselines=torch.zeros_like(x), target=y, attribute_to_layer_input=on_input
                    )
        for space in spaces:
            attr = found[space.name].detach().abs().movedim(space.unit_dim, -1)
            if attr.shape[-1] != space.width:
                raise ValueError(
                    f"neuron importance: the tensor observed for space {space.name!r} at {point!r} has "
                    f"{attr.shape[-1]} units on dim {space.unit_dim}, but the space has {space.width}"
                )
            totals[space.name] += attr.reshape(-1, space.width).sum(dim=0).float()
        samples += len(x)
    if samples == 0:
        raise ValueError(f"neuron importance {kind!r} needs labelled fusion data, but the data yielded no samples")
    return {name: total / samples + 1e-8 for name, total in totals.items()}


@contextlib.contextmanager
def _unpool_allowed() -> Iterator[None]:
    """Captum's DeepLift rule for max-pooling un-pools, which torch flags as nondeterministic on a GPU: where a
    caller asked for deterministic algorithms (as training does), let it run with a warning instead of failing."""
    strict = torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    if strict:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        if strict:
            torch.use_deterministic_algorithms(True)


def _conductance(
    forward: nn.Module, spaces: Sequence[FeatureSpace], point: Point, x: torch.Tensor, y: torch.Tensor, n_steps: int
) -> dict[str, torch.Tensor]:
    """Captum's layer conductance of every space for one batch, from one forward and one backward pass over the
    n_steps + 1 scaled inputs α·x (baseline zero) at captum's Gauss-Legendre points."""
    _, alphas_of = approximation_parameters("gausslegendre")
    alphas = alphas_of(n_steps + 1)
    n = len(x)
    scaled = torch.cat([alpha * x for alpha in alphas]).requires_grad_()
    with torch.enable_grad(), observing(forward.model, spaces, point) as seen:
        logits = forward(scaled)
        target = logits.gather(1, y.repeat(len(alphas))[:, None]).sum()
        tensors = [seen[space.name] for space in spaces]
        grads = torch.autograd.grad(target, tensors)
    return {
        space.name: ((h[n:] - h[:-n]) * g[:-n]).reshape(n_steps, n, *h.shape[1:]).sum(0)
        for space, h, g in zip(spaces, (t.detach() for t in tensors), grads, strict=True)
    }


for _kind in IMPORTANCES[1:]:
    register_precompute(f"importance_{_kind}", _precompute(_kind))
