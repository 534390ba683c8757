"""Multi-layer perceptron on flattened images."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from torch import nn

from hetmerge.models.base import MultiTaskNet
from hetmerge.models.units import DenseUnit
from hetmerge.spaces import AxisRef, FeatureSpace, SpaceGraph, consumer, linear_producer, norm_producer


@dataclass(frozen=True)
class MLPSpec:
    hidden: tuple[int, ...] = (256, 256)
    batch_norm: bool = True


class MLP(MultiTaskNet):
    family = "mlp"
    spec: MLPSpec

    def build_body(self) -> tuple[nn.Sequential, int]:
        if not self.spec.hidden:
            raise ValueError("mlp: 'hidden' needs at least one layer")
        body = nn.Sequential()
        body.add_module("flatten", nn.Flatten())
        d_in = math.prod(self.input_shape)
        for i, d_out in enumerate(self.spec.hidden):
            body.add_module(f"fc{i}", DenseUnit(d_in, d_out, self.spec.batch_norm))
            d_in = d_out
        return body, d_in

    def scaled_spec(self, factor: float) -> MLPSpec:
        hidden = tuple(math.floor(h * factor) for h in self.spec.hidden)
        if min(hidden) < 1:
            raise ValueError(f"mlp: width factor {factor} leaves a layer of {self.spec.hidden} without units")
        return dataclasses.replace(self.spec, hidden=hidden)

    def body_spaces(self, head_consumers: tuple[AxisRef, ...]) -> SpaceGraph:
        spaces = []
        n = len(self.spec.hidden)
        for i, width in enumerate(self.spec.hidden):
            unit = f"body.fc{i}"
            producers = linear_producer(f"{unit}.linear", bias=not self.spec.batch_norm)
            if self.spec.batch_norm:
                producers += norm_producer(f"{unit}.norm")
            consumers = (consumer(f"body.fc{i + 1}.linear"),) if i + 1 < n else head_consumers
            spaces.append(FeatureSpace(f"fc{i}", width, producers, consumers, observe=unit, act=f"{unit}.act"))
        cuts = (None, None, *(f"fc{i}" for i in range(n)))
        return SpaceGraph(tuple(spaces), cuts)
