"""Checkpoints: bit-exact round trips, defects (flipped bits included) reported with the file's name, atomic writes."""

from __future__ import annotations

import json
import os
import re
import resource
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import hetmerge.checkpoint
from hetmerge.atomic import write_json
from hetmerge.checkpoint import (
    FORMAT,
    CheckpointError,
    load_base_model,
    load_model,
    load_tensors,
    save_model,
    save_tensors,
)
from hetmerge.cli import main
from hetmerge.data import save_prepared
from hetmerge.merged import MergedModel, UnitMap
from hetmerge.models import build_model
from hetmerge.statistics import collect_statistics, load_statistics, save_statistics


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture
def resnet(make_model, randomize_bn):
    return randomize_bn(make_model("resnet", {"depth": 20, "width": 0.125}, {"A": 3}, (3, 32, 32)))


def test_base_model_round_trip_is_bit_exact(tmp_path, resnet):
    path = tmp_path / "m.safetensors"
    save_model(resnet, path, {"seed": 3, "history": [{"epoch": 1, "loss": 0.5}]})
    loaded, meta = load_model(path)
    assert_same_state(loaded, resnet)
    assert not loaded.training
    assert loaded.describe() == resnet.describe()
    assert meta["kind"] == "model"
    assert meta["info"] == {"seed": 3, "history": [{"epoch": 1, "loss": 0.5}]}
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x)["A"], resnet.eval()(x)["A"])
    base, _ = load_base_model(path)
    assert_same_state(base, resnet)


def merged_models(make_model, randomize_bn):
    a = randomize_bn(make_model("vgg", {"depth": 11, "width": 0.0625}, {"A": 3}, seed=1), 1)
    b = randomize_bn(make_model("vgg", {"depth": 11, "width": 0.0625}, {"B": 4}, seed=2), 2)
    trunk = randomize_bn(make_model("vgg", {"depth": 11, "width": 0.0625}, {"A": 3, "B": 4}, seed=3), 3)
    width = trunk.space_graph()[trunk.space_graph().cuts[4]].width
    return {
        "trunk-only": MergedModel(trunk),
        "ensemble": MergedModel(None, [a, b], cut=0),
        "partial-zip": MergedModel(trunk, [a, b], cut=4, unmerge=[torch.randn(width, width), None]),
    }


@pytest.mark.parametrize("kind", ["trunk-only", "ensemble", "partial-zip"])
def test_merged_model_round_trip_is_bit_exact(tmp_path, kind, make_model, randomize_bn):
    model = merged_models(make_model, randomize_bn)[kind].eval()
    path = tmp_path / f"{kind}.safetensors"
    save_model(model, path, {"method": kind})
    loaded, meta = load_model(path)
    assert isinstance(loaded, MergedModel)
    assert meta["kind"] == "merged" and meta["info"] == {"method": kind}
    assert_same_state(loaded, model)
    assert loaded.describe() == model.describe()
    assert [type(m) for m in loaded.unmerge] == [type(m) for m in model.unmerge]
    x = torch.randn(3, 1, 8, 8)
    expected, got = model(x), loaded(x)
    assert set(got) == {"A", "B"}
    for task in got:
        assert torch.equal(got[task], expected[task])


@pytest.mark.parametrize(
    ("family", "spec"),
    [
        ("mlp", {}),
        ("vgg", {"depth": 11, "width": 0.0625}),
        ("resnet", {"depth": 20, "width": 0.125}),
        ("vit", {"patch": 4}),
    ],
)
def test_every_family_round_trips(tmp_path, make_model, family, spec):
    """Loading first builds the description on the meta device: every family must support that."""
    model = make_model(family, spec, {"A": 3, "B": 2})
    save_model(model, tmp_path / "m.safetensors", {})
    assert_same_state(load_model(tmp_path / "m.safetensors")[0], model)


def test_partial_zip_really_uses_its_unmerge_map(make_model, randomize_bn):
    """Guards the round trip above: the unmerge map must influence the output."""
    model = merged_models(make_model, randomize_bn)["partial-zip"].eval()
    x = torch.randn(3, 1, 8, 8)
    before = model(x)["A"]
    assert isinstance(model.unmerge[0], UnitMap)
    with torch.no_grad():
        model.unmerge[0].weight.mul_(-1)
    assert not torch.allclose(model(x)["A"], before)


