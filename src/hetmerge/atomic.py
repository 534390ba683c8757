"""Atomic file output: a job that dies mid-write must never leave a plausible-looking half file behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _writer_tag() -> str:
    """This machine and PID namespace, hashed: a process ID in a temp file's name means something only here."""
    try:
        pid_namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc (macOS): one PID namespace per host
        pid_namespace = 0
    return hashlib.sha256(f"{socket.gethostname()}/{pid_namespace}".encode()).hexdigest()[:12]


def _pid_alive(pid: int) -> bool:
    """Signal 0 only checks that the process exists; an unreaped (zombie) writer counts as alive: the safe side."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _remove_stale_temps(target: Path, tag: str) -> None:
    """Delete the temp files of `target` left by killed writers, so that kills do not pile up hidden files.

    A temp file is named after its writer's process ID; it is stale when that writer ran on this machine
    (same tag) and no process has its ID any more. Not a lock: safetensors replaces the temp file with a new
    inode, so a lock on it would not survive, and locks on network filesystems may be node-local. Temp files of
    other machines are never touched (their writers cannot be checked from here), and a reused ID only keeps
    a stale file, never removes a live one.
    """
    pattern = re.compile(rf"\.{re.escape(target.name)}\.{tag}-(\d+)\.[^.]+\.tmp")
    with os.scandir(target.parent) as entries:
        stale = [e.path for e in entries if (m := pattern.fullmatch(e.name)) and not _pid_alive(int(m.group(1)))]
    for path in stale:
        # Gone already (another writer cleaned it), or another user's in a sticky directory: leave it be.
        with contextlib.suppress(FileNotFoundError, PermissionError):
            os.unlink(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; it is renamed onto `path` only if the block succeeds.

    The temporary file lives in the same directory so that the final `os.replace` is atomic on POSIX. Mode
    and fsync are applied after the block, to whatever file is then at the temporary path: writers such as
    safetensors' `save_file` replace it with a new owner-only (0600) file instead of writing into it.
    Temp files that killed writers left for the same target are removed first.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = _writer_tag()
    _remove_stale_temps(target, tag)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{tag}-{os.getpid()}.", suffix=".tmp", dir=target.parent)
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
