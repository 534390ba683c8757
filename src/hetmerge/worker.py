"""A warm worker, so that a pipeline job does not pay for importing torch and the method stack each time.

Why: a Snakemake job runs `python -m hetmerge ...`. Importing torch and the hetmerge stack takes seconds,
while a merge itself often takes less than one.

How: `python -m hetmerge ARGS` is a light client; it imports no torch, numpy or hetmerge.cli. It connects to
the Unix socket of a server that has imported every hetmerge module, and with them torch, numpy, pandas and
matplotlib. The server has run no torch operation, so no thread pool or CUDA context exists that a fork would
break. The server forks one child per request. The child takes over from the client:
- stdin, stdout and stderr, passed as file descriptors, with their encoding and buffering;
- the working directory, environment, umask and CPU affinity.
The child gives torch's and numpy's global generators fresh entropy, as a new process has them. Then it runs
`hetmerge.cli.main(ARGS)`. Redirections, exit codes, tracebacks and signal deaths therefore look as they do
in-process. The client exits with the child's code, or dies of the child's signal. It forwards SIGINT,
SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to the child. A child whose client disappears (SIGKILL, a lost
connection) kills itself.

A server serves one key, a hash of everything that decides what a child runs:
- the interpreter and its flags;
- sys.path (PYTHONPATH, the working directory where it holds modules) and the modification times of its
  directories, which a package installation changes;
- the environment variables that take effect when a library loads (PYTHON*, OMP_*, MKL_*, OPENBLAS_*,
  LC_*, ...). Snakemake sets the thread variables per rule, so rules with other thread counts get their own
  server;
- the path, size and mtime of every file in the hetmerge package.
A code edit therefore gets a fresh server. A stale server never runs old code: it stops accepting jobs
within seconds of the edit, and exits once its jobs are done. Otherwise a server exits after an idle period
without jobs. The socket, its lock and the server's log are `<key>.sock`, `<key>.lock` and `<key>.log` in a
private (0700) directory. If no server answers, the client starts one, detached in its own session. The lock
ensures that concurrent clients start only one. The client waits up to 20 s for it. It runs the command
in-process when that wait fails, and wherever the worker cannot be used.

Environment:
    HETMERGE_WORKER       0: always in-process. 1: use the worker, even inside a SLURM job. Unset: use the
                          worker, except inside a SLURM job (SLURM_JOB_ID set). There a job runs in-process,
                          within the job's cgroup and accounting; a server would be killed with the job,
                          or would outlive it. Where a whole Snakemake run is one allocation (salloc) with
                          local jobs, 1 gives it the worker.
    HETMERGE_WORKER_IDLE  seconds a server waits without jobs before it exits (default 300). The client that
                          starts a server sets it.
    HETMERGE_WORKER_DIR   socket directory (default $XDG_RUNTIME_DIR/hetmerge, else /tmp/hetmerge-<uid>).

Limits: resource limits (ulimit) and the nice value are the server's, not the client's. The child is no
descendant of the client, so Snakemake's `benchmark:` files record the client's memory and CPU time; their
wall time is right.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import hetmerge

START_WAIT_S = 20.0
DEFAULT_IDLE_S = 300.0
_STALE_CHECK_S = 2.0  # how often a server checks whether the package changed
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
# Environment variables that take effect when the interpreter or a library loads, so a forked child could not
# apply a different value: they are part of the key. Everything else reaches the child as the client's.
_STARTUP_ENV = ("PYTHON", "LD_", "LC_", "LANG", "OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "GOTO_", "VECLIB_")
_STARTUP_ENV += ("NUMEXPR_", "TORCH", "PYTORCH_", "MPL", "MALLOC_")
_INT = struct.Struct("!i")
_NOT_PRELOADED = ("hetmerge.__main__", "hetmerge.worker")  # the client; the server itself (its __main__)


class Unavailable(Exception):
    """The worker cannot run this job, and the job has not started: it may run in-process instead."""


def run(argv: Sequence[str]) -> int:
    """Run `hetmerge ARGV` through a warm server if the worker is enabled and reachable, else in-process."""
    mode = os.environ.get("HETMERGE_WORKER", "")
    if mode not in ("", "0", "1"):
        raise SystemExit(f"hetmerge: error: HETMERGE_WORKER must be 0 (off) or 1 (on), got {mode!r}")
    idle_seconds(os.environ)  # a bad value fails here, not silently in a detached server
    if mode == "0" or (mode == "" and "SLURM_JOB_ID" in os.environ) or _answered_by_argparse(argv):
        return _in_process(argv)
    try:
        status = _through_server(argv)
    except Unavailable as err:
        print(f"hetmerge: worker unavailable ({err}); running in-process", file=sys.stderr, flush=True)
        return _in_process(argv)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # the child died of a signal: die of it too, as an in-process run would
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


def _answered_by_argparse(argv: Sequence[str]) -> bool:
    """Help, the version and a usage error need no torch: argparse answers them before any command runs, faster
    than starting a server would."""
    return not argv or any(arg in ("-h", "--help", "--version") for arg in argv)


def idle_seconds(env: Mapping[str, str]) -> float:
    """HETMERGE_WORKER_IDLE, validated."""
    text = env.get("HETMERGE_WORKER_IDLE", str(DEFAULT_IDLE_S))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise SystemExit(f"hetmerge: error: HETMERGE_WORKER_IDLE must be a number of seconds >= 0, got {text!r}")
    return value


def _in_process(argv: Sequence[str]) -> int:
    from hetmerge.cli import main

    return main(list(argv))


# ---------------------------------------------------------------------------------------------------- the key


def socket_dir() -> Path:
    """The private directory of this user's sockets, created on first use; Unavailable if it is not private."""
    configured = os.environ.get("HETMERGE_WORKER_DIR")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(configured or (f"{runtime}/hetmerge" if runtime else f"/tmp/hetmerge-{os.getuid()}"))
    try:
        with contextlib.suppress(FileExistsError):  # a directory, or something the check below refuses
            path.mkdir(mode=0o700, parents=True)
        info = path.lstat()
    except OSError as err:
        raise Unavailable(f"socket directory {path}: {err.strerror}") from err
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise Unavailable(f"socket directory {path} must be a directory of user {os.getuid()} with mode 0700")
    return path


