"""Benchmark of HF/KF's least-squares neuron interpolation (one layer) against plain reference loops.

    python benchmarks/neuron_interpolation.py [--widths 256 512 1024 2048 4096] [--rows 8192] [--json]

For each width d, one layer Linear(d → d) of N = 2 parents: the first layer of an MLP whose inputs have d features
(ReLU'd Gaussians), parent 1's neurons being parent 0's, permuted, plus noise as large as the weights. The fused
network is a copy of parent 0, and `--rows` fusion rows are fed in batches of 1024.

- least squares: `hetmerge.interpolation.layer_system` + `refit` (G = XᵀX and XᵀA_k accumulated in float64 over the
  batches, one eigendecomposition of G, all neurons at once) against `reference_refits`: X and A formed whole and
  one `torch.linalg.lstsq` per neuron (SVD driver, with the cutoff of torch.linalg.pinv(X) on float32 data that
  `refit` reproduces); `ls_same` says whether the weights agree (allclose). One such solve takes 25 s at width 4096,
  so the least-squares reference stops at `--max-ls-reference-width` (default 2048);
- k-means fusion: KF's clustering of the 2d refits into d (`weighted_kmeans` on the refits' features, early stop at
  < 5 % gain over 3 iterations, one restart; then `Refits.combined` for the fused weights) against
  `reference_kmeans`: the same algorithm in pre-activation row space, each neuron a rows-long vector Xw, the
  distances computed one neuron at a time; `kmeans_same` says whether the assignment is identical and the fused
  weights allclose.

A reference that runs past `--reference-timeout` stops, and its full time is extrapolated from the part that ran
(least squares: per neuron; k-means: per neuron-to-centroid distance, for the number of iterations the fast run
took); the comparison then covers the neurons refitted (`ls_same`) or is unknown (`kmeans_same` null). The k-means
reference runs to the end up to `--full-kmeans-reference-width` (default 256).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hetmerge.interpolation import Layer, design_rows, layer_system, output_rows, refit
from hetmerge.matching.kmeans import weighted_kmeans
from hetmerge.methods.kf import MIN_IMPROVEMENT, PATIENCE
from hetmerge.models import MultiTaskNet, build_model

LAYER = Layer("body.fc0.linear", "fc0")
BATCH = 1024


def parents(d: int, seed: int) -> list[MultiTaskNet]:
    """Two MLPs d → d → 10; parent 1's hidden neurons are parent 0's, permuted, plus noise of their scale."""
    torch.manual_seed(seed)
    first = build_model("mlp", {"hidden": [d], "batch_norm": False}, (d,), {"all": 10}).eval()
    second = copy.deepcopy(first)
    with torch.no_grad():
        src, dst = first.body.fc0.linear, second.body.fc0.linear
        perm = torch.randperm(d)
        dst.weight.copy_(src.weight[perm] + src.weight.std() * torch.randn_like(src.weight))
        dst.bias.copy_(src.bias[perm])
    return [first, second]


def fusion_batches(d: int, rows: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    return [torch.randn(min(BATCH, rows - i), d, generator=gen).relu() for i in range(0, rows, BATCH)]


@dataclass(frozen=True)
class Reference:
    seconds: float  # measured, or extrapolated when `done` < `total`
    done: int
    total: int
    result: object


def _outputs(model: MultiTaskNet, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    layer = model.body.fc0.linear
    return torch.cat([output_rows(layer, layer(model.body.flatten(b))) for b in batches])


@torch.no_grad()
def reference_refits(
    fused: MultiTaskNet, models: Sequence[MultiTaskNet], batches: Sequence[torch.Tensor], time_limit: float
) -> Reference:
    """X and every A_k formed whole (float64), then one least-squares solve per neuron, until `time_limit`: X⁺a with
    singular values below max(rows, cols)·eps(float32)·σ_max dropped, as torch.linalg.pinv of the float32 rows."""
    start = time.perf_counter()
    x = torch.cat([design_rows(fused.body.fc0.linear, fused.body.flatten(b)) for b in batches]).double()
    a = torch.cat([_outputs(m, batches) for m in models], 1).double()
    rcond = max(x.shape) * torch.finfo(torch.float32).eps
    solved = []
    for i in range(a.shape[1]):
        if time.perf_counter() - start > time_limit:
            break
        solved.append(torch.linalg.lstsq(x, a[:, i : i + 1], rcond=rcond, driver="gelsd").solution)
    seconds = time.perf_counter() - start
    total = a.shape[1]
    return Reference(seconds * total / len(solved), len(solved), total, torch.cat(solved, 1))


def reference_kmeans(
    points: torch.Tensor,
    weights: torch.Tensor,
    k: int,
    first: int,
    iterations: int,
    time_limit: float,
    max_iter: int = 100,
) -> Reference:
    """KF's k-means written plainly on (n, rows) pre-activations: farthest-point seeds from `first`, then Lloyd
    steps whose distances are computed one neuron at a time, the same repair (a loop over empty clusters) and
    stopping rule (`max_iter` is `weighted_kmeans`'s default); stops after `time_limit` seconds. `iterations` (the fast
    run's count) sizes the extrapolation."""
    start = time.perf_counter()
    n = len(points)
    total = (k - 1) * n + (iterations + 1) * n * k  # point-to-centroid distances: seeding, first assignment, Lloyd
    done = 0

    def out_of_time() -> bool:
        return time.perf_counter() - start > time_limit

    def stopped() -> Reference:
        seconds = time.perf_counter() - start
        return Reference(seconds * total / max(done, 1), done, total, None)

    seeds = [first]
    nearest = (points - points[first]).square().sum(1)
    for _ in range(1, k):
        if out_of_time():
            return stopped()
        seeds.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, (points - points[seeds[-1]]).square().sum(1))
        done += n

    def distances(centroids: torch.Tensor) -> torch.Tensor | None:
        nonlocal done
        rows = []
        for i in range(n):
            if out_of_time():
                return None
            rows.append((centroids - points[i]).square().sum(1))
            done += k
        return torch.stack(rows)

    def repair(dist: torch.Tensor) -> torch.Tensor:
        best = dist.min(1)
        members = best.indices.clone()
        score = weights * best.values
        for j in range(k):
            if not (members == j).any():
                sizes = torch.bincount(members, minlength=k)
                i = int(torch.where(sizes[members] > 1, score, -torch.inf).argmax())
                members[i] = j
        return members

    dist = distances(points[seeds])
    if dist is None:
        return stopped()
    members = repair(dist)
    history: list[float] = []
    while True:
        centroids = torch.zeros(k, points.shape[1], dtype=points.dtype).index_add_(
            0, members, weights[:, None] * points
        )
        centroids /= torch.zeros(k, dtype=points.dtype).index_add_(0, members, weights)[:, None]
        dist = distances(centroids)
        if dist is None:
            return stopped()
        history.append(float((weights * dist[torch.arange(n), members]).sum()))
        stalled = len(history) > PATIENCE and history[-1] >= history[-1 - PATIENCE] * (1 - MIN_IMPROVEMENT)
        if stalled or len(history) == max_iter:
            break
        moved = repair(dist)
        if torch.equal(moved, members):
            break
        members = moved
    return Reference(time.perf_counter() - start, total, total, members)


