"""Merge methods are small registered objects with typed parameters, named in the config.

Adding a method = one module with a `MergeMethod` subclass decorated with `@register`. The base class
owns what every method shares: the model-count check, the compatibility check (one input shape, one class
count per head name), the refusal of NaN or inf in the models, statistics and merged weights, and the
optional BatchNorm reset on the merge slice afterwards.

A configured method also tells the pipeline and the report everything they need, so that neither names a
method: the analyses it offers (`analyses`), a parameter it chooses on the merge slice (`choice`), inputs the
pipeline computes once per model pair and seed (`precomputed`, computed by `PRECOMPUTE`), whether it needs
the statistics stage (`uses_statistics`), and whether it is scored from its members' stored test
predictions instead of being merged (`scored_from_predictions`).
"""

from __future__ import annotations

import abc
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from hetmerge.batchnorm import reset_batchnorm
from hetmerge.compatibility import first_names, nonfinite
from hetmerge.data.few_shot import FewShot
from hetmerge.merged import MergedModel
from hetmerge.models import MultiTaskNet
from hetmerge.params import ParameterError, parse_params
from hetmerge.precompute import PRECOMPUTE
from hetmerge.precompute import Precompute as Precompute  # re-exported for the methods' registrations
from hetmerge.precompute import register_precompute as register_precompute
from hetmerge.statistics import SpaceStats, collect_statistics

ANALYSES: tuple[str, ...] = ("partial_zip", "lambda_curve", "landscape", "alignment")
"""What a configured method can offer the report: the accuracy of a partial zip against its cut, the curve of a
parameter it chooses (its merge-slice and test scores at every value), the loss landscape on the plane through
model A, model B and the merge (one fully merged network in their weight space), the depth-alignment figure."""


class MergeError(ValueError):
    """These models cannot be merged by this method; the message says why."""


class MethodWarning(UserWarning):
    """`check` found the models mergeable but at risk (e.g. a zip β does not guarantee); the pipeline reports
    these at start-up, naming the experiment, before any training."""


@dataclass(frozen=True)
class MethodParams:
    """Parameters every method has. `reset_bn` recomputes BatchNorm statistics on the merge slice."""

    reset_bn: bool = True


@dataclass(frozen=True)
class Choice:
    """A parameter the method chooses on the merge slice: it merges at every value of `grid` (in order) and keeps
    the merge whose merge-slice score is highest, the first of ties (`choose`).

    A pipeline may instead merge at each value itself, with the parameter fixed (`{**params, param: value}`),
    score each merge on the merge slice and the test set (the parameter's curve), and keep `choose(scores)`:
    the same merge, bit for bit, as the method's own choice.
    """

    param: str
    grid: tuple[float, ...]

    def choose(self, scores: Mapping[float, float]) -> float:
        """The grid value the method would choose, from the merge-slice score of every grid value (values
        outside the grid, e.g. a figure's, may be present and are never chosen)."""
        missing = [v for v in self.grid if v not in scores]
        if missing:
            raise ValueError(f"choosing {self.param!r}: no merge-slice score for grid value(s) {missing}")
        return self.grid[first_best([scores[v] for v in self.grid])]


def first_best(scores: Sequence[float]) -> int:
    """Index of the highest score, the first of ties: the grid's order decides, never chance."""
    if not scores:
        raise ValueError("nothing to choose from: no scores")
    bad = [s for s in scores if not math.isfinite(s)]
    if bad:
        raise ValueError(f"cannot choose by scores that are not finite: {bad}")
    return max(range(len(scores)), key=scores.__getitem__)


