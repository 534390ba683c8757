"""Identity padding ("dummify", algorithms.md §4.2): give a shallow model a deeper model's depth.

`pad_to_depth` builds a model with the deep model's block counts that computes exactly the shallow model's
function (in eval mode): shallow block k of stage s moves to deep position `positions[s][k]` (as chosen by
`hetmerge.depth.align_depths`) and every other position becomes an identity block. Only depth changes:
width-related spec fields come from the shallow model, so width heterogeneity stays for the merge.

An identity block is exact because its input is a ReLU output (non-negative) and nothing in it changes
the width or stride (block 0 of every stage, which may, stays at position 0):

- ResNet BasicBlock without a conv shortcut: the residual branch is exactly zero (conv1, conv2 and the
  affine vectors of bn1/bn2 zeroed), so the block computes ReLU(x + 0) = x. Its inner space carries
  nothing and exists only in the padded model: a merge treats it as a single-model space.
- VGG conv unit: a Dirac (centre-tap identity) conv with zero bias, a BatchNorm that is the identity in
  eval mode (weight 1, bias 0, running mean 0, running variance 1 − eps) and a ReLU of a non-negative
  input. Its output space carries the previous unit's features, so it is an ordinary merged space.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
from collections.abc import Sequence

import torch
from torch import nn

from hetmerge.depth.alignment import DepthAlignment
from hetmerge.models.base import MultiTaskNet
from hetmerge.models.resnet import BasicBlock
from hetmerge.models.units import ConvUnit

# Spec fields describing widths (and the channel grouping tied to them): the padded model takes these
# from the shallow model; every other field except `depth` must agree between the two models.
WIDTH_FIELDS = ("width", "groups")


def _depth_stages(model: MultiTaskNet, role: str) -> list[list[str]]:
    try:
        return [list(stage) for stage in model.depth_stages()]
    except NotImplementedError as err:
        raise ValueError(f"cannot pad to depth: the {role} model: {err}") from err


def _padded_spec(shallow: MultiTaskNet, deep: MultiTaskNet) -> object:
    if type(shallow) is not type(deep):
        raise ValueError(
            f"cannot pad a {shallow.family!r} model ({type(shallow).__name__}) to the depth of a "
            f"{deep.family!r} model ({type(deep).__name__}): both must be of one family"
        )
    names = [f.name for f in dataclasses.fields(deep.spec)]
    differing = [
        n for n in names if n != "depth" and n not in WIDTH_FIELDS and getattr(deep.spec, n) != getattr(shallow.spec, n)
    ]
    if differing:
        details = ", ".join(f"{n}: {getattr(deep.spec, n)!r} vs {getattr(shallow.spec, n)!r}" for n in differing)
        raise ValueError(
            f"padding only changes depth, but the deep and shallow {deep.family} specs also differ in ({details})"
        )
    return dataclasses.replace(deep.spec, **{n: getattr(shallow.spec, n) for n in WIDTH_FIELDS if n in names})


def _check_positions(
    positions: Sequence[Sequence[int]], deep_stages: list[list[str]], shallow_stages: list[list[str]]
) -> list[tuple[int, ...]]:
    if len(deep_stages) != len(shallow_stages):
        raise ValueError(
            f"the deep model has {len(deep_stages)} stages and the shallow one {len(shallow_stages)}; "
            "depth padding needs the same stages"
        )
    if len(positions) != len(deep_stages):
        raise ValueError(f"{len(positions)} stages of positions for models with {len(deep_stages)} stages")
    checked = []
    for s, (stage, deep, shallow) in enumerate(zip(positions, deep_stages, shallow_stages, strict=True)):
        try:
            pos = tuple(operator.index(p) for p in stage)
        except TypeError:
            raise ValueError(f"stage {s}: positions must be integers, got {list(stage)}") from None
        if len(pos) != len(shallow):
            raise ValueError(f"stage {s}: {len(pos)} positions {list(pos)} for {len(shallow)} shallow blocks")
        if pos[0] != 0:
            raise ValueError(
                f"stage {s}: block 0 owns the stage's width/stride change (and the ResNet conv shortcut) and must "
                f"stay at position 0, got positions {list(pos)}"
            )
        if any(p >= q for p, q in itertools.pairwise(pos)):
            raise ValueError(f"stage {s}: positions {list(pos)} are not strictly increasing")
        if pos[-1] >= len(deep):
            raise ValueError(f"stage {s}: position {pos[-1]} is out of range for the deep stage of {len(deep)} blocks")
        checked.append(pos)
    return checked


def _identity_spaces(name: str, unit: nn.Module) -> frozenset[str]:
    """Check that `unit` can become an identity block; the feature spaces that then only exist inside it."""
    if isinstance(unit, BasicBlock):
        if unit.has_conv_shortcut or unit.conv1.stride != (1, 1):
            raise ValueError(
                f"block {name!r} has a conv shortcut (it changes width or stride), so it cannot be an identity block"
            )
        return frozenset({f"{name}.inner"})
    if isinstance(unit, ConvUnit):
        conv = unit.conv
        k = conv.kernel_size
        if conv.in_channels != conv.out_channels:
            raise ValueError(
                f"block {name!r} changes the width ({conv.in_channels} → {conv.out_channels}), so it cannot be an "
                "identity block"
            )
        if (
            conv.stride != (1, 1)
            or conv.dilation != (1, 1)
            or conv.groups != 1
            or k[0] % 2 == 0
            or k[1] % 2 == 0
            or conv.padding != (k[0] // 2, k[1] // 2)
            or conv.padding_mode != "zeros"
        ):
            raise ValueError(f"block {name!r}: its conv ({conv}) cannot be made an exact identity")
        norm = getattr(unit, "norm", None)
        if norm is not None and not (isinstance(norm, nn.BatchNorm2d) and norm.affine and norm.track_running_stats):
            raise ValueError(f"block {name!r}: its normalisation ({norm}) cannot be made an exact identity")
        return frozenset()
    raise ValueError(f"block {name!r} is a {type(unit).__name__}, which has no identity form")


@torch.no_grad()
def _make_identity(unit: nn.Module) -> None:
    if isinstance(unit, BasicBlock):
        for conv in (unit.conv1, unit.conv2):
            conv.weight.zero_()
        for norm in (unit.bn1, unit.bn2):
            norm.weight.zero_()
            norm.bias.zero_()
            if isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats:
                norm.running_mean.zero_()
                norm.running_var.fill_(1.0)
        return
    assert isinstance(unit, ConvUnit)
    nn.init.dirac_(unit.conv.weight)
    if unit.conv.bias is not None:
        unit.conv.bias.zero_()
    norm = getattr(unit, "norm", None)
    if norm is not None:
        norm.weight.fill_(1.0)
        norm.bias.zero_()
        norm.running_mean.zero_()
        # (x − 0) / sqrt((1 − eps) + eps) = x: exact in float32 and float64 for the default eps.
        norm.running_var.fill_(1.0 - norm.eps)


def pad_to_depth(
    shallow: MultiTaskNet, deep: MultiTaskNet, positions: Sequence[Sequence[int]] | DepthAlignment
) -> tuple[MultiTaskNet, frozenset[str]]:
    """The shallow model padded with identity blocks to the deep model's depth, and its single-model spaces.

    `positions[s][k]` is the deep position (within stage s) of shallow block k, e.g. `align_depths(...)
    .positions` (a `DepthAlignment` is accepted as well); every stage starts with 0 and increases strictly.
    The padded model has `deep`'s family and spec except the width fields (`WIDTH_FIELDS`), which come from
    `shallow`, and `shallow`'s heads and input shape; it computes `shallow`'s function exactly in eval mode.
    The returned set names the feature spaces that exist only inside identity blocks (ResNet: their
    "s{s}b{b}.inner"; VGG: none), which a merge treats as single-model spaces.
    """
    if isinstance(positions, DepthAlignment):
        positions = positions.positions
    deep_stages = _depth_stages(deep, "deep")
    shallow_stages = _depth_stages(shallow, "shallow")
    spec = _padded_spec(shallow, deep)
    checked = _check_positions(positions, deep_stages, shallow_stages)

    heads = {task: head.out_features for task, head in shallow.heads.items()}
    with torch.random.fork_rng(devices=[]):  # building initialises weights; leave the caller's RNG alone
        padded = type(deep)(spec, shallow.input_shape, heads)
    padded_stages = padded.depth_stages()
    if [len(s) for s in padded_stages] != [len(s) for s in deep_stages]:
        raise ValueError(
            f"the padded spec {spec} gives stages of {[len(s) for s in padded_stages]} blocks, the deep model "
            f"has {[len(s) for s in deep_stages]}"
        )
    reference = next((t for t in shallow.state_dict().values() if t.is_floating_point()), None)
    if reference is not None:
        padded.to(device=reference.device, dtype=reference.dtype)

    source = {}  # padded block name → shallow block name
    for stage, pads, shallows in zip(checked, padded_stages, shallow_stages, strict=True):
        for k, p in enumerate(stage):
            source[pads[p]] = shallows[k]
    identities = [name for stage in padded_stages for name in stage if name not in source]
    single = frozenset().union(*(_identity_spaces(n, padded.body.get_submodule(n)) for n in identities))
    for target, origin in source.items():
        want, have = padded.body.get_submodule(target), shallow.body.get_submodule(origin)
        if repr(want) != repr(have):
            raise ValueError(
                f"shallow block {origin!r} does not fit deep position {target!r}: {have} vs {want} (stride, "
                "width or shortcut differ)"
            )

    blocks = {name for stage in padded_stages for name in stage}
    shallow_state = shallow.state_dict()
    unused = set(shallow_state)
    state = {}
    for key, tensor in padded.state_dict().items():
        parts = key.split(".", 2)
        if parts[0] == "body" and len(parts) == 3 and parts[1] in blocks:
            if parts[1] not in source:
                state[key] = tensor  # identity block: set below
                continue
            origin = f"body.{source[parts[1]]}.{parts[2]}"
        else:
            origin = key
        if origin not in shallow_state or shallow_state[origin].shape != tensor.shape:
            found = tuple(shallow_state[origin].shape) if origin in shallow_state else "no such tensor"
            raise ValueError(f"padded tensor {key!r} {tuple(tensor.shape)} has no counterpart {origin!r} ({found})")
        state[key] = shallow_state[origin].detach().clone()
        unused.discard(origin)
    if unused:
        raise ValueError(f"the padded model has no place for the shallow model's tensors {sorted(unused)}")
    padded.load_state_dict(state)
    for name in identities:
        _make_identity(padded.body.get_submodule(name))

    missing = single - set(padded.space_graph().names)
    if missing:  # guards the naming contract with the architectures' space descriptions
        raise AssertionError(f"single-model spaces {sorted(missing)} are not spaces of the padded model")
    padded.train(shallow.training)
    return padded, single
