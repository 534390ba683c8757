"""ZipIt!: greedy zip of all N models' units at once, optionally only up to a chosen unit (partial zip).

Grouped spaces are zipped inside paired groups only (MuDSC's group zip), so heads stay heads. Models of
different widths are zipped elastically into the widest (algorithms.md §4.6).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hetmerge.matching.solvers import Zip
from hetmerge.merged import MergedModel
from hetmerge.methods.base import (
    MergeContext,
    MergeError,
    MergeMethod,
    MethodParams,
    register,
    require_same_structure,
)
from hetmerge.methods.spacewise import assemble, match_activations, resolve_cut
from hetmerge.models import MultiTaskNet


def require_alpha_fits(method: str, alpha: float, n_models: int) -> None:
    """α ≤ 0 never merges a merged unit again (greedy_zip): fine for two models, impossible for three or more."""
    if alpha <= 0 and n_models >= 3:
        raise MergeError(
            f"method {method!r}: α = {alpha} ≤ 0 never merges a merged unit again, so a merged unit holds at most "
            f"two units and can never absorb a third model's unit; {n_models} models of width d cannot shrink to "
            "d units. Use α > 0 (e.g. 1e-4) to zip three or more models"
        )


@dataclass(frozen=True)
class ZipItParams(MethodParams):
    """α discounts repeat merges of an already merged unit (α ≤ 0 forbids them: two models only); β bounds
    same-model merges (ZipIt! §4.3).

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

    def check(self, models: Sequence[MultiTaskNet]) -> None:
        super().check(models)
        require_alpha_fits(self.name, self.params.alpha, len(models))

    def combine(self, models: Sequence[MultiTaskNet], ctx: MergeContext) -> MergedModel:
        widest = require_same_structure(self.name, models)
        cut = resolve_cut(models[0], self.params.stop_after)
        solver = Zip(self.params.alpha, self.params.beta)
        return assemble(models, match_activations(models, ctx.statistics(models), solver, cut), cut, widest)
