"""Typed parameters: every declared range is enforced by parse_params, naming the owner, parameter, value and
range; parameters that are no mapping are refused as such."""

from __future__ import annotations

import math
import types
import typing
from typing import Annotated

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hetmerge.methods import REGISTRY, build_method
from hetmerge.params import ParameterError, Range, parse_params
from hetmerge.training import TrainSettings


def declared(hint, wrap=lambda v: v):
    """(base type, Range, how a single value becomes the parameter's value) for every range inside `hint`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        yield from ((args[0], r, wrap) for r in args[1:] if isinstance(r, Range))
    elif origin in (typing.Union, types.UnionType):
        for option in args:
            yield from declared(option, wrap)
    elif origin is tuple:
        yield from declared(args[0], lambda v: [wrap(v)])


def parse(owner, values):
    """Parse `values` as the method named `owner` does (build_method), or as training settings."""
    if owner == "training":
        return parse_params(TrainSettings, values, "training settings")
    return build_method(owner, values)


OWNERS = {"training": TrainSettings, **{name: cls.Params for name, cls in REGISTRY.items()}}
RANGES = [
    (owner, name, base, bound, wrap)
    for owner, cls in OWNERS.items()
    for name, hint in typing.get_type_hints(cls, include_extras=True).items()
    for base, bound, wrap in declared(hint)
]


def test_every_bounded_parameter_declares_its_range():
    found = {(owner, name): str(bound) for owner, name, _, bound, _ in RANGES}
    for method in ("zipit", "mudsc", "hetero"):
        assert found[method, "alpha"] == found[method, "beta"] == "[0, 1]"
    for method in ("mudsc", "hetero"):
        assert found[method, "max_sweeps"] == found[method, "patience"] == "[1, ∞)"
        assert found[method, "lam"] == "[0, 1]"
    assert found["mudsc", "lam_grid"] == "[0, 1]"
    assert found["weight_matching", "max_iter"] == "[1, ∞)"
    assert {k: v for (owner, k), v in found.items() if owner == "training"} == {
        "epochs": "[1, ∞)",
        "batch_size": "[1, ∞)",
        "lr": "(0, ∞)",
        "momentum": "[0, 1)",
        "weight_decay": "[0, ∞)",
        "warmup_epochs": "[0, ∞)",
        "label_smoothing": "[0, 1]",
        "beta1": "[0, 1)",
        "beta2": "[0, 1)",
        "min_lr": "[0, ∞)",
        "cutmix": "[0, ∞)",
    }


def int_bounds(bound):
    """The smallest and largest integer inside `bound` (integer ranges have integer bounds)."""
    low = None if bound.low is None else int(bound.low) + bound.open_low
    return low, None if bound.high is None else int(bound.high) - bound.open_high


def inside(base, bound):
    if base is int:
        low, high = int_bounds(bound)
        return st.integers(min_value=low, max_value=high)
    return st.floats(
        min_value=bound.low,
        max_value=bound.high,
        exclude_min=bound.open_low and bound.low is not None,
        exclude_max=bound.open_high and bound.high is not None,
        allow_nan=False,
        allow_infinity=False,
    )


def outside(base, bound):
    """Values of the right type outside `bound` (NaN and ±inf for floats too)."""
    if base is int:
        low, high = int_bounds(bound)
        below = [] if low is None else [st.integers(max_value=low - 1)]
        return st.one_of(below + ([] if high is None else [st.integers(min_value=high + 1)]))
    options = [st.sampled_from([math.nan, math.inf, -math.inf])]
    if bound.low is not None:
        options.append(st.floats(max_value=bound.low, exclude_max=not bound.open_low, allow_nan=False))
    if bound.high is not None:
        options.append(st.floats(min_value=bound.high, exclude_min=not bound.open_high, allow_nan=False))
    return st.one_of(options)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_values_outside_every_declared_range_are_rejected_naming_the_parameter(data):
    owner, name, base, bound, wrap = data.draw(st.sampled_from(RANGES))
    value = data.draw(outside(base, bound))
    with pytest.raises(ParameterError) as info:
        parse(owner, {name: wrap(value)})
    message = str(info.value)
    assert f"parameter {name!r}" in message and f"outside the allowed range {bound}" in message, message
    assert ("method" if owner != "training" else "training settings") in message


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_values_inside_every_declared_range_are_accepted(data):
    owner, name, base, bound, wrap = data.draw(st.sampled_from(RANGES))
    value = data.draw(inside(base, bound))
    parsed = parse(owner, {name: wrap(value)})
    params = parsed if owner == "training" else parsed.params
    assert getattr(params, name) == (tuple(wrap(value)) if isinstance(wrap(value), list) else value)


@pytest.mark.parametrize(
    ("owner", "values", "message"),
    [
        ("zipit", {"alpha": -1}, "method 'zipit', parameter 'alpha': -1.0 is outside the allowed range [0, 1]"),
        ("zipit", {"beta": 5}, "method 'zipit', parameter 'beta': 5.0 is outside the allowed range [0, 1]"),
        ("weight_matching", {"max_iter": -1}, "parameter 'max_iter': -1 is outside the allowed range [1, ∞)"),
        ("mudsc", {"lam": 1.5}, "method 'mudsc', parameter 'lam': 1.5 is outside the allowed range [0, 1]"),
        ("mudsc", {"lam_grid": [0.5, -0.1]}, "parameter 'lam_grid'[1]: -0.1 is outside the allowed range [0, 1]"),
        ("hetero", {"patience": 0}, "method 'hetero', parameter 'patience': 0 is outside the allowed range [1, ∞)"),
        ("training", {"lr": 0}, "training settings, parameter 'lr': 0.0 is outside the allowed range (0, ∞)"),
        ("training", {"epochs": 0}, "training settings, parameter 'epochs': 0 is outside the allowed range [1, ∞)"),
    ],
)
def test_reported_probes_are_rejected(owner, values, message):
    """zipit α −1, β 5 and weight_matching max_iter −1 used to be accepted; mudsc's λ check was hand-written."""
    with pytest.raises(ParameterError) as info:
        parse(owner, values)
    assert message in str(info.value)


def test_a_union_reports_the_range_not_the_types():
    with pytest.raises(ParameterError, match=r"'lam': 2.0 is outside the allowed range \[0, 1\]$"):
        build_method("mudsc", {"lam": 2})
    with pytest.raises(ParameterError, match=r"'lam': 'x' matches none of \['float', 'NoneType'\]"):
        build_method("mudsc", {"lam": "x"})
    assert build_method("mudsc", {"lam": None}).params.lam is None


@pytest.mark.parametrize("params", ["alpha=0.3", ["alpha", 0.3], 0.3])
def test_parameters_that_are_no_mapping_are_refused(params):
    """`build_method("zipit", "alpha=0.3")` used to fail with "dictionary update sequence element #0"."""
    with pytest.raises(ParameterError, match=r"method 'zipit': parameters must be a mapping of parameter names") as e:
        build_method("zipit", params)
    assert repr(params) in str(e.value) and "'alpha'" in str(e.value)


def test_range_text_and_membership():
    assert [str(r) for r in (Range(0, 1), Range(0, open_low=True), Range(1), Range(high=2, open_high=True))] == [
        "[0, 1]",
        "(0, ∞)",
        "[1, ∞)",
        "(-∞, 2)",
    ]
    assert 0 in Range(0, 1) and 1 in Range(0, 1) and 0 not in Range(0, open_low=True)
    assert math.nan not in Range() and math.inf not in Range(0)
