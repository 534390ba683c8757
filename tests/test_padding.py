"""Identity padding (hetmerge.depth.padding, algorithms.md §4.2): a shallow model padded to a deeper
architecture computes exactly the same function, for every alignment strategy and random positions."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hetmerge.depth import STRATEGIES, align_depths, layer_cka, pad_to_depth
from hetmerge.depth.padding import _identity_spaces
from hetmerge.models import build_model
from hetmerge.models.resnet import BasicBlock
from hetmerge.models.units import ConvUnit

# (name, family, shallow spec, deep spec, input shape): widths differ on purpose, the padded model keeps the
# shallow widths.
PAIRS = {
    "resnet-bn-8-14": ("resnet", {"depth": 8, "width": 0.25}, {"depth": 14, "width": 0.5}, (3, 8, 8)),
    "resnet-bn-14-26": ("resnet", {"depth": 14, "width": 0.25}, {"depth": 26, "width": 0.5}, (3, 8, 8)),
    "resnet-bn-20-26": ("resnet", {"depth": 20, "width": 0.25}, {"depth": 26, "width": 0.25}, (3, 8, 8)),
    "resnet-gn-14-20": (
        "resnet",
        {"depth": 14, "width": 0.5, "norm": "group", "groups": 4},
        {"depth": 20, "width": 0.5, "norm": "group", "groups": 2},
        (3, 8, 8),
    ),
    "vgg-stages-13-19": (
        "vgg",
        {"depth": 13, "width": 1 / 32, "variant": "stages"},
        {"depth": 19, "width": 1 / 16, "variant": "stages"},
        (3, 32, 32),
    ),
    "vgg-stages-nobn-13-19": (
        "vgg",
        {"depth": 13, "width": 1 / 32, "variant": "stages", "batch_norm": False},
        {"depth": 19, "width": 1 / 32, "variant": "stages", "batch_norm": False},
        (1, 28, 28),
    ),
    "vgg-standard-11-19": ("vgg", {"depth": 11, "width": 1 / 16}, {"depth": 19, "width": 1 / 16}, (1, 8, 8)),
}


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial norm statistics and affine vectors, and non-zero conv biases."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
        if isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model


@functools.cache
def pair(name: str) -> tuple[nn.Module, nn.Module]:
    """(shallow, deep), eval mode, built once per session (the tests never modify them)."""
    family, shallow_spec, deep_spec, shape = PAIRS[name]
    torch.manual_seed(0)
    shallow = randomize(build_model(family, shallow_spec, shape, {"A": 3, "B": 2}), 1).eval()
    deep = randomize(build_model(family, deep_spec, shape, {"C": 4}), 2).eval()
    return shallow, deep


def inputs(name: str, n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *PAIRS[name][3], generator=torch.Generator().manual_seed(seed))


def counts(model: nn.Module) -> list[int]:
    return [len(s) for s in model.depth_stages()]


@functools.cache
def similarity(name: str) -> torch.Tensor:
    """The deep × shallow minibatch CKA between the blocks' outputs, on random inputs."""
    shallow, deep = pair(name)
    layers = [[f"body.{b}" for stage in m.depth_stages() for b in stage] for m in (deep, shallow)]
    batches = [inputs(name, 8, seed) for seed in range(3)]
    return layer_cka(deep, shallow, batches, layers[0], layers[1])


def block_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    names = [b for stage in model.depth_stages() for b in stage]
    hooks = [
        model.body.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o)) for n in names
    ]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen | {f"head.{t}": v for t, v in out.items()}


def check_padding(name: str, positions) -> None:
    """The padded model carries shallow block k's output at its deep position and the previous block's at
    every identity position, and gives the same logits; its description and single-model spaces are right."""
    shallow, deep = pair(name)
    padded, single = pad_to_depth(shallow, deep, positions)
    assert not padded.training
    assert padded.describe() == {
        **shallow.describe(),
        "spec": {**shallow.describe()["spec"], "depth": deep.spec.depth},
    }
    assert counts(padded) == counts(deep)
    graph = padded.space_graph()
    graph.check_against(padded.state_dict())

    x = inputs(name)
    want, got = block_outputs(shallow, x), block_outputs(padded, x)
    identities = []
    for stage, shallow_stage, padded_stage in zip(
        positions, shallow.depth_stages(), padded.depth_stages(), strict=True
    ):
        carried = {p: shallow_stage[k] for k, p in enumerate(stage)}
        current = None
        for p, block in enumerate(padded_stage):
            if p in carried:
                current = carried[p]
            else:
                identities.append(block)
            assert torch.equal(got[block], want[current]), (block, current)
    for task in shallow.tasks:
        assert torch.equal(got[f"head.{task}"], want[f"head.{task}"])

    expected = {f"{b}.inner" for b in identities} if PAIRS[name][0] == "resnet" else set()
    assert single == expected
    assert single <= set(graph.names)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_padding_keeps_the_function_for_every_strategy(name, strategy):
    shallow, deep = pair(name)
    sim = similarity(name) if STRATEGIES[strategy].needs_similarity else None
    alignment = align_depths(strategy, counts(deep), counts(shallow), sim)
    check_padding(name, alignment.positions)


