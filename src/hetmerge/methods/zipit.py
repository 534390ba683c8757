"""ZipIt!: greedy zip of all N models' units at once, optionally only up to a chosen unit (partial zip)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hetmerge.matching.greedy_zip import greedy_zip
from hetmerge.matching.transforms import SpaceMerge
from hetmerge.merged import MergedModel
from hetmerge.methods.base import MergeContext, MergeMethod, MethodParams, register
from hetmerge.methods.spacewise import assemble, check_mergeable, resolve_cut, spaces_before
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
        check_mergeable(self.name, models)
        cut = resolve_cut(models[0], self.params.stop_after)
        stats = ctx.statistics(models)
        merges = {}
        for space in spaces_before(models[0], cut):
            s = stats[space.name]
            result = greedy_zip(s.correlation(), s.widths, self.params.alpha, self.params.beta)
            merges[space.name] = SpaceMerge.from_assignment(result.assignment, s.widths)
        return assemble(models, merges, cut)