def bench(d: int, args: argparse.Namespace) -> dict:
    models = parents(d, args.seed)
    fused = copy.deepcopy(models[0])
    batches = fusion_batches(d, args.rows, args.seed)
    t0 = time.perf_counter()
    refits = refit(layer_system(fused, models, LAYER, batches))
    ls_fast = time.perf_counter() - t0
    weights = torch.ones(2 * d, dtype=torch.float64)
    first = int(torch.randint(2 * d, (1,), generator=torch.Generator().manual_seed(args.seed)))
    t0 = time.perf_counter()
    result = weighted_kmeans(
        torch.cat(refits.features, 1).T,
        weights,
        d,
        generator=torch.Generator().manual_seed(args.seed),
        patience=PATIENCE,
        min_improvement=MIN_IMPROVEMENT,
    )
    fused_weights = refits.combined([weights[:d], weights[d:]], result.assign, d)
    kmeans_fast = time.perf_counter() - t0
    row: dict = {"width": d, "rows": args.rows, "threads": args.threads, "ls_fast_s": ls_fast}

    if d > args.max_ls_reference_width:
        skipped = f"skipped (width above --max-ls-reference-width {args.max_ls_reference_width})"
        row |= {"ls_reference_s": None, "ls_ratio": None, "ls_same": None, "ls_reference": skipped}
    else:
        ls = reference_refits(fused, models, batches, args.reference_timeout)
        want = torch.cat(refits.weights, 1)[:, : ls.done]
        row |= {
            "ls_reference_s": ls.seconds,
            "ls_ratio": ls.seconds / ls_fast,
            "ls_same": bool(torch.allclose(ls.result, want, rtol=1e-6, atol=1e-8 * want.abs().max().item())),
            "ls_reference": "full" if ls.done == ls.total else f"extrapolated from {ls.done} of {ls.total} neurons",
        }

    x = torch.cat([design_rows(fused.body.fc0.linear, fused.body.flatten(b)) for b in batches]).double()
    t0 = time.perf_counter()
    preacts = (x @ torch.cat(refits.weights, 1)).T  # the reference's points: each refit's pre-activations
    setup = time.perf_counter() - t0
    limit = torch.inf if d <= args.full_kmeans_reference_width else args.reference_timeout
    km = reference_kmeans(preacts, weights, d, first, len(result.history), limit)
    same = None
    if km.result is not None:
        members = km.result
        ref_weights = refits.combined([weights[:d], weights[d:]], members, d)
        same = torch.equal(members, result.assign) and bool(torch.allclose(ref_weights, fused_weights))
    km_seconds = km.seconds + setup
    row |= {
        "kmeans_fast_s": kmeans_fast,
        "kmeans_iterations": len(result.history),
        "kmeans_reference_s": km_seconds,
        "kmeans_ratio": km_seconds / kmeans_fast,
        "kmeans_same": same,
        "kmeans_reference": "full"
        if km.done == km.total
        else f"extrapolated from {km.done} of {km.total} neuron-centroid distances",
    }
    return row


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _same(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "NO")


