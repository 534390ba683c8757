"""VGG with a width multiplier and global average pooling, in two layouts.

- "standard": the configurations 11/13/16/19 (conv units separated by 2x2 max-pools).
- "stages": the heterogeneous-merging paper's VGG13/VGG19 (algorithms.md §1.5): three stages of 4 (13) or
  6 (19) conv units with 128/256/512 channels × width, MaxPool(4, 4) after stages 1 and 2 and MaxPool(2, 2)
  after stage 3 (32 → 8 → 2 → 1; 28 → 7 → 2 → 1 with ceil_mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

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

# The "stages" layout: conv units per stage for each depth (12 or 18 convs + 1 linear), stage channels,
# and the (square) max-pool closing each stage.
STAGE_BLOCKS: dict[int, int] = {13: 4, 19: 6}
STAGE_CHANNELS: tuple[int, ...] = (128, 256, 512)
STAGE_POOLS: tuple[int, ...] = (4, 4, 2)


@dataclass(frozen=True)
class VGGSpec:
    """`variant="stages"` is the heterogeneous-merging paper's three-stage VGG, only for depth 13 or 19.

    Its convs have no bias before a BatchNorm (like every `ConvUnit`): the reference code's conv bias
    there is cancelled by the normalisation, so the function class is the same.
    """

    depth: Literal[11, 13, 16, 19] = 11
    width: float = 1.0
    batch_norm: bool = True
    variant: Literal["standard", "stages"] = "standard"


class VGG(MultiTaskNet):
    family = "vgg"
    spec: VGGSpec

    def build_body(self) -> tuple[nn.Sequential, int]:
        if self.spec.variant == "stages":
            return self._build_stages()
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

    def _build_stages(self) -> tuple[nn.Sequential, int]:
        if self.spec.depth not in STAGE_BLOCKS:
            raise ValueError(
                f"vgg: variant 'stages' has depth 13 or 19 ({STAGE_BLOCKS[13]} or {STAGE_BLOCKS[19]} conv blocks "
                f"per stage), got depth {self.spec.depth}"
            )
        body = nn.Sequential()
        c_in = self.input_shape[0]
        conv = 0
        for pool, (channels, size) in enumerate(zip(STAGE_CHANNELS, STAGE_POOLS, strict=True)):
            c_out = scaled(channels, self.spec.width)
            for _ in range(STAGE_BLOCKS[self.spec.depth]):
                body.add_module(f"conv{conv}", ConvUnit(c_in, c_out, self.spec.batch_norm))
                c_in, conv = c_out, conv + 1
            # ceil_mode keeps 28×28 inputs valid (28 → 7 → 2 → 1), as well as 32 → 8 → 2 → 1.
            body.add_module(f"pool{pool}", nn.MaxPool2d(size, size, ceil_mode=True))
        body.add_module("gap", GlobalPool())
        init_weights(body)
        return body, c_in

    def describe(self) -> dict[str, Any]:
        """As the base class, but a "standard" spec leaves `variant` out, so its metadata (and the training
        fingerprints hashed from it) stay what they were before the variant existed."""
        desc = super().describe()
        if self.spec.variant == "standard":
            desc["spec"] = {k: v for k, v in desc["spec"].items() if k != "variant"}
        return desc

    def depth_stages(self) -> list[list[str]]:
        """The runs of conv units between max-pools, in order: the blocks depth alignment compares."""
        stages: list[list[str]] = [[]]
        for name in self.body._modules:
            if name.startswith("conv"):
                stages[-1].append(name)
            elif name.startswith("pool") and stages[-1]:
                stages.append([])
        return [s for s in stages if s]

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
            spaces.append(FeatureSpace(name, width, producers, consumers, observe=unit, act=f"{unit}.act"))
        cuts: list[str | None] = [None]
        for name in names:
            cuts.append(name if name.startswith("conv") else cuts[-1])
        return SpaceGraph(tuple(spaces), tuple(cuts))
