"""Device claiming with flock'ed lock files, across real (spawned) processes."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import re
import time
from pathlib import Path

import pytest
import torch
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

import hetmerge.devices
from hetmerge.devices import claim_slot, default_jobs_per_gpu, release_all, select_device

MP = multiprocessing.get_context("spawn")
WAIT_S = 60  # generous bound for spawned interpreters to import torch on a busy machine


def hold_slot(name, lock_dir, n_slots, events, release):
    """Child: claim a slot, report it, hold it until told to release (by exiting)."""
    events.put(("waiting", name, None))
    index = claim_slot(n_slots, Path(lock_dir), timeout_s=WAIT_S, poll_s=0.05)
    events.put(("got", name, index))
    release.wait(WAIT_S)


def fake_gpus(monkeypatch, n_devices):
    """Pretend `n_devices` CUDA devices are visible (torch.device('cuda', k) needs no driver)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n_devices)


def select_on_fake_gpus(name, lock_dir, n_devices, jobs_per_gpu, events, release):
    """Child: `select_device('auto')` as a pipeline job does, on fake devices; reports its device and slot."""
    os.environ.update(HETMERGE_LOCK_DIR=lock_dir, HETMERGE_JOBS_PER_GPU=str(jobs_per_gpu))
    fake_gpus(pytest.MonkeyPatch(), n_devices)
    events.put(("waiting", name, None))
    device = select_device("auto")
    events.put(("got", name, (device.index, Path(hetmerge.devices._held[-1].name).name)))
    release.wait(WAIT_S)


def crash_holding_slot(lock_dir, events, crash):
    index = claim_slot(1, Path(lock_dir), timeout_s=WAIT_S, poll_s=0.05)
    events.put(("got", "crasher", index))
    crash.wait(WAIT_S)
    os._exit(3)  # no cleanup of any kind


class Inbox:
    """Events from the children, kept so that they can be awaited in any order."""

    def __init__(self):
        self.queue = MP.Queue()
        self.seen = []

    def wait_for(self, kind, name, timeout=WAIT_S):
        deadline = time.monotonic() + timeout
        while True:
            for event in self.seen:
                if event[:2] == (kind, name):
                    return event[2]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise queue.Empty(f"no {kind!r} event from {name} within {timeout}s")
            with contextlib.suppress(queue.Empty):
                self.seen.append(self.queue.get(timeout=remaining))


@pytest.fixture
def processes():
    started = []

    def start(target, *args):
        started.append(MP.Process(target=target, args=args, daemon=True))
        started[-1].start()
        return started[-1]

    yield start
    for p in started:
        p.kill()
        p.join(5)


@pytest.fixture
def in_process_cleanup():
    yield
    release_all()


def test_concurrent_holders_get_distinct_slots_and_a_waiter_gets_a_freed_one(tmp_path, processes):
    n = 2
    inbox = Inbox()
    releases = {f"h{i}": MP.Event() for i in range(n)}
    holders = {name: processes(hold_slot, name, str(tmp_path), n, inbox.queue, ev) for name, ev in releases.items()}
    slots = {name: inbox.wait_for("got", name) for name in holders}
    assert sorted(slots.values()) == list(range(n))

    waiter_release = MP.Event()  # kept referenced: the child rebuilds it from its name
    processes(hold_slot, "w", str(tmp_path), n, inbox.queue, waiter_release)
    inbox.wait_for("waiting", "w")
    with pytest.raises(queue.Empty):  # every slot is held: the waiter must keep waiting
        inbox.wait_for("got", "w", timeout=1.5)

    freed = "h1"
    releases[freed].set()
    holders[freed].join(WAIT_S)
    assert holders[freed].exitcode == 0
    assert inbox.wait_for("got", "w") == slots[freed]


def test_a_crashed_holder_releases_its_slot(tmp_path, processes, in_process_cleanup):
    inbox, crash = Inbox(), MP.Event()
    child = processes(crash_holding_slot, str(tmp_path), inbox.queue, crash)
    assert inbox.wait_for("got", "crasher") == 0
    with pytest.raises(TimeoutError):
        claim_slot(1, tmp_path, timeout_s=0.2, poll_s=0.05)
    crash.set()
    child.join(WAIT_S)
    assert child.exitcode == 3
    assert claim_slot(1, tmp_path, timeout_s=5, poll_s=0.05) == 0