def print_table(rows: list[dict]) -> None:
    """A markdown table; references marked * were extrapolated (said below it)."""
    header = [
        "width",
        "LS fast s",
        "LS ref s",
        "ratio",
        "same",
        "k-means fast s",
        "iters",
        "k-means ref s",
        "ratio",
        "same",
    ]
    lines = [
        [
            str(r["width"]),
            _fmt(r["ls_fast_s"]),
            _fmt(r["ls_reference_s"]) + ("*" if r["ls_reference"] != "full" else ""),
            _fmt(r["ls_ratio"]),
            _same(r["ls_same"]),
            _fmt(r["kmeans_fast_s"]),
            str(r["kmeans_iterations"]),
            _fmt(r["kmeans_reference_s"]) + ("*" if r["kmeans_reference"] != "full" else ""),
            _fmt(r["kmeans_ratio"]),
            _same(r["kmeans_same"]),
        ]
        for r in rows
    ]
    sizes = [max(len(h), *(len(line[k]) for line in lines)) for k, h in enumerate(header)]
    print("| " + " | ".join(h.rjust(s) for h, s in zip(header, sizes, strict=True)) + " |")
    print("|" + "|".join("-" * (s + 1) + ":" for s in sizes) + "|")
    for line in lines:
        print("| " + " | ".join(c.rjust(s) for c, s in zip(line, sizes, strict=True)) + " |")
    notes = [
        f"\\* width {r['width']}: the {name} reference was {r[key]}."
        for r in rows
        for name, key in (("least-squares", "ls_reference"), ("k-means", "kmeans_reference"))
        if r[key] != "full"
    ]
    if notes:
        print("\n" + "\n".join(notes))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--rows", type=int, default=8192, help="fusion rows (samples) of the layer (default 8192)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows instead of a markdown table")
    parser.add_argument(
        "--reference-timeout",
        type=float,
        default=5.0,
        help="seconds before each reference stops and extrapolates (default 5: keeps the run within ~3 minutes)",
    )
    parser.add_argument(
        "--full-kmeans-reference-width",
        type=int,
        default=256,
        help="run the k-means reference to the end up to this width (default 256, about 30 s), so one row compares "
        "whole clusterings",
    )
    parser.add_argument(
        "--max-ls-reference-width", type=int, default=2048, help="skip the least-squares reference above this"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1, as the pipeline's `hetmerge merge`)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch threads {args.threads}, load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    rows = []
    for d in args.widths:
        t0 = time.perf_counter()
        rows.append(bench(d, args))
        seconds, load = time.perf_counter() - t0, os.getloadavg()[0]
        print(f"width {d} done in {seconds:.0f}s (load average {load:.1f})", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)
    return 0 if all(r["ls_same"] is not False and r["kmeans_same"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
