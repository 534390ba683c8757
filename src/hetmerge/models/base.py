"""The model interface every merge method relies on: a sequential body, per-task heads, feature spaces."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from hetmerge.params import as_dict
from hetmerge.spaces import AxisRef, SpaceGraph


class MultiTaskNet(nn.Module, abc.ABC):
    """A network = `body` (an nn.Sequential of named units) followed by one linear head per task.

    Cutting the body between units gives the hand-over points of partial merging; `space_graph()`
    describes which weight axes produce and consume each feature space.
    """

    family: ClassVar[str]

    def __init__(self, spec: Any, input_shape: Sequence[int], heads: Mapping[str, int]) -> None:
        super().__init__()
        if not heads:
            raise ValueError("a model needs at least one task head")
        self.spec = spec
        self.input_shape = tuple(int(s) for s in input_shape)
        body, feature_dim = self.build_body()
        self.body = body
        self.feature_dim = feature_dim
        self.heads = nn.ModuleDict({task: nn.Linear(feature_dim, n) for task, n in sorted(heads.items())})

    @abc.abstractmethod
    def build_body(self) -> tuple[nn.Sequential, int]:
        """Return the body and the width of the features it hands to the heads."""

    @abc.abstractmethod
    def body_spaces(self, head_consumers: tuple[AxisRef, ...]) -> SpaceGraph:
        """Describe the body's feature spaces; `head_consumers` read the final one."""

    def depth_stages(self) -> list[list[str]]:
        """Per stage, the names of the body units ("blocks") that depth alignment compares and positions.

        Block 0 of a stage may change width or stride; the later blocks of a stage keep its width, so an
        identity block can take their place (see `hetmerge.depth.padding`).
        """
        raise NotImplementedError(
            f"architecture family {self.family!r} ({type(self).__name__}) defines no depth stages, so it "
            "cannot take part in heterogeneous-depth merging"
        )

    def scaled_spec(self, factor: float) -> Any:
        """The spec of this architecture with every feature space ⌊width·factor⌋ wide (FS-Merge's comp_factor)."""
        raise NotImplementedError(
            f"architecture family {self.family!r} ({type(self).__name__}) cannot be rebuilt at another width; "
            "merge it at its own width (comp_factor 1)"
        )

    def space_graph(self) -> SpaceGraph:
        consumers = tuple(AxisRef(f"heads.{task}.weight", 1) for task in self.heads)
        return self.body_spaces(consumers)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.heads)

    def describe(self) -> dict[str, Any]:
        """Everything needed to rebuild this network (stored in checkpoint metadata)."""
        return {
            "family": self.family,
            "spec": as_dict(self.spec),
            "input_shape": list(self.input_shape),
            "heads": {t: h.out_features for t, h in self.heads.items()},
        }

    def run_body(self, h: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        for unit in self.body[start:stop]:
            h = unit(h)
        return h

    def head_logits(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {task: head(features) for task, head in self.heads.items()}

    def forward_from(self, h: torch.Tensor, start: int) -> dict[str, torch.Tensor]:
        """Continue from the tensor at cut `start` to the task logits."""
        return self.head_logits(self.run_body(h, start))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head_logits(self.body(x))


def scaled(channels: int, width: float) -> int:
    """Width multiplier applied to a channel count, never below one unit."""
    return max(1, round(channels * width))


def init_weights(module: nn.Module) -> None:
    """Kaiming init for convolutions (as the ZipIt!/MuDSC CIFAR models), unit/zero init for norms."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
