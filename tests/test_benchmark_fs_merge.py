"""benchmarks/fs_merge.py: its reference code is right on its own terms, agrees with the fast paths, and its main()
reports agreement (and less memory for local FS-Merge) on tiny sizes."""

from __future__ import annotations

import argparse
import json
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from benchmarks_loader import load_benchmark
from fake_cuda import fake_cuda
from hypothesis import given, settings
from hypothesis import strategies as st

from hetmerge.methods.regmean import input_grams, linear_layers
from hetmerge.models import build_model

bench = load_benchmark("fs_merge")
TINY = ["--widths", "8", "--channels", "3", "--models", "2", "3", "--batch", "4", "--conv-batch", "2"]
TINY += ["--conv-size", "5", "--gram-archs", "mlp", "vit", "--gram-images", "20", "--fs-images", "16", "--fs-val", "4"]
TINY += ["--fs-batch", "16", "--fs-epochs", "1", "--repeats", "1"]


def test_main_reports_agreement_and_the_memory_of_both_modes(capsys):
    assert bench.main([*TINY, "--json"]) == 0
    sections = json.loads(capsys.readouterr().out)
    assert [len(sections[k]) for k in ("superlayer", "fold", "grams", "fs_merge")] == [4, 4, 2, 4]
    assert all(r["same"] is True for k in ("superlayer", "fold", "grams") for r in sections[k])
    rows = {(r["arch"], r["mode"]): r for r in sections["fs_merge"]}
    assert {a: rows[a, "local"]["blocks"] for a in ("mlp", "vit")} == {"mlp": 3, "vit": 5}  # body units with layers
    for arch in ("mlp", "vit"):
        glob, local = rows[arch, "global"], rows[arch, "local"]
        assert glob["blocks"] == 1 and local["held_mb"] == max(local["block_held_mb"])
        assert local["held_mb"] < glob["held_mb"]  # one block's activations, against the whole SuperNet's
        assert glob["fold_max_rel"] < 1e-5 and local["fold_max_rel"] < 1e-5 and glob["cuda_peak_mb"] is None


@settings(max_examples=10, deadline=None)
@given(kind=st.sampled_from(["linear", "conv"]), n=st.integers(2, 3), width=st.integers(1, 6), seed=st.integers(0, 99))
def test_references_compute_the_superlayer(kind, n, width, seed):
    """The plain forward and the textbook fold agree with each other (the folded weights, applied as one plain layer,
    compute the plain forward), and with the SuperLayer's fast forward, backward and fold."""
    layer, sources = bench.make_layer(kind, n, width, seed)
    x = torch.randn((5, width) if kind == "linear" else (2, width, 4, 4), generator=torch.Generator().manual_seed(seed))
    want = bench.reference_forward(layer, sources, x)
    folded = bench.reference_fold(layer, sources)
    plain = F.linear if kind == "linear" else lambda h, w, b: F.conv2d(h, w, b, padding=1)
    torch.testing.assert_close(plain(x, folded["weight"], folded["bias"]), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-5)
    for key, value in layer.folded().items():
        torch.testing.assert_close(value, folded[key], rtol=1e-4, atol=1e-6)
    cotangent = torch.randn_like(want)
    params = list(layer.parameters())
    fast = bench.forward_backward(layer, x, cotangent, params)
    slow = bench.forward_backward(lambda h: bench.reference_forward(layer, sources, h), x, cotangent, params)
    for got, expected in zip(fast, slow, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["mlp", "vgg"])
def test_reference_grams(arch):
    """The first layer's Gram is that of the images themselves (flattened, or as 3×3 patches with zero padding), and
    every layer's agrees with `input_grams`."""
    family, spec = bench.ARCHS[arch]
    torch.manual_seed(0)
    model = build_model(family, {**spec, "width": 0.0625} if arch == "vgg" else spec, (1, 8, 8), {"A": 2}).eval()
    images = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    layers = list(linear_layers(model))
    want, held = bench.reference_grams(model, images, layers)
    rows = images.flatten(1) if arch == "mlp" else F.unfold(images, 3, padding=1).transpose(1, 2).reshape(-1, 9)
    torch.testing.assert_close(want[layers[0]], rows.double().T @ rows.double())
    assert held >= rows.numel() * 8
    got, _ = input_grams(model, images, layers)
    assert got.keys() == want.keys()
    for name in layers:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-9)


def test_close_flags_a_difference():
    a = torch.tensor([1.0, -2.0, 3.0])
    assert bench.close(a, a * (1 + 1e-6))
    assert not bench.close(a + torch.tensor([0.0, 0.0, 1e-2]), a)
    assert not bench.close(a[:2], a[:2, None])


def test_fs_merge_row_on_cuda():
    """On a (here emulated) GPU every tensor of the merge is on the device, and the peak is taken above what the
    models and the data held before it."""
    args = argparse.Namespace(seed=0, fs_images=8, fs_val=2, fs_batch=16, fs_epochs=1)
    with (
        fake_cuda() as device,
        mock.patch.object(torch.cuda, "reset_peak_memory_stats"),
        mock.patch.object(torch.cuda, "memory_allocated", return_value=3 * bench.MB),
        mock.patch.object(torch.cuda, "max_memory_allocated", return_value=5 * bench.MB),
    ):
        row = bench.bench_fs_merge("mlp", "local", device, args)
    assert row["device"] == "cuda" and row["cuda_peak_mb"] == 2.0 and row["blocks"] == 3