@pytest.mark.parametrize("keep", [0, 7, 0.5, -1])
def test_truncated_file_is_reported_with_its_path(tmp_path, resnet, keep):
    path = tmp_path / "good.safetensors"
    save_model(resnet, path, {})
    raw = path.read_bytes()
    n = int(len(raw) * keep) if isinstance(keep, float) else (len(raw) + keep if keep < 0 else keep)
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(raw[:n])
    with pytest.raises(CheckpointError, match=re.escape(str(bad))):
        load_model(bad)


def test_garbage_file_is_reported_with_its_path(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(CheckpointError, match=re.escape(str(bad))):
        load_model(bad)


def test_missing_file_is_reported_with_its_path(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "nope.safetensors"))):
        load_model(tmp_path / "nope.safetensors")


def test_safetensors_file_without_hetmerge_metadata(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}.*hetmerge metadata"):
        load_model(path)


def _swap_metadata(tensors_from, meta_from, out):
    """A consistently checksummed file whose metadata describes another model (a writer's bug, not bit rot)."""
    save_tensors(out, load_file(str(tensors_from)), load_tensors(meta_from)[1])


def test_metadata_and_tensors_of_different_depths(tmp_path, make_model):
    d20, d26 = tmp_path / "d20.safetensors", tmp_path / "d26.safetensors"
    save_model(make_model("resnet", {"depth": 20, "width": 0.125}), d20, {})
    save_model(make_model("resnet", {"depth": 26, "width": 0.125}), d26, {})
    bad = tmp_path / "mixed.safetensors"
    _swap_metadata(d26, d20, bad)
    assert load_tensors(bad)[1]["model"]["spec"]["depth"] == 20
    with pytest.raises(CheckpointError, match=f"{re.escape(str(bad))}.*body\\.s1b3\\.") as info:
        load_model(bad)
    assert "unexpected" in str(info.value)


def test_metadata_and_tensors_of_different_widths(tmp_path, make_model):
    narrow, wide = tmp_path / "narrow.safetensors", tmp_path / "wide.safetensors"
    save_model(make_model("resnet", {"depth": 20, "width": 0.125}), narrow, {})
    save_model(make_model("resnet", {"depth": 20, "width": 0.25}), wide, {})
    bad = tmp_path / "mixed.safetensors"
    _swap_metadata(wide, narrow, bad)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(bad))}.*tensor 'body\\..*' has shape"):
        load_model(bad)


def test_metadata_claiming_a_huge_model_is_refused_before_allocating(tmp_path, make_model):
    """A few-KB file whose metadata claims 60,000-wide layers must not make the loader allocate 14 GB."""
    model = make_model("mlp", {"hidden": [16, 16]})
    description = model.describe()
    description["spec"]["hidden"] = [60_000, 60_000]
    path = tmp_path / "huge.safetensors"
    save_tensors(path, model.state_dict(), {"kind": "model", "model": description, "info": {}})
    assert path.stat().st_size < 20_000
    peak_kib, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    message = "tensor 'body.fc0.linear.weight' has shape (16, 64), the model its metadata describes needs (60000, 64)"
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}: {re.escape(message)}"):
        load_model(path)
    assert time.perf_counter() - start < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kib < 1_000_000  # no new GB-sized peak


def test_load_base_model_rejects_a_merged_checkpoint(tmp_path, make_model):
    path = tmp_path / "merged.safetensors"
    save_model(MergedModel(None, [make_model(heads={"A": 2}), make_model(heads={"B": 2})]), path, {})
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}.*merged"):
        load_base_model(path)


