"""Device choice for jobs that Snakemake schedules under `--resources gpu=N`.

Snakemake only caps how many GPU jobs run at once; it never says which GPU a job gets. Each job therefore
claims a device itself by taking a non-blocking `flock` on one of `jobs_per_gpu × GPUs` node-local lock files
(slots). The kernel drops the lock when the process exits, so a crashed job never blocks a device forever.
Slot k runs on GPU k mod GPUs: the first free slot is taken, so jobs spread over the GPUs before they share
one, and slot k means the same GPU whatever `jobs_per_gpu` a concurrent run on the node uses.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
import time
from pathlib import Path
from typing import IO

import torch

_held: list[IO[bytes]] = []  # lock files kept open for the life of the process


def default_lock_dir() -> Path:
    return Path(os.environ.get("HETMERGE_LOCK_DIR", Path(tempfile.gettempdir()) / f"hetmerge-locks-{os.getuid()}"))


def default_jobs_per_gpu() -> int:
    """Jobs that may share one GPU: config `compute.jobs_per_gpu`, which the workflow exports to its jobs.

    An environment variable rather than a rule parameter, so that changing it reruns nothing: it schedules
    jobs and changes no result.
    """
    value = os.environ.get("HETMERGE_JOBS_PER_GPU", "1")
    if not value.isdecimal() or int(value) < 1:
        raise ValueError(f"HETMERGE_JOBS_PER_GPU must be an integer >= 1, got {value!r}")
    return int(value)


def claim_slot(n_slots: int, lock_dir: Path, timeout_s: float = 3600.0, poll_s: float = 0.5) -> int:
    """Return the index of the first of `n_slots` lock files this process could lock; wait if all are taken."""
    if n_slots < 1:
        raise ValueError("claim_slot needs at least one slot")
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    while True:
        for index in range(n_slots):
            handle = open(lock_dir / f"slot{index}.lock", "ab")  # noqa: SIM115 (held open on purpose)
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _held.append(handle)
            return index
        if time.monotonic() > deadline:
            raise TimeoutError(f"all {n_slots} device locks in {lock_dir} stayed busy for {timeout_s:.0f}s")
        time.sleep(poll_s)


def release_all() -> None:
    """Drop every device lock this process holds (tests; jobs just exit)."""
    while _held:
        _held.pop().close()


def select_device(request: str = "auto") -> torch.device:
    """'cpu', an explicit 'cuda:N', or 'auto': a free slot on a visible CUDA device if any, else the CPU."""
    if request == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda:\d+", request):
        return torch.device(request)
    if request != "auto":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda:N', got {request!r}")
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    return torch.device("cuda", claim_slot(default_jobs_per_gpu() * count, default_lock_dir()) % count)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"
