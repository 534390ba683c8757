"""Depth alignment: which block position of the deeper model each block of the shallower one takes (§4.3, §4.5).

Both models are split into the same number of stages. Within a stage the deep model has L_d blocks and
the shallow one L_s ≤ L_d. An alignment of a stage is a tuple of L_s strictly increasing deep positions,
one per shallow block. Block 0 of a stage owns the stride and shortcut, so it always stays at position 0.
Positions not taken become identity blocks when the shallow model is padded to the deep architecture.

The similarity-driven strategies work on the stage's sub-matrix C = S[1:L_d, 1:L_s] (m = L_d − 1 deep rows,
n = L_s − 1 shallow columns) and choose 0-based rows a_1 < … < a_n of C; shallow block k then sits at deep
position a_k + 1. Objectives, with k(l) the last shallow block placed at or before deep row l:

- segment (SMA, the paper's method):  Σ_k C[a_k, k].
- layer (LMA as intended):            Σ_{l ≥ a_1} C[l, k(l)]: every deep row from a_1 on is scored against the
  shallow block the padded model actually carries there (later rows are identity copies of it).
- layer_code (LMA as coded):          Σ_k C[a_k, k] + Σ_{l ≥ a_1 unmatched} C[l, k(l) − 1], with k(l) − 1
  wrapping to the last column when k(l) is the first (see `layer_code_alignment`).

The baselines (head, uniform, head_tail) ignore the similarities; their score is the segment objective.
Ties in the dynamic programs resolve as in the reference backtrack: skipping a deep row wins, so the
later shallow blocks sit as early as the optimum allows.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Positions = tuple[int, ...]


# --- dynamic programs ------------------------------------------------------------------------------


def _check_stage(sim: torch.Tensor) -> list[list[float]]:
    if sim.ndim != 2:
        raise ValueError(f"a stage's similarity must be a (deep × shallow) matrix, got shape {tuple(sim.shape)}")
    n_deep, n_shallow = sim.shape
    _check_depths(n_deep, n_shallow)
    if not torch.isfinite(sim).all():
        raise ValueError("the similarity matrix has NaN or infinite entries")
    return sim.detach().double().cpu().tolist()


def _dp(c: list[list[float]], skip_column: Callable[[int], int | None]) -> tuple[tuple[int, ...], float]:
    """Best strictly increasing rows a_1 < … < a_n of the m × n matrix `c` (0-based), and the best value.

    F[k][j]: best value with shallow columns 1..k placed among deep rows 1..j (1-based), column k at or
    before row j. Row j either takes column k (from F[k−1][j−1]) or is skipped (from F[k][j−1]), a skip
    scoring c[j][skip_column(k)] (nothing when None). The diagonal F[k][k] places columns 1..k on rows 1..k.
    """
    m, n = len(c), len(c[0]) if c else 0
    f = [[0.0] * (m + 1) for _ in range(n + 1)]
    skipped = [[False] * (m + 1) for _ in range(n + 1)]
    for k in range(1, n + 1):
        f[k][k] = f[k - 1][k - 1] + c[k - 1][k - 1]
        col = skip_column(k)
        for j in range(k + 1, m + 1):
            skip = f[k][j - 1] + (c[j - 1][col - 1] if col is not None else 0.0)
            take = f[k - 1][j - 1] + c[j - 1][k - 1]
            skipped[k][j] = skip >= take  # ties skip, like the reference backtrack's equality test
            f[k][j] = max(skip, take)
    rows = [0] * n
    j = m
    for k in range(n, 0, -1):
        while j > k and skipped[k][j]:
            j -= 1
        rows[k - 1] = j - 1
        j -= 1
    return tuple(rows), f[n][m]


def _positions(rows: Sequence[int]) -> Positions:
    """Rows of the sub-matrix (block 0 excluded) → stage positions, with block 0 at 0."""
    return (0, *(r + 1 for r in rows))


def segment_alignment(sim: torch.Tensor) -> Positions:
    """SMA: strictly increasing positions maximising the summed similarity of the matched blocks.

    The CLAFusion cross-layer DP; each shallow block closes a segment of consecutive deep blocks whose
    other members merge with identity blocks. `sim` is the stage's (L_d × L_s) block, block 0 included.
    """
    c = _check_stage(sim)
    return _positions(_dp([row[1:] for row in c[1:]], lambda k: None)[0])


def layer_alignment(sim: torch.Tensor) -> Positions:
    """LMA as intended: every deep block from the first match on scores against the shallow block it carries.

    A deep block skipped after shallow block k's position is an identity copy of k in the padded model,
    so the skip scores C[l, k].
    """
    c = _check_stage(sim)
    return _positions(_dp([row[1:] for row in c[1:]], lambda k: k)[0])


def layer_code_alignment(sim: torch.Tensor) -> Positions:
    """LMA exactly as the reference `align2` computes it (§4.5, §9.1 item 2).

    It differs from `layer_alignment` only in the skip term: a deep block skipped after shallow block k's
    position scores against shallow block k − 1 (code `C[l-1, k-2]`) instead of k, and for k = 1 the index
    −1 wraps to the *last* shallow block of the stage. The matched blocks and the diagonal base are as in
    the intended version.
    """
    c = _check_stage(sim)
    n = sim.shape[1] - 1
    return _positions(_dp([row[1:] for row in c[1:]], lambda k: k - 1 if k > 1 else n)[0])


# --- objectives --------------------------------------------------------------------------------------


def _rows_and_owner(sim: torch.Tensor, positions: Positions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sub-matrix C, 0-based matched rows a, and for each deep row the index of the last column placed at
    or before it (−1 before the first)."""
    _check_positions(positions, *sim.shape)
    c = sim.detach().double().cpu()[1:, 1:]
    a = torch.tensor(positions[1:], dtype=torch.long) - 1
    owner = torch.searchsorted(a, torch.arange(c.shape[0]), right=True) - 1
    return c, a, owner


