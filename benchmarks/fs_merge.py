"""Benchmark of FS-Merge's kernels against plain reference code, and of FS-Merge's global against its local training.

    python benchmarks/fs_merge.py [--widths 256 512 1024 2048] [--channels 64 128] [--models 2 4] [--json]

- superlayer: one `SuperLayer` (N frozen Linear(d → d) or Conv2d(c → c, 3×3) between an unmerge map U and a merge map
  M, `diagonal_and_low_rank` maps of rank 12 started at random) forward and backward on a batch (`--batch` rows for
  Linear; `--conv-batch` maps of `--conv-size`² for Conv2d). `fast` is the layer as FS-Merge trains it: through its
  folded weight Mᵀ·blockdiag(W)·Uᵀ, composed (differentiably) every step; `explicit` the paper's way, which
  `SuperLayer.explicit` computes: U, the N models' layers on N·d units (Linear one einsum batched over the models,
  Conv2d one grouped convolution), M. The reference (`reference_forward`) applies U, runs each model's own
  nn.Linear/nn.Conv2d module on its chunk in a loop, concatenates and applies M. `models_*` time the models' part
  alone (no maps, every model reads the batch): the batched einsum or grouped conv against the loop over the
  modules. `same`: the outputs and the gradients of the input and of every map parameter (fast and explicit against
  the reference), and the models' part's output and input gradient, are allclose.
- fold: `SuperLayer.folded()` (one einsum) against `reference_fold`, the textbook W' = Mᵀ·blockdiag(W₁…W_N)·Uᵀ
  (`torch.block_diag`, one product per kernel tap of a conv); `same`: weight and bias allclose.
- grams: RegMean's `input_grams` (forward pre-hooks that fold each chunk of a layer's input rows into its float64
  Gram XᵀX and keep nothing else) against `reference_grams`, which keeps every layer's input of one whole forward
  pass, forms each X whole in float64 (im2col for convolutions) and multiplies XᵀX; on the default config's MLP
  and ViT and a VGG-11 (convolutions), untrained, on `--gram-images` random images. `same`: every Gram allclose.
  `reference_held_mb` is what the reference holds at its peak (all inputs, plus the largest float64 X).
- fs_merge: the `fs_merge` method, `global` against `local`, on the default config's MLP (784-128-128-128 with
  BatchNorm) and ViT pairs (untrained, two seeds, heads A and B), on a synthetic few-shot slice of `--fs-images`
  training and `--fs-val` validation images per task, batches of `--fs-batch`, `--fs-epochs` epochs, the
  method's defaults otherwise. `held_mb` is the memory one training step holds (`training_memory`: the tensors
  autograd saves for one batch, plus parameters, gradients and AdamW's moments), global against the peak over
  local's blocks; `s_per_step` the seconds of its fits (targets, steps and per-epoch validation) per optimiser step.
  With CUDA, each mode runs on the GPU too, and `cuda_peak_mb` is torch.cuda.max_memory_allocated over the merge,
  above what the models and the data already held.

Timings are the best of `--repeats` runs after one warm-up run (FS-Merge: one run, after one untimed merge on each
device). The fits are timed by wrapping fs_merge's `fit_on_tasks`. The exit status is 1 if any comparison disagrees.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

import hetmerge.methods.fs_merge as fs_merge_module
from hetmerge.data.few_shot import FewShot, TaskImages
from hetmerge.levels import seeded
from hetmerge.methods import MergeContext, build_method
from hetmerge.methods.regmean import input_grams, linear_layers
from hetmerge.models import MultiTaskNet, build_model
from hetmerge.supernet import MapSpec, MergeMap, SuperLayer

RANK = 12
MAPS = MapSpec("diagonal_and_low_rank", RANK, "random")  # random: the low-rank part is not zero, so it is exercised
INPUT_SHAPE = (1, 28, 28)
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {  # the default config's FS-Merge pairs, plus convolutions for RegMean
    "mlp": ("mlp", {"hidden": [128, 128, 128], "batch_norm": True}),
    "vit": ("vit", {"patch": 7, "depth": 4, "width": 64, "heads": 4, "mlp_ratio": 2.0, "pool": "cls"}),
    "vgg": ("vgg", {"depth": 11, "width": 0.25}),
}
MB = 2**20
CPU = torch.device("cpu")  # where models are built, with a seeded CPU generator; FS-Merge's rows then move them
MODES = ("global", "local")


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4) -> bool:
    """allclose, with an absolute tolerance scaled to the result (float32 sums of different order)."""
    return got.shape == want.shape and bool(torch.allclose(got, want, rtol=rtol, atol=rtol * float(want.abs().max())))


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` timed calls, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# --- SuperLayer forward and backward ------------------------------------------------------------------------------


def make_layer(kind: str, n: int, width: int, seed: int) -> tuple[SuperLayer, list[nn.Module]]:
    """A SuperLayer of `n` seeded frozen Linear(width → width) or Conv2d(width → width, 3×3, padding 1) modules, and
    the modules themselves."""
    with seeded(seed, CPU):
        sources: list[nn.Module] = [
            nn.Linear(width, width) if kind == "linear" else nn.Conv2d(width, width, 3, padding=1) for _ in range(n)
        ]
    for source in sources:
        source.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    merge = MergeMap("h", n, width, width, "merge", MAPS, RANK, gen)
    unmerge = MergeMap("h", n, width, width, "unmerge", MAPS, RANK, gen)
    return SuperLayer(sources, merge, unmerge), sources


def _on_units(x: torch.Tensor, matrix: torch.Tensor, dim: int) -> torch.Tensor:
    return (x.movedim(dim, -1) @ matrix).movedim(-1, dim)


def reference_forward(layer: SuperLayer, sources: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The SuperLayer written plainly: U, each model's own module on its chunk of the units, concatenated, M."""
    assert layer.merge is not None and layer.unmerge is not None
    dim = layer.unit_dim
    chunks = _on_units(x, layer.unmerge.matrix(), dim).chunk(len(sources), dim)
    per_model = torch.cat([source(chunk) for source, chunk in zip(sources, chunks, strict=True)], dim)
    return _on_units(per_model, layer.merge.matrix(), dim)


