"""The merge-method registry. Importing this package registers every built-in method."""

from hetmerge.methods import average, ensemble, hetero, mudsc, permute, weight_matching, zipit
from hetmerge.methods.base import (
    ANALYSES,
    PRECOMPUTE,
    REGISTRY,
    Choice,
    MergeContext,
    MergeError,
    MergeMethod,
    MethodParams,
    MethodWarning,
    Precompute,
    build_method,
    first_best,
    register,
    register_precompute,
)

__all__ = [
    "ANALYSES",
    "PRECOMPUTE",
    "REGISTRY",
    "Choice",
    "MergeContext",
    "MergeError",
    "MergeMethod",
    "MethodParams",
    "MethodWarning",
    "Precompute",
    "average",
    "build_method",
    "ensemble",
    "first_best",
    "hetero",
    "mudsc",
    "permute",
    "register",
    "register_precompute",
    "weight_matching",
    "zipit",
]
