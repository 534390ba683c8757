"""Typed parameters from plain config mappings, with errors that name the culprit.

Merge methods, architectures and training declare their parameters as frozen dataclasses; this module turns
a config mapping into such a dataclass, rejecting unknown keys (listing the known ones), values of the wrong
type and numbers outside their declared range (`Annotated[float, Range(0, 1)]`). One parser for all keeps
config errors uniform, and a range is declared once, next to the parameter, instead of checked by hand.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

T = TypeVar("T")


class ParameterError(ValueError):
    """A config value does not fit the declared parameters."""


class ParameterRangeError(ParameterError):
    """A number of the right type outside its declared range (reported as such even inside a union)."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The allowed values of a number parameter: `Annotated[float, Range(0, 1)]`, enforced by `parse_params`.

    A missing bound is unbounded; `open_low`/`open_high` exclude the bound itself (`Range(0, open_low=True)`:
    > 0). NaN and ±inf are never in a range.
    """

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.open_high and value == self.high))

    def __str__(self) -> str:
        low = "(-∞" if self.low is None else f"{'(' if self.open_low else '['}{self.low:g}"
        high = "∞)" if self.high is None else f"{self.high:g}{')' if self.open_high else ']'}"
        return f"{low}, {high}"


def _name(hint: Any) -> str:
    if typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    return getattr(hint, "__name__", str(hint))


def _check(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin is Annotated:
        value = _check(value, args[0], where)
        for bound in args[1:]:
            if isinstance(bound, Range) and value not in bound:
                raise ParameterRangeError(f"{where}: {value!r} is outside the allowed range {bound}")
        return value
    if origin is typing.Literal:
        if value not in args:
            raise ParameterError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _check(value, option, where)
            except ParameterRangeError:
                raise
            except ParameterError:
                continue
        raise ParameterError(f"{where}: {value!r} matches none of {[_name(a) for a in args]}")
    if hint is type(None):
        if value is not None:
            raise ParameterError(f"{where}: expected null, got {value!r}")
        return None
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ParameterError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_check(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ParameterError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParameterError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParameterError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ParameterError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported parameter type {hint!r}")


def parse_params(cls: type[T], values: Mapping[str, Any] | None, what: str) -> T:
    """Build dataclass `cls` from `values`; `what` names the owner in error messages (e.g. "method 'zipit'")."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if values is not None and not isinstance(values, Mapping):
        raise ParameterError(
            f"{what}: parameters must be a mapping of parameter names to values (known parameters: "
            f"{sorted(fields)}), e.g. a dict; got the {type(values).__name__} {values!r}"
        )
    values = dict(values or {})
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ParameterError(f"{what}: unknown parameter(s) {unknown}; known parameters: {sorted(fields)}")
    hints = typing.get_type_hints(cls, include_extras=True)
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _check(value, hints[name], f"{what}, parameter {name!r}")
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ParameterError(f"{what}: missing required parameter(s) {missing}")
    return cls(**kwargs)


def as_dict(params: Any) -> dict[str, Any]:
    """Plain-builtin form of a parameter dataclass (for JSON metadata and Snakemake params)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(params).items()}
