"""Typed parameters from plain config mappings, with errors that name the culprit.

Merge methods and architectures declare their parameters as frozen dataclasses; this module turns a
config mapping into such a dataclass, rejecting unknown keys (listing the known ones) and values of the
wrong type. One parser for both keeps config errors uniform.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ParameterError(ValueError):
    """A config value does not fit the declared parameters."""


def _check(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin is typing.Literal:
        if value not in args:
            raise ParameterError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _check(value, option, where)
            except ParameterError as err:
                errors.append(str(err))
        raise ParameterError(f"{where}: {value!r} matches none of {[getattr(a, '__name__', a) for a in args]}")
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
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ParameterError(f"{what}: unknown parameter(s) {unknown}; known parameters: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
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