def key() -> str:
    """Everything that decides what a forked child runs, hashed (see the module docstring)."""
    digest = hashlib.sha256()
    context = [
        sys.executable,
        sys.version,
        _interpreter_flags(),
        _search_path(),
        sorted((k, v) for k, v in os.environ.items() if k.startswith(_STARTUP_ENV)),
        [_mtime_ns(entry) for entry in sys.path[1:]],  # not the working directory's: each new file there changes it
    ]
    digest.update(json.dumps(context).encode("utf-8", "surrogateescape"))
    digest.update(package_fingerprint().encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]


def _search_path() -> list[str]:
    """sys.path, with the working directory (first for `python -m`) as a placeholder where it holds no modules,
    so that jobs started in different directories share a server; a child gets the client's own sys.path."""
    path = list(sys.path)
    if path and path[0] in ("", os.getcwd()) and not _has_modules(path[0] or "."):
        path[0] = "<a working directory without modules>"
    return path


def _has_modules(folder: str) -> bool:
    """Whether `folder` holds something `import` finds before the rest of sys.path: a module, an extension or a
    regular package (a bare directory is a namespace package, which any regular one later on the path beats)."""
    with os.scandir(folder) as entries:
        return any(
            entry.name.endswith((".py", ".pyc", ".so"))
            or (entry.is_dir() and os.path.exists(os.path.join(entry.path, "__init__.py")))
            for entry in entries
        )


def package_fingerprint() -> str:
    """Path, size and mtime of every file of the hetmerge package (sources, templates, matplotlibrc)."""
    root = os.path.dirname(hetmerge.__file__)
    rows = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            info = os.stat(os.path.join(folder, name))
            rows.append(f"{os.path.relpath(os.path.join(folder, name), root)}\0{info.st_size}\0{info.st_mtime_ns}")
    return "\n".join([root, *rows])


def _interpreter_flags() -> list[str]:
    """The options that give another interpreter this one's settings (-X, -W, -O, -B, ...), as multiprocessing
    passes them."""
    return subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]


def _mtime_ns(path: str) -> int | None:
    try:
        return os.stat(path or ".").st_mtime_ns
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------- the client


