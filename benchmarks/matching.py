"""Benchmark of the matching engine against plain reference loops.

    python benchmarks/matching.py [--widths 256 512 1024 2048 4096] [--json] [--repeats N]

For each width d (two models, O = 2d units of one feature space):

- greedy zip: `hetmerge.matching.greedy_zip.greedy_zip` against `reference_zip` below, the textbook loop of
  algorithms.md §2.5 (a full-matrix argmax per step, physical deletion of the absorbed row and column), on
  the correlation of structured random features; `same` says whether both give the same assignment and the
  same sequence of merges;
- statistics: `hetmerge.statistics.collect_statistics` (one float64 matrix product per batch) against a
  per-sample loop of float64 outer products; `stats_same` says whether the covariances agree (allclose).

References that would run longer than their time limit stop early, and their full time is extrapolated
(said in the row's `reference` / `stats_reference` note); `same` is then only known for the steps that ran.
`tests/test_matching.py` imports `reference_zip` from this file, so there is exactly one reference loop.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hetmerge.matching.greedy_zip import greedy_zip
from hetmerge.models import build_model
from hetmerge.statistics import collect_statistics


class ZipExhausted(Exception):
    """Every remaining entry of the similarity matrix is −∞ before the zip is done."""


@dataclass(frozen=True)
class ReferenceZip:
    assignment: np.ndarray | None  # (O × max d) 0/1 membership, columns ordered by smallest member; None if stopped
    merges: list[tuple[int, int]]  # (kept, absorbed) original unit ids, in order
    steps: int  # merges made
    total_steps: int  # merges a full run makes
    seconds: float


def reference_zip(
    similarity: np.ndarray, widths: Sequence[int], alpha: float, beta: float, time_limit: float | None = None
) -> ReferenceZip:
    """The textbook greedy zip (§2.5): argmax over the whole matrix, merge, physically delete the absorbed unit.

    P is kept as its columns (the member lists of each merged unit): "add column j into column i and delete
    column j" is `members[i] += members[j]; del members[j]`. Raises ZipExhausted when only −∞ is left.
    With `time_limit` (seconds) the loop may stop early; the result then has no assignment.
    """
    start = time.perf_counter()
    sims = np.array(similarity, dtype=np.float64, copy=True)
    n_units = sims.shape[0]
    np.fill_diagonal(sims, -np.inf)
    members = [[k] for k in range(n_units)]
    origin = np.repeat(np.arange(len(widths)), widths)
    to_remove = n_units - max(widths)
    budget = [int((to_remove * d // n_units) * beta + 1e-4) for d in widths]
    merges: list[tuple[int, int]] = []
    while len(members) > max(widths):
        if time_limit is not None and time.perf_counter() - start > time_limit:
            return ReferenceZip(None, merges, len(merges), to_remove, time.perf_counter() - start)
        best = int(sims.reshape(-1).argmax())  # first maximum in row-major order
        i, j = divmod(best, sims.shape[1])
        if sims[i, j] == -np.inf:
            raise ZipExhausted(f"only -inf left after {len(merges)} merges")
        if j < i:
            i, j = j, i
        merges.append((members[i][0], members[j][0]))
        members[i] += members[j]
        del members[j]
        if alpha > 0:
            sims[:, i] = alpha * np.minimum(sims[:, i], sims[:, j])
        else:
            sims[:, i] = -np.inf
        sims = np.delete(sims, j, axis=1)
        if alpha > 0:
            sims[i, :] = alpha * np.minimum(sims[i, :], sims[j, :])
        else:
            sims[i, :] = -np.inf
        sims = np.delete(sims, j, axis=0)
        kept, absorbed = origin[i], origin[j]
        origin = np.delete(origin, j)
        if kept == absorbed:
            budget[kept] -= 1
            if budget[kept] <= 0:
                same = origin == kept
                sims[np.ix_(same, same)] = -np.inf
    assignment = np.zeros((n_units, len(members)))
    for column, units in enumerate(members):
        assignment[units, column] = 1.0
    return ReferenceZip(assignment, merges, len(merges), to_remove, time.perf_counter() - start)


def structured_correlation(d: int, n_samples: int, seed: int) -> np.ndarray:
    """Correlation of Z = [X; X[π] + noise]: model B's units are noisy permuted copies of model A's.

    X has low-rank structure too, so units within a model are correlated as well; the noise level varies
    per unit, so the cross-model pairs range from nearly identical to weakly related.
    """
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(max(1, d // 8), n_samples))
    x = 0.5 * rng.normal(size=(d, latent.shape[0])) @ latent + rng.normal(size=(d, n_samples))
    noise = rng.uniform(0.1, 2.0, size=(d, 1)) * rng.normal(size=(d, n_samples))
    z = torch.from_numpy(np.concatenate([x, x[rng.permutation(d)] + noise]))
    z = z - z.mean(1, keepdim=True)
    cov = z @ z.T / n_samples
    cov = (cov + cov.T) / 2  # exactly symmetric, as the zip assumes
    std = cov.diagonal().sqrt()
    return (cov / torch.outer(std, std)).numpy()


def _best_of(repeats: int, fn):
    """Minimum wall time over `repeats` calls, and the last result."""
    best = math.inf
    result = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def _extrapolate_zip(ref: ReferenceZip, n_units: int) -> float:
    """Full reference time from the first `ref.steps` steps, with a step on an n×n matrix costing ∝ n²."""
    sizes = n_units - np.arange(ref.total_steps, dtype=np.float64)
    return ref.seconds * float((sizes**2).sum() / (sizes[: ref.steps] ** 2).sum())


def bench_zip(d: int, args: argparse.Namespace) -> dict:
    widths = [d, d]
    sims = structured_correlation(d, args.samples, args.seed)
    fast_s, fast = _best_of(args.repeats, lambda: greedy_zip(torch.from_numpy(sims), widths, args.alpha, args.beta))
    row: dict = {"zip_fast_s": fast_s, "zip_merges": len(fast.merges)}
    if d > args.max_reference_width:
        return {**row, "zip_reference_s": None, "ratio": None, "same": None, "reference": "skipped"}
    ref = reference_zip(sims, widths, args.alpha, args.beta, time_limit=args.reference_timeout)
    if ref.assignment is not None:
        same = ref.merges == list(fast.merges) and np.array_equal(ref.assignment, fast.assignment.numpy())
        return {**row, "zip_reference_s": ref.seconds, "ratio": ref.seconds / fast_s, "same": same, "reference": "full"}
    estimate = _extrapolate_zip(ref, sum(widths))
    return {
        **row,
        "zip_reference_s": estimate,
        "ratio": estimate / fast_s,
        "same": None,
        "same_prefix": ref.merges == list(fast.merges[: ref.steps]),
        "reference": f"extrapolated from first {ref.steps} of {ref.total_steps} steps "
        f"({ref.seconds:.0f}s, step cost ∝ n²); same_prefix compares those {ref.steps} merges",
    }


@torch.no_grad()
def bench_stats(d: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    models = [build_model("mlp", {"hidden": [d], "batch_norm": False}, (1, 8, 8), {"A": 10}) for _ in range(2)]
    batches = [torch.randn(args.batch_size, 1, 8, 8) for _ in range(args.batches)]
    total = args.batch_size * args.batches
    for m in models:
        m.eval()
    fast_s, _ = _best_of(args.repeats, lambda: collect_statistics(models, batches))
    # the reference: one float64 outer product per sample, in plain numpy
    t0 = time.perf_counter()
    sums = np.zeros(2 * d)
    outer = np.zeros((2 * d, 2 * d))
    seen: list[torch.Tensor] = []
    for x in batches:
        z = torch.cat([m.run_body(x).T for m in models]).double().numpy()  # body = flatten, fc0
        for k in range(z.shape[1]):
            if time.perf_counter() - t0 > args.stats_reference_timeout:
                break
            sums += z[:, k]
            outer += np.outer(z[:, k], z[:, k])
            seen.append(x[k])
        else:
            continue
        break
    ref_s = time.perf_counter() - t0
    n = len(seen)
    mean = sums / n
    cov = outer / n - np.outer(mean, mean)
    fast = collect_statistics(models, [torch.stack(seen)])["fc0"]  # the same samples, for the comparison
    same = bool(
        np.allclose(fast.mean.numpy(), mean, rtol=1e-9, atol=1e-12)
        and np.allclose(fast.cov.numpy(), cov, rtol=1e-9, atol=1e-9 * np.abs(cov).max())
    )
    row = {"stats_fast_s": fast_s, "stats_samples": total, "stats_same": same}
    if n == total:
        return {**row, "stats_reference_s": ref_s, "stats_ratio": ref_s / fast_s, "stats_reference": "full"}
    estimate = ref_s / n * total
    return {
        **row,
        "stats_reference_s": estimate,
        "stats_ratio": estimate / fast_s,
        "stats_reference": f"extrapolated per sample from the first {n} of {total} samples ({ref_s:.0f}s); "
        f"stats_same compares those {n}",
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _same(row: dict, key: str = "same") -> str:
    if row[key] is None:
        return "-" if "same_prefix" not in row else f"prefix {'yes' if row['same_prefix'] else 'NO'}"
    return "yes" if row[key] else "NO"


def print_table(rows: list[dict]) -> None:
    header = ["width", "zip fast s", "zip ref s", "ratio", "same", "stats fast s", "stats ref s", "ratio", "same"]
    lines = [
        [
            str(r["width"]),
            _fmt(r["zip_fast_s"]),
            _fmt(r["zip_reference_s"]) + ("*" if r["reference"] != "full" else ""),
            _fmt(r["ratio"]),
            _same(r),
            _fmt(r["stats_fast_s"]),
            _fmt(r["stats_reference_s"]) + ("*" if r["stats_reference"] != "full" else ""),
            _fmt(r["stats_ratio"]),
            _same(r, "stats_same"),
        ]
        for r in rows
    ]
    sizes = [max(len(h), *(len(line[k]) for line in lines)) for k, h in enumerate(header)]
    print("  ".join(h.rjust(s) for h, s in zip(header, sizes, strict=True)))
    for line in lines:
        print("  ".join(c.rjust(s) for c, s in zip(line, sizes, strict=True)))
    for r in rows:
        for key in ("reference", "stats_reference"):
            if r[key] != "full":
                print(f"* width {r['width']}: {r[key]}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows instead of a table")
    parser.add_argument("--repeats", type=int, default=3, help="fast timings are the best of N runs (default 3)")
    parser.add_argument("--max-reference-width", type=int, default=4096, help="skip the zip reference above this")
    parser.add_argument(
        "--reference-timeout",
        type=float,
        default=150.0,
        help="seconds before the zip reference stops and extrapolates (default 150: width 2048 runs in full)",
    )
    parser.add_argument(
        "--stats-reference-timeout", type=float, default=10.0, help="seconds before the per-sample loop extrapolates"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1, as the pipeline's `hetmerge merge`)"
    )
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--beta", type=float, default=0.125)
    parser.add_argument("--samples", type=int, default=512, help="feature samples behind the zip's correlation")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch threads {args.threads}, load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    rows = []
    for d in args.widths:
        t0 = time.perf_counter()
        row = {"width": d, "threads": args.threads, **bench_zip(d, args), **bench_stats(d, args)}
        rows.append(row)
        seconds, load = time.perf_counter() - t0, os.getloadavg()[0]
        print(f"width {d} done in {seconds:.0f}s (load average {load:.1f})", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)
    return 0 if all(r["same"] is not False and r.get("same_prefix", True) and r["stats_same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
