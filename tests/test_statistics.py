"""Tests for hetmerge.statistics: streaming activation statistics against a naive float64 reference."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from hetmerge.checkpoint import CheckpointError, save_model, save_tensors
from hetmerge.models import MultiTaskNet, build_model
from hetmerge.statistics import SpaceStats, collect_statistics, load_statistics, save_statistics

SHAPE = (1, 16, 16)
FAMILIES = {
    "mlp": {"hidden": [5, 3]},
    "vgg": {"depth": 11, "width": 0.125},
    "resnet": {"depth": 20, "width": 0.25},
}


def make_batches(seed: int, n: int = 3, size: int = 8, shape: Sequence[int] = SHAPE) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, *shape, generator=g) for _ in range(n)]


def make_model(family: str, seed: int, spec: dict | None = None, shape: Sequence[int] = SHAPE) -> MultiTaskNet:
    torch.manual_seed(seed)
    return build_model(family, spec if spec is not None else FAMILIES[family], shape, {"A": 3}).eval()


@torch.no_grad()
def naive_statistics(models: Sequence[MultiTaskNet], batches: Sequence[torch.Tensor]) -> dict[str, tuple]:
    """Gather every activation with forward hooks, then mean and covariance of the concatenation in numpy."""
    per_model: dict[str, list[np.ndarray]] = defaultdict(list)
    for model in models:
        outputs: dict[str, list[np.ndarray]] = defaultdict(list)
        handles = []
        for space in model.space_graph().spaces:

            def hook(module, args, out, name=space.name, store=outputs):
                store[name].append(out.detach().double().numpy())

            handles.append(model.get_submodule(space.observe).register_forward_hook(hook))
        model.eval()
        for x in batches:
            model(x)
        for h in handles:
            h.remove()
        for name, chunks in outputs.items():
            h = np.concatenate(chunks)  # (samples, C, ...)
            per_model[name].append(np.moveaxis(h, 1, 0).reshape(h.shape[1], -1))
    result = {}
    for name, zs in per_model.items():
        z = np.concatenate(zs)
        result[name] = (z.mean(1), np.cov(z, bias=True), z.shape[1], tuple(len(x) for x in zs))
    return result


def assert_stats_close(stats: SpaceStats, mean: np.ndarray, cov: np.ndarray) -> None:
    # E[zzᵀ] − E[z]E[z]ᵀ cancels digits where the mean is large against the spread: allow that on top of rtol
    scale = np.abs(cov).max()
    np.testing.assert_allclose(stats.mean.numpy(), mean, rtol=1e-9, atol=1e-12 * np.abs(mean).max())
    np.testing.assert_allclose(stats.cov.numpy(), cov, rtol=1e-9, atol=1e-12 * scale)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_matches_naive_reference(family):
    models = [make_model(family, seed) for seed in (0, 1)]
    batches = make_batches(2)
    stats = collect_statistics(models, batches)
    reference = naive_statistics(models, batches)
    assert sorted(stats) == sorted(reference) == sorted(models[0].space_graph().names)
    for name, (mean, cov, count, widths) in reference.items():
        s = stats[name]
        assert s.widths == widths
        assert s.count == count
        assert s.mean.dtype == s.cov.dtype == torch.float64
        assert_stats_close(s, mean, cov)


def test_matches_naive_reference_three_models_of_different_widths():
    shape = (1, 4, 4)
    models = [
        make_model("mlp", 0, {"hidden": [5, 3]}, shape),
        make_model("mlp", 1, {"hidden": [2, 7], "batch_norm": False}, shape),
        make_model("mlp", 2, {"hidden": [4, 1]}, shape),
    ]
    batches = make_batches(3, n=2, size=16, shape=shape)
    stats = collect_statistics(models, batches)
    reference = naive_statistics(models, batches)
    assert stats["fc0"].widths == (5, 2, 4)
    assert stats["fc1"].widths == (3, 7, 1)
    for name, (mean, cov, count, _) in reference.items():
        assert stats[name].count == count == 32
        assert_stats_close(stats[name], mean, cov)


def test_only_the_named_spaces():
    models = [make_model("resnet", seed) for seed in (0, 1)]
    stats = collect_statistics(models, make_batches(0, n=1), spaces=["stage2", "s1b0.inner"])
    assert sorted(stats) == ["s1b0.inner", "stage2"]
    assert stats["stage2"].widths == (8, 8)


@torch.no_grad()
def test_streaming_equals_one_big_batch_exactly_representable():
    """Integer weights and inputs make the float32 forward exact, so only the accumulation order differs."""
    shape = (1, 3, 3)
    models = [make_model("mlp", seed, {"hidden": [6, 4], "batch_norm": False}, shape) for seed in (3, 4)]
    g = torch.Generator().manual_seed(0)
    for model in models:
        for p in model.parameters():
            p.copy_(torch.randint(-2, 3, p.shape, generator=g))
    batches = [torch.randint(-3, 4, (5, *shape), generator=g).float() for _ in range(4)]
    streamed = collect_statistics(models, batches)
    at_once = collect_statistics(models, [torch.cat(batches)])
    reference = naive_statistics(models, batches)
    for name, s in streamed.items():
        assert s.count == at_once[name].count == 20
        torch.testing.assert_close(s.mean, at_once[name].mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.cov, at_once[name].cov, rtol=1e-9, atol=1e-12 * s.cov.abs().max().item())
        assert_stats_close(s, *reference[name][:2])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_streaming_equals_one_big_batch(family):
    """Real models: equal up to the float32 forward, whose rounding depends on the batch size."""
    models = [make_model(family, seed) for seed in (3, 4)]
    batches = make_batches(5, n=4, size=5)
    streamed = collect_statistics(models, batches)
    at_once = collect_statistics(models, [torch.cat(batches)])
    for name, s in streamed.items():
        assert s.count == at_once[name].count
        scale = s.cov.abs().max().item()
        torch.testing.assert_close(s.mean, at_once[name].mean, rtol=1e-5, atol=1e-6 * s.mean.abs().max().item())
        torch.testing.assert_close(s.cov, at_once[name].cov, rtol=1e-5, atol=1e-6 * scale)


@torch.no_grad()
def test_dead_and_constant_units_give_zero_correlation():
    shape = (1, 4, 4)
    bn = make_model("mlp", 0, {"hidden": [4, 3]}, shape)
    plain = make_model("mlp", 1, {"hidden": [4, 3], "batch_norm": False}, shape)
    # unit 1 of bn's fc0: BN weight 0 and bias −1, so ReLU always outputs exactly 0
    bn.body.fc0.norm.weight[1] = 0.0
    bn.body.fc0.norm.bias[1] = -1.0
    # unit 2 of plain's fc0: a zeroed weight row and bias, exactly 0; unit 0: zero row, bias 0.7, a constant
    plain.body.fc0.linear.weight[2] = 0.0
    plain.body.fc0.linear.bias[2] = 0.0
    plain.body.fc0.linear.weight[0] = 0.0
    plain.body.fc0.linear.bias[0] = 0.7
    stats = collect_statistics([bn, plain], make_batches(6, shape=shape))["fc0"]
    corr = stats.correlation()
    assert torch.isfinite(stats.mean).all() and torch.isfinite(stats.cov).all() and torch.isfinite(corr).all()
    dead = [1, 4 + 2]
    constant = [4 + 0]
    live = [k for k in range(8) if k not in dead + constant]
    for k in dead:
        assert torch.equal(corr[k], torch.zeros(8, dtype=torch.float64))
        assert torch.equal(corr[:, k], torch.zeros(8, dtype=torch.float64))
    for k in constant:
        assert corr[k].abs().max() < 1e-6 and corr[:, k].abs().max() < 1e-6
        assert stats.mean[k].item() == pytest.approx(0.7)
    torch.testing.assert_close(corr.diagonal()[live], torch.ones(len(live), dtype=torch.float64))
    assert (corr[live][:, live].abs() <= 1 + 1e-12).all()
    # the next space of both models is still fine
    assert torch.isfinite(collect_statistics([bn, plain], make_batches(6, shape=shape))["fc1"].correlation()).all()


def test_correlation_of_a_fresh_vgg_has_no_nan():
    """Deep 1×1 VGG layers on random data have units dead on every sample: no NaN, zero rows.

    The diagonal is 1 where the variance is above the clamp (σ² ≥ 1e-7); units alive on a handful of samples
    can fall below it, as in ZipIt!'s `compute_correlation`.
    """
    models = [make_model("vgg", seed) for seed in (0, 1)]
    for name, s in collect_statistics(models, make_batches(1, n=2)).items():
        corr = s.correlation()
        assert torch.isfinite(corr).all(), name
        dead = s.cov.diagonal() <= 0
        assert (corr[dead] == 0).all() and (corr[:, dead] == 0).all(), name
        live = s.cov.diagonal() >= 1e-7
        assert live.sum() > len(live) // 2, name
        torch.testing.assert_close(corr.diagonal()[live], torch.ones(int(live.sum()), dtype=torch.float64))
        assert (corr.diagonal()[~live] < 1).all(), name


def test_save_load_round_trip(tmp_path):
    models = [make_model("resnet", seed) for seed in (0, 1)]
    stats = collect_statistics(models, make_batches(0, n=1))
    path = tmp_path / "stats.safetensors"
    sources = [{"path": f"m{i}.safetensors", "sha256": str(i), "task": "A"} for i in range(2)]
    save_statistics(stats, path, sources)
    loaded, recorded = load_statistics(path)
    assert recorded == sources
    assert sorted(loaded) == sorted(stats)
    for name, s in stats.items():
        assert loaded[name].widths == s.widths
        assert loaded[name].count == s.count
        assert torch.equal(loaded[name].mean, s.mean)
        assert torch.equal(loaded[name].cov, s.cov)
        assert loaded[name].cov.dtype == torch.float64


def test_loading_a_model_checkpoint_as_statistics_raises(tmp_path):
    path = tmp_path / "model.safetensors"
    save_model(make_model("mlp", 0), path, {})
    with pytest.raises(CheckpointError, match="not activation statistics"):
        load_statistics(path)


def test_statistics_file_lacking_a_tensor_raises(tmp_path):
    path = tmp_path / "stats.safetensors"
    meta = {"kind": "statistics", "spaces": {"fc0": {"widths": [2, 2], "count": 3}}}
    save_tensors(path, {"fc0.mean": torch.zeros(4, dtype=torch.float64)}, meta)
    with pytest.raises(CheckpointError, match=r"fc0\.cov"):
        load_statistics(path)


def test_mismatched_spaces_raise_naming_the_space():
    shape = (1, 4, 4)
    deep = make_model("mlp", 0, {"hidden": [4, 4]}, shape)
    shallow = make_model("mlp", 1, {"hidden": [4]}, shape)
    with pytest.raises(ValueError, match="fc1"):
        collect_statistics([deep, shallow], make_batches(0, shape=shape))
    # the spaces both have are fine
    assert collect_statistics([deep, shallow], make_batches(0, shape=shape), spaces=["fc0"])["fc0"].widths == (4, 4)
    r20, r26 = make_model("resnet", 0), make_model("resnet", 1, {"depth": 26, "width": 0.25})
    with pytest.raises(ValueError, match=r"s1b3\.inner"):
        collect_statistics([r26, r20], make_batches(0, n=1))


def test_no_batches_raises():
    with pytest.raises(ValueError, match="no data"):
        collect_statistics([make_model("mlp", 0)] * 2, [])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_activations_name_the_space_batch_and_model(value):
    """One NaN pixel in batch 1 used to make every correlation NaN silently."""
    models = [make_model("vgg", seed) for seed in (0, 1)]
    batches = make_batches(0)
    with torch.no_grad():
        models[1].body.conv3.conv.weight[0, 0, 0, 0] = value  # the first space it spoils is conv3, in model 1 only
    with pytest.raises(
        ValueError, match=r"space 'conv3' hold NaN or inf \(first in batch 0 of the data, in model\(s\) \[1\]"
    ):
        collect_statistics(models, batches)
    batches[1][2, 0, 3, 3] = value
    with pytest.raises(
        ValueError, match=r"space 'conv0' hold NaN or inf \(first in batch 1 of the data, in model\(s\) \[0, 1\]"
    ):
        collect_statistics([make_model("vgg", seed) for seed in (0, 1)], batches)


def test_loading_nonfinite_statistics_names_the_file_and_space(tmp_path):
    stats = collect_statistics([make_model("mlp", seed) for seed in (0, 1)], make_batches(0))
    stats["fc1"].cov[0, 1] = float("inf")
    path = tmp_path / "stats.safetensors"
    save_statistics(stats, path, [])
    with pytest.raises(CheckpointError, match=rf"{path}: statistics of feature space\(s\) \['fc1'\] hold NaN or inf"):
        load_statistics(path)


def test_nonfinite_activations_on_a_cuda_device(monkeypatch):
    """The check runs where the activations are (emulated device-strict cuda:0) and still names the batch."""
    from fake_cuda import fake_cuda

    with fake_cuda() as device:
        models = [make_model("mlp", seed).to(device) for seed in (0, 1)]
        batches = [x.to(device) for x in make_batches(0)]
        batches[2][0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match=r"space 'fc0' hold NaN or inf \(first in batch 2 of the data"):
            collect_statistics(models, batches)