def _through_server(argv: Sequence[str]) -> int:
    """Run the job in a forked child of the server; return its wait status."""
    folder = socket_dir()
    request, fds = _request(argv)  # before the socket exists: a closed fd 0 to 2 is not confused with it
    name = key()
    path = folder / f"{name}.sock"
    if len(os.fsencode(path)) > 100:  # sockaddr_un holds about 108 bytes
        raise Unavailable(f"socket path {path} is too long; set HETMERGE_WORKER_DIR to a shorter directory")
    try:
        sock = _connect_or_start(path, folder / f"{name}.lock", folder / f"{name}.log")
    except OSError as err:
        raise Unavailable(f"cannot start a server in {folder}: {err}") from err
    with sock:
        try:
            sent = socket.send_fds(sock, [request], fds)
            sock.sendall(request[sent:])
            pid = _recv_int(sock)
        except OSError as err:
            raise Unavailable(f"the server dropped the connection: {err}") from err
        if pid is None:
            raise Unavailable("the server closed the connection before starting the job")
        previous = {}
        for signum in FORWARDED:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, lambda signum, _frame: _forward(pid, signum))
        try:
            status = _recv_int(sock)
        except OSError:
            status = None
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    if status is None:
        print(f"hetmerge: the worker server died; the exit status of job {pid} is unknown", file=sys.stderr)
        return 1 << 8  # a wait status: exit code 1
    return status


