"""RegMean (algorithms.md §2.7): every linear map merged by the least squares of its inputs, the rest averaged.

For each Linear (and Conv2d, through im2col) of the body, with Gᵢ = XᵢᵀXᵢ the Gram matrix of model i's input to that
layer on model i's own tasks' few-shot images and G̃ᵢ = α·Gᵢ + (1 − α)·diag(Gᵢ) (α = `reg_coef`), the merged weight
minimises Σᵢ ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖² with shrunk cross terms: Wᵀ = (Σᵢ G̃ᵢ)⁻¹ Σᵢ G̃ᵢ Wᵢᵀ (torch Linear computes x·Wᵀ).
Tokens and conv patches are rows; a conv's columns follow `weight.reshape(out, -1)` (channel, then kernel tap).
Biases, norms, class token, positions and BatchNorm statistics are averaged; each task's head is its owner's.

`align` first matches the models' units on the merge slice (activation matching, or ZipIt!'s zip). RegMean then
works in the merged basis, where each merged unit's *members* are the model units the matching put into it. Model
i's input in the merged basis is, per merged unit, the mean of its members from model i (zero where it has none),
so its Gram is Vᵢᵀ G̃ᵢ Vᵢ with Vᵢ = Uᵢ·diag(members per merged unit)⁺. Where every merged unit holds at most one unit
of each model (no alignment, any permutation, a zip without same-model merges) Vᵢ = Uᵢ and this is exactly the
Gram of the permuted model's inputs, G' = Uᵢᵀ G̃ᵢ Uᵢ. Each merged output unit is the least-squares fit of all its
members at once (each member's target is its own output on its own model's data), so a merged unit that holds two
units of one model, or none, is still well defined: unit k solves (Σᵢ cᵢₖ G̃'ᵢ) w = Σ over members of G̃'ᵢ·(member's
row), cᵢₖ being model i's member count. Units with equal member counts share one system, so the solves loop over
count patterns (one for any alignment), never over units. Tensors that are not linear maps take the alignment's
own average over members (`apply_merges`).

An input that no participating model's images ever reach (a dead ReLU unit, a kernel tap that only ever reads
padding) leaves its column free; it gets the members' mean column, which is the ε → 0 limit of RegMean with ε·I
added to every Gram. `ctx.notes` records how many, per layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from hetmerge.matching import solvers
from hetmerge.matching.transforms import SpaceMerge, apply_merges
from hetmerge.merged import MergedModel
from hetmerge.methods.average import union_heads_model
from hetmerge.methods.base import (
    MergeContext,
    MergeError,
    MergeMethod,
    MethodParams,
    register,
    require_same_architecture,
)
from hetmerge.methods.spacewise import match_activations
from hetmerge.methods.zipit import ZipItParams, zip_fit
from hetmerge.models import MultiTaskNet
from hetmerge.params import Range
from hetmerge.progress import track
from hetmerge.task_targets import CHUNK, task_owners

GRAM_ELEMENTS = 1 << 22  # unfolded input elements per Gram product (memory, not results)
EPS = torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class RegMeanParams(MethodParams):
    """`reg_coef` α ∈ [0, 1]: the share of each Gram's off-diagonal kept (the paper's 0.7; 1 = plain least squares,
    0 = a per-input weighted average). `align`: "none" merges unit k with unit k, "permute" first aligns every
    model to model 0 by activation matching, "zipit" first zips the units with ZipIt!'s α = `zip_alpha`, β =
    `zip_beta` (the zipit method's defaults), which only this alignment reads."""

    reset_bn: bool = False
    reg_coef: Annotated[float, Range(0, 1)] = 0.7
    align: Literal["none", "permute", "zipit"] = "none"
    zip_alpha: Annotated[float, Range(0, 1)] = ZipItParams.alpha
    zip_beta: Annotated[float, Range(0, 1)] = ZipItParams.beta


def linear_layers(model: MultiTaskNet) -> dict[str, nn.Linear | nn.Conv2d]:
    """The body's Linear and Conv2d modules by name: the maps RegMean solves (heads are copied, not merged)."""
    layers: dict[str, nn.Linear | nn.Conv2d] = {}
    for name, module in model.body.named_modules(prefix="body"):
        if isinstance(module, nn.Conv2d):
            if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise MergeError(
                    f"RegMean's im2col Gram needs ungrouped convolutions with numeric zero padding; {name!r} has "
                    f"groups={module.groups}, padding={module.padding!r}, padding_mode={module.padding_mode!r}"
                )
            layers[name] = module
        elif isinstance(module, nn.Linear):
            layers[name] = module
    return layers


def layer_rows(layer: nn.Linear | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as rows (one per sample and token or patch), columns in `weight.reshape(out, -1)` order."""
    if isinstance(layer, nn.Conv2d):
        patches = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (B, C·kh·kw, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def input_grams(
    model: MultiTaskNet, images: torch.Tensor, layers: Sequence[str]
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Gram matrix XᵀX (float64, on the model's device) of each named layer's input over `images`, run through
    `model` in evaluation mode in chunks, and each Gram's number of rows. Only the Grams are kept, never the
    activations."""
    device = next(model.parameters()).device
    grams: dict[str, torch.Tensor] = {}
    rows = dict.fromkeys(layers, 0)

    def accumulate(name: str, layer: nn.Linear | nn.Conv2d, x: torch.Tensor) -> None:
        taps = layer.weight[0, 0].numel()  # a conv's kernel taps: each input element is read about this often
        for part in x.split(max(1, GRAM_ELEMENTS // (x[0].numel() * taps))):
            r = layer_rows(layer, part).double()
            grams[name] = r.T @ r if name not in grams else grams[name].addmm_(r.T, r)
            rows[name] += r.shape[0]

    handles = []
    for name in layers:
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear | nn.Conv2d):
            raise ValueError(f"input Grams: {name!r} is a {type(layer).__name__}, not a Linear or Conv2d")

        def hook(
            module: nn.Module, args: tuple[torch.Tensor, ...], name: str = name, layer: nn.Linear | nn.Conv2d = layer
        ) -> None:
            accumulate(name, layer, args[0])

        handles.append(layer.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            for part in track(images.split(CHUNK), desc="regmean input Grams", unit="chunk"):
                model.body(part.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if len(grams) != len(layers):
        raise ValueError(f"input Grams: no images reached layer(s) {sorted(set(layers) - set(grams))}")
    return {name: (g + g.T) / 2 for name, g in grams.items()}, rows


def shrink(gram: torch.Tensor, reg_coef: float) -> torch.Tensor:
    """G̃ = α·G + (1 − α)·diag(G): RegMean's shrinkage of the off-diagonal."""
    return reg_coef * gram + (1 - reg_coef) * torch.diag(gram.diagonal())


def _into_merged(t: torch.Tensor, matrix: torch.Tensor, taps: int, dim: int) -> torch.Tensor:
    """Dimension `dim` of `t` (d channels × `taps` kernel taps, channel-major) into m merged channels: matrixᵀ·t
    with `matrix` (d, m), applied to every tap alike."""
    t = t.movedim(dim, 0)
    rest = t.shape[1:]
    merged = torch.einsum("dtr,dm->mtr", t.reshape(matrix.shape[0], taps, -1), matrix)
    return merged.reshape(matrix.shape[1] * taps, *rest).movedim(0, dim)


class LayerSystem:
    """RegMean's normal equations of one layer in the merged basis, summed model by model as their Grams come.

    `inputs[i]` (d_in_i, m_in) and `outputs[i]` (d_out_i, m_out) are model i's 0/1 unmerge maps of the layer's
    input and output spaces (column k: model i's members of merged unit k); `taps` the kernel taps of a conv.
    """

    def __init__(self, name: str, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], taps: int) -> None:
        self.name = name
        self.inputs = [u.double() for u in inputs]
        self.outputs = [u.double() for u in outputs]
        self.taps = taps
        counts = torch.stack([u.sum(0) for u in self.outputs], dim=1)  # (m_out, N): members of each model
        self.patterns, which = torch.unique(counts, dim=0, return_inverse=True)
        self.rows = [(which == p).nonzero().squeeze(1) for p in range(len(self.patterns))]
        self.lhs: list[torch.Tensor | None] = [None] * len(self.patterns)
        self.rhs: torch.Tensor | None = None  # (m_in·taps, m_out): Σ over members of G̃'ᵢ·(member's row)
        self.members: torch.Tensor | None = None  # (m_out, m_in·taps): Σ of the members' rows

    def add(self, model: int, gram: torch.Tensor, weight: torch.Tensor, reg_coef: float) -> None:
        """Model `model`'s part, from its input Gram (original basis) and its weight (out, in[, kh, kw])."""
        u_in = self.inputs[model].to(gram.device)
        u_out = self.outputs[model].to(gram.device)
        w = weight.detach().to(gram).reshape(weight.shape[0], -1)
        if (u_in.shape[0] * self.taps, u_out.shape[0]) != (w.shape[1], w.shape[0]):
            raise MergeError(
                f"layer {self.name!r} of model {model}: weight of shape {tuple(weight.shape)} does not fit its spaces' "
                f"widths {u_in.shape[0]} (× {self.taps} taps) in and {u_out.shape[0]} out"
            )
        reader = u_in / u_in.sum(0).clamp_min(1)  # Vᵢ: the mean of model i's members of each merged unit
        read = _into_merged(shrink(gram, reg_coef), reader, self.taps, 1)  # G̃ᵢ·Vᵢ
        merged_gram = _into_merged(read, reader, self.taps, 0)
        rhs = read.T @ (w.T @ u_out)
        members = u_out.T @ _into_merged(w, u_in, self.taps, 1)
        self.rhs = rhs if self.rhs is None else self.rhs + rhs
        self.members = members if self.members is None else self.members + members
        for p, pattern in enumerate(self.patterns.tolist()):
            if pattern[model]:
                part = pattern[model] * merged_gram
                current = self.lhs[p]
                self.lhs[p] = part if current is None else current + part

    def solve(self) -> tuple[torch.Tensor, float, int]:
        """The merged weight (m_out, m_in·taps), the largest condition number of its systems, and the most inputs
        one system had that no member's data reaches (their columns are the members' mean)."""
        if self.rhs is None or self.members is None or any(lhs is None for lhs in self.lhs):
            raise ValueError(f"layer {self.name!r}: not every model's Gram was added")
        weight = self.rhs.new_empty(self.members.shape)
        worst, unreached = 1.0, 0
        for pattern, rows, lhs in zip(self.patterns, self.rows, self.lhs, strict=True):
            assert lhs is not None
            dead = lhs.diagonal() == 0
            lhs = lhs.clone()
            lhs.diagonal().masked_fill_(dead, float(pattern.sum()))
            rhs = torch.where(dead[:, None], self.members[rows].T, self.rhs[:, rows])
            eigen = torch.linalg.eigvalsh(lhs)
            if eigen[0] <= eigen[-1] * len(eigen) * EPS:
                raise MergeError(
                    f"RegMean's Gram matrix of layer {self.name!r} is singular to working precision (eigenvalues "
                    f"{float(eigen[0]):.3g} … {float(eigen[-1]):.3g}): the inputs of its {len(eigen)} columns are "
                    "linearly dependent on the few-shot images; use reg_coef < 1 or more images"
                )
            worst = max(worst, float(eigen[-1] / eigen[0]))
            unreached = max(unreached, int(dead.sum()))
            weight[rows] = torch.linalg.solve(lhs, rhs).T
        return weight, worst, unreached


def identity_merges(model: MultiTaskNet, n: int) -> dict[str, SpaceMerge]:
    """Every space merged unit by unit (unit k of every model into merged unit k): no alignment."""
    return {s.name: SpaceMerge.from_permutations([torch.arange(s.width)] * n) for s in model.space_graph().spaces}


def layer_maps(
    models: Sequence[MultiTaskNet], merges: Mapping[str, SpaceMerge], name: str, layer: nn.Linear | nn.Conv2d
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per model, the unmerge maps of the layer's input and output spaces (the identity on an axis no space names,
    e.g. the pixels a first layer reads)."""
    axes = models[0].space_graph().axes_of(f"{name}.weight")

    def maps(axis: int) -> list[torch.Tensor]:
        if axis not in axes:
            return [torch.eye(layer.weight.shape[axis], dtype=torch.float64)] * len(models)
        return list(merges[axes[axis][0].name].unmerge)

    return maps(1), maps(0)


@register
class RegMean(MergeMethod):
    """Every linear map solved from the models' input Grams on few-shot data, optionally after an alignment."""

    name = "regmean"
    paper = "RegMean"
    Params = RegMeanParams
    uses_few_shot = True
    uses_statistics = True  # for the alignments; RegMean's own Grams come from the few-shot slice
    params: RegMeanParams

    def keeps_first_basis(self) -> bool:
        return self.params.align != "zipit"

    def risk(self, models: Sequence[MultiTaskNet]) -> str | None:
        require_same_architecture(self.name, models)
        linear_layers(models[0])
        if self.params.align == "zipit":
            return zip_fit(self.name, models, self.params.zip_alpha, self.params.zip_beta)
        return None

    def alignment(self, models: Sequence[MultiTaskNet], ctx: MergeContext) -> dict[str, SpaceMerge]:
        """Every space's merge: unit by unit, or matched on the merge slice's activation statistics."""
        align = self.params.align
        if align == "none":
            return identity_merges(models[0], len(models))
        solver = solvers.align if align == "permute" else solvers.Zip(self.params.zip_alpha, self.params.zip_beta)
        return match_activations(models, ctx.statistics(models), solver)

    def combine(self, models: Sequence[MultiTaskNet], ctx: MergeContext) -> MergedModel:
        data = ctx.require_few_shot(f"method {self.name!r}").train
        tasks = tuple(sorted({t for m in models for t in m.heads}))
        data.require_tasks(tasks, f"method {self.name!r}")
        owners = task_owners(self.name, models, tasks)
        merges = self.alignment(models, ctx)
        target = union_heads_model(models).to(ctx.device)
        state = apply_merges(models, merges, target)
        layers = linear_layers(models[0])
        systems = {}
        for name, layer in layers.items():
            inputs, outputs = layer_maps(models, merges, name, layer)
            taps = layer.weight[0, 0].numel()
            systems[name] = LayerSystem(name, inputs, outputs, taps)
        rows: dict[str, list[int]] = {name: [] for name in layers}
        images = []
        for i, model in enumerate(models):
            own = torch.tensor([data.names.index(t) for t, o in zip(tasks, owners, strict=True) if o == i])
            mine = data.images[torch.isin(data.tasks, own.to(data.tasks.device))]
            grams, counts = input_grams(model, mine, list(layers))
            images.append(len(mine))
            for name, gram in grams.items():
                if not bool(torch.isfinite(gram).all()):
                    raise MergeError(
                        f"method {self.name!r}: the inputs of layer {name!r} in model {i} hold NaN or inf on its "
                        "tasks' images"
                    )
                systems[name].add(i, gram, model.get_submodule(name).weight, self.params.reg_coef)
                rows[name].append(counts[name])
        condition: dict[str, float] = {}
        unreached: dict[str, int] = {}
        for name, system in systems.items():
            weight, condition[name], dead = system.solve()
            if dead:
                unreached[name] = dead
            key = f"{name}.weight"
            state[key] = weight.reshape(state[key].shape).to(state[key])
        target.load_state_dict(state)
        worst = max(condition, key=condition.__getitem__)
        ctx.notes.update(
            reg_coef=self.params.reg_coef,
            align=self.params.align,
            images=images,
            gram_rows=rows,
            condition=condition,
            condition_max=condition[worst],
            condition_max_layer=worst,
            unreached_inputs=unreached,
        )
        return MergedModel(target)