def segment_score(sim: torch.Tensor, positions: Positions) -> float:
    """Σ_k C[a_k, k]: the similarity of the matched blocks, block 0 excluded."""
    c, a, _ = _rows_and_owner(sim, positions)
    return float(c[a, torch.arange(len(a))].sum())


def layer_score(sim: torch.Tensor, positions: Positions) -> float:
    """Σ_{l ≥ a_1} C[l, k(l)]: every deep block from the first match on, against the shallow block it carries."""
    c, _, owner = _rows_and_owner(sim, positions)
    rows = (owner >= 0).nonzero().flatten()
    return float(c[rows, owner[rows]].sum())


def layer_code_score(sim: torch.Tensor, positions: Positions) -> float:
    """The objective `layer_code_alignment` maximises: matches score C[a_k, k], skips C[l, k(l) − 1] (wrapped)."""
    c, a, owner = _rows_and_owner(sim, positions)
    rows = (owner >= 0).nonzero().flatten()
    matched = torch.isin(rows, a)
    cols = torch.where(matched, owner[rows], (owner[rows] - 1) % max(c.shape[1], 1))
    return float(c[rows, cols].sum())


# --- baselines -----------------------------------------------------------------------------------------


def head_alignment(n_deep: int, n_shallow: int) -> Positions:
    """`headalign`: the shallow blocks take the first positions; the last L_d − L_s are identity."""
    _check_depths(n_deep, n_shallow)
    return tuple(range(n_shallow))


