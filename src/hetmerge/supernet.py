"""FS-Merge's Foldable SuperNet (algorithms.md §6.2-6.3): the N frozen source networks, with a learned merge map M
after and a learned unmerge map U before every layer, computing in a merged width d'.

The SuperNet is the merged architecture (a model of the sources' family at the merged widths) in which every
Linear/Conv2d is a `SuperLayer`: U expands the merged input to N copies (one per model), each model's own frozen
layer reads its copy, and M merges the N outputs back to d'. Everything between layers (norms, nonlinearities,
residual sums, attention's softmax, pooling) acts on the merged units, so each layer's M and U fold into one weight
W' = Mᵀ·blockdiag(W₁…W_N)·Uᵀ (`fold`): the folded model is a plain network of the merged widths that computes what
the SuperNet computes. The feature-space description drives it all: a layer's output axis names the space its M
merges, its input axis the space its U unmerges (none: the raw image, which every model reads as it is).
Parameters that write a space without being a layer (a class token, positional embeddings) get their own M; norms
of the merged width are learned (initialised from model 0 or the average); each task's head reads its model's
features through a one-model U (the paper's U_output, folded into the head here).

A SuperLayer computes either way: `explicit`ly, as the paper's SuperNet (N·d-wide copies between U and M), or
through its folded weight, composed differentiably every step; whichever costs fewer multiply-adds for the batch (a
ViT's many token rows favour the folded weight: a training step of the default ViT pair takes half the time). Both
are the same function with the same gradients (tested), so training is the paper's either way; `SuperNet.computing`
forces one.

Maps are per layer, not per space: a reader and a writer of one space learn different maps, as the paper's
U_att/M_o2 around every attention block. A map's rank scales with its space's width as the paper's hidden maps do
(rank · D_h/d): rank · width / (width of the features the heads read).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from hetmerge.models import MultiTaskNet
from hetmerge.spaces import SpaceGraph

MapKind = Literal["diagonal", "low_rank", "diagonal_and_low_rank", "full"]
MapInit = Literal["first", "average", "random"]
Direction = Literal["merge", "unmerge"]
Computation = Literal["auto", "explicit", "folded"]

LOW_RANK_FACTOR = 0.1  # the paper's scale of the low-rank factor that starts non-zero
NORMS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)
LAYERS = (nn.Linear, nn.Conv2d)


class FoldError(ValueError):
    """These models cannot be folded together into one SuperNet; the message says why."""


@dataclass(frozen=True)
class MapSpec:
    """How every map is parameterised: `kind`, `rank` (at the head-read width), `init`."""

    kind: MapKind = "diagonal_and_low_rank"
    rank: int = 12
    init: MapInit = "first"


class MergeMap(nn.Module):
    """A learned map between N models' concatenated units (N·d) and the merged units (d').

    `merge`: (…, N·d) → (…, d') by right-multiplying with M (N·d × d'); `unmerge`: (…, d') → (…, N·d) with
    U (d' × N·d). M = D + A·B: the diagonal part D stacks one diagonal per model (diag(m_i) as the i-th block of
    rows of M, or of columns of U), so `diagonal` is a per-unit weighted average; A·B has rank `rank`; `full` is
    dense. With d ≠ d' the diagonals cover the first min(d, d') units.
    """

    def __init__(
        self,
        space: str,
        n: int,
        d: int,
        merged: int,
        direction: Direction,
        spec: MapSpec,
        rank: int,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.space, self.n, self.d, self.merged, self.direction, self.kind = space, n, d, merged, direction, spec.kind
        wide, narrow = (n * d, merged) if direction == "merge" else (merged, n * d)
        scale = d**-0.5
        k = min(d, merged)
        if spec.kind == "full":
            dense = torch.randn(wide, narrow, generator=generator) * scale
            if spec.init != "random":
                dense = self._diagonal_matrix(self._start_diagonal(spec.init, n, k))
            self.dense = nn.Parameter(dense)
            return
        if spec.kind in ("diagonal", "diagonal_and_low_rank"):
            diag = torch.randn(n, k, generator=generator) * scale
            self.diag = nn.Parameter(diag if spec.init == "random" else self._start_diagonal(spec.init, n, k))
        if spec.kind in ("low_rank", "diagonal_and_low_rank"):
            if spec.init == "random":
                a = torch.randn(wide, rank, generator=generator) * scale / math.sqrt(rank)
                b = torch.randn(rank, narrow, generator=generator) * scale / math.sqrt(rank)
            else:  # A = 0 and B ≠ 0: the low-rank term starts at zero, yet gradients reach A (algorithms.md §9.7)
                a = torch.zeros(wide, rank)
                b = torch.randn(rank, narrow, generator=generator) * LOW_RANK_FACTOR * scale / rank
            self.a, self.b = nn.Parameter(a), nn.Parameter(b)

    def _start_diagonal(self, init: MapInit, n: int, k: int) -> torch.Tensor:
        """`first`: M takes model 0's units, `average`: the mean over models; U copies the merged units to all."""
        if self.direction == "unmerge":
            return torch.ones(n, k)
        if init == "first":
            return torch.cat([torch.ones(1, k), torch.zeros(n - 1, k)])
        return torch.full((n, k), 1.0 / n)

    def _diagonal_matrix(self, diag: torch.Tensor) -> torch.Tensor:
        """The (N·d × d') stacked-diagonal M, or its (d' × N·d) transpose for U, differentiable in `diag`."""
        n, k = diag.shape
        rows = (torch.arange(n, device=diag.device)[:, None] * self.d + torch.arange(k, device=diag.device)).flatten()
        cols = torch.arange(k, device=diag.device).repeat(n)
        stacked = diag.new_zeros(self.n * self.d, self.merged).index_put((rows, cols), diag.flatten())
        return stacked if self.direction == "merge" else stacked.T

    def matrix(self) -> torch.Tensor:
        """M (N·d × d') or U (d' × N·d)."""
        if self.kind == "full":
            return self.dense
        parts = []
        if hasattr(self, "diag"):
            parts.append(self._diagonal_matrix(self.diag))
        if hasattr(self, "a"):
            parts.append(self.a @ self.b)
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]

    def transform(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The map on the unit dimension `dim` of `x`."""
        return (x.movedim(dim, -1) @ self.matrix()).movedim(-1, dim)

    def extra_repr(self) -> str:
        return f"{self.space}, {self.direction}, n={self.n}, d={self.d}, merged={self.merged}, kind={self.kind}"


class SuperLayer(nn.Module):
    """N frozen copies of one Linear/Conv2d (one per model) between the unmerge map `unmerge` of its input and the
    merge map `merge` of its output. No `unmerge`: every model reads the raw input; no `merge`: one model's layer
    whose output is not a space (a task head)."""

    def __init__(self, sources: Sequence[nn.Module], merge: MergeMap | None, unmerge: MergeMap | None) -> None:
        super().__init__()
        first = sources[0]
        if isinstance(first, nn.Conv2d) and any(s.groups != 1 for s in sources):
            raise FoldError(f"grouped convolutions cannot be folded: {first}")
        self.conv = isinstance(first, nn.Conv2d)
        self.options = (
            {"stride": first.stride, "padding": first.padding, "dilation": first.dilation} if self.conv else {}
        )
        self.n = len(sources)
        self.register_buffer("weight_stack", torch.stack([s.weight.detach() for s in sources]))
        biases = [s.bias for s in sources]
        self.register_buffer(
            "bias_stack",
            None if biases[0] is None else torch.stack([b.detach() for b in biases]),  # type: ignore[union-attr]
        )
        self.merge, self.unmerge = merge, unmerge
        self.mode: Computation = "auto"

    @property
    def unit_dim(self) -> int:
        return 1 if self.conv else -1

    def per_model(self, x: torch.Tensor) -> torch.Tensor:
        """Each model's own layer on its unmerged copy: (…, N·out) on the unit dimension."""
        dim = self.unit_dim
        u = self.unmerge.transform(x, dim) if self.unmerge is not None else torch.cat([x] * self.n, dim=dim)
        if self.conv:
            weight = self.weight_stack.flatten(0, 1)
            bias = None if self.bias_stack is None else self.bias_stack.flatten()
            return F.conv2d(u, weight, bias, groups=self.n, **self.options)
        y = torch.einsum("...ni,noi->...no", u.unflatten(-1, (self.n, -1)), self.weight_stack)
        if self.bias_stack is not None:
            y = y + self.bias_stack
        return y.flatten(-2)

    def explicit(self, x: torch.Tensor) -> torch.Tensor:
        """The SuperNet's layer as the paper computes it: U, the N models' own layers on N·d units, then M."""
        y = self.per_model(x)
        return y if self.merge is None else self.merge.transform(y, self.unit_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same function, computed the cheaper way for this batch: U, the N layers and M are linear, so composing
        them into the folded weight first costs one product of the weights per step and then one layer's work per
        row (and holds no N·d-wide activations), where the explicit path costs N layers and two maps per row. Many
        rows (a ViT's tokens) favour the folded weight, few rows of a wide layer the explicit path; both give the
        same function and gradients (tested), and the choice depends on shapes only."""
        if self.mode == "explicit" or (self.mode == "auto" and not self._folding_is_cheaper(x)):
            return self.explicit(x)
        state = self.folded()
        if self.conv:
            return F.conv2d(x, state["weight"], state.get("bias"), **self.options)
        return F.linear(x, state["weight"], state.get("bias"))

    def _folding_is_cheaper(self, x: torch.Tensor) -> bool:
        """Whether composing the folded weight and applying it takes fewer multiply-adds than the explicit path."""
        n, out, inp = self.weight_stack.shape[:3]
        taps = self.weight_stack[0, 0, 0].numel()  # kernel positions of a convolution, 1 for a Linear
        d_in = inp if self.unmerge is None else self.unmerge.merged
        d_out = out if self.merge is None else self.merge.merged
        rows = x.numel() // x.shape[self.unit_dim]
        maps = (0 if self.unmerge is None else d_in * n * inp) + (0 if self.merge is None else n * out * d_out)
        explicit = rows * (maps + n * inp * out * taps)
        folding = n * out * inp * taps * (d_in + d_out) + rows * d_in * d_out * taps
        return folding < explicit

    def folded(self) -> dict[str, torch.Tensor]:
        """The one weight (and bias) that computes this layer in the merged widths: W' = Mᵀ·blockdiag(W)·Uᵀ
        (differentiable in the maps)."""
        w = self.weight_stack  # (N, out, in, *kernel)
        n, out, inp = w.shape[:3]
        merge = (
            self.merge.matrix().view(n, out, -1)
            if self.merge is not None
            else torch.eye(out, dtype=w.dtype, device=w.device)[None]
        )
        unmerge = (
            self.unmerge.matrix().view(-1, n, inp)
            if self.unmerge is not None
            else torch.eye(inp, dtype=w.dtype, device=w.device)[:, None].expand(-1, n, -1)
        )
        weight = torch.einsum("npq...,npa,bnq->ab...", w, merge, unmerge)
        state = {"weight": weight}
        if self.bias_stack is not None:
            state["bias"] = torch.einsum("np,npa->a", self.bias_stack, merge)
        return state


class MergedParameter(nn.Module):
    """A parametrization: a parameter that writes a space (class token, positional embedding) is M applied to the
    N models' copies concatenated along its unit axis."""

    def __init__(self, sources: Sequence[torch.Tensor], axis: int, merge: MergeMap) -> None:
        super().__init__()
        self.axis = axis
        self.register_buffer("stacked", torch.cat([s.detach() for s in sources], dim=axis))
        self.merge = merge

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        return self.merge.transform(self.stacked, self.axis)


def map_rank(spec: MapSpec, space: str, d: int, merged: int, reference: int, count: int) -> int:
    """The rank of a map of `space` (`count` models of width d, merged width `merged`): the spec's rank, scaled by
    merged/reference as the paper scales its hidden maps; it must fit the map's smaller side."""
    rank = max(1, round(spec.rank * merged / reference))
    if spec.kind in ("low_rank", "diagonal_and_low_rank") and rank > min(count * d, merged):
        raise FoldError(
            f"rank {spec.rank} is out of range: the maps of space {space!r} would need rank {rank} (scaled by its "
            f"width {merged}/{reference}), more than their smaller side {min(count * d, merged)}"
        )
    return rank


def check_ranks(models: Sequence[MultiTaskNet], spec: MapSpec, comp_factor: float) -> None:
    """Without building the SuperNet: every map's rank fits (see `map_rank`)."""
    source = models[0].space_graph()
    merged = merged_skeleton(models[:1], comp_factor, dict(models[0].describe()["heads"])).space_graph()
    reference = merged[head_space(merged)].width
    for space in source.spaces:
        map_rank(spec, space.name, space.width, merged[space.name].width, reference, len(models))


def merged_skeleton(models: Sequence[MultiTaskNet], comp_factor: float, heads: dict[str, int]) -> MultiTaskNet:
    """A fresh network of the models' family at the merged widths, with every task's head."""
    spec = models[0].spec if comp_factor == 1 else models[0].scaled_spec(comp_factor)
    return type(models[0])(spec, models[0].input_shape, heads)


def head_space(graph: SpaceGraph) -> str:
    """The feature space the task heads read, whose merged width the maps' ranks are scaled against."""
    return next(s.name for s in graph.spaces if any(ref.param.startswith("heads.") for ref in s.consumers))


def _owner_map(graph: SpaceGraph) -> dict[tuple[str, int], str]:
    return {(ref.param, ref.axis): space.name for space in graph.spaces for ref in space.axes()}


class SuperNet(nn.Module):
    """The SuperNet of `models` (one architecture, one head per task, each task owned by one model).

    `net` is the merged architecture with SuperLayers in place of its layers; `heads[t]` is task t's one-model
    unmerge map, and `owners[t]` the model whose features it reconstructs. `net.body(x)` gives the merged features,
    `reconstruct` each task's reconstruction of its model's features from them.
    """

    def __init__(
        self,
        models: Sequence[MultiTaskNet],
        owners: dict[str, int],
        spec: MapSpec,
        comp_factor: float,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        check_foldable(models)
        self.owners = dict(owners)
        self.head_classes = {t: models[i].heads[t].out_features for t, i in owners.items()}
        net = merged_skeleton(models, comp_factor, self.head_classes)
        device = next(models[0].parameters()).device
        net.to(device)
        source_graph, merged_graph = models[0].space_graph(), net.space_graph()
        owner = _owner_map(merged_graph)  # the merged net has every task's head; model 0's graph only its own
        reference = merged_graph[head_space(merged_graph)].width
        self.spec, self.source_graph, self.merged_graph = spec, source_graph, merged_graph
        self.n_models, self.reference, self.generator, self.device = len(models), reference, generator, device
        self.feature_dim = models[0].feature_dim

        modules = dict(net.named_modules())
        sources = [dict(m.named_modules()) for m in models]
        for name, module in modules.items():
            if isinstance(module, LAYERS):
                parent, _, child = name.rpartition(".")
                out_space = owner.get((f"{name}.weight", 0))
                in_space = owner.get((f"{name}.weight", 1))
                if name.startswith("heads."):
                    task = child
                    layer = SuperLayer([sources[owners[task]][name]], None, self.make_map(in_space, "unmerge", 1))
                else:
                    if out_space is None:
                        raise FoldError(f"layer {name!r} writes no feature space, so its output cannot be merged")
                    merge = self.make_map(out_space, "merge")
                    unmerge = None if in_space is None else self.make_map(in_space, "unmerge")
                    layer = SuperLayer([s[name] for s in sources], merge, unmerge)
                setattr(modules[parent] if parent else net, child, layer)
            elif isinstance(module, NORMS) and comp_factor == 1:
                _init_norm(module, [s[name] for s in sources], spec.init)
        for space in source_graph.spaces:
            for ref in space.producers:
                module_name, _, attr = ref.param.rpartition(".")
                if isinstance(modules.get(module_name), LAYERS + NORMS):
                    continue
                states = [dict(m.named_parameters())[ref.param] for m in models]
                holder = net.get_submodule(module_name)
                parametrize.register_parametrization(
                    holder, attr, MergedParameter(states, ref.axis, self.make_map(space.name, "merge")), unsafe=True
                )
                holder.parametrizations[attr].original.requires_grad_(False)
        self.net = net
        self.net.eval()

    def make_map(self, space: str, direction: Direction, count: int | None = None) -> MergeMap:
        """A fresh map between `count` (default: all) models' units of `space` and its merged units."""
        count = self.n_models if count is None else count
        d, merged = self.source_graph[space].width, self.merged_graph[space].width
        rank = map_rank(self.spec, space, d, merged, self.reference, count)
        return MergeMap(space, count, d, merged, direction, self.spec, rank, self.generator).to(self.device)

    def layers(self) -> dict[str, SuperLayer]:
        return {name: m for name, m in self.net.named_modules() if isinstance(m, SuperLayer)}

    def reconstruct(self, merged: torch.Tensor, tasks: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """Row j: task `names[tasks[j]]`'s head map applied to the merged features `merged[j]`, i.e. the SuperNet's
        reconstruction of the features of that task's model."""
        out = merged.new_zeros((len(merged), self.feature_dim))
        for t, task in enumerate(names):
            rows = (tasks == t).nonzero().squeeze(1)
            if len(rows):
                out = out.index_copy(0, rows, self.net.heads[task].unmerge.transform(merged[rows], -1))
        return out

    @contextlib.contextmanager
    def computing(self, mode: Computation) -> Iterator[None]:
        """Run every layer the paper's way (`explicit`: N copies between U and M), through its folded weight
        (`folded`), or whichever is cheaper for the batch (`auto`, the default)."""
        layers = self.layers().values()
        for layer in layers:
            layer.mode = mode
        try:
            yield
        finally:
            for layer in layers:
                layer.mode = "auto"

    def trainable(self) -> list[nn.Parameter]:
        """What FS-Merge learns: every map and every merged norm (the source weights are buffers)."""
        return [p for name, p in self.net.named_parameters() if not name.endswith(".original")]

    @torch.no_grad()
    def fold(self) -> MultiTaskNet:
        """The plain network of the merged widths that computes what this SuperNet computes."""
        current = self.net.state_dict()
        folded: dict[str, torch.Tensor] = {}
        for name, layer in self.layers().items():
            folded.update({f"{name}.{k}": v for k, v in layer.folded().items()})  # (fold runs without gradients)
        for name, module in self.net.named_modules():
            if parametrize.is_parametrized(module):
                folded.update({f"{name}.{attr}": getattr(module, attr) for attr in module.parametrizations})
        plain = type(self.net)(self.net.spec, self.net.input_shape, self.head_classes)
        plain.to(next(iter(current.values())).device)
        plain.load_state_dict({key: folded[key] if key in folded else current[key] for key in plain.state_dict()})
        return plain.eval()


def _init_norm(norm: nn.Module, sources: Sequence[nn.Module], init: MapInit) -> None:
    """A merged norm starts as model 0's (`first`), the models' mean (`average`) or fresh (`random`)."""
    if init == "random":
        return
    with torch.no_grad():
        for key, value in norm.state_dict().items():
            if key == "num_batches_tracked":
                continue
            stack = torch.stack([s.state_dict()[key] for s in sources])
            value.copy_(stack[0] if init == "first" else stack.mean(0))


def check_foldable(models: Sequence[MultiTaskNet]) -> None:
    """The SuperNet runs every model's own layer on its copy of the merged units, so the models must share one
    architecture (heads aside) and every layer must be one the SuperNet knows."""
    reference = {k: v for k, v in models[0].describe().items() if k != "heads"}
    for i, model in enumerate(models[1:], start=1):
        other = {k: v for k, v in model.describe().items() if k != "heads"}
        if other != reference:
            raise FoldError(
                f"models of different architectures cannot be folded together: model 0 is {reference}, model {i} "
                f"is {other}"
            )
    trainable = (*LAYERS, *NORMS)
    for name, module in models[0].named_modules():
        own = list(module.parameters(recurse=False))
        if own and not isinstance(module, trainable) and not _only_space_parameters(models[0], name):
            raise FoldError(f"module {name!r} ({type(module).__name__}) holds parameters FS-Merge cannot fold")


def _only_space_parameters(model: MultiTaskNet, module: str) -> bool:
    """Whether every parameter of `module` writes a feature space (so it gets a merge map)."""
    producers = {ref.param for space in model.space_graph().spaces for ref in space.producers}
    own = [f"{module}.{name}" for name, _ in model.get_submodule(module).named_parameters(recurse=False)]
    return all(p in producers for p in own)
