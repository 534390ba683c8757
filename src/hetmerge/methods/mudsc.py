"""MuDSC (Merging under Dual-Space Constraints): units matched on λ·activation + (1 − λ)·weight similarity.

`solver: align` is alignment-based MuDSC (every model permuted onto model 0, then averaged); `solver: zip`
is zip-based MuDSC (ZipIt!'s greedy zip on the blend). Grouped spaces use group matching. λ = 0 is the
weight-only matching of the MuDSC paper's "Git Re-Basin" (align) and "W. Zip" (zip) rows, λ = 1 is
activation-only ("A. Align" = `permute`, "ZipIt" = `zipit`). With `lam: null`, λ is chosen from `lam_grid`
by joint accuracy on the labelled merge slice, never on the test set; the scores of every candidate are
recorded with the merge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from hetmerge.matching.dual_space import dual_space_matching
from hetmerge.matching.solvers import make_solver
from hetmerge.merged import MergedModel
from hetmerge.methods.base import (
    Choice,
    MergeContext,
    MergeError,
    MergeMethod,
    MethodParams,
    first_best,
    register,
)
from hetmerge.methods.spacewise import assemble, target_architecture
from hetmerge.methods.zipit import ZipBudgetWarning, zip_fit
from hetmerge.models import MultiTaskNet
from hetmerge.params import Range
from hetmerge.progress import track

Share = Annotated[float, Range(0, 1)]


@dataclass(frozen=True)
class MuDSCParams(MethodParams):
    """`lam` ∈ [0, 1] is the activation share of the similarity (MuDSC's fix_rate is 1 − lam); α/β as in ZipIt!.

    Defaults follow the MuDSC code: α 0.5, β 1, the 9-value grid 0.1…0.9, up to 100 sweeps, patience 5.
    """

    solver: Literal["align", "zip"] = "zip"
    lam: Share | None = None
    lam_grid: tuple[Share, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    alpha: Annotated[float, Range(0, 1)] = 0.5
    beta: Annotated[float, Range(0, 1)] = 1.0
    max_sweeps: Annotated[int, Range(1)] = 100
    patience: Annotated[int, Range(1)] = 5


@register
class MuDSC(MergeMethod):
    """Zip or alignment on λ·activation + (1−λ)·weight similarity, refined by sweeps over the spaces."""

    name = "mudsc"
    paper = "MuDSC"
    Params = MuDSCParams
    uses_statistics = True
    risk_warning = ZipBudgetWarning

    def __init__(self, params: MuDSCParams) -> None:
        super().__init__(params)
        if params.lam is None and not params.lam_grid:
            raise MergeError("method 'mudsc': with lam null, λ is chosen from lam_grid, which is empty; list λ values")

    def risk(self, models: Sequence[MultiTaskNet]) -> str | None:
        target_architecture(self.name, models, self.params.solver)
        if self.params.solver == "align":
            return None
        return zip_fit(self.name, models, self.params.alpha, self.params.beta)

    def keeps_first_basis(self) -> bool:
        return self.params.solver == "align"

    def merge_at(self, models: Sequence[MultiTaskNet], ctx: MergeContext, lam: float) -> MergedModel:
        """The merge for one λ (before the BatchNorm reset)."""
        like = target_architecture(self.name, models, self.params.solver)
        solver = make_solver(self.params.solver, self.params.alpha, self.params.beta)
        activation = None
        if lam > 0:
            activation = {name: s.correlation() for name, s in ctx.statistics(models).items()}
        result = dual_space_matching(
            models, activation, lam, solver, self.params.max_sweeps, self.params.patience, ctx.seed
        )
        ctx.notes.setdefault("sweeps", {})[str(lam)] = result.sweeps
        return assemble(models, result.merges, None, like)

    def choice(self) -> Choice | None:
        """With `lam: null`, λ is chosen from `lam_grid` by the merges' joint accuracy on the merge slice."""
        if self.params.lam is not None:
            return None
        return Choice("lam", tuple(float(v) for v in self.params.lam_grid))

    def combine(self, models: Sequence[MultiTaskNet], ctx: MergeContext) -> MergedModel:
        choice = self.choice()
        if choice is None:
            ctx.notes["lam"] = self.params.lam
            return self.merge_at(models, ctx, self.params.lam)
        if ctx.score is None:
            raise MergeError("method 'mudsc' with lam: null chooses λ on the labelled merge slice, which was not given")
        scores: list[float] = []
        for lam in track(choice.grid, desc="mudsc λ grid", unit="value"):
            candidate = self.finish(self.merge_at(models, ctx, lam), ctx)
            scores.append(ctx.score(candidate))
            if first_best(scores) == len(scores) - 1:  # keep only the best so far: one candidate in memory
                best = candidate
        lam = choice.grid[first_best(scores)]
        ctx.notes.update({"lam": lam, "lam_scores": {str(v): s for v, s in zip(choice.grid, scores, strict=True)}})
        return best