def uniform_alignment(n_deep: int, n_shallow: int) -> Positions:
    """`unialign`: with stride round(L_d/L_s) (half up), shallow blocks L_s−1, L_s−2, … take deep positions
    L_d−1, L_d−1−stride, … down to 1; shallow blocks the stride runs out for keep their own index.
    Raises where that would put two blocks at one position (e.g. 10 into 15 blocks)."""
    _check_depths(n_deep, n_shallow)
    stride = int(n_deep / n_shallow + 0.5)
    positions = list(range(n_shallow))
    for b, p in zip(range(n_shallow - 1, 0, -1), range(n_deep - 1, 0, -stride), strict=False):
        positions[b] = p
    if any(p >= q for p, q in itertools.pairwise(positions)):
        raise ValueError(
            f"uniform alignment of {n_shallow} into {n_deep} blocks (stride {stride}) gives colliding positions "
            f"{positions}; use another strategy for this stage"
        )
    return tuple(positions)


def head_tail_alignment(n_deep: int, n_shallow: int) -> Positions:
    """`htalign`: shallow blocks ⌊L_s/2⌋ … L_s−1 take the last deep positions; the lower half stays at the
    head. Block 0 stays at 0 even when L_s = 1 (where the reference code would move it)."""
    _check_depths(n_deep, n_shallow)
    tail_from = max(n_shallow // 2, 1)
    return tuple(b if b < tail_from else n_deep - n_shallow + b for b in range(n_shallow))


# --- registry --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Strategy:
    """A named alignment rule: from the stage's similarity block, or from the block counts alone."""

    name: str
    score: Callable[[torch.Tensor, Positions], float]  # the objective it maximises (segment for baselines)
    by_similarity: Callable[[torch.Tensor], Positions] | None = None
    by_depth: Callable[[int, int], Positions] | None = None

    @property
    def needs_similarity(self) -> bool:
        return self.by_similarity is not None

    def align(self, n_deep: int, n_shallow: int, sim: torch.Tensor | None = None) -> Positions:
        if self.by_depth is not None:
            return self.by_depth(n_deep, n_shallow)
        assert self.by_similarity is not None
        if sim is None:
            raise ValueError(f"depth alignment {self.name!r} needs a layer similarity matrix")
        if tuple(sim.shape) != (n_deep, n_shallow):
            raise ValueError(f"stage similarity of shape {tuple(sim.shape)} for {n_deep} × {n_shallow} blocks")
        return self.by_similarity(sim)


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("segment", segment_score, by_similarity=segment_alignment),
        Strategy("layer", layer_score, by_similarity=layer_alignment),
        Strategy("layer_code", layer_code_score, by_similarity=layer_code_alignment),
        Strategy("head", segment_score, by_depth=head_alignment),
        Strategy("uniform", segment_score, by_depth=uniform_alignment),
        Strategy("head_tail", segment_score, by_depth=head_tail_alignment),
    )
}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown depth alignment {name!r}; valid: {', '.join(STRATEGIES)}") from None


# --- stages ----------------------------------------------------------------------------------------------


def _check_depths(n_deep: int, n_shallow: int) -> None:
    if n_shallow < 1:
        raise ValueError(f"a stage needs at least one block, got {n_shallow}")
    if n_shallow > n_deep:
        raise ValueError(
            f"the shallow model has {n_shallow} blocks in a stage where the deep one has {n_deep}; "
            "pass the deeper model first"
        )


def _check_positions(positions: Positions, n_deep: int, n_shallow: int) -> None:
    if len(positions) != n_shallow or positions[:1] != (0,) or positions[-1] >= n_deep:
        raise ValueError(f"{positions} is not an alignment of {n_shallow} into {n_deep} blocks")
    if any(p >= q for p, q in itertools.pairwise(positions)):
        raise ValueError(f"alignment {positions} is not strictly increasing")


def _check_stages(deep_blocks: Sequence[int], shallow_blocks: Sequence[int]) -> None:
    if len(deep_blocks) != len(shallow_blocks):
        raise ValueError(
            f"the deep model has {len(deep_blocks)} stages {list(deep_blocks)} and the shallow one "
            f"{len(shallow_blocks)} {list(shallow_blocks)}; depth alignment needs the same stages"
        )
    for s, (d, b) in enumerate(zip(deep_blocks, shallow_blocks, strict=True)):
        try:
            _check_depths(d, b)
        except ValueError as err:
            raise ValueError(f"stage {s}: {err}") from None


