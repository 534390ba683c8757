"""Fixed cost per job: wall time of `python -m hetmerge methods` in-process, through a cold worker server and
through a warm one, with the client's peak memory. See benchmarks/README.md."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_once(command: list[str], env: dict[str, str]) -> tuple[float, float, bytes]:
    """Wall seconds, peak RSS (MB) of the process started (its own, not the server's) and its stdout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "hetmerge", *command], env=env, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"`hetmerge {' '.join(command)}` exited with {proc.returncode}")
    return seconds, usage.ru_maxrss / 1024, out


def server_pids(folder: Path) -> list[int]:
    """Servers of `folder`: each writes its pid into the lock it holds."""
    return [int(t) for lock in folder.glob("*.lock") if (t := lock.read_text().strip()).isdecimal()]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stop(folder: Path) -> None:
    for pid in server_pids(folder):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    shutil.rmtree(folder, ignore_errors=True)


def measure(command: list[str], repeats: int, cold_repeats: int) -> tuple[list[dict[str, object]], float]:
    """Rows per mode, and the warm server's resident memory in MB."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HETMERGE_WORKER", "SLURM_"))}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)
    runs: dict[str, list[tuple[float, float, bytes]]] = {"in-process": [], "cold server": [], "warm server": []}
    folders = []
    server_mb = float("nan")
    try:
        for _ in range(cold_repeats):
            runs["in-process"].append(run_once(command, {**base, "HETMERGE_WORKER": "0"}))
            folders.append(Path(tempfile.mkdtemp(prefix="hw-bench", dir="/tmp")))
            env = {**base, "HETMERGE_WORKER_DIR": str(folders[-1]), "HETMERGE_WORKER_IDLE": "60"}
            runs["cold server"].append(run_once(command, env))
        for _ in range(repeats):
            runs["warm server"].append(run_once(command, env))
        server_mb = sum(rss_mb(pid) for pid in server_pids(folders[-1]))
    finally:
        for folder in folders:
            stop(folder)
    reference = runs["in-process"][0][2]
    rows = [
        {
            "mode": mode,
            "runs": len(results),
            "median_s": round(statistics.median(r[0] for r in results), 3),
            "min_s": round(min(r[0] for r in results), 3),
            "max_s": round(max(r[0] for r in results), 3),
            "client_peak_rss_mb": round(max(r[1] for r in results), 1),
            "same_output": all(r[2] == reference for r in results),
        }
        for mode, results in runs.items()
    ]
    return rows, round(server_mb, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--command", nargs="+", default=["methods"], help="hetmerge arguments (default: methods)")
    parser.add_argument("--repeats", type=int, default=10, help="warm-server runs (median)")
    parser.add_argument("--cold-repeats", type=int, default=3, help="in-process and cold-server runs")
    parser.add_argument("--json", action="store_true", help="a JSON object instead of a table")
    args = parser.parse_args()
    rows, server_mb = measure(args.command, args.repeats, args.cold_repeats)
    if args.json:
        print(json.dumps({"command": args.command, "rows": rows, "server_rss_mb": server_mb}, indent=2))
    else:
        print(f"`python -m hetmerge {' '.join(args.command)}`, {os.cpu_count()} cores")
        header = list(rows[0])
        print("  ".join(f"{h:>18}" for h in header))
        for row in rows:
            print("  ".join(f"{row[h]!s:>18}" for h in header))
        print(f"warm server resident memory: {server_mb} MB (shared with its children until they write)")
    return 0 if all(row["same_output"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
