"""Shared fixtures: the offline `digits` dataset, one task split of it, and tiny model factories."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hetmerge.data import load_dataset, make_class_disjoint_split
from hetmerge.models import build_model


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """One torch thread: the models are tiny, and extra threads only contend with other work on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """scikit-learn's 8x8 digits (1442 train / 355 test images), prepared without any download."""
    return load_dataset("digits", [], download=False, download_root=tmp_path_factory.mktemp("downloads"))


@pytest.fixture(scope="session")
def digits_split(digits):
    """Two 5-class tasks, 10 held-out merge images per class, all other images for training."""
    return make_class_disjoint_split(
        digits.train_labels,
        digits.test_labels,
        digits.num_classes,
        2,
        0,
        merge_per_class=10,
        train_per_task=None,
        test_per_task=None,
        dataset="digits",
    )


@pytest.fixture(scope="session")
def cpu():
    return torch.device("cpu")


@pytest.fixture(scope="session")
def make_model():
    """`make_model(family, spec, heads, input_shape=(1, 8, 8), seed=0)`: a freshly initialised, seeded network."""

    def make(family="mlp", spec=None, heads=None, input_shape=(1, 8, 8), seed=0):
        torch.manual_seed(seed)
        return build_model(family, spec or {}, input_shape, heads or {"A": 5})

    return make


@pytest.fixture(scope="session")
def randomize_bn():
    """`randomize_bn(model, seed)`: non-trivial BatchNorm statistics and affine parameters, in place."""

    @torch.no_grad()
    def randomize(model, seed=0):
        gen = torch.Generator().manual_seed(seed)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen))
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(n, generator=gen))
                m.bias.copy_(torch.randn(n, generator=gen))
        return model

    return randomize


@pytest.fixture
def batches():
    """Three fixed batches of 8×8 grey images: `batches()` starts a fresh pass."""
    gen = torch.Generator().manual_seed(7)
    data = [torch.randn(16, 1, 8, 8, generator=gen) * 2 + 0.5 for _ in range(3)]
    return lambda: iter(data)


@pytest.fixture
def pair(make_model, randomize_bn):
    """Two tiny VGG-11s of one architecture, different weights and BatchNorm statistics, heads A and B."""
    spec = {"depth": 11, "width": 0.0625}
    a = randomize_bn(make_model("vgg", spec, {"A": 3}, seed=1), 1).eval()
    b = randomize_bn(make_model("vgg", spec, {"B": 4}, seed=2), 2).eval()
    return a, b


@pytest.fixture
def keep_determinism_flag():
    """Training turns deterministic algorithms on, as a job does; put the flag back for other tests."""
    was = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(was)
