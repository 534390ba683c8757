"""The warm worker (hetmerge.worker): `python -m hetmerge` through a forked child of a server behaves as the
same command run in-process.

Most tests run a stand-in package on PYTHONPATH: the real __init__.py, __main__.py and worker.py next to a
small cli.py whose commands show what a job sees. Its servers start in milliseconds, and the tests do not
depend on the rest of the package. The tests that need the real stack (output of real commands, torch
threads in a forked child) use a copy of the whole package. Every test has its own socket directory
(HETMERGE_WORKER_DIR), and the fixture stops every server started there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SRC = Path(__file__).resolve().parents[1] / "src" / "hetmerge"
TIMEOUT = 120

STAND_IN_CLI = '''
"""Stand-in for hetmerge.cli in tests/test_worker.py."""
import json
import os
import sys
import time

VERSION = 1


def main(argv):
    command, *rest = argv
    if command == "show":  # what the job sees, then output on both streams and the exit code asked for
        umask = os.umask(0)
        print(json.dumps({"pid": os.getpid(), "server": os.getppid(), "cwd": os.getcwd(), "argv": sys.argv[1:],
                          "env": os.environ.get("HW_VALUE"), "umask": umask, "version": VERSION,
                          "modules": sorted(m for m in ("torch", "numpy") if m in sys.modules)}))
        for i in range(3):
            print(f"out {i}")
            print(f"err {i}", file=sys.stderr)
        return int(rest[0]) if rest else 0
    if command == "sleep":  # write the pid, then wait to be killed
        with open(rest[0], "w") as handle:
            handle.write(str(os.getpid()))
        time.sleep(60)
    if command == "raise":
        raise RuntimeError("boom")
    if command == "exit":
        sys.exit(rest[0])
    return 0
'''

TORCH_CHECK = '''

_cli_main = main


def main(argv=None):
    """Test command `torch-check`: seeded threaded CPU kernels, then unseeded draws (torch, numpy, random)."""
    if argv and argv[0] == "torch-check":
        import hashlib
        import random

        import numpy
        import torch

        unseeded = (torch.rand(1).item(), numpy.random.rand(), random.random())
        torch.set_num_threads(2)
        torch.manual_seed(0)
        x = torch.randn(300, 300)
        y = torch.nn.functional.conv2d(torch.randn(8, 3, 64, 64), torch.randn(16, 3, 5, 5))
        print(torch.get_num_threads(), hashlib.sha256((x @ x).numpy().tobytes() + y.numpy().tobytes()).hexdigest())
        print(*unseeded)
        return 0
    return _cli_main(argv)
'''


def _worker_process(pid: int, folder: Path) -> bool:
    """Whether `pid` is a hetmerge.worker server of `folder` (so that a reused pid is never killed)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"hetmerge.worker" in cmdline and any(arg.startswith(os.fsencode(folder)) for arg in cmdline)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:  # it exited between the two looks
        return False


def _wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not _alive(pid)


def servers(folder: Path) -> list[int]:
    """Pids of the live servers of `folder` (each writes its pid into the lock it holds)."""
    pids = [int(text) for lock in folder.glob("*.lock") if (text := lock.read_text().strip()).isdecimal()]
    return [pid for pid in pids if _worker_process(pid, folder)]


@pytest.fixture
def worker_dir() -> Iterator[Path]:
    """A short private socket directory (sockaddr_un holds ~108 bytes); its servers are stopped at the end."""
    folder = Path(tempfile.mkdtemp(prefix="hw", dir="/tmp"))
    yield folder
    for pid in servers(folder):
        os.kill(pid, signal.SIGTERM)
        assert _wait_gone(pid), f"server {pid} did not stop"
    shutil.rmtree(folder)