def forward_backward(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    cotangent: torch.Tensor,
    params: list[nn.Parameter],
) -> list[torch.Tensor]:
    """The output, then the gradients of ⟨output, cotangent⟩ with respect to the input and to `params`."""
    x = x.detach().requires_grad_()
    out = forward(x)
    return [out.detach(), *torch.autograd.grad(out, [x, *params], cotangent)]


def bench_superlayer(kind: str, n: int, width: int, args: argparse.Namespace) -> dict[str, Any]:
    layer, sources = make_layer(kind, n, width, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    shape = (args.batch, width) if kind == "linear" else (args.conv_batch, width, args.conv_size, args.conv_size)
    x = torch.randn(shape, generator=gen)
    cotangent = torch.randn(shape, generator=gen)
    params = list(layer.parameters())

    def fast() -> list[torch.Tensor]:
        return forward_backward(layer, x, cotangent, params)

    def explicit() -> list[torch.Tensor]:
        return forward_backward(layer.explicit, x, cotangent, params)

    def reference() -> list[torch.Tensor]:
        return forward_backward(lambda h: reference_forward(layer, sources, h), x, cotangent, params)

    # the models' part alone (no maps: every model reads x): one batched einsum or grouped conv against the loop
    bare = SuperLayer(sources, None, None)
    dim = bare.unit_dim
    wide = torch.cat([cotangent] * n, dim)

    def models_fast() -> list[torch.Tensor]:
        return forward_backward(bare.per_model, x, wide, [])

    def models_reference() -> list[torch.Tensor]:
        return forward_backward(lambda h: torch.cat([s(h) for s in sources], dim), x, wide, [])

    fast_s, reference_s = best_time(fast, args.repeats), best_time(reference, args.repeats)
    explicit_s = best_time(explicit, args.repeats)
    models_fast_s, models_reference_s = best_time(models_fast, args.repeats), best_time(models_reference, args.repeats)
    pairs = [
        *zip(fast(), reference(), strict=True),
        *zip(explicit(), reference(), strict=True),
        *zip(models_fast(), models_reference(), strict=True),
    ]
    same = all(close(a, b) for a, b in pairs)
    return {
        "layer": kind,
        "models": n,
        "width": width,
        "input": list(shape),
        "fast_s": fast_s,
        "reference_s": reference_s,
        "ratio": reference_s / fast_s,
        "explicit_s": explicit_s,
        "explicit_ratio": reference_s / explicit_s,
        "models_fast_s": models_fast_s,
        "models_reference_s": models_reference_s,
        "models_ratio": models_reference_s / models_fast_s,
        "same": same,
    }


# --- folding ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_fold(layer: SuperLayer, sources: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """W' = Mᵀ·blockdiag(W₁…W_N)·Uᵀ (per kernel tap of a conv) and b' = Mᵀ·(b₁…b_N), with torch.block_diag."""
    assert layer.merge is not None and layer.unmerge is not None
    m, u = layer.merge.matrix(), layer.unmerge.matrix()
    weights = [s.weight for s in sources]
    if layer.conv:
        kh, kw = weights[0].shape[2:]
        taps = [m.T @ torch.block_diag(*(w[:, :, i, j] for w in weights)) @ u.T for i in range(kh) for j in range(kw)]
        weight = torch.stack(taps, -1).unflatten(-1, (kh, kw))
    else:
        weight = m.T @ torch.block_diag(*weights) @ u.T
    return {"weight": weight, "bias": m.T @ torch.cat([s.bias for s in sources])}


def bench_fold(kind: str, n: int, width: int, args: argparse.Namespace) -> dict[str, Any]:
    layer, sources = make_layer(kind, n, width, args.seed)
    fast_s = best_time(layer.folded, args.repeats)
    reference_s = best_time(lambda: reference_fold(layer, sources), args.repeats)
    got, want = layer.folded(), reference_fold(layer, sources)
    return {
        "layer": kind,
        "models": n,
        "width": width,
        "fast_s": fast_s,
        "reference_s": reference_s,
        "ratio": reference_s / fast_s,
        "same": got.keys() == want.keys() and all(close(got[k], want[k]) for k in want),
    }


# --- RegMean's Grams ----------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_grams(
    model: MultiTaskNet, images: torch.Tensor, layers: Sequence[str]
) -> tuple[dict[str, torch.Tensor], int]:
    """Every layer's input kept from one whole forward pass, each X formed whole in float64 (im2col for a conv) and
    XᵀX; also the bytes held at the peak (every input, plus the largest X)."""
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda m, a, name=name: inputs.__setitem__(name, a[0]))
        for name in layers
    ]
    try:
        model.eval().body(images)
    finally:
        for handle in handles:
            handle.remove()
    grams, largest = {}, 0
    for name in layers:
        layer, x = model.get_submodule(name), inputs[name]
        if isinstance(layer, nn.Conv2d):
            patches = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
            x = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        rows = x.reshape(-1, x.shape[-1]).double()
        largest = max(largest, rows.numel() * rows.element_size())
        grams[name] = rows.T @ rows
    return grams, largest + sum(x.numel() * x.element_size() for x in inputs.values())