def test_a_depth_alignment_is_accepted_directly():
    shallow, deep = pair("resnet-bn-14-26")
    alignment = align_depths("uniform", counts(deep), counts(shallow))
    a, single_a = pad_to_depth(shallow, deep, alignment)
    b, single_b = pad_to_depth(shallow, deep, alignment.positions)
    assert single_a == single_b
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@settings(max_examples=30, deadline=None)
@given(data=st.data(), name=st.sampled_from(["resnet-bn-14-26", "resnet-gn-14-20", "vgg-stages-13-19"]))
def test_random_positions_keep_the_function(data, name):
    shallow, deep = pair(name)
    positions = []
    for n_deep, n_shallow in zip(counts(deep), counts(shallow), strict=True):
        rest = data.draw(
            st.lists(st.integers(1, n_deep - 1), min_size=n_shallow - 1, max_size=n_shallow - 1, unique=True)
        )
        positions.append((0, *sorted(rest)))
    check_padding(name, positions)


def test_padded_tensors_copy_the_shallow_blocks_and_zero_the_residual_branches():
    shallow, deep = pair("resnet-bn-14-26")
    shallow_before = {k: v.clone() for k, v in shallow.state_dict().items()}
    rng = torch.get_rng_state()
    padded, single = pad_to_depth(shallow, deep, [(0, 2), (0, 3), (0, 1)])
    assert torch.equal(torch.get_rng_state(), rng), "padding must not consume the caller's random numbers"
    assert all(torch.equal(v, shallow.state_dict()[k]) for k, v in shallow_before.items()), "shallow changed"
    assert single == {f"s{s}b{b}.inner" for s, b in [(1, 1), (1, 3), (2, 1), (2, 2), (3, 2), (3, 3)]}

    state, source = padded.state_dict(), shallow.state_dict()
    moved = {"s1b0": "s1b0", "s1b2": "s1b1", "s2b0": "s2b0", "s2b3": "s2b1", "s3b0": "s3b0", "s3b1": "s3b1"}
    for key, tensor in state.items():
        unit = key.split(".")[1] if key.startswith("body.") else None
        if unit in moved:
            assert torch.equal(tensor, source[key.replace(f".{unit}.", f".{moved[unit]}.")]), key
        elif unit is not None and unit.startswith("s") and unit != "stem":
            assert "shortcut" not in key
            if key.endswith((".weight", ".bias", "running_mean")):  # convs and affine norms of the branch
                assert not tensor.any(), key
        else:
            assert torch.equal(tensor, source[key]), key
    # The padded tensors are copies, not views of the shallow model's.
    assert state["body.stem.conv.weight"].data_ptr() != source["body.stem.conv.weight"].data_ptr()


def test_vgg_identity_units_are_dirac_convs_with_identity_batchnorm():
    shallow, deep = pair("vgg-stages-13-19")
    padded, single = pad_to_depth(shallow, deep, [(0, 1, 2, 3), (0, 2, 3, 5), (0, 1, 2, 5)])
    assert single == frozenset()
    identity = padded.body.conv4  # stage 1, position 4
    w = identity.conv.weight
    assert torch.equal(w, nn.init.dirac_(torch.empty_like(w)))
    assert torch.equal(identity.norm.weight, torch.ones_like(identity.norm.weight))
    assert not identity.norm.bias.any() and not identity.norm.running_mean.any()
    x = torch.rand(2, w.shape[1], 5, 5)
    with torch.no_grad():
        assert torch.equal(identity.eval()(x), x)


