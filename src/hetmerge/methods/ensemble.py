"""Ensemble: run every model; each answers with its own heads (the upper reference of merging).

The pipeline scores an ensemble from its members' stored test predictions (`scored_from_predictions`) and never
merges one; `combine` serves the API and the CLI.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

from hetmerge.merged import MergedModel
from hetmerge.methods.base import MergeContext, MergeMethod, MethodParams, register
from hetmerge.models import MultiTaskNet


@dataclass(frozen=True)
class EnsembleParams(MethodParams):
    reset_bn: bool = False  # the members are the trained models themselves


@register
class Ensemble(MergeMethod):
    """Keeps every model and answers each task with its models' heads, their mean where several answer."""

    name = "ensemble"
    Params = EnsembleParams
    offers = ()  # no merged network: nothing lies in a weight space
    scored_from_predictions = True

    def combine(self, models: Sequence[MultiTaskNet], ctx: MergeContext) -> MergedModel:
        # copies: a BN reset of the ensemble must not rewrite the caller's models
        return MergedModel(None, [copy.deepcopy(m) for m in models], cut=0)
