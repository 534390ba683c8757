"""FS-Merge (Foldable SuperNets, algorithms.md §6): learn merge/unmerge maps around the frozen layers of N models of
different tasks from a few unlabelled images per task, then fold them into one plain network.

The loss is the paper's reconstruction with task ids: for an image of task t, the SuperNet's reconstruction of model
t's features (through task t's head map) against model t's own features (MSE); `inner_weight` adds the inner-feature
terms (each layer that writes a cut of the body: model t's own output of that layer inside the SuperNet against the
original's, divided by the target's mean square). Labels are never used.

`mode="global"` trains every map end to end (the paper's implementation). `mode="local"` trains block by block (a
block = one body unit holding layers, with the units around it that hold none), as §6.5 infers the paper's
unreleased driver: each block's maps learn, from the merged output of the blocks before it, to reconstruct the N
models' features at the block's end (concatenated, through an end unmerge map that is not folded, whose trained
values start the next block's unmerge maps of that space); the last block learns the task-id loss with the heads'
maps. Only one block's activations are ever held for the backward pass.

`order="sequential"` merges more than two models the paper's way (`learn_tasks_sequentially`): the first two, then
the folded result with the third, and so on; `joint` builds one SuperNet of all N.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from hetmerge.data.few_shot import FewShot, TaskImages
from hetmerge.levels import chunked
from hetmerge.merged import MergedModel
from hetmerge.methods.base import MergeContext, MergeError, MergeMethod, register
from hetmerge.methods.learned import FitParams, fit_on_tasks
from hetmerge.models import MultiTaskNet
from hetmerge.params import Range, as_dict
from hetmerge.supernet import (
    FoldError,
    MapInit,
    MapKind,
    MapSpec,
    MergeMap,
    SuperLayer,
    SuperNet,
    check_foldable,
    check_ranks,
)
from hetmerge.task_targets import CHUNK, owner_features, task_owners


@dataclass(frozen=True)
class FSMergeParams(FitParams):
    """`maps`: the M/U parameterisation (§6.3); `rank` at the width the heads read (other spaces scale it with their
    width); `comp_factor`: merged width ⌊d·comp_factor⌋ (MLP and ViT only; at most N, the concatenated width)."""

    maps: MapKind = "diagonal_and_low_rank"
    rank: Annotated[int, Range(1)] = 12
    comp_factor: Annotated[float, Range(0, open_low=True)] = 1.0
    init: MapInit = "first"
    mode: Literal["global", "local"] = "global"
    order: Literal["joint", "sequential"] = "joint"
    inner_weight: Annotated[float, Range(0)] = 0.0


@register
class FSMerge(MergeMethod):
    """Learned merge and unmerge maps around the frozen models' layers, trained on few-shot data, then folded."""

    name = "fs_merge"
    paper = "FS-Merge"
    Params = FSMergeParams
    uses_few_shot = True
    params: FSMergeParams

    def spec(self) -> MapSpec:
        return MapSpec(self.params.maps, self.params.rank, self.params.init)

    def risk(self, models: Sequence[MultiTaskNet]) -> str | None:
        p = self.params
        p.fit_settings()
        if p.maps == "low_rank" and p.init != "random":
            raise MergeError(
                f"method {self.name!r}: maps 'low_rank' start at zero with init {p.init!r} (A = 0), so the SuperNet "
                "would compute nothing at first; use init 'random', or maps with a diagonal"
            )
        if p.mode == "local" and p.inner_weight > 0:
            raise MergeError(f"method {self.name!r}: inner-feature terms are for mode 'global', local trains per block")
        at_once = 2 if p.order == "sequential" else len(models)
        if p.comp_factor > at_once:
            raise MergeError(
                f"method {self.name!r}: comp_factor {p.comp_factor} is out of range (0, {at_once}]: wider than the "
                f"{at_once} models it merges at once, concatenated"
            )
        try:
            check_foldable(models)
            check_ranks(models[:at_once], self.spec(), p.comp_factor)
        except (FoldError, NotImplementedError, ValueError) as err:
            raise MergeError(f"method {self.name!r}: {err}") from err
        return None

    def _supernet(self, models: Sequence[MultiTaskNet], generator: torch.Generator) -> SuperNet:
        owners = {task: i for i, m in enumerate(models) for task in m.heads}
        return SuperNet(models, owners, self.spec(), self.params.comp_factor, generator)

    def combine(self, models: Sequence[MultiTaskNet], ctx: MergeContext) -> MergedModel:
        few = ctx.require_few_shot(f"method {self.name!r}").to(ctx.device)
        tasks = tuple(t for m in models for t in m.heads)
        for part in (few.train, few.val):
            try:
                part.require_tasks(tasks, f"method {self.name!r}")
            except ValueError as err:
                raise MergeError(str(err)) from err
        task_owners(self.name, models, tasks)
        generator = torch.Generator().manual_seed(ctx.seed)
        steps: list[dict[str, Any]] = []
        if self.params.order == "sequential" and len(models) > 2:
            merged = models[0]
            for k, model in enumerate(models[1:], start=1):
                merged = self._merge([merged, model], ctx, generator, f"{self.name}-step{k}", steps)
        else:
            merged = self._merge(models, ctx, generator, self.name, steps)
        ctx.notes.update(settings=as_dict(self.params), steps=steps)
        return MergedModel(merged)

    def _merge(
        self,
        models: Sequence[MultiTaskNet],
        ctx: MergeContext,
        generator: torch.Generator,
        desc: str,
        steps: list[dict[str, Any]],
    ) -> MultiTaskNet:
        """One SuperNet of `models`, trained on their tasks' images, folded."""
        few = ctx.require_few_shot(f"method {self.name!r}").to(ctx.device)
        restricted = FewShot(_restrict(few.train, models), _restrict(few.val, models), few.originals, few.aug_factor)
        step_ctx = dataclasses.replace(ctx, few_shot=restricted)
        supernet = self._supernet(models, generator)
        owners = task_owners(self.name, models, step_ctx.require_few_shot(self.name).train.names)
        inner = _InnerTerms(supernet, models, owners) if self.params.inner_weight > 0 else None
        loss_for = _task_loss(supernet, models, owners, inner, self.params.inner_weight)

        record: dict[str, Any] = {"step": desc, "models": len(models)}
        if self.params.mode == "global":
            with inner or contextlib.nullcontext():
                record["memory"] = self._fit(models, supernet.trainable(), loss_for, step_ctx, desc)
        else:
            record.update(self._local(supernet, models, owners, step_ctx, desc))
        folded = supernet.fold()
        record["fold_error"] = _fold_error(supernet, folded, step_ctx.require_few_shot(self.name).val)
        steps.append(record)
        return folded

    def _fit(
        self,
        models: Sequence[MultiTaskNet],
        params: list[nn.Parameter],
        loss_for: Callable[[TaskImages], Callable[[torch.Tensor], torch.Tensor]],
        ctx: MergeContext,
        desc: str,
    ) -> dict[str, int]:
        """Train `params` with the shared fit loop; returns the memory one training step holds."""
        settings = self.params.fit_settings()
        train = ctx.require_few_shot(self.name).train.to(ctx.device)
        first = torch.arange(min(settings.batch_size, len(train.images)), device=ctx.device)
        loss_on = loss_for(train)
        memory = training_memory(params, lambda: loss_on(first))
        fit_on_tasks(self.name, models, params, loss_for, ctx, settings, desc, as_dict(self.params))
        return memory

    def _local(
        self,
        supernet: SuperNet,
        models: Sequence[MultiTaskNet],
        owners: Sequence[int],
        ctx: MergeContext,
        desc: str,
    ) -> dict[str, Any]:
        """Block-wise training (module docstring); returns each block's units and memory, and the peak."""
        net, graph = supernet.net, models[0].space_graph()
        blocks = _blocks(net)
        records = []
        for b, (start, stop) in enumerate(blocks):
            params = [
                p
                for unit in list(net.body)[start:stop]
                for n, p in unit.named_parameters()
                if not n.endswith(".original")
            ]
            if b == len(blocks) - 1:
                params += [p for head in net.heads.values() for p in head.parameters()]
                loss_for = _task_loss(supernet, models, owners, None, 0.0, start)
            else:
                space = graph.cuts[stop]
                if space is None:
                    raise MergeError(f"method {self.name!r}: local mode needs a feature space after body unit {stop}")
                end = supernet.make_map(space, "unmerge")
                params += list(end.parameters())
                loss_for = _block_loss(net, models, end, start, stop, graph[space].unit_dim)
            memory = self._fit(models, params, loss_for, ctx, f"{desc}-block{b}")
            records.append({"block": b, "units": [start, stop], "memory": memory})
            if b < len(blocks) - 1:
                for p in params:
                    p.requires_grad_(False)
                for layer in (m for unit in list(net.body)[stop:] for m in unit.modules()):
                    if isinstance(layer, SuperLayer) and layer.unmerge is not None and layer.unmerge.space == space:
                        layer.unmerge.load_state_dict(end.state_dict())
        peak = {key: max(r["memory"][key] for r in records) for key in records[0]["memory"]}
        return {"blocks": records, "memory": peak}