@dataclass
class MergeContext:
    """What a method may use besides the models: the merge slice (never the test set) and a device.

    `batches()` starts a fresh pass over the merge slice's input images. `score(model)` is a candidate's
    joint accuracy on the labelled merge slice, for methods that choose a hyperparameter. `labelled()` starts a
    pass over the merge slice's (image, label) pairs, the label being the class index in the models' one head:
    same-task fusion methods use it (neuron importance, distillation). `class_shares[k, c]` is model k's share of
    class c's training data (each column sums to 1), where the models were trained on partitions of one task.
    Methods record what they chose, and why, in `notes`; the merge's metadata keeps it. `precomputed` holds the
    inputs the method declares in `MergeMethod.precomputed`, as their `PRECOMPUTE` function returned them (a method
    computes what is missing itself). `few_shot` is the task-tagged few-shot slice of the merges that learn
    (FS-Merge, distillation, RegMean); `state_dir` is where their training saves its state every epoch, so that an
    interrupted merge resumes (None: nothing is saved).
    """

    device: torch.device
    batches: Callable[[], Iterable[torch.Tensor]] | None = None
    labelled: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None
    class_shares: torch.Tensor | None = None
    seed: int = 0
    stats: dict[str, SpaceStats] | None = None
    score: Callable[[MergedModel], float] | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    precomputed: dict[str, Any] = field(default_factory=dict)
    few_shot: FewShot | None = None
    state_dir: Path | None = None

    def statistics(self, models: Sequence[MultiTaskNet]) -> dict[str, SpaceStats]:
        """Activation statistics of every space (given, e.g. by the pipeline's statistics stage, or computed)."""
        if self.stats is None:
            self.stats = collect_statistics(models, self.require_batches("activation statistics")())
        graphs = [m.space_graph() for m in models]
        for name, stats in self.stats.items():
            widths = tuple(g[name].width for g in graphs)
            if stats.widths != widths:
                raise MergeError(
                    f"statistics of space {name!r} are for widths {stats.widths}, the models have {widths}"
                )
        bad = nonfinite({f"{n}.{part}": getattr(s, part) for n, s in self.stats.items() for part in ("mean", "cov")})
        if bad:
            spaces = sorted({name.rsplit(".", 1)[0] for name in bad})
            raise MergeError(f"statistics of feature space(s) {spaces} hold NaN or inf; compute them again")
        return self.stats

    def require_batches(self, why: str) -> Callable[[], Iterable[torch.Tensor]]:
        if self.batches is None:
            raise MergeError(f"{why} needs data from the merge slice, but no data was given")
        return self.batches

    def require_few_shot(self, why: str) -> FewShot:
        if self.few_shot is None:
            raise MergeError(
                f"{why} needs the few-shot slice of every task (images tagged with their task, and held-out images "
                "for the validation loss), but none was given"
            )
        return self.few_shot

    def require_labelled(self, why: str) -> Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]:
        if self.labelled is None:
            raise MergeError(
                f"{why} needs the labels of the fusion data (images with their classes), but only unlabelled images "
                "or no data were given"
            )
        return self.labelled


