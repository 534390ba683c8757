"""Activation matching ("Permute" in ZipIt!, "A. Align" in MuDSC): LAP on feature correlations, then average.

Grouped spaces (attention heads, GroupNorm groups) are aligned group-wise (MuDSC's group matching).
"""

from __future__ import annotations

from collections.abc import Sequence

from hetmerge.matching import solvers
from hetmerge.merged import MergedModel
from hetmerge.methods.base import MergeContext, MergeMethod, register, require_same_architecture
from hetmerge.methods.spacewise import assemble, match_activations
from hetmerge.models import MultiTaskNet


@register
class Permute(MergeMethod):
    """Activation matching: feature correlations aligned to the first model's by linear assignment, then averaged."""

    name = "permute"
    paper = "Git Re-Basin"

    def keeps_first_basis(self) -> bool:
        return True

    uses_statistics = True

    def combine(self, models: Sequence[MultiTaskNet], ctx: MergeContext) -> MergedModel:
        require_same_architecture(self.name, models)
        return assemble(models, match_activations(models, ctx.statistics(models), solvers.align), None)
