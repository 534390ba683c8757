"""What produced a result: code version, package versions and device. No timestamps (they defeat reruns)."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from hetmerge.devices import describe_device

PACKAGES = ("hetmerge", "torch", "torchvision", "numpy", "scipy", "safetensors", "pot")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(args: list[str], cwd: Path | None) -> str:
    # --no-optional-locks: `git status` must not rewrite the index, so that concurrent jobs and the user's own
    # git commands never contend for its lock.
    return subprocess.run(
        ["git", "--no-optional-locks", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()


def git_state(where: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Commit of a git checkout and whether it had uncommitted changes to tracked files.

    By default the checkout holding this package's source, which is the code that ran (a Snakemake job may
    run in a copy of the workflow that is no checkout), else the working directory's; `where` names
    another directory. Commit and dirty flag are None where there is no checkout (or no git).
    """
    candidates = [Path(where)] if where is not None else [Path(__file__).resolve().parent, None]
    for cwd in candidates:
        try:
            commit = _git(["rev-parse", "HEAD"], cwd)
            dirty = bool(_git(["status", "--porcelain", "--untracked-files=no"], cwd))
        except (OSError, subprocess.SubprocessError):
            continue
        return {"commit": commit, "dirty": dirty}
    return {"commit": None, "dirty": None}


def provenance(device: torch.device) -> dict[str, Any]:
    """What every result JSON records about how it was produced: code version, package versions and device.

    `cuda` is the CUDA version torch was built for (None for a CPU-only build), also on a CPU run: a property of
    the install, not of the device, which `device` names.
    """
    return {
        "git": git_state(),
        "packages": {p: _version(p) for p in PACKAGES},
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "device": describe_device(device),
    }
