"""A loopback HTTP server for tests and benchmarks: a folder, plus misbehaving endpoints.

It binds 127.0.0.1 on a port the OS picks and serves the files of one folder.
A path prefix makes a request misbehave, so one folder serves every case:

``/PATH``
    the file ``PATH`` of the folder (404 if missing).
``/flaky/N/PATH``
    503 with ``Retry-After`` the first N times this exact request path is
    asked for, then the file.
``/status/CODE/PATH``
    always answers ``CODE`` (``/status/404/x``, ``/status/500/x``).
``/hang/PATH``
    reads the request and never answers (until the server stops).
``/wrong/PATH``
    the file's length with different bytes (its first byte inverted).
``/slow/PATH``
    the file, trickled: ``slow_chunk`` bytes every ``slow_interval`` seconds
    (for tests that kill a client mid-download).

With ``auth=(user, password)`` every request needs that HTTP basic auth (401
otherwise). Every request is logged (method, path, file, status, bytes sent)
in memory and, with ``log_file``, as one JSON line per request, so a test can
count downloads even when the server runs in another process.

In-process: ``with LoopbackHttpServer(folder) as server: server.url("a.tar")``.
As a process: ``python -m pipeline.testing.httpserver FOLDER [--log FILE]``
prints the port on its first line; :class:`HttpServerProcess` does that and
reads the log back.
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import subprocess
import sys
import threading
import urllib.parse
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["AccessEntry", "HttpServerProcess", "LoopbackHttpServer", "main"]

_CHUNK = 1 << 16


@dataclass(frozen=True)
class AccessEntry:
    """One request the server answered (or, for ``/hang/``, received).

    Attributes:
        method: ``GET``, ``HEAD`` ...
        path: the request path without the query (``/flaky/2/a.tar``).
        file: the folder's file it names (``a.tar``), "" if none.
        status: the status sent (0: none, the ``/hang/`` endpoint).
        sent: body bytes sent (fewer than the file's size if the client left).
    """

    method: str
    path: str
    file: str
    status: int
    sent: int


class _AccessLog:
    """The log, shared by the handler threads; thread-safe."""

    def __init__(self, log_file: Path | None) -> None:
        self._lock = threading.Lock()
        self.entries: list[AccessEntry] = []
        self.seen: dict[str, int] = {}
        self._log_file = log_file

    def add(self, entry: AccessEntry) -> None:
        with self._lock:
            self.entries.append(entry)
            if self._log_file is not None:
                with open(self._log_file, "a", encoding="utf-8") as f:
                    f.write(json.dumps(asdict(entry)) + "\n")

    def hit(self, path: str) -> int:
        """How many times ``path`` was asked for before (0 the first time)."""
        with self._lock:
            count = self.seen.get(path, 0)
            self.seen[path] = count + 1
            return count


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung handler must not keep the process alive
    allow_reuse_address = False

    root: Path
    auth: str | None
    retry_after: float
    slow_chunk: int
    slow_interval: float
    log: _AccessLog
    stopping: threading.Event


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the access log is kept in :class:`_AccessLog`, not on stderr."""

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, *, body: bool) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if not self._authorised():
            self._status(path, "", 401, extra={"WWW-Authenticate": 'Basic realm="remex-test"'})
            return
        parts = [urllib.parse.unquote(p) for p in path.split("/") if p]
        mode = "plain"
        if parts and parts[0] in ("hang", "wrong", "slow"):
            mode = parts.pop(0)
        elif len(parts) >= 2 and parts[0] in ("flaky", "status") and parts[1].isdigit():
            mode, number = parts[0], int(parts[1])
            parts = parts[2:]
        file = "/".join(parts)
        if mode == "hang":
            self.server.log.add(AccessEntry(self.command, path, file, 0, 0))
            self.server.stopping.wait()
            self.close_connection = True
            return
        if mode == "status":
            self._status(path, file, number)
            return
        if mode == "flaky" and self.server.log.hit(path) < number:
            self._status(path, file, 503, extra={"Retry-After": f"{self.server.retry_after:g}"})
            return
        target = self._file(parts)
        if target is None:
            self._status(path, file, 404)
            return
        data = target.read_bytes()
        if mode == "wrong" and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        sent = 0
        try:
            if body:
                sent = self._send_body(data, slow=mode == "slow")
        finally:
            self.server.log.add(AccessEntry(self.command, path, file, 200, sent))

    def _send_body(self, data: bytes, *, slow: bool) -> int:
        sent = 0
        step = self.server.slow_chunk if slow else _CHUNK
        try:
            while sent < len(data):
                if slow and sent and self.server.stopping.wait(self.server.slow_interval):
                    break
                self.wfile.write(data[sent : sent + step])
                sent += min(step, len(data) - sent)
            self.wfile.flush()
            if sent < len(data):
                self.close_connection = True  # cut off: the client sees a short body
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        return sent

    def _authorised(self) -> bool:
        if self.server.auth is None:
            return True
        return self.headers.get("Authorization", "") == f"Basic {self.server.auth}"

    def _file(self, parts: list[str]) -> Path | None:
        # Only plain names inside the folder: no "..", no absolute paths.
        if not parts or any(p in ("", ".", "..") or "/" in p or "\0" in p for p in parts):
            return None
        target = self.server.root.joinpath(*parts)
        return target if target.is_file() else None

    def _status(
        self, path: str, file: str, status: int, *, extra: dict[str, str] | None = None
    ) -> None:
        body = f"{status}\n".encode()
        self.send_response(status)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.server.log.add(AccessEntry(self.command, path, file, status, 0))