def test_timeout_is_bounded_and_names_the_lock_dir(tmp_path, in_process_cleanup):
    assert claim_slot(2, tmp_path) == 0
    assert claim_slot(2, tmp_path) == 1  # flock conflicts between open file descriptions, even in one process
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=f"all 2 device locks in {re.escape(str(tmp_path))}"):
        claim_slot(2, tmp_path, timeout_s=0.3, poll_s=0.05)
    assert 0.3 <= time.monotonic() - t0 < 5.0  # bounded: the deadline is checked on every round
    release_all()
    assert claim_slot(2, tmp_path, timeout_s=0) == 0


def test_claim_needs_a_slot(tmp_path):
    with pytest.raises(ValueError, match="at least one slot"):
        claim_slot(0, tmp_path)


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("cuda:1") == torch.device("cuda", 1)
    if not torch.cuda.is_available():
        assert select_device("auto") == torch.device("cpu")
        assert select_device() == torch.device("cpu")


@pytest.mark.parametrize("request_", ["gpu", "CPU", "", "cuda", "cuda0"])
def test_select_device_rejects_bad_strings(request_):
    with pytest.raises(ValueError, match="'auto', 'cpu' or 'cuda:N'"):
        select_device(request_)


@pytest.mark.parametrize("request_", ["cuda:x", "cuda:-1"])
def test_select_device_rejects_bad_cuda_index(request_):
    with pytest.raises(ValueError):
        select_device(request_)


def test_jobs_share_gpus_with_one_slot_each(tmp_path, processes):
    """2 GPUs × 2 jobs per GPU: four concurrent jobs hold four distinct slots, two on each GPU; a fifth waits."""
    inbox = Inbox()
    releases = {f"j{i}": MP.Event() for i in range(5)}
    args = (str(tmp_path), 2, 2, inbox.queue)
    for name in list(releases)[:4]:
        processes(select_on_fake_gpus, name, *args, releases[name])
    got = [inbox.wait_for("got", f"j{i}") for i in range(4)]
    assert sorted(slot for _, slot in got) == [f"slot{k}.lock" for k in range(4)]
    assert sorted(device for device, _ in got) == [0, 0, 1, 1]
    processes(select_on_fake_gpus, "j4", *args, releases["j4"])
    inbox.wait_for("waiting", "j4")
    with pytest.raises(queue.Empty):
        inbox.wait_for("got", "j4", timeout=1.5)


def test_jobs_spread_over_gpus_before_sharing_one(tmp_path, monkeypatch, in_process_cleanup):
    fake_gpus(monkeypatch, 2)
    monkeypatch.setenv("HETMERGE_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("HETMERGE_JOBS_PER_GPU", "3")
    assert [select_device("auto").index for _ in range(6)] == [0, 1, 0, 1, 0, 1]
    with pytest.raises(TimeoutError, match="all 6 device locks"):
        claim_slot(6, tmp_path, timeout_s=0)


@pytest.mark.parametrize("value", ["0", "-1", "two", "", "1.5"])
def test_jobs_per_gpu_must_be_a_positive_integer(monkeypatch, value):
    monkeypatch.setenv("HETMERGE_JOBS_PER_GPU", value)
    with pytest.raises(ValueError, match="HETMERGE_JOBS_PER_GPU must be an integer >= 1"):
        default_jobs_per_gpu()


def test_jobs_per_gpu_defaults_to_one(monkeypatch):
    monkeypatch.delenv("HETMERGE_JOBS_PER_GPU", raising=False)
    assert default_jobs_per_gpu() == 1


def minimal_config(**compute):
    return {
        "dataset": {"name": "digits"},
        "split": {"seeds": [0]},
        "architectures": {"mlp": {"family": "mlp"}},
        "methods": {"ensemble": {"method": "ensemble"}},
        "experiments": {"mlp": {"models": ["mlp", "mlp"], "methods": ["ensemble"]}},
        "compute": compute,
    }


def test_schema_defaults_jobs_per_gpu_to_one_and_rejects_zero():
    schema = str(Path(__file__).resolve().parents[1] / "config" / "schema.yaml")
    config = minimal_config()
    validate(config, schema, set_default=True)
    assert config["compute"]["jobs_per_gpu"] == 1
    validate(minimal_config(jobs_per_gpu=4), schema)
    with pytest.raises(WorkflowError, match="jobs_per_gpu"):
        validate(minimal_config(jobs_per_gpu=0), schema)
