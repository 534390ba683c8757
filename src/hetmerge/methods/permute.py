"""Activation matching ("Permute" in ZipIt!, "A. Align" in MuDSC): LAP on feature correlations, then average."""

from __future__ import annotations

from collections.abc import Sequence

from hetmerge.matching.assignment import align_to_first
from hetmerge.matching.transforms import SpaceMerge
from hetmerge.merged import MergedModel
from hetmerge.methods.base import MergeContext, MergeMethod, register
from hetmerge.methods.spacewise import assemble, check_mergeable
from hetmerge.models import MultiTaskNet


@register
class Permute(MergeMethod):
    name = "permute"
    uses_statistics = True

    def combine(self, models: Sequence[MultiTaskNet], ctx: MergeContext) -> MergedModel:
        check_mergeable(self.name, models)
        stats = ctx.statistics(models)
        merges = {}
        for space in models[0].space_graph().spaces:
            s = stats[space.name]
            merges[space.name] = SpaceMerge.from_permutations(align_to_first(s.correlation(), s.widths))
        return assemble(models, merges, None)
