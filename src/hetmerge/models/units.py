"""Building blocks shared by the architectures, with stable module names the space descriptions use."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class ConvUnit(nn.Sequential):
    """conv → (norm) → ReLU; its output is one feature space.

    `norm` is True for BatchNorm, False for none, or a factory `channels → module` (e.g. GroupNorm). The
    conv has a bias only without a norm, whose own bias would make it redundant.
    """

    def __init__(self, c_in: int, c_out: int, norm: bool | Callable[[int], nn.Module], stride: int = 1) -> None:
        make_norm = nn.BatchNorm2d if norm is True else norm or None
        layers: dict[str, nn.Module] = {
            "conv": nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=make_norm is None)
        }
        if make_norm is not None:
            layers["norm"] = make_norm(c_out)
        layers["act"] = nn.ReLU()
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, layer)


class DenseUnit(nn.Sequential):
    """linear → (BatchNorm) → ReLU; its output is one feature space."""

    def __init__(self, d_in: int, d_out: int, batch_norm: bool) -> None:
        super().__init__()
        self.add_module("linear", nn.Linear(d_in, d_out, bias=not batch_norm))
        if batch_norm:
            self.add_module("norm", nn.BatchNorm1d(d_out))
        self.add_module("act", nn.ReLU())


class GlobalPool(nn.Module):
    """Average over all spatial positions: (N, C, H, W) → (N, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))
