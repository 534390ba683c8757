"""The merge-method registry. Importing this package registers every built-in method."""

from hetmerge.methods import average, ensemble, hetero, mudsc, permute, weight_matching, zipit
from hetmerge.methods.base import (
    REGISTRY,
    MergeContext,
    MergeError,
    MergeMethod,
    MethodParams,
    MethodWarning,
    build_method,
    register,
)

__all__ = [
    "REGISTRY",
    "MergeContext",
    "MergeError",
    "MergeMethod",
    "MethodParams",
    "MethodWarning",
    "average",
    "build_method",
    "ensemble",
    "hetero",
    "mudsc",
    "permute",
    "register",
    "weight_matching",
    "zipit",
]
