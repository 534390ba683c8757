"""Layer-by-layer least-squares neuron interpolation: the paper's LSFusion (algorithms.md §5.5), vectorised.

HF and KF walk a chain of conv/linear layers. At layer l, X is the layer's input in the FUSED network on the fusion
images (conv inputs unfolded into rows = samples × positions, plus a ones column for a bias), A_k parent k's output
of that layer (its pre-activations) on the same images. Every parent neuron is refitted from the fused network's own
inputs, W_k = X⁺A_k, the refits are combined into the fused layer (HF: pairs by LAP, KF: k-means centroids), written
back, and layer l+1 sees the updated fused network: errors of earlier layers are compensated.

X is never formed whole, nor its pseudo-inverse: G = XᵀX and XᵀA_k are accumulated over batches in float64, and with
G = VΛVᵀ (one eigh), W_k = VΛ⁻¹VᵀXᵀA_k: X⁺A_k with torch.linalg.pinv(X)'s default cutoff (singular values below
max(rows, cols)·eps(dtype of X)·σ_max dropped, i.e. eigenvalues of G below that squared), and never below what a
float64 eigh of G resolves (cols·eps·λ_max; with float32 inputs the first bound is the larger one). A ridge solve
would be cheaper but not X⁺: it shrinks every direction and keeps noise directions, such as dead inputs, that the
paper's pinv drops. Squaring X's condition number in G is why it is float64. Pre-activation distances
need no rows either: ‖X(u − v)‖² = (u − v)ᵀG(u − v) = ‖f_u − f_v‖² with features f = Λ^½Vᵀw (an orthogonal rotation
of the symmetric root's G^½w, so the same distances), and the misfit of a refit to its parent's actual
pre-activation, ‖Xw − a‖² = ‖a‖² − ‖f‖², comes from the accumulated column norms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from hetmerge.importance import Importance, importance_scores
from hetmerge.models import MultiTaskNet
from hetmerge.observe import as_rows
from hetmerge.progress import track

if TYPE_CHECKING:
    from hetmerge.methods.base import MergeContext

CHAIN = "HF/KF need a chain of conv/linear layers without normalisation, like the paper's MLP and VGG"


def _refusal(message: str) -> Exception:
    """A MergeError, imported here: `hetmerge.methods` imports this module while it registers HF and KF."""
    from hetmerge.methods.base import MergeError

    return MergeError(message)


@dataclass(frozen=True)
class Layer:
    """One weight-carrying layer of the chain: its module's qualified name and the feature space it writes (None
    for the class layer, the one head)."""

    module: str
    space: str | None


def _module_of(param: str) -> str:
    return param.rsplit(".", 1)[0]


def _check_module(model: MultiTaskNet, name: str, where: str) -> None:
    """Refuse layers the refit cannot express as rows × weights: anything but a Linear or a plain Conv2d."""
    module = model.get_submodule(name)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise _refusal(
                f"{where}: conv {name!r} has groups={module.groups}, padding={module.padding!r}, padding_mode="
                f"{module.padding_mode!r}; the least-squares refit unfolds plain convs (groups 1, zero padding)"
            )
    elif not isinstance(module, nn.Linear):
        raise _refusal(f"{where}: {name!r} is a {type(module).__name__}; {CHAIN}")


def layer_chain(model: MultiTaskNet) -> list[Layer]:
    """The model's layers in forward order, checked to form a chain: each feature space written by exactly one
    conv/linear layer (its weight's axis 0 and bias) and read by exactly the next, the last read by the one head,
    and no parameter or buffer outside these layers. Raises MergeError naming the culprit otherwise."""
    graph = model.space_graph()
    if len(model.heads) != 1:
        raise _refusal(f"the model has heads {list(model.heads)}; {CHAIN} ending in one class layer")
    head = f"heads.{next(iter(model.heads))}"
    writers = {space.name: sorted({_module_of(ref.param) for ref in space.producers}) for space in graph.spaces}
    layers = {
        name: [w for w in found if isinstance(model.get_submodule(w), nn.Linear | nn.Conv2d)]
        for name, found in writers.items()
    }
    for name, found in layers.items():  # the more basic refusal first: no normalisation would fix this one
        if len(found) > 1:
            raise _refusal(
                f"feature space {name!r} is a residual stream written by several layers {found}; the least-squares "
                f"refit needs one writer per space. {CHAIN}, not residual networks (ResNet, ViT)"
            )
    chain: list[Layer] = []
    for space in graph.spaces:
        others = [
            f"{w} ({type(model.get_submodule(w)).__name__})" for w in writers[space.name] if w not in layers[space.name]
        ]
        if others:
            raise _refusal(f"feature space {space.name!r} is also written by {others}; {CHAIN}")
        if not layers[space.name]:
            raise _refusal(f"feature space {space.name!r} is written by no conv/linear layer; {CHAIN}")
        module = layers[space.name][0]
        expected = {(f"{module}.weight", 0)} | ({(f"{module}.bias", 0)} if _has_bias(model, module) else set())
        if {(ref.param, ref.axis) for ref in space.producers} != expected:
            raise _refusal(f"feature space {space.name!r}: its producers {space.producers} are not {module}'s outputs")
        _check_module(model, module, f"feature space {space.name!r}")
        chain.append(Layer(module, space.name))
    chain.append(Layer(head, None))
    _check_module(model, head, "the class layer")
    for layer, space in zip(chain[1:], graph.spaces, strict=True):
        if [(ref.param, ref.axis) for ref in space.consumers] != [(f"{layer.module}.weight", 1)]:
            readers = [ref.param for ref in space.consumers]
            raise _refusal(f"feature space {space.name!r} is read by {readers}, not by the next layer alone; {CHAIN}")
    owned = {f"{layer.module}.{kind}" for layer in chain for kind in ("weight", "bias")}
    stray = sorted(set(model.state_dict()) - owned)
    if stray:
        raise _refusal(f"parameters/buffers {stray[:4]} belong to no conv/linear layer of the chain; {CHAIN}")
    return chain


def _has_bias(model: MultiTaskNet, module: str) -> bool:
    return getattr(model.get_submodule(module), "bias", None) is not None


def _signature(module: nn.Module) -> tuple:
    """What must agree between parents' layers (widths may differ)."""
    if isinstance(module, nn.Conv2d):
        return ("conv", module.kernel_size, module.stride, module.padding, module.dilation, module.bias is not None)
    return ("linear", module.bias is not None)


def common_chain(method: str, models: Sequence[MultiTaskNet]) -> list[Layer]:
    """The one chain every parent has (same layers and kinds; widths may differ), or a MergeError saying who differs."""
    chains = [layer_chain(m) for m in models]
    for i, chain in enumerate(chains[1:], start=1):
        kinds = [
            [_signature(m.get_submodule(layer.module)) for layer in c]
            for m, c in ((models[0], chains[0]), (models[i], chain))
        ]
        if chain != chains[0] or kinds[0] != kinds[1]:
            raise _refusal(
                f"method {method!r}: model {i}'s layers {[layer.module for layer in chain]} {kinds[1]} differ from "
                f"model 0's {[layer.module for layer in chains[0]]} {kinds[0]}; parents may differ in width only"
            )
    return chains[0]


def design_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as the rows of its least-squares system: (samples·positions, C_in·k·k [+ 1 for a bias]).

    Conv rows come out in the (batch, H_out, W_out) order of the conv's output and columns in its weight's
    (C_in, kh, kw) order, so X @ weight.reshape(C_out, -1).T + bias = the output as rows.
    """
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        rows = as_rows(x, -1)
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(len(rows), 1)], 1)
    return rows


def output_rows(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The layer's output (pre-activations) as (samples·positions, units), row-aligned with `design_rows`."""
    return as_rows(y, 1 if isinstance(module, nn.Conv2d) else -1)


class _Reached(Exception):
    """Raised by a hook to end a forward pass once the wanted tensor is in hand."""


def _run_until(model: nn.Module, name: str, on_input: bool, x: torch.Tensor) -> torch.Tensor:
    """Module `name`'s input (or output) when `model` runs on `x`; the layers after it are skipped."""
    seen: list[torch.Tensor] = []

    def grab(t: torch.Tensor) -> None:
        seen.append(t)
        raise _Reached

    module = model.get_submodule(name)
    if on_input:
        handle = module.register_forward_pre_hook(lambda _m, args: grab(args[0]))
    else:
        handle = module.register_forward_hook(lambda _m, _args, out: grab(out))
    try:
        model(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    return seen[0]


@dataclass(frozen=True)
class LayerSystem:
    """One layer's least-squares statistics over the fusion set, all float64: G = XᵀX, XᵀA_k and ‖a_{k,i}‖² per
    parent; `rows` and `dtype` (of X) set the pseudo-inverse's cutoff."""

    gram: torch.Tensor
    cross: list[torch.Tensor]
    energy: list[torch.Tensor]
    rows: int
    dtype: torch.dtype


@torch.no_grad()
def layer_system(
    fused: MultiTaskNet, parents: Sequence[MultiTaskNet], layer: Layer, batches: Iterable[torch.Tensor]
) -> LayerSystem:
    """Accumulate `layer`'s statistics: X from the fused network, A_k from each parent, batch by batch."""
    own = fused.get_submodule(layer.module)
    theirs = [p.get_submodule(layer.module) for p in parents]
    gram = torch.zeros((), dtype=torch.float64)
    cross = [gram] * len(parents)
    energy = [gram] * len(parents)
    rows = 0
    dtype = torch.float32
    for x in batches:
        design = design_rows(own, _run_until(fused, layer.module, True, x))
        dtype, rows = design.dtype, rows + len(design)
        design = design.double()
        gram = gram + design.T @ design
        for k, (parent, module) in enumerate(zip(parents, theirs, strict=True)):
            a = output_rows(module, _run_until(parent, layer.module, False, x)).double()
            cross[k] = cross[k] + design.T @ a
            energy[k] = energy[k] + a.square().sum(0)
    if not rows:
        raise _refusal("the least-squares refit got no fusion data")
    return LayerSystem(gram, cross, energy, rows, dtype)


@dataclass(frozen=True)
class Refits:
    """Each parent's neurons refitted from the fused network's inputs, per parent k:

    - `weights[k]` (cols, n_k): W_k = X⁺A_k, float64, a bias in the last row if the layer has one;
    - `features[k]` (rank, n_k): f = Λ^½VᵀW_k, so ‖X(u − v)‖ = ‖f_u − f_v‖ for refits u, v;
    - `misfit[k]` (n_k,): ‖Xw_{k,i} − a_{k,i}‖², what no weight vector can reproduce from these inputs.
    """

    weights: list[torch.Tensor]
    features: list[torch.Tensor]
    misfit: list[torch.Tensor]

    def combined(self, shares: Sequence[torch.Tensor], assign: torch.Tensor, width: int) -> torch.Tensor:
        """(cols, width) weighted means of all parents' refits per group: column j = Σ_{assign=j} s·w / Σ s."""
        w = torch.cat(self.weights, 1)
        s = torch.cat(list(shares)).to(w)
        totals = torch.zeros(width, dtype=w.dtype, device=w.device).index_add_(0, assign, s)
        sums = torch.zeros(width, w.shape[0], dtype=w.dtype, device=w.device).index_add_(0, assign, (w * s).T)
        return (sums / totals[:, None]).T


def refit(system: LayerSystem) -> Refits:
    """Solve every parent's least-squares refits at once from one eigendecomposition of G."""
    lam, vec = torch.linalg.eigh(system.gram)
    rtol = max(system.rows, len(lam)) * torch.finfo(system.dtype).eps
    floor = len(lam) * torch.finfo(lam.dtype).eps  # what eigh resolves: eigenvalues below are noise
    keep = lam > lam.max().clamp_min(0) * max(rtol**2, floor)
    root, vec = lam[keep].sqrt(), vec[:, keep]
    features = [(vec.T @ cross) / root[:, None] for cross in system.cross]  # Λ^-½VᵀXᵀA = Λ^½VᵀW
    weights = [vec @ (f / root[:, None]) for f in features]
    misfit = [(e - f.square().sum(0)).clamp_min(0) for e, f in zip(system.energy, features, strict=True)]
    return Refits(weights, features, misfit)


@torch.no_grad()
def write_layer(model: MultiTaskNet, layer: Layer, weights: torch.Tensor) -> None:
    """Set `layer`'s weight (and bias, the last row) from (cols, units) least-squares weights."""
    module = model.get_submodule(layer.module)
    w = weights.T
    if module.bias is not None:
        module.bias.copy_(w[:, -1])
        w = w[:, :-1]
    module.weight.copy_(w.reshape(module.weight.shape))


FuseLayer = Callable[[int, Layer, Refits], torch.Tensor]
"""(layer index, layer, the parents' refits) → the fused layer's (cols, width) weights."""


def interpolate(
    fused: MultiTaskNet,
    parents: Sequence[MultiTaskNet],
    chain: Sequence[Layer],
    batches: Callable[[], Iterable[torch.Tensor]],
    fuse_layer: FuseLayer,
) -> MultiTaskNet:
    """Fuse `chain` layer by layer into `fused` (in place, and returned): refit, combine, write, next layer on the
    updated network. One pass over the fusion set per layer."""
    for index, layer in enumerate(track(chain, desc="least-squares fusion", unit="layer")):
        refits = refit(layer_system(fused, parents, layer, batches()))
        write_layer(fused, layer, fuse_layer(index, layer, refits))
    return fused


def layer_importance(
    models: Sequence[MultiTaskNet], chain: Sequence[Layer], ctx: MergeContext, kind: Importance, normalise: bool
) -> list[list[torch.Tensor]]:
    """Per layer, per parent: the importance of the layer's output units (`neuron_importance` at their
    pre-activations; ones for the class layer, whose units are matched by identity), float64, optionally scaled to
    sum 1 per parent and layer (the paper's KF does that to uniform scores)."""
    spaces = [[m.space_graph()[layer.space] for layer in chain if layer.space] for m in models]
    per_model = []
    for model, scores in zip(models, importance_scores(models, spaces, ctx, kind), strict=True):
        ones = torch.ones(model.get_submodule(chain[-1].module).weight.shape[0], device=next(model.parameters()).device)
        per_model.append([scores[layer.space] if layer.space else ones for layer in chain])
    return [
        [(s / s.sum() if normalise else s).double() for s in layer_scores]
        for layer_scores in zip(*per_model, strict=True)
    ]
