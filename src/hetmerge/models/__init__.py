"""Architecture registry: families are data (a spec dataclass) plus a builder; checkpoints store the spec."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hetmerge.models.base import MultiTaskNet
from hetmerge.models.mlp import MLP, MLPSpec
from hetmerge.models.resnet import ResNet, ResNetSpec
from hetmerge.models.vgg import VGG, VGGSpec
from hetmerge.models.vit import ViT, ViTSpec
from hetmerge.params import ParameterError, parse_params

FAMILIES: dict[str, tuple[type[MultiTaskNet], type]] = {
    "mlp": (MLP, MLPSpec),
    "vgg": (VGG, VGGSpec),
    "resnet": (ResNet, ResNetSpec),
    "vit": (ViT, ViTSpec),
}


def parse_spec(family: str, spec: Mapping[str, Any] | None) -> Any:
    if family not in FAMILIES:
        raise ParameterError(f"unknown architecture family {family!r}; known: {sorted(FAMILIES)}")
    return parse_params(FAMILIES[family][1], spec, f"architecture {family!r}")


def build_model(
    family: str, spec: Mapping[str, Any] | None, input_shape: Sequence[int], heads: Mapping[str, int]
) -> MultiTaskNet:
    """Build a freshly initialised network of a registered family."""
    parsed = parse_spec(family, spec)
    return FAMILIES[family][0](parsed, input_shape, heads)


def build_from_description(desc: Mapping[str, Any]) -> MultiTaskNet:
    """Inverse of `MultiTaskNet.describe()`."""
    return build_model(desc["family"], desc["spec"], desc["input_shape"], desc["heads"])


__all__ = ["FAMILIES", "MultiTaskNet", "build_from_description", "build_model", "parse_spec"]
