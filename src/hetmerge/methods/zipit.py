"""ZipIt!: greedy zip of all N models' units at once, optionally only up to a chosen unit (partial zip).

Grouped spaces are zipped inside paired groups only (MuDSC's group zip), so heads stay heads. Models of
different widths are zipped elastically into the widest (algorithms.md §4.6).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from hetmerge.matching.greedy_zip import min_beta, zip_guaranteed, zip_possible
from hetmerge.matching.solvers import Zip
from hetmerge.merged import MergedModel
from hetmerge.methods.base import (
    MergeContext,
    MergeError,
    MergeMethod,
    MethodParams,
    MethodWarning,
    register,
    require_same_structure,
)
from hetmerge.methods.spacewise import assemble, match_activations, resolve_cut, spaces_before
from hetmerge.models import MultiTaskNet
from hetmerge.params import Range


class ZipBudgetWarning(MethodWarning):
    """β does not guarantee that the greedy zip of these models finishes: depending on the models'
    similarities it may stop with "no admissible pair is left" (greedy_zip's module docstring says when)."""


def zip_widths(models: Sequence[MultiTaskNet], cut: int | None = None) -> dict[str, list[int]]:
    """The widths each greedy zip of these models sees, per zipped space: the models' widths, or for a grouped
    space the group size (its units are zipped inside paired groups)."""
    graphs = [m.space_graph() for m in models]
    return {s.name: [g[s.name].width // s.groups for g in graphs] for s in spaces_before(models[0], cut)}


def zip_fit(
    method: str, models: Sequence[MultiTaskNet], alpha: float, beta: float, cut: int | None = None
) -> str | None:
    """Refuse (MergeError) a zip of `models` that no similarity lets finish; return a note naming the β that
    guarantees it where `beta` does not (greedy_zip's module docstring has the bound), else None."""
    widths = zip_widths(models, cut)
    impossible = [name for name, w in widths.items() if not zip_possible(w, alpha)]
    if impossible:
        w = widths[impossible[0]]
        raise MergeError(
            f"method {method!r}: α = {alpha} never merges a merged unit again, so a merged unit holds at most two "
            f"units and can never absorb a third model's unit; {len(models)} models of widths {w} (space "
            f"{impossible[0]!r}{_more(impossible)}) cannot shrink to {max(w)} units. Use α > 0 (e.g. 1e-4) to zip "
            "three or more models"
        )
    weak = [name for name, w in widths.items() if not zip_guaranteed(w, alpha, beta)]
    if not weak:
        return None
    needed = {name: min_beta(widths[name], alpha) for name in weak}
    worst = max(weak, key=lambda name: 2.0 if needed[name] is None else needed[name])
    cure = "no β ≤ 1 guarantees it" if needed[worst] is None else f"β ≥ {needed[worst]:g} always zips them"
    return (
        f"method {method!r}: β = {beta} does not guarantee the greedy zip of {len(models)} models: with widths "
        f"{widths[worst]} (space {worst!r}{_more(weak)}) it may run out of admissible pairs, depending on the "
        f"models' similarities; {cure}"
    )


def _more(names: Sequence[str]) -> str:
    return f", and {len(names) - 1} more" if len(names) > 1 else ""


@dataclass(frozen=True)
class ZipItParams(MethodParams):
    """α ∈ [0, 1] discounts repeat merges of an already merged unit (α = 0 forbids them: two models only, see
    greedy_zip); β ∈ [0, 1] scales the same-model merge budgets (ZipIt! §4.3).

    `stop_after` names the last body unit that is zipped (e.g. "s2b2" for ResNet-20's 13/20); the rest of
    every model is kept and answers through its own heads.
    """

    alpha: Annotated[float, Range(0, 1)] = 0.3
    beta: Annotated[float, Range(0, 1)] = 0.125
    stop_after: str | None = None


@register
class ZipIt(MergeMethod):
    """Greedy zip of correlated features within and across all N models at once, optionally up to a cut only."""

    name = "zipit"
    paper = "ZipIt!"
    Params = ZipItParams
    uses_statistics = True
    risk_warning = ZipBudgetWarning

    def analyses(self) -> tuple[str, ...]:
        """A partial zip (`stop_after`) keeps every model's tail: it offers the accuracy-against-cut curve, and no
        landscape (its merge is no single network in the models' weight space)."""
        return ("partial_zip",) if self.params.stop_after is not None else super().analyses()

    def risk(self, models: Sequence[MultiTaskNet]) -> str | None:
        require_same_structure(self.name, models)
        cut = resolve_cut(models[0], self.params.stop_after)
        return zip_fit(self.name, models, self.params.alpha, self.params.beta, cut)

    def combine(self, models: Sequence[MultiTaskNet], ctx: MergeContext) -> MergedModel:
        widest = require_same_structure(self.name, models)
        cut = resolve_cut(models[0], self.params.stop_after)
        solver = Zip(self.params.alpha, self.params.beta)
        return assemble(models, match_activations(models, ctx.statistics(models), solver, cut), cut, widest)
