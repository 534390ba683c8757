"""Inputs the pipeline computes once per ordered list of models and seed, for every merge that reads them.

A method names them (`MergeMethod.precomputed_inputs`); the function registered under the name computes the
record from the models (on the device, in eval mode) and a `MergeContext` over the merge slice (its images,
and their labels where the split has one task), and returns it JSON-ready; `MergeContext.precomputed` hands it
back to the method. It lives apart from the methods so that the modules whose computations they are (the depth
alignment, neuron importance) can register them without importing the methods.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hetmerge.methods.base import MergeContext
    from hetmerge.models import MultiTaskNet

Precompute = Callable[["Sequence[MultiTaskNet]", "MergeContext"], dict[str, Any]]

PRECOMPUTE: dict[str, Precompute] = {}


def register_precompute(name: str, compute: Precompute) -> None:
    """Name the function that computes the precomputed input `name`."""
    if name in PRECOMPUTE:
        raise ValueError(f"precomputed input {name!r} registered twice")
    PRECOMPUTE[name] = compute
