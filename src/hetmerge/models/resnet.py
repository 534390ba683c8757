"""CIFAR-style ResNet-(6n+2) with BasicBlocks, as used by ZipIt!, MuDSC and heterogeneous merging."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from hetmerge.models.base import MultiTaskNet, init_weights, scaled
from hetmerge.models.units import ConvUnit, GlobalPool
from hetmerge.spaces import AxisRef, FeatureSpace, SpaceGraph, consumer, linear_producer, norm_producer


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus shortcut, then ReLU.

    The shortcut is a 3x3 conv + BN when the stride or width changes (as in the papers' code, not the
    usual 1x1), identity otherwise. `norm` builds each normalisation from its channel count; the modules
    keep the BN names (bn1, bn2, shortcut.1) whatever they are, so descriptions and checkpoints stay valid.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, norm: Callable[[int], nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(c_out)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = norm(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), norm(c_out))
        self.act2 = nn.ReLU()

    @property
    def has_conv_shortcut(self) -> bool:
        return not isinstance(self.shortcut, nn.Identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(h)) + self.shortcut(x))


@dataclass(frozen=True)
class ResNetSpec:
    """`norm="group"` uses GroupNorm with `groups` groups (batch-independent, so no statistics to reset)."""

    depth: int = 20
    width: float = 1.0
    norm: Literal["batch", "group"] = "batch"
    groups: int = 8


class ResNet(MultiTaskNet):
    family = "resnet"
    spec: ResNetSpec

    @property
    def blocks_per_stage(self) -> int:
        if (self.spec.depth - 2) % 6 or self.spec.depth < 8:
            raise ValueError(f"resnet: depth must be 6n+2 (20, 26, 50, ...), got {self.spec.depth}")
        return (self.spec.depth - 2) // 6

    @property
    def norm_groups(self) -> int:
        """Groups of every feature space: GroupNorm only keeps its function under moves that respect its groups."""
        return self.spec.groups if self.spec.norm == "group" else 1

    def depth_stages(self) -> list[list[str]]:
        """Per stage, its BasicBlock units s{stage}b{block} in order."""
        stages: dict[str, list[str]] = {}
        for name, unit in self.body.named_children():
            if isinstance(unit, BasicBlock):
                stages.setdefault(name.split("b")[0], []).append(name)
        return list(stages.values())

    def build_body(self) -> tuple[nn.Sequential, int]:
        planes = [scaled(c, self.spec.width) for c in (16, 32, 64)]
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d
        if self.spec.norm == "group":
            if self.spec.groups < 1 or any(c % self.spec.groups for c in planes):
                raise ValueError(
                    f"resnet: 'groups' ({self.spec.groups}) must divide every channel count {planes} "
                    f"(set by 'width' {self.spec.width})"
                )
            norm = functools.partial(nn.GroupNorm, self.spec.groups)
        body = nn.Sequential()
        body.add_module("stem", ConvUnit(self.input_shape[0], planes[0], norm=norm))
        c_in = planes[0]
        for s, c_out in enumerate(planes, start=1):
            for b in range(self.blocks_per_stage):
                stride = 2 if s > 1 and b == 0 else 1
                body.add_module(f"s{s}b{b}", BasicBlock(c_in, c_out, stride, norm))
                c_in = c_out
        body.add_module("gap", GlobalPool())
        init_weights(body)
        return body, c_in

    def body_spaces(self, head_consumers: tuple[AxisRef, ...]) -> SpaceGraph:
        """Residual streams are tied across every block writing into them; each block has an inner space."""
        stats = self.spec.norm == "batch"
        groups = self.norm_groups
        stream = {"name": "stage1", "producers": [*linear_producer("body.stem.conv", bias=False)]}
        stream["producers"] += norm_producer("body.stem.norm", stats)
        stream_consumers: list[AxisRef] = []
        stream_width = self.body.stem.conv.out_channels
        observe, act = "body.stem", "body.stem.act"
        spaces: list[FeatureSpace] = []
        cuts: list[str | None] = [None, "stage1"]

        def close_stream(consumers: tuple[AxisRef, ...]) -> None:
            producers = tuple(stream["producers"])
            spaces.append(
                FeatureSpace(stream["name"], stream_width, producers, consumers, observe, groups=groups, act=act)
            )

        for name, block in self.body.named_children():
            if not isinstance(block, BasicBlock):
                continue
            unit = f"body.{name}"
            if block.has_conv_shortcut:
                close_stream((*stream_consumers, consumer(f"{unit}.conv1"), consumer(f"{unit}.shortcut.0")))
                stream = {"name": f"stage{name[1]}", "producers": []}
                stream["producers"] += linear_producer(f"{unit}.shortcut.0", bias=False)
                stream["producers"] += norm_producer(f"{unit}.shortcut.1", stats)
                stream_consumers = []
                stream_width = block.conv2.out_channels
            else:
                stream_consumers.append(consumer(f"{unit}.conv1"))
            stream["producers"] += linear_producer(f"{unit}.conv2", bias=False)
            stream["producers"] += norm_producer(f"{unit}.bn2", stats)
            observe, act = unit, f"{unit}.act2"
            inner = linear_producer(f"{unit}.conv1", bias=False) + norm_producer(f"{unit}.bn1", stats)
            spaces.append(
                FeatureSpace(
                    f"{name}.inner",
                    block.conv1.out_channels,
                    inner,
                    (consumer(f"{unit}.conv2"),),
                    f"{unit}.act1",
                    groups=groups,
                    act=f"{unit}.act1",
                )
            )
            cuts.append(stream["name"])
        close_stream((*stream_consumers, *head_consumers))
        cuts.append(cuts[-1])  # global pooling keeps the last stream's units
        return SpaceGraph(tuple(spaces), tuple(cuts))