class MergeMethod(abc.ABC):
    name: ClassVar[str]
    paper: ClassVar[str | None] = None  # key of hetmerge.papers.PAPERS that `hetmerge methods` cites; None: a baseline
    Params: ClassVar[type[MethodParams]] = MethodParams
    risk_warning: ClassVar[type[MethodWarning]] = MethodWarning  # what `check` warns with
    min_models: ClassVar[int] = 2
    max_models: ClassVar[int | None] = None
    uses_statistics: ClassVar[bool] = False  # the pipeline then feeds it the statistics stage's output
    offers: ClassVar[tuple[str, ...]] = ("landscape",)  # analyses (of ANALYSES) whatever the parameters
    precomputed: ClassVar[tuple[str, ...]] = ()  # inputs (names in PRECOMPUTE) it always reads from ctx.precomputed
    scored_from_predictions: ClassVar[bool] = False  # scored from its members' stored test predictions, not merged
    same_task: ClassVar[bool] = False  # fuses models of one task over one label space (require_same_task)
    uses_few_shot: ClassVar[bool] = False  # learns from each task's few-shot slice (ctx.few_shot), whose size it names

    def __init__(self, params: MethodParams) -> None:
        self.params = params

    def analyses(self) -> tuple[str, ...]:
        """The analyses (of ANALYSES) this configured method offers: a method that chooses a parameter offers its
        curve, plus what the class `offers` (by default the landscape: the merge is one fully merged network)."""
        curve = ("lambda_curve",) if self.choice() is not None else ()
        return (*curve, *self.offers)

    def precomputed_inputs(self) -> tuple[str, ...]:
        """The precomputed inputs (names in PRECOMPUTE) this configured method reads: the class's `precomputed`, plus
        what its parameters ask for (e.g. the neuron importances of its `importance`)."""
        return self.precomputed

    def choice(self) -> Choice | None:
        """The parameter this configured method chooses on the merge slice, and from which values; None if none."""
        return None

    def keeps_first_basis(self) -> bool:
        """Whether the merge's units are model 0's units in model 0's order (so weights compare directly)."""
        return False

    def check(self, models: Sequence[MultiTaskNet]) -> None:
        """Reject inputs this method cannot merge, saying why."""
        n = len(models)
        if n < self.min_models or (self.max_models is not None and n > self.max_models):
            if self.max_models is None:
                counts = f"{self.min_models} or more"
            elif self.min_models == self.max_models:
                counts = f"exactly {self.min_models}"
            else:
                counts = f"{self.min_models} to {self.max_models}"
            raise MergeError(f"method {self.name!r} merges {counts} models, but got {n}")
        require_same_inputs_and_heads(self.name, models)
        if self.same_task:
            require_same_task(self.name, models)
        risk = self.risk(models)
        if risk is not None:
            warnings.warn(risk, self.risk_warning, stacklevel=3)

    def risk(self, models: Sequence[MultiTaskNet]) -> str | None:
        """Beyond the checks every method shares: refuse (MergeError) models this method can never merge, and
        say where a merge may still fail (None: nothing to say). Cheap and data-free, so the pipeline asks it
        at start-up, before any model is trained."""
        return None

    @abc.abstractmethod
    def combine(self, models: Sequence[MultiTaskNet], ctx: MergeContext) -> MergedModel:
        """The method itself: build the merged model from the (unchanged) source models."""

    def __call__(self, models: Sequence[MultiTaskNet], ctx: MergeContext) -> MergedModel:
        self.check(models)
        unknown = sorted(set(ctx.precomputed) - set(self.precomputed_inputs()))
        if unknown:
            raise MergeError(
                f"method {self.name!r} reads no precomputed input(s) {unknown}; it reads "
                f"{list(self.precomputed_inputs())}"
            )
        models = [m.to(ctx.device).eval() for m in models]
        for i, model in enumerate(models):
            bad = nonfinite(model.state_dict())
            if bad:
                raise MergeError(
                    f"method {self.name!r}: model {i} holds NaN or inf in {first_names(bad)}; merging it would spread "
                    "them into every merged weight: check its training"
                )
        return self.finish(self.combine(models, ctx), ctx)

    def finish(self, merged: MergedModel, ctx: MergeContext) -> MergedModel:
        """What follows every merge: the BatchNorm reset on the merge slice, evaluation mode, and the refusal of
        NaN or inf in the result (a merged model that answers NaN must never be saved)."""
        merged = merged.to(ctx.device)
        if self.params.reset_bn:
            reset_batchnorm(merged, ctx.require_batches(f"{self.name}: reset_bn")())
        bad = nonfinite(merged.state_dict())
        if bad:
            why = "the merge data of the BatchNorm reset, " if self.params.reset_bn else ""
            raise MergeError(
                f"method {self.name!r}: the merged model holds NaN or inf in {first_names(bad)}; check {why}the "
                "models' weights (overflow?) and the method's parameters"
            )
        return merged.eval()


