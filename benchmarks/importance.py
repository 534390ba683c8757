"""Benchmark of neuron importance: one-pass conductance of every feature space against captum's per-layer runs.

    python benchmarks/importance.py [--widths 0.0625 0.125 0.25] [--samples 400] [--json]

For a VGG11 without BatchNorm on 28×28 images (the default config's fusion net at width 1/16, and wider), the
conductance of all 8 feature spaces at their pre-activations over `--samples` labelled images, in batches of 200:

- `hetmerge.importance.neuron_importance(..., "conductance")`: ONE forward pass over the n_steps + 1 scaled inputs
  keeps every space's tensor, one backward gives all their gradients;
- the reference: captum's `LayerConductance` run once per space (what the paper's code does), each run a forward
  and a backward pass over the same scaled inputs.

`same` says whether the two agree (allclose, rtol 1e-4). DeepLIFT is timed for comparison: it is captum's
`LayerDeepLift` per space in both, one pass of 2 × batch images per space.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from captum.attr import LayerConductance

from hetmerge.importance import neuron_importance
from hetmerge.models import build_model
from hetmerge.observe import probe


def reference_conductance(model, spaces, data, n_steps: int) -> dict[str, torch.Tensor]:
    """Captum's LayerConductance, one space at a time, reduced as `neuron_importance` does."""
    head = next(iter(model.heads))
    found = {}
    for space in spaces:
        module, on_input = probe(space, "pre")
        method = LayerConductance(lambda x: model(x)[head], model.get_submodule(module))
        total, n = torch.zeros(space.width), 0
        for x, y in data:
            attr = method.attribute(
                x, baselines=torch.zeros_like(x), target=y, n_steps=n_steps, attribute_to_layer_input=on_input
            )
            total += attr.abs().movedim(space.unit_dim, -1).reshape(-1, space.width).sum(0)
            n += len(x)
        found[space.name] = total / n + 1e-8
    return found


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench(width: float, data, n_steps: int) -> dict:
    """Time both conductance computations (and DeepLIFT) on one VGG11 width; say whether they agree."""
    torch.manual_seed(0)
    model = build_model("vgg", {"depth": 11, "width": width, "batch_norm": False}, (1, 28, 28), {"all": 10}).eval()
    spaces = model.space_graph().spaces
    fast, fast_s = timed(lambda: neuron_importance(model, spaces, data, "conductance", n_steps=n_steps))
    ref, ref_s = timed(lambda: reference_conductance(model, spaces, data, n_steps))
    _, deeplift_s = timed(lambda: neuron_importance(model, spaces, data, "deeplift"))
    return {
        "width": width,
        "spaces": len(spaces),
        "conductance_s": round(fast_s, 3),
        "captum_per_layer_s": round(ref_s, 3),
        "ratio": round(ref_s / fast_s, 1),
        "same": all(torch.allclose(fast[k], ref[k], rtol=1e-4, atol=1e-6) for k in ref),
        "deeplift_s": round(deeplift_s, 3),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[0.0625, 0.125, 0.25])
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--n-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch threads {args.threads}, load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.samples, 1, 28, 28, generator=gen)
    labels = torch.randint(0, 10, (args.samples,), generator=gen)
    data = list(zip(images.split(200), labels.split(200), strict=True))
    rows = []
    for width in args.widths:
        rows.append(bench(width, data, args.n_steps))
        print(rows[-1], file=sys.stderr, flush=True)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    else:
        print("| width | spaces | one pass s | captum per layer s | ratio | same | DeepLIFT s |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['width']} | {r['spaces']} | {r['conductance_s']} | {r['captum_per_layer_s']} | {r['ratio']} | "
                f"{r['same']} | {r['deeplift_s']} |"
            )
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