def _forward(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.fspath(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError as err:
        sock.close()
        raise Unavailable(f"cannot connect to {path}: {err.strerror}") from err
    return sock


def _connect_or_start(path: Path, lock: Path, log: Path) -> socket.socket:
    """Connect to the server of this key, starting it if nobody holds its lock (a running or starting server
    does, for its whole life)."""
    sock = _connect(path)
    deadline = time.monotonic() + START_WAIT_S
    server: subprocess.Popen[bytes] | None = None
    while sock is None:
        if server is None and (fd := _try_lock(lock)) is not None:
            server = _start_server(path, fd, log)
        elif server is not None and server.poll() is not None:
            raise Unavailable(f"the server exited with status {server.returncode} while starting; see {log}")
        if time.monotonic() > deadline:
            raise Unavailable(f"no server answered at {path} within {START_WAIT_S:.0f}s; see {log}")
        time.sleep(0.02)
        sock = _connect(path)
    return sock


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path`, or None if another process holds it (or it was just
    unlinked by a retiring server, whose lock then guards nothing)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(fd)
    return None


def _start_server(path: Path, lock_fd: int, log: Path) -> subprocess.Popen[bytes]:
    """Start `python -m hetmerge.worker` detached, with this process's interpreter, flags, cwd, environment
    and sys.path (so that it computes the same key), handing it the lock."""
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    arguments = [os.fspath(path), str(lock_fd), json.dumps(sys.path)]
    try:
        return subprocess.Popen(
            [sys.executable, *_interpreter_flags(), "-m", "hetmerge.worker", *arguments],
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            pass_fds=(lock_fd,),
            start_new_session=True,
        )
    finally:
        os.close(log_fd)
        os.close(lock_fd)


def _stdio_spec(stream: Any) -> dict[str, Any]:
    """How this interpreter set up a standard stream (encoding, errors, buffering), for the child to copy."""
    return {
        "encoding": getattr(stream, "encoding", None),
        "errors": getattr(stream, "errors", None),
        "line_buffering": bool(getattr(stream, "line_buffering", False)),
        "write_through": bool(getattr(stream, "write_through", False)),
    }


def _request(argv: Sequence[str]) -> tuple[bytes, list[int]]:
    """The job as the child needs it (length-prefixed JSON), and the standard fds that are open."""
    fds = [fd for fd in (0, 1, 2) if _is_open(fd)]
    umask = os.umask(0)
    os.umask(umask)
    try:
        cwd = os.getcwd()
    except OSError as err:
        raise Unavailable(f"no working directory: {err.strerror}") from err
    request = {
        "argv": [sys.argv[0], *argv],
        "path": sys.path,
        "cwd": cwd,
        "env": dict(os.environ),
        "umask": umask,
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "fds": fds,
        "stdio": [_stdio_spec(s) for s in (sys.stdin, sys.stdout, sys.stderr)],
    }
    payload = json.dumps(request).encode()
    return _INT.pack(len(payload)) + payload, fds


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size and (chunk := sock.recv(size - len(data))):
        data += chunk
    return data


def _recv_int(sock: socket.socket) -> int | None:
    data = _recv_exact(sock, _INT.size)
    return _INT.unpack(data)[0] if len(data) == _INT.size else None


# ------------------------------------------------------------------------------------------------- the server


def serve(path: Path, lock_fd: int, search_path: list[str]) -> None:
    """Serve jobs on `path` until idle. `lock_fd` holds the key's lock for the life of the server;
    `search_path` is the client's sys.path (its first entry depends on how the client was started)."""
    os.ftruncate(lock_fd, 0)
    os.write(lock_fd, f"{os.getpid()}\n".encode())  # who holds the lock, for people and tests
    sys.path[:] = search_path
    if path.stem != key():
        raise SystemExit(f"{path}: this server's key is {key()}: started with another environment")
    idle = idle_seconds(os.environ)
    fingerprint = package_fingerprint()
    _preload()
    if package_fingerprint() != fingerprint:
        raise SystemExit("the hetmerge package changed while it was imported")
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        raise SystemExit("importing hetmerge initialized CUDA, which a forked child cannot use")
    sys.stdout.flush()
    _Server(path, lock_fd, idle).loop(fingerprint)


def _preload() -> None:
    """Import every hetmerge module, and with them torch and the report stack. Best effort: a module that
    fails to import is logged, and a child that needs it imports it again and reports the error itself."""
    import importlib
    import pkgutil

    def failed(name: str) -> None:
        print(f"preloading {name} failed:", flush=True)
        traceback.print_exc()

    for module in pkgutil.walk_packages(hetmerge.__path__, "hetmerge.", onerror=failed):
        if module.name not in _NOT_PRELOADED:
            try:
                importlib.import_module(module.name)
            except Exception:
                failed(module.name)
    # torch imports its compiler stack lazily: torch._dynamo at the first random initialisation (nn.init goes
    # through torch._refs), torch._inductor in use_deterministic_algorithms; 1.6 s each that every forked child
    # (building a model, training) would pay again
    for name in ("torch._dynamo", "torch._inductor"):
        try:
            importlib.import_module(name)
        except Exception:
            failed(name)
    print(f"preloaded {len(sys.modules)} modules", flush=True)


class _Server:
    """The accept/fork/reap loop: a child's wait status goes back over its client's connection."""

    def __init__(self, path: Path, lock_fd: int, idle: float) -> None:
        self.path, self.lock_fd, self.idle = path, lock_fd, idle
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead server's socket: we hold the lock, so no live server has this path
        self.listener.bind(os.fspath(path))
        self.listener.listen(128)
        self.inode = path.stat().st_ino
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno())
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the selector through the wakeup fd
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        self.children: dict[int, socket.socket] = {}

    def loop(self, fingerprint: str) -> None:
        """Serve until idle, or until the package differs from `fingerprint` (then new clients have another
        key, and the server only finishes its jobs instead of holding its memory for the idle period)."""
        last = check = time.monotonic()
        serving = True
        while serving or self.children:
            until_idle = math.inf if self.children else last + self.idle - time.monotonic()
            events = self.selector.select(max(0.0, min(until_idle, _STALE_CHECK_S)))
            for event, _ in events:
                if event.fileobj is self.listener:
                    self.fork(self.listener.accept()[0])
                else:
                    with contextlib.suppress(BlockingIOError):  # drained
                        while self.wake_r.recv(4096):
                            pass
            self.reap()
            now = time.monotonic()
            if self.children or events:
                last = now
            stale = False
            if serving and now - check >= _STALE_CHECK_S:
                check, stale = now, package_fingerprint() != fingerprint
            if stale or (serving and not self.children and now - last >= self.idle):
                print("the package changed: retiring" if stale else "idle: retiring", flush=True)
                self.retire()
                serving = False

    def fork(self, conn: socket.socket) -> None:
        try:
            pid = os.fork()
        except OSError as err:  # out of memory or processes: the client sees no pid and runs in-process
            print(f"fork failed: {err}", flush=True)
            conn.close()
            return
        if pid == 0:
            try:
                self.close_in_child(conn)
                _child(conn)
            finally:
                os._exit(1)  # _child never returns; this keeps a failing child out of the server loop
        self.children[pid] = conn

    def close_in_child(self, conn: socket.socket) -> None:
        """A child keeps only `conn`, its own connection: no listener, lock, selector or other clients."""
        signal.set_wakeup_fd(-1)
        for sock in (self.listener, self.wake_r, self.wake_w, *self.children.values()):
            sock.close()
        self.selector.close()
        with contextlib.suppress(OSError):  # closed already once the server retired
            os.close(self.lock_fd)

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(OSError), conn:  # a client that died no longer listens
                    conn.sendall(_INT.pack(status))

    def retire(self) -> None:
        """Stop being the key's server: remove the socket, log and lock, then serve only connections that
        arrived before the socket went away (a new server may start meanwhile)."""
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self.inode:
                self.path.unlink()
        for suffix in (".log", ".lock"):  # unlinked while locked: clients that opened it retry (_try_lock)
            with contextlib.suppress(FileNotFoundError):
                self.path.with_suffix(suffix).unlink()
        os.close(self.lock_fd)
        self.selector.unregister(self.listener)
        self.listener.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                self.fork(self.listener.accept()[0])
        self.listener.close()


# -------------------------------------------------------------------------------------------------- the child


def _child(conn: socket.socket) -> None:
    """Become the client's job: take its stdin/stdout/stderr, tell it our pid, run the job, exit with its code."""
    request, fds = _recv_request(conn)
    for target, fd in zip(request["fds"], fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    for target in {0, 1, 2} - set(request["fds"]):
        os.close(target)
    threading.Thread(target=_watch, args=(conn,), daemon=True).start()
    conn.sendall(_INT.pack(os.getpid()))
    for signum in (*FORWARDED, signal.SIGCHLD):  # as in a fresh interpreter
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    sys.stdin, sys.stdout, sys.stderr = (
        _stdio(fd, spec) if fd in request["fds"] else None for fd, spec in enumerate(request["stdio"])
    )
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    os._exit(_finish(_exit_code(lambda: _job(request))))


def _job(request: dict[str, Any]) -> int:
    """The client's cwd, environment, umask, CPU affinity, argv and sys.path; then the CLI, as `python -m
    hetmerge` runs it."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if "tempfile" in sys.modules:
        sys.modules["tempfile"].tempdir = None  # recomputed from the client's TMPDIR
    os.umask(request["umask"])
    if request["affinity"] is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, request["affinity"])
    sys.argv = request["argv"]
    sys.path[:] = request["path"]
    _reseed_from_entropy()
    from hetmerge.cli import main

    return main(sys.argv[1:])


def _reseed_from_entropy() -> None:
    """Give the global generators fresh entropy, as a new process has: else every child would continue the
    server's unseeded streams, the same ones. (`random` reseeds itself after a fork.) Seeded code, such as
    every hetmerge command, is unaffected."""
    if "torch" in sys.modules:
        sys.modules["torch"].default_generator.seed()  # the CPU generator only: CUDA's are made in this child
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()


def _recv_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """The request of `_request` and the fds that came with its first bytes."""
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    if len(data) < _INT.size:
        data += _recv_exact(conn, _INT.size - len(data))
    (size,) = _INT.unpack(data[: _INT.size])
    data = data[_INT.size :]
    data += _recv_exact(conn, size - len(data))
    return json.loads(data), fds


def _watch(conn: socket.socket) -> None:
    """End the job when its client is gone: the client never sends anything after the request, so any
    return from recv (end of file or an error) means it died."""
    with contextlib.suppress(OSError):
        conn.recv(1)
    os.kill(os.getpid(), signal.SIGKILL)


def _stdio(fd: int, spec: dict[str, Any]) -> io.TextIOWrapper:
    """A standard stream on `fd` as CPython builds it, with the client's encoding and buffering."""
    unbuffered = spec["write_through"] and fd != 0  # python -u: stdout and stderr on the raw file
    buffer = io.open(fd, "rb" if fd == 0 else "wb", buffering=0 if unbuffered else -1, closefd=False)  # noqa: SIM115, UP020
    (buffer if unbuffered else buffer.raw).name = ("<stdin>", "<stdout>", "<stderr>")[fd]
    stream = io.TextIOWrapper(
        buffer,
        encoding=spec["encoding"],
        errors=spec["errors"],
        newline="\n",
        line_buffering=spec["line_buffering"],
        write_through=spec["write_through"],
    )
    stream.mode = "r" if fd == 0 else "w"  # type: ignore[misc]
    return stream


def _exit_code(call: Callable[[], Any]) -> int:
    """Run `call` and return the exit code the interpreter would give it (SystemExit, tracebacks); a
    KeyboardInterrupt ends the process with SIGINT, as CPython does."""
    try:
        return _system_exit_code(call())
    except SystemExit as exit_:
        return _system_exit_code(exit_.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        _finish(0)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        return 130
    except BaseException:
        sys.excepthook(*sys.exc_info())
        return 1


def _system_exit_code(code: Any) -> int:
    """The exit status of `SystemExit(code)`, printing a non-integer code as the interpreter does."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _finish(status: int) -> int:
    """What the interpreter does at exit: atexit handlers, then flushing stdio (a failed flush exits 120)."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            status = status or 120
    return status


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]))
