"""OTFusion (Singh & Jaggi; algorithms.md §2.4, as re-implemented by the Neuron Interpolation paper, §5.7).

Model 0 is the target. Every other model k is aligned to it feature space by feature space, in graph order: an
optimal transport plan T (n_k × n_0) between k's units and model 0's, with the units' importances as marginals and
a ground cost from the units' tensors (`acts`) or from the weights producing them (`weights`), turns into a merge
of the space in the form `transforms` applies (`space_merge`), the soft form of a ZipIt! assignment:
- producers of k become Bᵀ·W with B = T · diag(1/colsum T): fused unit j is a convex combination of k's units,
  the barycentric projection of OTFusion's "correction", in model 0's scale;
- consumers of k become W·R with R = diag(1/rowsum T) · T: each of k's units hands its whole outgoing weight to
  the fused units it is transported to (OTFusion's "past correction").
The fused model is the average of model 0 and every aligned model, in model 0's architecture. With an exact plan
colsum T = ν and rowsum T = μ; with uniform marginals of equal widths B = R is the permutation, as in the
reference. The reference instead scales outgoing rows by Tᵀ·diag(1/μ) (algorithms.md §2.4 step 5) and incoming
columns by T·diag(1/ν): where widths differ that puts k's producers on another scale than model 0's before
they are averaged (a unit of model 0 split into two copies in model k comes back doubled); B and R give back model
0 exactly, function and weights, in that case.

A residual stream is one feature space of the graph, so one transport is applied to every block that writes into it
(its producers) and every block that reads it (its consumers): residual streams are transported consistently by
construction, where the reference code patches ResNet shortcuts layer by layer. Attention heads (grouped spaces) are
transported whole, a head's query/key and value/output spaces sharing one head transport, and units are matched
inside each pair of heads by a LAP (a within-head reordering keeps a head's function, so it is as arbitrary as the
order of the heads). The heads' classes are the identity: a head only consumes the last space.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import ot
import torch

from hetmerge.importance import Importance, importance_input, importance_scores, neuron_importance
from hetmerge.matching.assignment import best_permutation
from hetmerge.matching.transforms import SpaceMerge, transform_axis
from hetmerge.merged import MergedModel
from hetmerge.methods.base import MergeContext, MergeError, MergeMethod, MethodParams, register
from hetmerge.methods.spacewise import assemble
from hetmerge.models import MultiTaskNet
from hetmerge.observe import Point, as_rows, observing
from hetmerge.params import Range
from hetmerge.progress import track
from hetmerge.spaces import FeatureSpace, SpaceGraph


@dataclass(frozen=True)
class OTFusionParams(MethodParams):
    """`cost`: Euclidean (not squared) distance of the units' tensors at `point` over the fusion rows (`acts`, the
    paper's choice on pre-activations), or of the rows of the tensors producing them, input axes already aligned
    (`weights`). `solver`: exact OT (`ot.emd`) or entropic OT (`ot.sinkhorn`, log-domain) whose regularisation
    `epsilon` applies to the cost divided by its maximum, so one ε suits every layer (0.01 is OTFusion's --reg).
    `samples` caps the fusion images the activations are taken from (None: all). `importance` gives the
    marginals (captum attributions at `point`, or uniform)."""

    reset_bn: bool = False
    importance: Importance = "uniform"
    cost: Literal["acts", "weights"] = "acts"
    solver: Literal["emd", "sinkhorn"] = "emd"
    epsilon: Annotated[float, Range(0, open_low=True)] = 0.01
    point: Point = "pre"
    samples: Annotated[int, Range(1)] | None = None


def _first_images(batches: Iterable[torch.Tensor], limit: int | None) -> Iterator[torch.Tensor]:
    """The batches cut to their first `limit` images in all (None: every image)."""
    left = limit
    for x in batches:
        if left is not None:
            if left <= 0:
                return
            x = x[:left]
            left -= len(x)
        yield x


@torch.no_grad()
def activation_distances(
    models: Sequence[MultiTaskNet], spaces: Sequence[str], batches: Iterable[torch.Tensor], point: Point
) -> list[dict[str, torch.Tensor]]:
    """Per model k ≥ 1 and space, the (n_k × n_0) Euclidean distances between k's units and model 0's over the
    rows (samples × positions) at `point`, from Gram matrices accumulated batch by batch (no activation kept)."""
    graphs = [m.space_graph() for m in models]
    widths = [{name: g[name].width for name in spaces} for g in graphs]
    device = next(models[0].parameters()).device
    norms = [{name: torch.zeros(w[name], dtype=torch.float64, device=device) for name in spaces} for w in widths]
    gram = [
        {name: torch.zeros(w[name], widths[0][name], dtype=torch.float64, device=device) for name in spaces}
        for w in widths[1:]
    ]
    seen = 0
    with contextlib.ExitStack() as stack, torch.autocast("cuda", enabled=False):
        captured = [
            stack.enter_context(observing(m, [g[s] for s in spaces], point))
            for m, g in zip(models, graphs, strict=True)
        ]
        for x in track(batches, desc="otfusion activation costs", unit="batch"):
            for model in models:
                model(x)
            seen += len(x)
            for name in spaces:
                rows = [as_rows(c[name], g[name].unit_dim).double() for c, g in zip(captured, graphs, strict=True)]
                for k, r in enumerate(rows):
                    norms[k][name] += r.square().sum(0)
                    if k:
                        gram[k - 1][name] += r.T @ rows[0]
    if not seen:
        raise MergeError("method 'otfusion': the fusion data yielded no images for the activation costs")
    return [
        {
            name: (norms[k][name][:, None] + norms[0][name] - 2 * gram[k - 1][name]).clamp_min(0).sqrt()
            for name in spaces
        }
        for k in range(1, len(models))
    ]


def _unit_rows(state: Mapping[str, torch.Tensor], space: FeatureSpace) -> torch.Tensor:
    """One row per unit: every weight tensor producing `space` (running statistics say nothing about what a unit
    computes), flattened over its other axes and concatenated."""
    weights = [r for r in space.producers if r.role == "weight"]
    return torch.cat([state[r.param].double().movedim(r.axis, 0).reshape(space.width, -1) for r in weights], dim=1)


def weight_distances(
    models: Sequence[MultiTaskNet], k: int, space: str, merges: Mapping[str, SpaceMerge]
) -> torch.Tensor:
    """(n_k × n_0) distances between the producer rows of model k's units (their input axes carried into model 0's
    bases by the transports found so far, OTFusion's past correction) and model 0's."""
    graph = models[k].space_graph()
    own = graph[space]
    source = models[k].state_dict()
    state = {}
    for ref in own.producers:
        w = source[ref.param].double()
        for axis, (other, _) in graph.axes_of(ref.param).items():
            if axis != ref.axis:
                w = transform_axis(w, axis, merges[other.name], k, producer=False)
        state[ref.param] = w
    return torch.cdist(_unit_rows(state, own), _unit_rows(models[0].state_dict(), models[0].space_graph()[space]))


def weight_order_problem(graph: SpaceGraph) -> str | None:
    """Why a weight cost cannot be computed in the graph's order (a space's producers read a space not yet
    transported, e.g. a residual stream that later blocks write), or None."""
    done: set[str] = set()
    for members in graph.matching_sets():
        for space in members:
            for ref in space.producers:
                for axis, (other, _) in graph.axes_of(ref.param).items():
                    if axis != ref.axis and other.name not in done:
                        return (
                            f"space {space.name!r} is produced by {ref.param!r}, which reads space {other.name!r} "
                            "before that space is transported"
                        )
        done |= {m.name for m in members}
    return None


def solve_transport(
    mu: torch.Tensor, nu: torch.Tensor, cost: torch.Tensor, solver: Literal["emd", "sinkhorn"], epsilon: float
) -> torch.Tensor:
    """The transport plan (float64, on the CPU: POT's solvers) between marginals `mu` and `nu` (each sums to 1).

    POT gets numpy arrays: its torch backend would probe CUDA, which a job on the CPU must never touch."""
    mu, nu, cost = (t.detach().to("cpu", torch.float64).numpy() for t in (mu, nu, cost))
    if solver == "emd":
        plan, log = ot.emd(mu, nu, cost, numItermax=10_000_000, log=True)
        if log["warning"] is not None:
            raise MergeError(f"method 'otfusion': exact OT failed ({log['warning']})")
        return torch.from_numpy(plan)
    scale = cost.max()
    plan = ot.sinkhorn(mu, nu, cost / scale if scale > 0 else cost, epsilon, method="sinkhorn_log", numItermax=10_000)
    return torch.from_numpy(plan)


def space_merge(plans: Sequence[torch.Tensor]) -> SpaceMerge:
    """The merge of one space from each model k ≥ 1's transport plan onto model 0 (n_k × n_0).

    Producers: B = T · diag(1/colsum T), so fused unit j is a convex combination of k's units, in model 0's
    scale. Consumers: R = diag(1/rowsum T) · T, so each of k's units hands its whole outgoing weight to the fused
    units it is transported to. Model 0 keeps its units; everything is averaged over the N models.
    """
    n = len(plans) + 1
    eye = torch.eye(plans[0].shape[1], dtype=torch.float64, device=plans[0].device)
    merge, unmerge = [eye / n], [eye]
    for plan in plans:
        into, out_of = plan.sum(0), plan.sum(1)
        if not torch.isfinite(plan).all() or (into <= 0).any() or (out_of <= 0).any():
            raise MergeError(
                "method 'otfusion': a transport plan leaves a unit without mass or is not finite; with "
                "solver='sinkhorn', raise epsilon"
            )
        merge.append((plan / into).T / n)
        unmerge.append(plan / out_of[:, None])
    return SpaceMerge(tuple(merge), tuple(unmerge))


def _normalised(scores: torch.Tensor) -> torch.Tensor:
    return scores.double() / scores.double().sum()


def align_units(
    cost: torch.Tensor, mu: torch.Tensor, nu: torch.Tensor, solver: Literal["emd", "sinkhorn"], epsilon: float
) -> tuple[torch.Tensor, float]:
    """Transport plan (n_k × n_0, on the cost's device) of an ungrouped space, and its transport cost."""
    plan = solve_transport(_normalised(mu), _normalised(nu), cost, solver, epsilon)
    return plan.to(cost.device), float((plan * cost.cpu()).sum())


def align_heads(
    costs: Sequence[torch.Tensor],
    mus: Sequence[torch.Tensor],
    nus: Sequence[torch.Tensor],
    groups: int,
    solver: Literal["emd", "sinkhorn"],
    epsilon: float,
) -> tuple[list[torch.Tensor], float]:
    """Unit-level plans of linked grouped spaces (one per member) that move whole heads, by one head transport.

    For every pair of heads (a of model k, b of model 0) and every member space, a LAP on squared unit distances
    matches units inside the heads; the head cost is the distance of the heads' concatenated activations so
    matched, over all members. Head marginals are the heads' summed unit importances. Unit plan:
    T[(a, i), (b, j)] = T_heads[a, b] · [unit i of head a matched to unit j of head b]. Returns the head plan's cost.
    """
    head_sq = torch.zeros(groups, groups, dtype=torch.float64)
    matches = []
    for cost in costs:
        size = cost.shape[1] // groups
        if cost.shape[0] != cost.shape[1]:
            raise MergeError(
                f"method 'otfusion': heads of {cost.shape[0] // groups} and {size} units cannot be transported onto "
                "each other (attention spaces must have one width in every model)"
            )
        blocks = cost.square().cpu().reshape(groups, size, groups, size).transpose(1, 2)
        match = torch.zeros(groups, groups, size, size, dtype=torch.float64)
        for a in range(groups):  # a loop over pairs of heads, never over units
            for b in range(groups):
                match[a, b, torch.arange(size), best_permutation(-blocks[a, b])] = 1.0
        head_sq += (blocks * match).sum((2, 3))
        matches.append(match)
    head_cost = head_sq.sqrt()
    mu = sum(m.double().reshape(groups, -1).sum(1) for m in mus)
    nu = sum(v.double().reshape(groups, -1).sum(1) for v in nus)
    plan = solve_transport(_normalised(mu), _normalised(nu), head_cost, solver, epsilon)
    width = costs[0].shape[0]
    units = [torch.einsum("ab,abij->aibj", plan, m).reshape(width, width).to(costs[0].device) for m in matches]
    return units, float((plan * head_cost).sum())


@register
class OTFusion(MergeMethod):
    """Optimal transport of each same-task model's units onto model 0's, importance-weighted, then averaged."""

    name = "otfusion"
    paper = "OTFusion"
    Params = OTFusionParams
    same_task = True
    params: OTFusionParams

    def keeps_first_basis(self) -> bool:
        return True

    def risk(self, models: Sequence[MultiTaskNet]) -> str | None:
        graphs = [m.space_graph() for m in models]
        for i, graph in enumerate(graphs[1:], start=1):
            layout = [(s.name, s.groups, s.link, tuple(r.param for r in s.axes())) for s in graph.spaces]
            if models[i].family != models[0].family or layout != [
                (s.name, s.groups, s.link, tuple(r.param for r in s.axes())) for s in graphs[0].spaces
            ]:
                raise MergeError(
                    f"method 'otfusion' aligns models that differ at most in width, but model {i} "
                    f"({models[i].describe()['spec']}) is laid out differently from model 0 "
                    f"({models[0].describe()['spec']})"
                )
        if self.params.cost == "weights":
            problem = weight_order_problem(graphs[0])
            if problem is not None:
                raise MergeError(f"method 'otfusion' cannot use cost='weights' here: {problem}; use cost='acts'")
        return None

    def precomputed_inputs(self) -> tuple[str, ...]:
        """The pipeline's importance scores, which are observed at pre-activations."""
        return importance_input(self.params.importance) if self.params.point == "pre" else ()

    def _importances(self, models: Sequence[MultiTaskNet], ctx: MergeContext) -> list[dict[str, torch.Tensor]]:
        kind = self.params.importance
        if self.params.point == "pre":
            return importance_scores(models, [m.space_graph().spaces for m in models], ctx, kind)
        labelled = None if kind == "uniform" else ctx.require_labelled(f"method 'otfusion' with importance {kind!r}")
        return [
            neuron_importance(m, m.space_graph().spaces, labelled() if labelled else (), kind, self.params.point)
            for m in models
        ]

    def combine(self, models: Sequence[MultiTaskNet], ctx: MergeContext) -> MergedModel:
        p = self.params
        graphs = [m.space_graph() for m in models]
        importances = self._importances(models, ctx)
        distances: list[dict[str, torch.Tensor]] = []
        if p.cost == "acts":
            batches = ctx.require_batches("method 'otfusion' with cost='acts'")()
            distances = activation_distances(models, graphs[0].names, _first_images(batches, p.samples), p.point)
        n = len(models)
        merges: dict[str, SpaceMerge] = {}
        spent: dict[str, float] = {}
        for members in track(graphs[0].matching_sets(), desc="otfusion transport", unit="space set"):
            plans: list[list[torch.Tensor]] = [[] for _ in members]
            for k in range(1, n):
                if p.cost == "acts":
                    cost = [distances[k - 1][s.name] for s in members]
                else:
                    cost = [weight_distances(models, k, s.name, merges) for s in members]
                mus = [importances[k][s.name] for s in members]
                nus = [importances[0][s.name] for s in members]
                if members[0].groups > 1:
                    found, c = align_heads(cost, mus, nus, members[0].groups, p.solver, p.epsilon)
                else:
                    plan, c = align_units(cost[0], mus[0], nus[0], p.solver, p.epsilon)
                    found = [plan]
                for own, plan in zip(plans, found, strict=True):
                    own.append(plan)
                for space in members:
                    spent[space.name] = spent.get(space.name, 0.0) + c / (n - 1)
            merges.update({space.name: space_merge(own) for space, own in zip(members, plans, strict=True)})
        ctx.notes["transport_cost"] = spent
        return assemble(models, merges, None)