def bench_grams(arch: str, args: argparse.Namespace) -> dict[str, Any]:
    family, spec = ARCHS[arch]
    with seeded(args.seed, CPU):
        model = build_model(family, spec, INPUT_SHAPE, {"A": 5}).eval()
    images = torch.randn(args.gram_images, *INPUT_SHAPE, generator=torch.Generator().manual_seed(args.seed))
    layers = list(linear_layers(model))
    fast_s = best_time(lambda: input_grams(model, images, layers), args.repeats)
    reference_s = best_time(lambda: reference_grams(model, images, layers), args.repeats)
    (got, _), (want, held) = input_grams(model, images, layers), reference_grams(model, images, layers)
    return {
        "arch": arch,
        "layers": len(layers),
        "images": args.gram_images,
        "fast_s": fast_s,
        "reference_s": reference_s,
        "ratio": reference_s / fast_s,
        "grams_mb": sum(g.numel() * g.element_size() for g in got.values()) / MB,
        "reference_held_mb": held / MB,
        "same": got.keys() == want.keys() and all(close(got[k], want[k], rtol=1e-9) for k in want),
    }


# --- FS-Merge, global against local -------------------------------------------------------------------------------


def synthetic_few_shot(per_task: int, val: int, seed: int) -> FewShot:
    """Random normalised images of tasks A and B (FS-Merge never reads labels)."""
    gen = torch.Generator().manual_seed(seed)

    def part(n: int) -> TaskImages:
        images = torch.randn(2 * n, *INPUT_SHAPE, generator=gen)
        return TaskImages(images, torch.arange(2).repeat_interleave(n), ("A", "B"))

    return FewShot(part(per_task), part(val), per_task, 0)


@contextlib.contextmanager
def timed_fits(seconds: list[float]) -> Iterator[None]:
    """Appends the wall time of every `fit_on_tasks` call fs_merge makes (synchronising a GPU at both ends)."""
    inner = fs_merge_module.fit_on_tasks

    def timed(*a: Any, **kw: Any) -> Any:
        sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
        sync()
        t0 = time.perf_counter()
        result = inner(*a, **kw)
        sync()
        seconds.append(time.perf_counter() - t0)
        return result

    with mock.patch.object(fs_merge_module, "fit_on_tasks", timed):
        yield


