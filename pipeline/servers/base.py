"""The base of every launcher: a process started in a session of its own,
bound to 127.0.0.1 on a port picked here, healthy once it answers, stopped by
PID with its whole process tree.

Every server

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
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from pipeline.servers.errors import ServerError
from pipeline.servers.process import (
    kill_process_tree,
    listening_inodes,
    pid_alive,
    process_tree,
    socket_inodes,
    tail,
    tcp_accepts,
    wait_until,
)

__all__ = [
    "HOST",
    "PORT_IN_USE",
    "PortInUse",
    "Server",
    "ServerError",
    "free_port",
    "reapi_answers",
    "remex_program",
    "require_program",
    "venv_program",
]

HOST = "127.0.0.1"
# How many different ports start() tries when the chosen port turns out taken.
PORT_ATTEMPTS = 5
# How long start() keeps retrying a fixed port (restart()) that is still taken.
SAME_PORT_RETRY_SECONDS = 15.0

#: Log lines meaning "the port was taken": start() then retries on another port.
PORT_IN_USE = re.compile(
    r"address already in use|eaddrinuse|failed to bind|could not bind|"
    r"could not create server tcp listening socket|port .* (?:is )?(?:already )?in use",
    re.IGNORECASE,
)


class PortInUse(Exception):
    """Raised by a launcher when its server could not bind its port: start()
    then retries on another one."""


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


def require_program(name: str, hint: str) -> str:
    """The path of program ``name`` on PATH; ServerError with ``hint`` if absent."""
    found = shutil.which(name)
    if found:
        return found
    raise ServerError(f"{name!r} not found on PATH: {hint}")


def venv_program(name: str, hint: str) -> str:
    """A console script next to the running interpreter (the venv's bin/), else PATH."""
    candidate = Path(sys.executable).parent / name  # do not resolve: keep the venv path
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return require_program(name, hint)


def remex_program() -> str:
    """The ``remex`` console script of this venv (else the one on PATH)."""
    return venv_program("remex", "pip install -e . in this venv")


def reapi_answers(url: str, timeout: float) -> bool:
    """True if the REAPI server at ``url`` answers GetCapabilities within
    ``timeout`` s (one attempt: the caller polls)."""
    # Imported here: `remex down` and the process helpers need no gRPC.
    from pipeline.errors import RemexError
    from pipeline.reapi.remote import probe_capabilities

    try:
        probe_capabilities(url, timeout=timeout)
    except RemexError:
        return False
    return True


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
    #: False for a process that binds no TCP port (a worker, a bot, a server on
    #: a unix socket): start() picks none and waits for _probe() alone.
    listens: bool = True
    #: The file-mode creation mask of the process (None: inherit ours);
    #: 0o077 keeps what it writes (an AOF, a database) to its owner.
    umask: int | None = None
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
            except PortInUse as exc:
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

    def log_tail(self, lines: int = 40) -> str:
        """The first and last lines of the log since the last start."""
        return tail(self.log_path, self._log_offset, lines)

    def log_text(self) -> str:
        """The whole log since the last start."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

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
        return tail(self.log_path, self._log_offset)

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
                umask=-1 if self.umask is None else self.umask,
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
                log = self._log_tail()
                if PORT_IN_USE.search(log):
                    raise PortInUse(f"exit code {code}")
                raise ServerError(
                    f"{self.name} exited during start (exit code {code}); "
                    f"log {self.log_path}:\n{log}"
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
                if tcp_accepts(HOST, port) and self._probe(min(remaining, self.probe_timeout)):
                    break
            time.sleep(0.05)

    def _listens_alone(self, port: int) -> bool:
        """False while the server does not listen on ``port`` yet; raises
        PortInUse if another process listens on it too.  gRPC C++ servers set
        SO_REUSEPORT, so their bind of a taken port "succeeds", and the kernel
        then hands the connections to the other listener."""
        listening = listening_inodes(port)
        ours = listening & socket_inodes(self._process_tree())
        if not ours:
            return False
        if listening - ours:
            raise PortInUse(f"another process also listens on port {port} (SO_REUSEPORT)")
        return True

    def _process_tree(self) -> list[int]:
        if self._pid is None:
            return []
        return list(process_tree(self._pid, self._own_pgid()))

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
        tree = process_tree(pid, pgid) if self._alive() else {}
        if grace > 0 and self._alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            wait_until(lambda: not self._alive(), grace)
        kill_process_tree(pid, pgid, known=tree)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=30)
        else:
            wait_until(lambda: not pid_alive(pid), 30)