def test_training_mode_dtype_and_equal_depth():
    shallow, _ = pair("resnet-gn-14-20")
    same = build_model("resnet", {"depth": 14, "width": 0.5, "norm": "group", "groups": 4}, (3, 8, 8), {"C": 4})
    twin = build_model("resnet", {"depth": 14, "width": 0.5, "norm": "group", "groups": 4}, (3, 8, 8), {"A": 3, "B": 2})
    twin.load_state_dict(shallow.state_dict())
    twin.double().train()
    padded, single = pad_to_depth(twin, same, [(0, 1)] * 3)
    assert padded.training and single == frozenset()
    assert all(v.dtype == torch.float64 for v in padded.state_dict().values() if v.is_floating_point())
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in padded.state_dict().items())


@pytest.mark.parametrize(
    ("positions", "match"),
    [
        ([(1, 3), (0, 1), (0, 1)], "block 0 .*position 0"),
        ([(0, 1), (0, 0), (0, 1)], "stage 1: .*not strictly increasing"),
        ([(0, 3), (0, 1), (0, 2)], None),  # valid, as a control
        ([(0, 4), (0, 1), (0, 2)], "stage 0: position 4 is out of range"),
        ([(0, 1), (0, 1)], "2 stages of positions .* 3 stages"),
        ([(0, 1), (0, 1, 2), (0, 1)], "stage 1: 3 positions"),
        ([(0, 1.5), (0, 1), (0, 1)], "integers"),
    ],
)
def test_bad_positions_are_rejected(positions, match):
    shallow, deep = pair("resnet-bn-14-26")
    if match is None:
        pad_to_depth(shallow, deep, positions)
    else:
        with pytest.raises(ValueError, match=match):
            pad_to_depth(shallow, deep, positions)


def test_the_shallow_model_must_be_the_shallower_one():
    shallow, deep = pair("resnet-bn-14-26")
    with pytest.raises(ValueError, match=r"out of range|positions"):
        pad_to_depth(deep, shallow, [(0, 1, 2, 3)] * 3)


@pytest.mark.parametrize(
    ("shallow", "deep", "match"),
    [
        (("resnet", {"depth": 8}), ("vgg", {"depth": 13}), "one family"),
        (("resnet", {"depth": 8}), ("resnet", {"depth": 14, "norm": "group"}), "norm: 'group' vs 'batch'"),
        (("vgg", {"depth": 13}), ("vgg", {"depth": 19, "variant": "stages"}), "variant"),
        (("mlp", {"hidden": [8]}), ("mlp", {"hidden": [8, 8]}), "'mlp'.*no depth stages"),
        (
            ("vit", {"patch": 4, "depth": 1, "width": 8, "heads": 2}),
            ("vit", {"patch": 4, "depth": 2, "width": 8, "heads": 2}),
            "'vit'.*no depth stages",
        ),
    ],
)
def test_incompatible_models_are_rejected(shallow, deep, match):
    a = build_model(shallow[0], shallow[1], (3, 8, 8), {"A": 2})
    b = build_model(deep[0], deep[1], (3, 8, 8), {"A": 2})
    with pytest.raises(ValueError, match=match):
        pad_to_depth(a, b, [(0,)] * 3)


def test_mismatched_stage_counts_are_rejected(monkeypatch):
    shallow, deep = pair("resnet-bn-14-26")
    monkeypatch.setattr(shallow, "depth_stages", lambda: [["s1b0", "s1b1"], ["s2b0", "s2b1"]])
    with pytest.raises(ValueError, match="3 stages and the shallow one 2"):
        pad_to_depth(shallow, deep, [(0, 1)] * 2)


def test_blocks_that_change_width_or_have_a_shortcut_have_no_identity_form():
    assert _identity_spaces("s1b1", BasicBlock(8, 8, 1)) == {"s1b1.inner"}
    with pytest.raises(ValueError, match="conv shortcut"):
        _identity_spaces("s2b0", BasicBlock(8, 16, 2))
    with pytest.raises(ValueError, match="conv shortcut"):
        _identity_spaces("s2b0", BasicBlock(8, 8, 2))
    assert _identity_spaces("conv1", ConvUnit(8, 8, True)) == frozenset()
    assert _identity_spaces("conv1", ConvUnit(8, 8, False)) == frozenset()
    with pytest.raises(ValueError, match="changes the width"):
        _identity_spaces("conv4", ConvUnit(8, 16, True))
    with pytest.raises(ValueError, match="exact identity"):
        _identity_spaces("conv1", ConvUnit(8, 8, True, stride=2))
    with pytest.raises(ValueError, match="normalisation"):
        _identity_spaces("conv1", ConvUnit(8, 8, lambda c: nn.GroupNorm(2, c)))
    with pytest.raises(ValueError, match="no identity form"):
        _identity_spaces("fc0", nn.Linear(4, 4))
