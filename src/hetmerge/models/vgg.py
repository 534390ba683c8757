"""VGG (configurations 11/13/16/19) with a width multiplier and global average pooling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from hetmerge.models.base import MultiTaskNet, init_weights, scaled
from hetmerge.models.units import ConvUnit, GlobalPool
from hetmerge.spaces import AxisRef, FeatureSpace, SpaceGraph, consumer, linear_producer, norm_producer

# The standard VGG layer lists; "M" is a 2x2 max-pool.
CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        512,
        "M",
    ),
}


@dataclass(frozen=True)
class VGGSpec:
    depth: Literal[11, 13, 16, 19] = 11
    width: float = 1.0
    batch_norm: bool = True


class VGG(MultiTaskNet):
    family = "vgg"
    spec: VGGSpec

    def build_body(self) -> tuple[nn.Sequential, int]:
        body = nn.Sequential()
        c_in = self.input_shape[0]
        conv = pool = 0
        for item in CONFIGS[self.spec.depth]:
            if item == "M":
                # ceil_mode keeps every pool valid on small inputs (28 → 14 → 7 → 4 → 2 → 1).
                body.add_module(f"pool{pool}", nn.MaxPool2d(2, ceil_mode=True))
                pool += 1
            else:
                c_out = scaled(int(item), self.spec.width)
                body.add_module(f"conv{conv}", ConvUnit(c_in, c_out, self.spec.batch_norm))
                c_in, conv = c_out, conv + 1
        body.add_module("gap", GlobalPool())
        init_weights(body)
        return body, c_in

    def body_spaces(self, head_consumers: tuple[AxisRef, ...]) -> SpaceGraph:
        names = list(self.body._modules)
        convs = [n for n in names if n.startswith("conv")]
        spaces = []
        for i, name in enumerate(convs):
            unit = f"body.{name}"
            producers = linear_producer(f"{unit}.conv", bias=not self.spec.batch_norm)
            if self.spec.batch_norm:
                producers += norm_producer(f"{unit}.norm")
            consumers = (consumer(f"body.{convs[i + 1]}.conv"),) if i + 1 < len(convs) else head_consumers
            width = self.body.get_submodule(name).conv.out_channels
            spaces.append(FeatureSpace(name, width, producers, consumers, observe=unit))
        cuts: list[str | None] = [None]
        for name in names:
            cuts.append(name if name.startswith("conv") else cuts[-1])
        return SpaceGraph(tuple(spaces), tuple(cuts))
