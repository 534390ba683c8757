"""Atomic file output: a job that dies mid-write must never leave a plausible-looking half file behind."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; it is renamed onto `path` only if the block succeeds.

    The temporary file lives in the same directory so that the final `os.replace` is atomic on POSIX. Mode
    and fsync are applied after the block, to whatever file is then at the temporary path: writers such as
    safetensors' `save_file` replace it with a new owner-only (0600) file instead of writing into it.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # the usual permissions, not mkstemp's (or the writer's) owner-only ones
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # data on disk before the rename, so a crash cannot leave an empty file at `path`
        finally:
            os.close(fd)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a file for writing that appears at `path` only once it is completely written (and fsynced)."""
    with atomic_path(path) as tmp, open(tmp, mode) as handle:
        yield handle


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON atomically with sorted keys, so identical results give identical bytes."""
    with atomic_open(path) as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
