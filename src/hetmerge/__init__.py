"""hetmerge: merge neural networks trained from different initializations, tasks, depths and widths.

The top-level names are imported lazily so that light consumers (the report stage) never load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "build_model": "hetmerge.models",
    "merge": "hetmerge.api",
    "save_model": "hetmerge.checkpoint",
    "load_model": "hetmerge.checkpoint",
    "collect_statistics": "hetmerge.statistics",
    "draw_few_shot": "hetmerge.data.few_shot",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hetmerge' has no attribute {name!r}")