def require_same_inputs_and_heads(method: str, models: Sequence[MultiTaskNet]) -> None:
    """Every method runs one input batch through all models and joins heads by name, so the models must take
    one input shape, and a head name shared by two models must have one class count."""
    for i, model in enumerate(models[1:], start=1):
        if model.input_shape != models[0].input_shape:
            raise MergeError(
                f"method {method!r}: model 0 takes inputs of shape {models[0].input_shape} but model {i} takes "
                f"{model.input_shape}; models of one merge must read the same images"
            )
    seen: dict[str, tuple[int, int]] = {}
    for i, model in enumerate(models):
        for task, head in model.heads.items():
            first, n = seen.setdefault(task, (i, head.out_features))
            if head.out_features != n:
                raise MergeError(
                    f"method {method!r}: head {task!r} has {n} classes in model {first} but {head.out_features} in "
                    f"model {i}; models sharing a task head must be trained on the same classes of that task"
                )


def require_same_task(method: str, models: Sequence[MultiTaskNet]) -> str:
    """Same-task fusion needs one label space: every model has exactly one head, of one name and class count.
    Returns that head's name."""
    heads = [dict(m.describe()["heads"]) for m in models]
    if len(heads[0]) != 1 or any(h != heads[0] for h in heads[1:]):
        raise MergeError(
            f"method {method!r} fuses models of one task over one label space (one head, the same classes), but the "
            f"models' heads are {heads}: models trained on different label spaces need a multi-task method (zipit)"
        )
    return next(iter(heads[0]))


def require_same_architecture(method: str, models: Sequence[MultiTaskNet]) -> None:
    """Methods that combine weights elementwise need one architecture (heads may differ)."""
    reference = {k: v for k, v in models[0].describe().items() if k != "heads"}
    for i, model in enumerate(models[1:], start=1):
        other = {k: v for k, v in model.describe().items() if k != "heads"}
        if other != reference:
            raise MergeError(
                f"method {method!r} needs models of one architecture: model 0 is {reference} but model {i} is {other}"
            )


def require_same_structure(method: str, models: Sequence[MultiTaskNet]) -> int:
    """For methods that merge spaces of different widths (elastic zip): same family, spaces and tensors.

    One model must be at least as wide as every other in every space; the merge takes its architecture.
    Returns that model's index.
    """
    graphs = [m.space_graph() for m in models]
    body = [sorted(k for k in m.state_dict() if not k.startswith("heads.")) for m in models]
    arch = [{k: v for k, v in m.describe().items() if k in ("family", "spec")} for m in models]
    for i, graph in enumerate(graphs[1:], start=1):
        if models[i].family != models[0].family or graph.names != graphs[0].names or body[i] != body[0]:
            raise MergeError(
                f"method {method!r} needs models that differ at most in width: model 0 is {arch[0]} but model {i} "
                f"is {arch[i]} (different depths need depth alignment first: method 'hetero')"
            )
    widths = [[g[name].width for name in graphs[0].names] for g in graphs]
    for i, own in enumerate(widths):
        if all(all(a >= b for a, b in zip(own, other, strict=True)) for other in widths):
            return i
    raise MergeError(f"method {method!r}: no model is at least as wide as the others in every feature space")


REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    if cls.name in REGISTRY:
        raise ValueError(f"merge method {cls.name!r} registered twice")
    unknown = [a for a in cls.offers if a not in ANALYSES]
    if unknown:
        raise ValueError(f"merge method {cls.name!r} offers unknown analyses {unknown}; known: {list(ANALYSES)}")
    missing = [p for p in cls.precomputed if p not in PRECOMPUTE]
    if missing:
        raise ValueError(
            f"merge method {cls.name!r} reads precomputed inputs {missing} that nothing computes; register_precompute "
            "them first"
        )
    REGISTRY[cls.name] = cls
    return cls


def build_method(name: str, params: Mapping[str, Any] | None = None) -> MergeMethod:
    """Instantiate a registered method; unknown names or parameters raise errors listing what exists."""
    if name not in REGISTRY:
        raise ParameterError(f"unknown merge method {name!r}; available methods: {sorted(REGISTRY)}")
    cls = REGISTRY[name]
    method = cls(parse_params(cls.Params, params, f"method {name!r}"))
    missing = [p for p in method.precomputed_inputs() if p not in PRECOMPUTE]
    if missing:
        raise ParameterError(f"method {name!r} reads precomputed inputs {missing} that nothing computes")
    return method
