"""What produced a result: code version, package versions and device. No timestamps (they defeat reruns)."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from typing import Any

import torch

from hetmerge.devices import describe_device

PACKAGES = ("hetmerge", "torch", "torchvision", "numpy", "scipy", "safetensors", "pot")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_state() -> dict[str, Any]:
    """Commit of the working directory's repository and whether it had uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                check=True,
                timeout=10,
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def provenance(device: torch.device) -> dict[str, Any]:
    return {
        "git": git_state(),
        "packages": {p: _version(p) for p in PACKAGES},
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "device": describe_device(device),
    }
