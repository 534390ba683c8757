"""Atomic writes: temp files of killed writers are cleaned up, those of live writers never are."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from hetmerge.atomic import atomic_path, write_json

# Opens an atomic write of argv[1], writes half of it, reports its temp file and waits to be killed.
WRITER = """
import sys, time
from hetmerge.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("half a file")
    print(tmp, flush=True)
    time.sleep(600)
"""


def start_writer(target: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line, f"writer exited with {proc.wait(30)}"
    return proc, Path(line)


def temps(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.endswith(".tmp"))


def test_killed_writers_temp_file_is_removed_by_next_write(tmp_path: Path) -> None:
    target = tmp_path / "out" / "result.json"
    proc, tmp = start_writer(target)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert tmp.exists() and tmp.name.startswith(".result.json.")  # the kill left it behind
    write_json(target, {"a": 1})
    assert temps(target) == []
    assert json.loads(target.read_text()) == {"a": 1}


def test_live_writers_temp_file_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    proc, tmp = start_writer(target)
    try:
        write_json(target, {"a": 1})  # a concurrent writer of the same target, in another process
        with atomic_path(target) as mine:  # and one in this process
            mine.write_text("{}")
            write_json(target, {"b": 2})
            assert sorted([tmp.name, mine.name]) == temps(target)
        assert tmp.read_text() == "half a file"
    finally:
        proc.kill()
        proc.wait(30)


def test_only_the_targets_own_temp_files_are_touched(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    proc, other = start_writer(tmp_path / "a.json.bak")  # its temp name starts with `.a.json.`, too
    proc.kill()
    proc.wait(30)
    foreign = tmp_path / ".a.json.0123456789ab-999999999.xyz.tmp"  # another machine's writer: cannot be checked
    foreign.write_text("")
    write_json(target, {})
    assert other.exists() and foreign.exists()