def make_package(root: Path, cli: str | None = None) -> Path:
    """`root`/hetmerge: the real package (cli None) or the stand-in with `cli` as cli.py; returns `root`."""
    package = root / "hetmerge"
    if cli is None:
        shutil.copytree(SRC, package, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        package.mkdir(parents=True)
        for name in ("__init__.py", "__main__.py", "worker.py"):
            shutil.copy(SRC / name, package / name)
        (package / "cli.py").write_text(cli)
    return root


@pytest.fixture
def stand_in(tmp_path: Path) -> Path:
    return make_package(tmp_path / "pkg", STAND_IN_CLI)


def environment(package_root: Path, folder: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HETMERGE_WORKER", "SLURM_"))}
    env.update(PYTHONPATH=str(package_root), HETMERGE_WORKER_DIR=str(folder), HETMERGE_WORKER_IDLE="60")
    return {**env, **extra}


def hetmerge(
    argv: list[str], env: dict[str, str], cwd: Path | None = None, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hetmerge", *argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        **kwargs,  # type: ignore[call-overload]
    )


def show(env: dict[str, str], *argv: str, cwd: Path | None = None) -> tuple[dict, subprocess.CompletedProcess[str]]:
    proc = hetmerge(["show", *argv], env, cwd)
    return json.loads(proc.stdout.splitlines()[0]), proc


@pytest.mark.parametrize("unbuffered", [False, True])
def test_job_runs_in_a_forked_child_with_the_clients_cwd_env_umask_and_streams(
    stand_in: Path, worker_dir: Path, tmp_path: Path, unbuffered: bool
) -> None:
    env = environment(stand_in, worker_dir, HW_VALUE="from the client")
    env.pop("PYTHONUNBUFFERED", None)
    env.update({"PYTHONUNBUFFERED": "1"} if unbuffered else {})
    command = f"umask 027; {sys.executable} -m hetmerge show 4 'two words' > log 2>&1"
    ran = []
    for mode in ("1", "0"):
        proc = subprocess.run(
            ["sh", "-c", command], cwd=tmp_path, env={**env, "HETMERGE_WORKER": mode}, timeout=TIMEOUT, check=False
        )
        lines = (tmp_path / "log").read_text().splitlines()
        seen = json.loads(next(line for line in lines if line.startswith("{")))
        ran.append((proc.returncode, [line if line[0] != "{" else "{...}" for line in lines], seen))
    (code, output, seen), (code_0, output_0, seen_0) = ran
    assert code == code_0 == 4
    # stderr is line buffered; stdout to a file is block buffered unless PYTHONUNBUFFERED (then write-through)
    grouped = ["err 0", "err 1", "err 2", "{...}", "out 0", "out 1", "out 2"]
    interleaved = ["{...}", "out 0", "err 0", "out 1", "err 1", "out 2", "err 2"]
    assert output == output_0 == (interleaved if unbuffered else grouped)
    assert seen["server"] in servers(worker_dir) and seen_0["server"] not in servers(worker_dir)
    assert [seen[k] for k in ("cwd", "argv", "env", "umask")] == [seen_0[k] for k in ("cwd", "argv", "env", "umask")]
    assert [seen[k] for k in ("cwd", "argv", "env", "umask")] == [
        str(tmp_path),
        ["show", "4", "two words"],
        "from the client",
        0o027,
    ]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    args=st.lists(st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0"), max_size=12), max_size=4),
    value=st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0"), max_size=30),
)
def test_arguments_and_environment_reach_the_child_unchanged(
    stand_in: Path, worker_dir: Path, args: list[str], value: str
) -> None:
    seen, proc = show(environment(stand_in, worker_dir, HW_VALUE=value), "0", *args)
    assert proc.returncode == 0, proc.stderr
    assert seen["argv"] == ["show", "0", *args] and seen["env"] == value
    assert seen["server"] in servers(worker_dir)


@pytest.mark.parametrize(
    ("argv", "code", "last_line"),
    [
        (["raise"], 1, "RuntimeError: boom"),
        (["exit", "a message"], 1, "a message"),
        (["show", "300"], 300 & 0xFF, "err 2"),
    ],
)
def test_exit_codes_and_tracebacks_match_in_process(
    stand_in: Path, worker_dir: Path, argv: list[str], code: int, last_line: str
) -> None:
    """The traceback's frames differ (worker.py, not runpy), its message does not."""
    env = environment(stand_in, worker_dir)
    through, in_process = hetmerge(argv, env), hetmerge(argv, {**env, "HETMERGE_WORKER": "0"})
    assert through.returncode == in_process.returncode == code
    assert through.stderr.splitlines()[-1] == in_process.stderr.splitlines()[-1] == last_line
    assert ("Traceback" in through.stderr) is ("Traceback" in in_process.stderr)
    assert servers(worker_dir)


def test_client_imports_neither_the_cli_nor_torch(stand_in: Path, worker_dir: Path) -> None:
    """The client module, run as `python -m hetmerge` is, exits without having imported the heavy modules."""
    script = (
        "import json, runpy, sys\n"
        "sys.argv = ['hetmerge', 'show']\n"
        "try:\n"
        "    runpy.run_module('hetmerge', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exit_:\n"
        "    heavy = ('torch', 'numpy', 'pandas', 'matplotlib', 'hetmerge.cli')\n"
        "    print(json.dumps([exit_.code, [m for m in heavy if m in sys.modules]]), file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=environment(stand_in, worker_dir),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert json.loads(proc.stderr.splitlines()[-1]) == [0, []], proc.stderr
    assert json.loads(proc.stdout.splitlines()[0])["server"] in servers(worker_dir)


def test_a_source_change_starts_a_new_server(stand_in: Path, worker_dir: Path) -> None:
    env = environment(stand_in, worker_dir)
    first, _ = show(env)
    again, _ = show(env)
    assert first["server"] == again["server"] and first["pid"] != again["pid"]
    cli = stand_in / "hetmerge" / "cli.py"
    cli.write_text(cli.read_text().replace("VERSION = 1", "VERSION = 2"))
    edited, _ = show(env)
    assert edited["version"] == 2 and edited["server"] != first["server"]
    assert _wait_gone(first["server"]), "a server of old code did not retire"
    assert servers(worker_dir) == [edited["server"]]
    other_threads, _ = show({**env, "OMP_NUM_THREADS": "3"})  # read when libraries load: a key of its own
    assert other_threads["server"] not in (first["server"], edited["server"])


def test_working_directories_share_a_server_unless_they_hold_modules(
    stand_in: Path, worker_dir: Path, tmp_path: Path
) -> None:
    """`python -m` puts the working directory first on sys.path: its modules would shadow others in-process."""
    env = environment(stand_in, worker_dir)
    folders = [tmp_path / name for name in ("a", "b", "with_module", "with_package")]
    for folder in folders:
        folder.mkdir()
    (folders[2] / "some_module.py").write_text("")
    (folders[3] / "some_package" / "data").mkdir(parents=True)
    (folders[3] / "some_package" / "__init__.py").write_text("")
    (folders[1] / "namespace_only" / "data").mkdir(parents=True)  # no module: shadows nothing
    seen = [show(env, cwd=folder)[0] for folder in folders]
    assert [s["cwd"] for s in seen] == [str(f) for f in folders]
    assert seen[0]["server"] == seen[1]["server"]
    assert len({seen[0]["server"], seen[2]["server"], seen[3]["server"]}) == 3


def test_concurrent_clients_start_one_server(stand_in: Path, worker_dir: Path) -> None:
    env = environment(stand_in, worker_dir)
    clients = [
        subprocess.Popen([sys.executable, "-m", "hetmerge", "show"], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    seen = [json.loads(client.communicate(timeout=TIMEOUT)[0].splitlines()[0]) for client in clients]
    assert all(client.returncode == 0 for client in clients)
    assert len({s["server"] for s in seen}) == 1 and servers(worker_dir) == [seen[0]["server"]]
    assert len(list(worker_dir.glob("*.sock"))) == 1


@pytest.mark.parametrize(
    ("extra", "worker"),
    [
        ({"HETMERGE_WORKER": "0"}, False),
        ({"SLURM_JOB_ID": "7"}, False),
        ({"SLURM_JOB_ID": "7", "HETMERGE_WORKER": "1"}, True),
    ],
)
def test_off_and_inside_slurm_jobs_it_runs_in_process(
    stand_in: Path, worker_dir: Path, extra: dict[str, str], worker: bool
) -> None:
    env = environment(stand_in, worker_dir, **extra)
    client = subprocess.Popen([sys.executable, "-m", "hetmerge", "show"], env=env, stdout=subprocess.PIPE, text=True)
    seen = json.loads(client.communicate(timeout=TIMEOUT)[0].splitlines()[0])
    assert client.returncode == 0
    assert (seen["pid"] != client.pid) is worker and bool(servers(worker_dir)) is worker


@pytest.mark.parametrize("argv", [["show", "0", "--help"], ["--version"], ["show", "0", "-h"]])
def test_help_and_version_run_in_process_without_a_server(stand_in: Path, worker_dir: Path, argv: list[str]) -> None:
    """argparse answers these before any command runs: starting a server for them would only cost seconds."""
    env = environment(stand_in, worker_dir, HETMERGE_WORKER="1")
    client = subprocess.Popen([sys.executable, "-m", "hetmerge", *argv], env=env, stdout=subprocess.PIPE, text=True)
    out = client.communicate(timeout=TIMEOUT)[0]
    assert client.returncode == 0 and not servers(worker_dir)
    if argv[0] == "show":
        assert json.loads(out.splitlines()[0])["pid"] == client.pid


def test_an_unusable_socket_directory_runs_in_process(stand_in: Path, worker_dir: Path, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    for folder in (not_a_dir, shared):
        seen, proc = show(environment(stand_in, folder))
        assert proc.returncode == 0
        assert seen["server"] == os.getpid()  # our child, the client itself: no server
        assert proc.stderr.startswith("hetmerge: worker unavailable (") and "must be a directory" in proc.stderr


@pytest.mark.parametrize(("name", "value"), [("HETMERGE_WORKER", "yes"), ("HETMERGE_WORKER_IDLE", "soon")])
def test_bad_settings_are_one_line_errors(stand_in: Path, worker_dir: Path, name: str, value: str) -> None:
    proc = hetmerge(["show"], environment(stand_in, worker_dir, **{name: value}))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"hetmerge: error: {name} must be") and proc.stderr.count("\n") == 1


def test_an_idle_server_exits_and_cleans_up(stand_in: Path, worker_dir: Path) -> None:
    seen, _ = show(environment(stand_in, worker_dir, HETMERGE_WORKER_IDLE="0.3"))
    assert _wait_gone(seen["server"])
    assert list(worker_dir.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_stopping_the_client_stops_the_job(stand_in: Path, worker_dir: Path, tmp_path: Path, signum: int) -> None:
    """SIGTERM and SIGINT are forwarded (the client then dies of the same signal, as the job did); after a
    SIGKILL the child notices its lost connection."""
    pid_file = tmp_path / "pid"
    client = subprocess.Popen(
        [sys.executable, "-m", "hetmerge", "sleep", str(pid_file)],
        env=environment(stand_in, worker_dir),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + TIMEOUT
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and client.poll() is None
        time.sleep(0.02)
    job = int(pid_file.read_text())
    assert job != client.pid and _alive(job)
    client.send_signal(signum)
    _, err = client.communicate(timeout=TIMEOUT)
    assert client.returncode == -signum
    assert _wait_gone(job)
    assert ("KeyboardInterrupt" in err) is (signum == signal.SIGINT)


@pytest.fixture(scope="module")
def real_package(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A copy of the whole package, with a `torch-check` command, and the socket directory of its server."""
    root = make_package(tmp_path_factory.mktemp("real"))
    cli = root / "hetmerge" / "cli.py"
    cli.write_text(cli.read_text() + TORCH_CHECK)
    folder = Path(tempfile.mkdtemp(prefix="hw", dir="/tmp"))
    yield root, folder
    for pid in servers(folder):
        os.kill(pid, signal.SIGTERM)
        assert _wait_gone(pid)
    shutil.rmtree(folder)


@pytest.mark.parametrize("argv", [["methods"], ["inspect", "/nonexistent"], ["torch-check"]])
def test_real_commands_give_what_they_give_in_process(real_package: tuple[Path, Path], argv: list[str]) -> None:
    """Same stdout, stderr and exit code; torch-check runs threaded kernels in a child forked from a server that
    imported the whole stack (no deadlock, the same numbers as in a fresh process)."""
    root, folder = real_package
    env = environment(root, folder)
    through, in_process = hetmerge(argv, env), hetmerge(argv, {**env, "HETMERGE_WORKER": "0"})
    assert servers(folder), through.stderr
    seeded = 1 if argv[0] == "torch-check" else None  # the rest are unseeded draws
    assert (through.returncode, through.stdout.splitlines()[:seeded], through.stderr) == (
        in_process.returncode,
        in_process.stdout.splitlines()[:seeded],
        in_process.stderr,
    )
    if argv[0] == "inspect":
        assert through.returncode == 1 and through.stderr.count("\n") == 1
    if argv[0] == "torch-check":
        assert through.stdout.startswith("2 ")
        again = hetmerge(argv, env).stdout.splitlines()
        unseeded = [
            set(run.split()) for run in (again[1], through.stdout.splitlines()[1], in_process.stdout.splitlines()[1])
        ]
        assert not set.intersection(*unseeded), "children share the state of an unseeded random generator"