def _task_loss(
    supernet: SuperNet,
    models: Sequence[MultiTaskNet],
    owners: Sequence[int],
    inner: _InnerTerms | None,
    inner_weight: float,
    start: int = 0,
) -> Callable[[TaskImages], Callable[[torch.Tensor], torch.Tensor]]:
    """The task-id reconstruction loss (plus the inner terms) of the SuperNet from body unit `start` on; the frozen
    units before it run once per data set."""
    net = supernet.net

    def loss_for(data: TaskImages) -> Callable[[torch.Tensor], torch.Tensor]:
        targets = owner_features(models, data, owners)
        with torch.no_grad():
            inputs = chunked(lambda h: net.run_body(h, 0, start), data.images) if start else data.images

        def loss_on(idx: torch.Tensor) -> torch.Tensor:
            merged = net.run_body(inputs[idx], start)
            loss = F.mse_loss(supernet.reconstruct(merged, data.tasks[idx], data.names), targets[idx])
            if inner is not None:
                loss = loss + inner_weight * inner.loss(data.images[idx], data.tasks[idx])
            return loss

        return loss_on

    return loss_for


def _block_loss(
    net: MultiTaskNet, models: Sequence[MultiTaskNet], end: MergeMap, start: int, stop: int, unit_dim: int
) -> Callable[[TaskImages], Callable[[torch.Tensor], torch.Tensor]]:
    """An inner block's loss: its output, unmerged by its end map, against the N models' concatenated features at
    its end; its input is the trained blocks' merged output, computed once per data set."""

    def loss_for(data: TaskImages) -> Callable[[torch.Tensor], torch.Tensor]:
        with torch.no_grad():
            inputs = chunked(lambda h: net.run_body(h, 0, start), data.images)
            wanted = torch.cat([chunked(lambda h, m=m: m.run_body(h, 0, stop), data.images) for m in models], unit_dim)

        def loss_on(idx: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(end.transform(net.run_body(inputs[idx], start, stop), unit_dim), wanted[idx])

        return loss_on

    return loss_for


def _restrict(data: TaskImages, models: Sequence[MultiTaskNet]) -> TaskImages:
    """The images of the tasks that `models` own (a sequential step merges only some of them)."""
    names = tuple(t for m in models for t in m.heads)
    if names == data.names:
        return data
    kept = torch.tensor([data.names.index(t) for t in names], device=data.tasks.device)
    keep = torch.isin(data.tasks, kept)
    remap = torch.full((len(data.names),), -1, dtype=torch.long, device=data.tasks.device)
    remap[kept] = torch.arange(len(names), device=data.tasks.device)
    labels = None if data.labels is None else data.labels[keep]
    return TaskImages(data.images[keep], remap[data.tasks[keep]], names, labels)


def _blocks(net: MultiTaskNet) -> list[tuple[int, int]]:
    """(start, stop) body indices of the local blocks: each unit holding a layer opens one; units holding none join
    the block before them (or the first)."""
    opens = [i for i, unit in enumerate(net.body) if any(isinstance(m, SuperLayer) for m in unit.modules())]
    if not opens:
        raise MergeError("local FS-Merge: the body holds no layer to merge")
    starts = [0, *opens[1:]]
    return list(zip(starts, [*starts[1:], len(net.body)], strict=True))


def training_memory(params: Sequence[nn.Parameter], loss: Callable[[], torch.Tensor]) -> dict[str, int]:
    """Bytes one training step holds besides the data: the tensors autograd saves for the backward pass of one batch
    (each tensor once, by identity: device-independent, so a CPU run measures what a GPU run would hold), and the
    trainable state (parameters, gradients and AdamW's two moments)."""
    saved: dict[int, torch.Tensor] = {}  # by identity; holding each one keeps its id from being reused

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[id(t)] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss()
    state = sum(p.numel() * p.element_size() for p in params) * 4
    activations = sum(t.numel() * t.element_size() for t in saved.values())
    return {"saved_activation_bytes": activations, "trainable_state_bytes": state, "total_bytes": activations + state}


@torch.no_grad()
def _fold_error(supernet: SuperNet, folded: MultiTaskNet, data: TaskImages) -> dict[str, float]:
    """How far the folded network's logits are from the SuperNet's, computed the paper's way (N copies between the
    maps), on the validation images: float rounding only."""
    worst = scale = 0.0
    for part in data.images.split(CHUNK):
        with supernet.computing("explicit"):
            want = supernet.net(part)
        got = folded(part)
        for task in want:
            worst = max(worst, float((want[task] - got[task]).abs().max()))
            scale = max(scale, float(want[task].abs().max()))
    return {"max_abs": worst, "max_rel": worst / scale if scale else 0.0}


class _InnerTerms:
    """The inner-feature terms: every layer writing a cut of the body, model t's own output inside the SuperNet against
    model t's original output of that layer, on images of task t, each divided by the target's mean square."""

    def __init__(self, supernet: SuperNet, models: Sequence[MultiTaskNet], owners: Sequence[int]) -> None:
        graph = models[0].space_graph()
        cut_spaces = {c for c in graph.cuts if c is not None}
        writers = {ref.param.rpartition(".")[0] for s in cut_spaces for ref in graph[s].producers}
        self.layers = {n: m for n, m in supernet.layers().items() if n in writers and m.merge is not None}
        self.models, self.owners = models, torch.tensor(owners)
        self.seen: dict[str, torch.Tensor] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> _InnerTerms:
        for name, layer in self.layers.items():

            def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor, key: str = name) -> None:
                self.seen[key] = mod.per_model(args[0])  # type: ignore[operator]

            self.handles.append(layer.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def loss(self, x: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """The mean over layers of the scaled inner MSE (call after the SuperNet's forward pass on x)."""
        owners = self.owners.to(tasks.device)[tasks]
        wanted: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for i, model in enumerate(self.models):
                rows = (owners == i).nonzero().squeeze(1)
                if not len(rows):
                    continue
                modules = dict(model.named_modules())
                outs: dict[str, torch.Tensor] = {}
                handles = [
                    modules[name].register_forward_hook(lambda m, a, o, k=name, outs=outs: outs.__setitem__(k, o))
                    for name in self.layers
                ]
                try:
                    model.body(x[rows])
                finally:
                    for handle in handles:
                        handle.remove()
                for name, out in outs.items():
                    if name not in wanted:
                        wanted[name] = out.new_zeros((len(x), *out.shape[1:]))
                    wanted[name][rows] = out
        terms = []
        for name, layer in self.layers.items():
            dim = layer.unit_dim % self.seen[name].dim()
            per_model = self.seen[name].movedim(dim, 1).unflatten(1, (layer.n, -1))
            own = per_model[torch.arange(len(x), device=x.device), owners]
            target = wanted[name].movedim(dim, 1)
            terms.append(F.mse_loss(own, target) / target.pow(2).mean().clamp_min(1e-12))
        return torch.stack(terms).mean()
