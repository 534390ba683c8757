"""ZipIt!: greedy zip of all N models' units at once, optionally only up to a chosen unit (partial zip).

Grouped spaces are zipped inside paired groups only (MuDSC's group zip), so heads stay heads. Models of
different widths are zipped elastically into the widest (algorithms.md §4.6).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hetmerge.matching.solvers import Zip
from hetmerge.merged import MergedModel
from hetmerge.methods.base import MergeContext, MergeMethod, MethodParams, register, require_same_structure
from hetmerge.methods.spacewise import assemble, match_activations, resolve_cut
from hetmerge.models import MultiTaskNet


@dataclass(frozen=True)
class ZipItParams(MethodParams):
    """α discounts repeat merges of an already merged unit; β bounds same-model merges (ZipIt! §4.3).

    `stop_after` names the last body unit that is zipped (e.g. "s2b2" for ResNet-20's 13/20); the rest of
    every model is kept and answers through its own heads.
    """

    alpha: float = 0.3
    beta: float = 0.125
    stop_after: str | None = None


@register
class ZipIt(MergeMethod):
    name = "zipit"
    Params = ZipItParams
    uses_statistics = True

    def combine(self, models: Sequence[MultiTaskNet], ctx: MergeContext) -> MergedModel:
        widest = require_same_structure(self.name, models)
        cut = resolve_cut(models[0], self.params.stop_after)
        solver = Zip(self.params.alpha, self.params.beta)
        return assemble(models, match_activations(models, ctx.statistics(models), solver, cut), cut, widest)