def bench_fs_merge(arch: str, mode: str, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    family, spec = ARCHS[arch]
    models = []
    for i, task in enumerate("AB"):
        with seeded(args.seed + i, CPU):
            models.append(build_model(family, spec, INPUT_SHAPE, {task: 5}).eval().to(device))
    few = synthetic_few_shot(args.fs_images, args.fs_val, args.seed).to(device)
    params = {"mode": mode, "epochs": args.fs_epochs, "batch_size": args.fs_batch}
    ctx = MergeContext(device=device, few_shot=few, seed=args.seed)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    fits: list[float] = []
    t0 = time.perf_counter()
    with timed_fits(fits):
        build_method("fs_merge", params)(models, ctx)
    merge_s = time.perf_counter() - t0
    [step] = ctx.notes["steps"]
    steps_per_fit = args.fs_epochs * math.ceil(2 * args.fs_images / args.fs_batch)
    row = {
        "arch": arch,
        "mode": mode,
        "device": device.type,
        "blocks": len(fits),
        "held_mb": step["memory"]["total_bytes"] / MB,
        "activations_mb": step["memory"]["saved_activation_bytes"] / MB,
        "state_mb": step["memory"]["trainable_state_bytes"] / MB,
        "s_per_step": sum(fits) / (steps_per_fit * len(fits)),
        "merge_s": merge_s,
        "fold_max_rel": step["fold_error"]["max_rel"],
        "cuda_peak_mb": (torch.cuda.max_memory_allocated(device) - before) / MB if cuda else None,
    }
    if mode == "local":
        row["block_held_mb"] = [b["memory"]["total_bytes"] / MB for b in step["blocks"]]
    return row


# --- output -------------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return " ".join(_cell(v) for v in value)
    return str(value)


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    """One markdown table per section, a column per key."""
    header = list(rows[0])
    lines = [[_cell(r[k]) for k in header] for r in rows]
    sizes = [max(len(h), *(len(line[k]) for line in lines)) for k, h in enumerate(header)]
    print(f"\n{title}\n")
    print("| " + " | ".join(h.rjust(s) for h, s in zip(header, sizes, strict=True)) + " |")
    print("|" + "|".join("-" * (s + 1) + ":" for s in sizes) + "|")
    for line in lines:
        print("| " + " | ".join(c.rjust(s) for c, s in zip(line, sizes, strict=True)) + " |")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048], help="Linear widths d")
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 128], help="Conv2d channels")
    parser.add_argument("--models", type=int, nargs="+", default=[2, 4], help="models N per SuperLayer")
    parser.add_argument("--batch", type=int, default=128, help="rows of a Linear SuperLayer's batch")
    parser.add_argument("--conv-batch", type=int, default=16, help="maps of a Conv2d SuperLayer's batch")
    parser.add_argument("--conv-size", type=int, default=16, help="side of a Conv2d SuperLayer's maps")
    parser.add_argument("--gram-archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--gram-images", type=int, default=1024)
    parser.add_argument("--fs-archs", nargs="+", default=["mlp", "vit"], choices=list(ARCHS))
    parser.add_argument("--fs-images", type=int, default=144, help="few-shot training images per task (16 × 9)")
    parser.add_argument("--fs-val", type=int, default=32, help="few-shot validation images per task")
    parser.add_argument("--fs-batch", type=int, default=128)
    parser.add_argument("--fs-epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the pipeline's jobs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print a JSON object of the sections' rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch threads {args.threads}, load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)

    sizes = [("linear", n, d) for d in args.widths for n in args.models]
    sizes += [("conv", n, c) for c in args.channels for n in args.models]
    devices = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    sections: dict[str, list[dict[str, Any]]] = {
        "superlayer": [bench_superlayer(*s, args) for s in sizes],
        "fold": [bench_fold(*s, args) for s in sizes],
        "grams": [bench_grams(arch, args) for arch in args.gram_archs],
        "fs_merge": [],
    }
    for device in devices:
        bench_fs_merge(args.fs_archs[0], "global", device, args)  # untimed: the first AdamW step imports torch._dynamo
        sections["fs_merge"] += [bench_fs_merge(a, mode, device, args) for a in args.fs_archs for mode in MODES]
    print(f"load average at the end {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(sections, indent=2))
    else:
        for title, rows in sections.items():
            print_table(title, rows)
    return 0 if all(r["same"] for rows in sections.values() for r in rows if "same" in r) else 1


if __name__ == "__main__":
    sys.exit(main())
