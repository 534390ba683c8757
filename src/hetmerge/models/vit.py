"""A small pre-norm Vision Transformer, the attention architecture of MuDSC's head-aware merging.

Two options give the Neuron Interpolation paper's ViT (algorithms.md §5.2): `mlp_out_act` (a GELU after the MLP's
second linear too) and `attn_scale="width"` (scores divided by √width instead of √head_dim). Their defaults keep
the standard block and leave the fields out of `describe()`, so existing checkpoints and fingerprints stay valid.

Attention heads are grouped feature spaces: a head's query/key units and its value/output units must stay
in one head, and heads must keep their pairing between the two, which the space description states with
`groups` and `link`.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from hetmerge.models.base import MultiTaskNet
from hetmerge.spaces import AxisRef, FeatureSpace, SpaceGraph, consumer, linear_producer, norm_producer


class PatchEmbed(nn.Module):
    """Non-overlapping patches → tokens (B, T, D), with a class token in front and learned positions added."""

    def __init__(self, channels: int, width: int, patch: int, tokens: int, cls_token: bool) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, width, patch, stride=patch)
        if cls_token:
            self.cls_token = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, 1, width), std=0.02))
        else:
            self.register_parameter("cls_token", None)
        self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, tokens + int(cls_token), width), std=0.02))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        return h + self.pos_embed


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v maps, so each is a plain Linear the spaces can name.

    `mix` (an identity) exposes the concatenated head outputs, the value/output space, to forward hooks.
    Plain matmul + softmax keeps the CPU forward deterministic. Scores are scaled by `scale`.
    """

    def __init__(self, width: int, heads: int, scale: float) -> None:
        super().__init__()
        self.heads = heads
        self.scale = scale
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.mix = nn.Identity()
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (m(x).view(b, t, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        weights = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        return self.proj(self.mix((weights @ v).transpose(1, 2).reshape(b, t, d)))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, scale={self.scale:.4g}"


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    With `out_act` the MLP ends in a second GELU (`mlp.act2`) before it is added to the stream; being
    elementwise, it leaves the stream's units free to permute.
    """

    def __init__(self, width: int, heads: int, hidden: int, scale: float, out_act: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, scale)
        self.norm2 = nn.LayerNorm(width)
        layers = OrderedDict(fc1=nn.Linear(width, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, width))
        if out_act:
            layers["act2"] = nn.GELU()
        self.mlp = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenPool(nn.Module):
    """(B, T, D) → (B, D): the class token, or the mean over tokens."""

    def __init__(self, mode: Literal["cls", "mean"]) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.mode == "cls" else x.mean(dim=1)

    def extra_repr(self) -> str:
        return self.mode


@dataclass(frozen=True)
class ViTSpec:
    """`attn_scale`: divide attention scores by √head_dim ("head", standard) or √width ("width", the Neuron
    Interpolation paper's ViT); `mlp_out_act`: a GELU after the MLP's second linear too (that paper's ViT)."""

    patch: int = 7
    depth: int = 4
    width: int = 64
    heads: int = 4
    mlp_ratio: float = 2.0
    pool: Literal["cls", "mean"] = "cls"
    mlp_out_act: bool = False
    attn_scale: Literal["head", "width"] = "head"


# Fields added after checkpoints existed, with the values that reproduce the older network: `describe()` omits
# them at these values, so the metadata (and the training fingerprints hashed from it) stay as they were.
LATER_DEFAULTS: dict[str, Any] = {"mlp_out_act": False, "attn_scale": "head"}


class ViT(MultiTaskNet):
    family = "vit"
    spec: ViTSpec

    def build_body(self) -> tuple[nn.Sequential, int]:
        spec = self.spec
        channels, height, width = self.input_shape
        if spec.width < 1 or spec.heads < 1 or spec.width % spec.heads:
            raise ValueError(f"vit: 'width' ({spec.width}) must be a positive multiple of 'heads' ({spec.heads})")
        if spec.patch < 1 or height % spec.patch or width % spec.patch:
            raise ValueError(f"vit: 'patch' ({spec.patch}) must divide the image height and width {height}x{width}")
        if spec.depth < 1:
            raise ValueError(f"vit: 'depth' must be at least 1, got {spec.depth}")
        hidden = round(spec.width * spec.mlp_ratio)
        if hidden < 1:
            raise ValueError(f"vit: 'mlp_ratio' ({spec.mlp_ratio}) leaves no hidden units")
        tokens = (height // spec.patch) * (width // spec.patch)
        scale = (spec.width // spec.heads if spec.attn_scale == "head" else spec.width) ** -0.5
        body = nn.Sequential()
        body.add_module("embed", PatchEmbed(channels, spec.width, spec.patch, tokens, spec.pool == "cls"))
        for k in range(spec.depth):
            body.add_module(f"block{k}", Block(spec.width, spec.heads, hidden, scale, spec.mlp_out_act))
        body.add_module("norm", nn.LayerNorm(spec.width))
        body.add_module("pool", TokenPool(spec.pool))
        return body, spec.width

    def describe(self) -> dict[str, Any]:
        """As the base class, but without the later fields left at their defaults (see `LATER_DEFAULTS`)."""
        desc = super().describe()
        desc["spec"] = {k: v for k, v in desc["spec"].items() if k not in LATER_DEFAULTS or v != LATER_DEFAULTS[k]}
        return desc

    def scaled_spec(self, factor: float) -> ViTSpec:
        """⌊width·factor⌋ wide, in whole heads; the MLP keeps its ratio to the width."""
        width = math.floor(self.spec.width * factor)
        if width < self.spec.heads or width % self.spec.heads:
            raise ValueError(
                f"vit: width factor {factor} gives width {width}, not a positive multiple of {self.spec.heads} heads"
            )
        return dataclasses.replace(self.spec, width=width)

    def body_spaces(self, head_consumers: tuple[AxisRef, ...]) -> SpaceGraph:
        """One residual stream; per block linked query/key and value/output head spaces, and the MLP hidden space.

        The stream passes no nonlinearity of its own (`act` None): an `mlp_out_act` GELU acts on fc2's output
        before the residual sum, i.e. inside a branch, not on the stream.
        """
        width, heads, depth = self.spec.width, self.spec.heads, self.spec.depth
        stream = [*linear_producer("body.embed.proj"), AxisRef("body.embed.pos_embed", 2)]
        if self.spec.pool == "cls":
            stream.append(AxisRef("body.embed.cls_token", 2))
        readers: list[AxisRef] = []
        spaces = []
        for k in range(depth):
            unit = f"body.block{k}"
            stream += [*norm_producer(f"{unit}.norm1", running_stats=False), *linear_producer(f"{unit}.attn.proj")]
            stream += [*norm_producer(f"{unit}.norm2", running_stats=False), *linear_producer(f"{unit}.mlp.fc2")]
            readers += [consumer(f"{unit}.attn.{m}") for m in ("q", "k", "v")] + [consumer(f"{unit}.mlp.fc1")]
            link = f"block{k}.heads"
            qk = linear_producer(f"{unit}.attn.q") + linear_producer(f"{unit}.attn.k")
            v, proj = linear_producer(f"{unit}.attn.v"), (consumer(f"{unit}.attn.proj"),)
            fc1, fc2 = linear_producer(f"{unit}.mlp.fc1"), (consumer(f"{unit}.mlp.fc2"),)
            hidden = self.body.get_submodule(f"block{k}").mlp.fc1.out_features
            spaces += [  # q·k is the query/key space's only consumer
                FeatureSpace(f"block{k}.qk", width, qk, (), f"{unit}.attn.k", groups=heads, unit_dim=-1, link=link),
                FeatureSpace(f"block{k}.vo", width, v, proj, f"{unit}.attn.mix", groups=heads, unit_dim=-1, link=link),
                FeatureSpace(f"block{k}.mlp", hidden, fc1, fc2, f"{unit}.mlp.act", unit_dim=-1, act=f"{unit}.mlp.act"),
            ]
        stream += norm_producer("body.norm", running_stats=False)
        spaces.insert(
            0,
            FeatureSpace(
                "stream", width, tuple(stream), (*readers, *head_consumers), f"body.block{depth - 1}", unit_dim=-1
            ),
        )
        cuts = (None, *["stream"] * len(self.body))
        return SpaceGraph(tuple(spaces), cuts)