@pytest.mark.parametrize("existed", [False, True])
def test_failed_write_leaves_no_file_behind(tmp_path, monkeypatch, make_model, existed):
    target = tmp_path / "model.safetensors"
    if existed:
        target.write_bytes(b"previous content")

    def failing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(hetmerge.checkpoint, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_model(make_model(), target, {})
    if existed:
        assert target.read_bytes() == b"previous content"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    else:
        assert list(tmp_path.iterdir()) == []


def test_successful_write_leaves_only_the_target(tmp_path, make_model):
    save_model(make_model(), tmp_path / "sub" / "m.safetensors", {})
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["m.safetensors"]


@pytest.fixture
def umask_022():
    """A known umask, so that 'the usual permissions' are 0644 whatever the machine's umask is."""
    previous = os.umask(0o022)
    yield 0o022
    os.umask(previous)


def write_output(kind, path, make_model, digits):
    """Write one output of the kind a pipeline stage writes (every kind goes through atomic_path)."""
    if kind == "json":
        write_json(path, {"a": 1})
    elif kind == "model":
        save_model(make_model(), path, {})
    elif kind == "statistics":
        save_statistics(collect_statistics([make_model(), make_model(seed=1)], [torch.randn(4, 1, 8, 8)]), path)
    else:
        save_prepared(digits, path)


@pytest.mark.parametrize("kind", ["json", "model", "statistics", "dataset"])
def test_atomic_outputs_get_the_usual_permissions(tmp_path, umask_022, kind, make_model, digits):
    """safetensors' save_file replaces the temporary file with an owner-only one; outputs must still be 0644."""
    path = tmp_path / f"x.{kind}"
    write_output(kind, path, make_model, digits)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask_022


@pytest.mark.parametrize("kind", ["json", "model", "statistics", "dataset"])
def test_outputs_are_fsynced_before_the_rename(tmp_path, monkeypatch, kind, make_model, digits):
    """A crash right after the rename must not leave an empty or short file: the data reaches disk first."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", str(src), Path(src).stat().st_size))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / f"x.{kind}"
    write_output(kind, path, make_model, digits)
    assert [c[0] for c in calls] == ["fsync", "replace"]
    assert calls[0][1:] == calls[1][1:]  # the very file that is renamed, at its final size
    assert calls[1][2] == path.stat().st_size > 0


# ---------------------------------------------------------------------------------------------------------
# Checksums: damaged bytes fail loudly, naming the file and the tensor

CORRUPT = "the file is corrupt; delete it and rerun the job that made it"


def tensor_bytes(path):
    """Where each tensor's data lies in a safetensors file, as absolute byte offsets."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    return {
        name: range(8 + size + entry["data_offsets"][0], 8 + size + entry["data_offsets"][1])
        for name, entry in header.items()
        if name != "__metadata__"
    }


@pytest.mark.parametrize("kind", ["model", "statistics"])
def test_flipped_bytes_in_tensor_data_are_caught_naming_the_tensor(tmp_path, make_model, capsys, kind):
    """The user's probe: 60 flipped bytes of a model's weights loaded silently and evaluated at 21 %."""
    path = tmp_path / f"{kind}.safetensors"
    models = [make_model("mlp", {"hidden": [32, 32]}), make_model("mlp", {"hidden": [32, 32]}, seed=1)]
    if kind == "model":
        save_model(models[0], path, {})
        load = load_model
    else:
        save_statistics(collect_statistics(models, [torch.randn(16, 1, 8, 8)]), path)
        load = load_statistics
    name, where = max(tensor_bytes(path).items(), key=lambda item: len(item[1]))
    raw = bytearray(path.read_bytes())
    for i in where[:60]:
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    message = f"{path}: tensor {name!r} does not match its checksum; {CORRUPT}"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load(path)
    assert main(["inspect", str(path)]) == 1
    assert capsys.readouterr().err == f"hetmerge inspect: error: {message}\n"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    torch.manual_seed(0)
    save_model(build_model("mlp", {"hidden": [3]}, (1, 2, 2), {"A": 2}), path, {"seed": 0})
    return path


@settings(max_examples=200, deadline=None)
@given(position=st.integers(min_value=0, max_value=2**24))
def test_no_flipped_bit_anywhere_loads_silently(tiny_checkpoint, position):
    """Header, metadata, checksums or tensor data: every single-bit flip is refused with the file named."""
    raw = bytearray(tiny_checkpoint.read_bytes())
    bit = position % (8 * len(raw))
    raw[bit // 8] ^= 1 << (bit % 8)
    bad = tiny_checkpoint.with_name("flipped.safetensors")
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=re.escape(str(bad))):
        load_tensors(bad)


def test_file_without_checksums_is_refused(tmp_path, make_model):
    """What hetmerge wrote before it checksummed its files cannot be verified, so it is not trusted."""
    model = make_model()
    path = tmp_path / "old.safetensors"
    meta = {"format": FORMAT, "kind": "model", "model": model.describe(), "info": {}}
    save_file(model.state_dict(), str(path), metadata={"hetmerge": json.dumps(meta, sort_keys=True)})
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))} has no checksums: .*rerun the job that made it"):
        load_model(path)


def test_checksums_cover_every_dtype_and_layout(tmp_path):
    tensors = {
        "bool": torch.tensor([True, False, True]),
        "bf16": torch.randn(3, dtype=torch.bfloat16),
        "scalar": torch.tensor(7),
        "empty": torch.zeros(0, 3),
        "transposed": torch.randn(4, 3).t(),
        "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
    }
    save_tensors(tmp_path / "t.safetensors", tensors, {"kind": "test"})
    back, meta = load_tensors(tmp_path / "t.safetensors")
    assert meta == {"format": FORMAT, "kind": "test"}
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
