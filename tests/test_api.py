"""The library entry point, used as in the README: merge your own models with a DataLoader."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import hetmerge.api
from hetmerge.batchnorm import reset_batchnorm
from hetmerge.merged import MergedModel
from hetmerge.methods import MergeError
from hetmerge.models import build_model


@pytest.fixture
def loader():
    images = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 3 + 1
    return DataLoader(TensorDataset(images, torch.zeros(40, dtype=torch.long)), batch_size=16)


@pytest.fixture
def models():
    torch.manual_seed(0)
    m1 = build_model("vgg", {"depth": 11, "width": 0.0625}, (1, 8, 8), {"A": 5})
    m2 = build_model("vgg", {"depth": 11, "width": 0.0625}, (1, 8, 8), {"B": 5})
    return m1.eval(), m2.eval()


def test_readme_example_average_with_bn_reset(models, loader):
    merged = hetmerge.api.merge(list(models), "average", {"reset_bn": True}, data=loader)
    assert isinstance(merged, MergedModel) and not merged.training
    x = torch.randn(3, 1, 8, 8)
    out = merged(x)
    assert {t: tuple(v.shape) for t, v in out.items()} == {"A": (3, 5), "B": (3, 5)}

    # Same as averaging by hand and resetting BN on the loader's images (labels ignored).
    expected = build_model("vgg", {"depth": 11, "width": 0.0625}, (1, 8, 8), {"A": 5, "B": 5})
    state = {k: (v + models[1].state_dict()[k]) / 2 for k, v in models[0].state_dict().items() if "heads" not in k}
    state.update({k: v for m in models for k, v in m.state_dict().items() if "heads" in k})
    state.update({k: v for k, v in models[0].state_dict().items() if k.endswith("num_batches_tracked")})
    expected.load_state_dict(state)
    reset_batchnorm(expected, (x for x, _ in loader))
    expected.eval()
    for task in ("A", "B"):
        torch.testing.assert_close(out[task], expected(x)[task], atol=1e-5, rtol=1e-4)


def test_plain_tensor_loader_and_ensemble(models):
    images = [torch.randn(8, 1, 8, 8) for _ in range(2)]  # batches that are bare tensors, not (x, y)
    before = copy.deepcopy(models[0].state_dict())
    merged = hetmerge.api.merge(list(models), "ensemble", data=images)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(merged(x)["A"], models[0](x)["A"])
    assert all(torch.equal(v, before[k]) for k, v in models[0].state_dict().items())


def test_bn_reset_without_data_says_so(models):
    with pytest.raises(MergeError, match="needs data"):
        hetmerge.api.merge(list(models), "average")


def test_a_one_shot_generator_as_data_is_refused(models, loader):
    """A generator would be used up by the statistics pass, leaving the BatchNorm reset nothing to read."""
    for data in ((x for x, _ in loader), iter(list(loader)), map(lambda b: b[0], loader)):
        with pytest.raises(
            TypeError, match=r"data is a one-shot iterator \(\w+\).*pass a list of batches or a DataLoader"
        ):
            hetmerge.api.merge(list(models), "zipit", data=data)
    hetmerge.api.merge(list(models), "zipit", data=[x for x, _ in loader])  # a list is read again every pass


def test_a_plain_torch_module_is_refused(models, loader):
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))
    with pytest.raises(
        TypeError,
        match=r"model 1 is a torch\.nn\.modules\.container\.Sequential, not a hetmerge "
        r"MultiTaskNet: build it with hetmerge\.build_model",
    ):
        hetmerge.api.merge([models[0], plain], "average", data=loader)
    with pytest.raises(TypeError, match="merge takes a list of models, got a single VGG"):
        hetmerge.api.merge(models[0], "average", data=loader)