class LoopbackHttpServer:
    """The server in this process, on a thread (see the module docstring).

    Args:
        root: the folder to serve.
        auth: ``(user, password)`` for HTTP basic auth on every request.
        retry_after: the ``Retry-After`` seconds the ``/flaky/`` endpoint sends.
        slow_chunk: bytes per step of the ``/slow/`` endpoint.
        slow_interval: seconds between steps of the ``/slow/`` endpoint.
        log_file: also append the access log there, one JSON line per request.
    """

    def __init__(
        self,
        root: Path,
        *,
        auth: tuple[str, str] | None = None,
        retry_after: float = 1.0,
        slow_chunk: int = 16 * 1024,
        slow_interval: float = 0.1,
        log_file: Path | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        server = _Server(("127.0.0.1", 0), _Handler)
        server.root = self.root
        server.auth = base64.b64encode(":".join(auth).encode()).decode() if auth else None
        server.retry_after = retry_after
        server.slow_chunk = slow_chunk
        server.slow_interval = slow_interval
        server.log = _AccessLog(log_file)
        server.stopping = threading.Event()
        self._server = server
        self._thread: threading.Thread | None = None
        self.port: int = server.server_address[1]

    def start(self) -> LoopbackHttpServer:
        """Serve on a daemon thread; returns self."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, release hung handlers and close the socket."""
        self._server.stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> LoopbackHttpServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str, *, user: tuple[str, str] | None = None) -> str:
        """The URL of ``path`` (``"flaky/2/a.tar"``), with credentials if given."""
        netloc = f"127.0.0.1:{self.port}"
        if user is not None:
            quoted = ":".join(urllib.parse.quote(p, safe="") for p in user)
            netloc = f"{quoted}@{netloc}"
        return f"http://{netloc}/{path.lstrip('/')}"

    @property
    def entries(self) -> list[AccessEntry]:
        """Every request so far, in order."""
        return list(self._server.log.entries)

    def count(self, path: str | None = None, *, file: str | None = None, status: int = 0) -> int:
        """How many GET requests asked for ``path`` (``"/flaky/2/a.tar"``) and/or
        the folder's ``file``, answered with ``status`` when not 0."""
        return _count(self.entries, path, file, status)


def _count(entries: list[AccessEntry], path: str | None, file: str | None, status: int) -> int:
    return sum(
        1
        for e in entries
        if e.method == "GET"
        and (path is None or e.path == "/" + path.lstrip("/"))
        and (file is None or e.file == file)
        and (not status or e.status == status)
    )


class HttpServerProcess:
    """The server as a child process (``python -m pipeline.testing.httpserver``),
    so a test can kill it (a mirror going down) by its pid.

    Args:
        root: the folder to serve.
        log_file: where the child appends its access log (read by :meth:`entries`).
        args: more command-line options (``["--auth", "u:p"]``).
    """

    def __init__(self, root: Path, log_file: Path, args: list[str] | None = None) -> None:
        self.root = Path(root)
        self.log_file = Path(log_file)
        self._args = args or []
        self._process: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self, timeout: float = 20.0) -> HttpServerProcess:
        """Start the child and wait for it to print its port."""
        self.log_file.touch()
        command = [sys.executable, "-m", "pipeline.testing.httpserver", str(self.root)]
        command += ["--log", str(self.log_file), *self._args]
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self._process.stdout is not None
        line = _read_line(self._process.stdout, timeout)
        if not line.strip().isdigit():
            self.kill()
            raise RuntimeError(f"the test HTTP server did not print its port (got {line!r})")
        self.port = int(line)
        return self

    @property
    def pid(self) -> int:
        """The child's process id."""
        assert self._process is not None
        return self._process.pid

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        """The URL of ``path`` on this server."""
        return f"{self.base_url}/{path.lstrip('/')}"

    def kill(self) -> None:
        """SIGKILL the child and reap it (idempotent)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        if self._process is not None:
            self._process.wait()
            if self._process.stdout is not None:
                self._process.stdout.close()

    def __enter__(self) -> HttpServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    def entries(self) -> list[AccessEntry]:
        """The access log the child wrote so far."""
        out = []
        for line in self.log_file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append(AccessEntry(**json.loads(line)))
        return out

    def count(self, path: str | None = None, *, file: str | None = None, status: int = 0) -> int:
        """As :meth:`LoopbackHttpServer.count`, from the log file."""
        return _count(self.entries(), path, file, status)


def _read_line(stream: Any, timeout: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0] if result else ""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.testing.httpserver",
        description="Serve a folder on 127.0.0.1 (port printed first) with test endpoints.",
    )
    parser.add_argument("root", type=Path, help="the folder to serve")
    parser.add_argument("--log", type=Path, help="append the access log there (JSON lines)")
    parser.add_argument("--auth", help="USER:PASSWORD for basic auth on every request")
    parser.add_argument("--retry-after", type=float, default=1.0)
    parser.add_argument("--slow-chunk", type=int, default=16 * 1024)
    parser.add_argument("--slow-interval", type=float, default=0.1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGTERM/SIGINT; print the port on the first line of stdout."""
    args = _parse_args(argv)
    auth = None
    if args.auth:
        user, _, password = args.auth.partition(":")
        auth = (user, password)
    server = LoopbackHttpServer(
        args.root,
        auth=auth,
        retry_after=args.retry_after,
        slow_chunk=args.slow_chunk,
        slow_interval=args.slow_interval,
        log_file=args.log,
    ).start()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(server.port, flush=True)
    while not done.wait(0.5):
        pass
    server.stop()


if __name__ == "__main__":
    main()