def stage_offsets(blocks: Sequence[int]) -> tuple[int, ...]:
    """Global index of each stage's block 0 when the stages' blocks are concatenated."""
    return tuple(itertools.accumulate(blocks, initial=0))[:-1]


def to_global(blocks: Sequence[int], stage: int, position: int) -> int:
    if not 0 <= position < blocks[stage]:
        raise ValueError(f"stage {stage} has {blocks[stage]} blocks, no position {position}")
    return stage_offsets(blocks)[stage] + position


def to_local(blocks: Sequence[int], index: int) -> tuple[int, int]:
    """(stage, position within the stage) of a global block index."""
    for s, start in enumerate(stage_offsets(blocks)):
        if start <= index < start + blocks[s]:
            return s, index - start
    raise ValueError(f"block {index} is outside the {sum(blocks)} blocks of stages {list(blocks)}")


def stage_similarity(
    similarity: torch.Tensor, deep_blocks: Sequence[int], shallow_blocks: Sequence[int], stage: int
) -> torch.Tensor:
    """Stage `stage`'s (L_d × L_s) block of the global (Σ deep × Σ shallow) similarity matrix."""
    r, c = stage_offsets(deep_blocks)[stage], stage_offsets(shallow_blocks)[stage]
    return similarity[r : r + deep_blocks[stage], c : c + shallow_blocks[stage]]


@dataclass(frozen=True)
class DepthAlignment:
    """Per stage, the deep position of every shallow block; `score` sums the strategy's objective over the
    stages (None when no similarity was given)."""

    strategy: str
    deep_blocks: tuple[int, ...]
    shallow_blocks: tuple[int, ...]
    positions: tuple[Positions, ...]
    score: float | None

    def global_positions(self) -> tuple[int, ...]:
        """Global deep block index of every global shallow block index."""
        return tuple(to_global(self.deep_blocks, s, p) for s, stage in enumerate(self.positions) for p in stage)


def align_depths(
    strategy: str,
    deep_blocks: Sequence[int],
    shallow_blocks: Sequence[int],
    similarity: torch.Tensor | None = None,
    reset_offsets: bool = False,
) -> DepthAlignment:
    """Align every stage; `similarity` is the global (Σ deep × Σ shallow) matrix, stages concatenated.

    `reset_offsets=True` reproduces the reference code's stage-offset bug (§9.1 item 1): every stage is
    aligned on the rows/columns at the *start* of the matrix (stage 1's, for equal stage sizes). The score
    always uses each stage's own block.
    """
    rule = get_strategy(strategy)
    deep, shallow = tuple(int(d) for d in deep_blocks), tuple(int(b) for b in shallow_blocks)
    _check_stages(deep, shallow)
    if similarity is not None and tuple(similarity.shape) != (sum(deep), sum(shallow)):
        raise ValueError(
            f"similarity of shape {tuple(similarity.shape)} does not fit {sum(deep)} deep blocks {list(deep)} "
            f"× {sum(shallow)} shallow blocks {list(shallow)}"
        )
    if rule.needs_similarity and similarity is None:
        raise ValueError(f"depth alignment {strategy!r} needs a layer similarity matrix")
    positions = []
    score = 0.0
    for s, (d, b) in enumerate(zip(deep, shallow, strict=True)):
        block = stage_similarity(similarity, deep, shallow, s) if similarity is not None else None
        used = similarity[:d, :b] if reset_offsets and similarity is not None else block
        positions.append(rule.align(d, b, used))
        if block is not None:
            score += rule.score(block, positions[-1])
    return DepthAlignment(strategy, deep, shallow, tuple(positions), score if similarity is not None else None)
