"""ZipIt!'s greedy zip, exact and fast.

The textbook loop (algorithms.md §2.5) repeatedly takes the most correlated remaining pair of units (the
first maximum in row-major order), merges them, sets the merged unit's similarities to α·min of the two,
and enforces a per-model budget of same-model merges. Done literally that is an argmax over the whole
O×O matrix per step. Here each row's maximum and its first position are cached, and after a merge only
the rows whose cached maximum was touched are recomputed, which gives the identical sequence of merges,
ties included, at O(O) work per step in the typical case.

α ≤ 0 is hetmerge's own rule, not the reference code's: a merged unit never merges again, so every merged
unit has at most two members (the α → 0 limit of the discount, made absolute). MuDSC's
`default_fusion_weight` instead keeps min(S_i, S_j) undiscounted and blocks the merged unit only against
the index ranges of its two origin models, and it takes those ranges (m·O_m … (m+1)·O_m) on the already
shrunken matrix, where they no longer line up with the models' units. There a merged unit can still absorb
a third model's unit; here it cannot, so α ≤ 0 cannot zip three models of equal width (3d units need 2d
merges, pairs give at most 1.5d), and the zipit and mudsc methods refuse it.

When does the zip finish? (`zip_possible`, `zip_guaranteed`, `min_beta`.) A merged unit belongs to the model
of its first unit; a model is *spent* once its same-model merges reach its budget (a budget of 0 still lets
one through: the mask comes after the merge), and then its units left, its *seeds*, are masked against each
other, and so is every unit later merged from two of its seeds (similarities are α·min, and α·(−∞) = −∞).
Nothing else is ever masked. With α > 0 the zip is stuck only when every pair of the K units left shares a
seed model; one model's seeds alone number at most its width, so K > max(d) needs sets of at least two seed
models per unit, hence K ≤ Σ seeds / 2, and model i has at most d_i − max(budget_i, 1) seeds. So
⌊Σ_i (d_i − max(budget_i, 1))⁺ / 2⌋ ≤ max(d) guarantees the zip for every similarity. For three models it is
tight: below it, same-model merges first and then cross pairs in a triangle (units of models 0+1, 0+2, 1+2)
leave ⌊3(d − b)/2⌋ > d mutually masked units (tests/test_matching.py builds that matrix). It is no necessary
condition: similar models zip with β = 0 (cross-model pairs first), so below it the zip may or may not finish,
depending on the similarities. With α ≤ 0 merged units never merge again, so the zip is possible only when
the widest model holds at least half the units, and stuck only when the units left are one spent model's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ZipResult:
    """`assignment` is the 0/1 membership matrix (Σd_i × m): column k lists the units of merged unit k.

    `values` holds the similarity of each pair when it was merged (α-discounted where a member had already
    merged), in merge order: MuDSC's merge value of a zip is their mean.
    """

    assignment: torch.Tensor
    merges: tuple[tuple[int, int], ...]  # (kept, absorbed) pairs in the order they were made
    values: torch.Tensor  # (merges,) on the similarity's device


def zip_budgets(widths: Sequence[int], beta: float) -> list[int]:
    """Same-model merges allowed per model, proportional to its share of units (elastic zip, §4.6)."""
    total = sum(widths)
    to_remove = total - max(widths)
    return [int((to_remove * d // total) * beta + 1e-4) for d in widths]


def zip_possible(widths: Sequence[int], alpha: float) -> bool:
    """Whether some similarity lets the zip finish: with α ≤ 0 a merged unit holds at most two units, so the
    Σd − max(d) merges need the widest model to hold at least half of all units."""
    return alpha > 0 or 2 * max(widths) >= sum(widths)


def zip_guaranteed(widths: Sequence[int], alpha: float, beta: float) -> bool:
    """Whether the zip finishes for every similarity matrix (the bound of the module docstring)."""
    if not zip_possible(widths, alpha):
        return False
    # a budget of 0 lets one same-model merge through before the model is masked
    budgets = [max(b, 1) for b in zip_budgets(widths, beta)]
    if alpha > 0:
        return sum(max(0, d - b) for d, b in zip(widths, budgets, strict=True)) // 2 <= max(widths)
    # α ≤ 0: stuck means r lone units of one spent model e are left after (Σd − r)/2 merges, too few when
    # r > 2·max(d) − Σd. Model e's own merges used 2·budget_e of its units; with two models, every unit of the
    # other one not used by its own merges was merged with one of e's.
    slack = 2 * max(widths) - sum(widths)
    for e, (d, b) in enumerate(zip(widths, budgets, strict=True)):
        left = d - 2 * b
        if len(widths) == 2:
            other, own = widths[1 - e], budgets[1 - e]
            left -= other - 2 * min(own, other // 2)
        left -= (left - sum(widths)) % 2  # r has the parity of Σd
        if left > slack:
            return False
    return True


def min_beta(widths: Sequence[int], alpha: float) -> float | None:
    """The smallest β ≤ 1 (rounded up to 3 decimals) that guarantees the zip of `widths`; None if none does.

    Budgets only change where q_i·β crosses an integer (q_i: zip_budgets' multiplier), so those are the
    candidates."""
    total = sum(widths)
    multipliers = {(total - max(widths)) * d // total for d in widths}
    candidates = sorted({0.0} | {k / q for q in multipliers if q for k in range(1, q + 1)})
    for beta in candidates:
        rounded = math.ceil(round(beta * 1000, 6)) / 1000
        if zip_guaranteed(widths, alpha, rounded):
            return rounded
    return None


def _exhausted(widths: Sequence[int], alpha: float, beta: float, done: int, steps: int) -> str:
    """Why the zip stopped, and what would have finished it."""
    why = (
        f"no admissible pair is left to merge after {done} of {steps} merges of {len(widths)} models of widths "
        f"{list(widths)}"
    )
    if not zip_possible(widths, alpha):
        return f"{why}: α = {alpha} ≤ 0 never merges a merged unit again, so these widths need α > 0"
    budgets = [max(b, 1) for b in zip_budgets(widths, beta)]  # a budget of 0 still lets one merge through
    why += (
        f": β = {beta} allows {budgets} same-model merges per model, and every pair left would merge units of a "
        "model whose budget is spent"
    )
    needed = min_beta(widths, alpha)
    if needed is None:
        return f"{why}; no β ≤ 1 guarantees these widths{'' if alpha > 0 else ' with α ≤ 0: use α > 0'}"
    return f"{why}; β ≥ {needed:g} always zips these widths"


class _Exhausted(Exception):
    def __init__(self, done: int) -> None:
        self.done = done


def _origin(widths: Sequence[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(widths)), torch.as_tensor(list(widths)))


def _assignment(owner: torch.Tensor) -> torch.Tensor:
    """Membership matrix from each unit's cluster representative; clusters ordered by representative."""
    reps, column = torch.unique(owner, sorted=True, return_inverse=True)
    out = torch.zeros(len(owner), len(reps), dtype=torch.float64)
    out[torch.arange(len(owner)), column] = 1.0
    return out


def greedy_zip(similarity: torch.Tensor, widths: Sequence[int], alpha: float, beta: float) -> ZipResult:
    """Zip Σd_i units of N models down to max(d_i) merged units (ZipIt!, elastic for unequal widths).

    `similarity` is the (Σd × Σd) correlation of the concatenated features; it is not modified.
    α ≤ 0 forbids a merged unit from merging again (hetmerge's rule; see the module docstring).
    """
    n_units = similarity.shape[0]
    if similarity.shape != (n_units, n_units) or n_units != sum(widths):
        raise ValueError(f"similarity of shape {tuple(similarity.shape)} does not fit widths {list(widths)}")
    if not torch.equal(similarity, similarity.T):
        raise ValueError("the similarity matrix must be exactly symmetric (symmetrise it, e.g. (S + Sᵀ)/2)")
    s = similarity.detach().clone()
    s.fill_diagonal_(-torch.inf)
    origin = _origin(widths)
    budget = zip_budgets(widths, beta)
    owner = torch.arange(n_units)
    steps = n_units - max(widths)
    try:
        with _single_thread():  # each step is many tiny ops: thread hand-offs cost more than they gain
            merges, values = _zip_loop(s, origin, budget, steps, alpha, owner)
    except _Exhausted as stop:
        raise ValueError(_exhausted(widths, alpha, beta, stop.done, steps)) from None
    return ZipResult(_assignment(owner), tuple(merges), values)


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _zip_loop(
    s: torch.Tensor, origin: torch.Tensor, budget: list[int], steps: int, alpha: float, owner: torch.Tensor
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """The merges, in order, and the similarity each was made at; `s` and `owner` are updated in place."""
    neg_inf = torch.tensor(-torch.inf, dtype=s.dtype)
    row_max, row_arg = s.max(dim=1)
    merges = []
    values = []
    for _ in range(steps):
        i = int(row_max.argmax())
        best = row_max[i]
        if best == -torch.inf:
            raise _Exhausted(len(merges))
        j = int(row_arg[i])  # i < j: the first maximum of a symmetric matrix lies above the diagonal
        merges.append((i, j))
        values.append(best.clone())
        owner[owner == j] = i
        # α ≤ 0: the merged unit never merges again (hetmerge's rule, stricter than the reference code's)
        column = torch.minimum(s[:, i], s[:, j]) * alpha if alpha > 0 else torch.full_like(s[:, i], -torch.inf)
        column[i] = neg_inf
        s[:, i] = column
        s[i, :] = column
        s[:, j] = neg_inf
        s[j, :] = neg_inf
        recompute = (row_arg == j) | ((row_arg == i) & (column < row_max))
        improve = ~recompute & ((column > row_max) | ((column == row_max) & (row_arg > i)))
        row_max = torch.where(improve, column, row_max)
        row_arg = torch.where(improve, torch.full_like(row_arg, i), row_arg)
        recompute[i] = True
        recompute[j] = True
        m = int(origin[i])
        if m == int(origin[j]):
            budget[m] -= 1
            if budget[m] <= 0:
                same = origin == m
                s[same.unsqueeze(1) & same.unsqueeze(0)] = neg_inf
                recompute |= same
        rows = recompute.nonzero().squeeze(1)
        row_max[rows], row_arg[rows] = s.index_select(0, rows).max(dim=1)
    return merges, torch.stack(values) if values else s.new_empty(0)
