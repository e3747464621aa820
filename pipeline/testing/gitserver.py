"""Real git servers on loopback ports, for tests and benchmarks.

- :class:`GitHttpServer`: ``git http-backend`` (smart HTTP) run as a CGI
  program behind a small threaded HTTP server in this process; counts the
  requests per path (``hits``) so a test can prove what was fetched.
- :class:`GitDaemon`: ``git daemon`` (the ``git://`` protocol) as a child
  process, started and stopped by its PID.

Both serve every repository under ``root`` (``--export-all``) and bind
127.0.0.1 on a port picked by the system.
"""

from __future__ import annotations

import collections
import os
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

__all__ = ["GitDaemon", "GitHttpServer", "closed_port"]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _backend() -> str:
    exec_path = subprocess.run(
        ["git", "--exec-path"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return str(Path(exec_path) / "git-http-backend")


class GitHttpServer:
    """``git http-backend`` behind a loopback HTTP server; ``url`` is its base URL."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hits: collections.Counter[str] = collections.Counter()
        self._backend = _backend()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._cgi()

            def do_POST(self) -> None:
                self._cgi()

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _cgi(self) -> None:
                path, _, query = self.path.partition("?")
                server.hits[path] += 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
                env.update(
                    GIT_PROJECT_ROOT=str(server.root),
                    GIT_HTTP_EXPORT_ALL="1",
                    REQUEST_METHOD=self.command,
                    PATH_INFO=path,
                    QUERY_STRING=query,
                    CONTENT_TYPE=self.headers.get("Content-Type") or "",
                    CONTENT_LENGTH=str(len(body)),
                    REMOTE_ADDR="127.0.0.1",
                    GATEWAY_INTERFACE="CGI/1.1",
                    SERVER_PROTOCOL="HTTP/1.1",
                )
                if self.headers.get("Git-Protocol"):
                    env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
                if self.headers.get("Content-Encoding"):
                    env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
                result = subprocess.run(
                    [server._backend], input=body, capture_output=True, env=env, check=False
                )
                head, _, payload = result.stdout.partition(b"\r\n\r\n")
                status = 200
                headers: list[tuple[str, str]] = []
                for line in head.decode("latin-1").split("\r\n"):
                    name, _, value = line.partition(":")
                    if name.lower() == "status":
                        status = int(value.split()[0])
                    elif name:
                        headers.append((name, value.strip()))
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port: int = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def start(self) -> GitHttpServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def fetches(self, repo: str) -> int:
        """How many fetches (upload-pack POSTs) asked ``repo`` for objects."""
        return self.hits[f"/{repo}/git-upload-pack"]

    def __enter__(self) -> GitHttpServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class GitDaemon:
    """``git daemon --export-all`` on a loopback port; ``url`` is ``git://127.0.0.1:P``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = closed_port()
        self.url = f"git://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> GitDaemon:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        self._proc = subprocess.Popen(
            [shutil.which("git") or "git", "daemon", "--export-all", "--reuseaddr",
             f"--base-path={self.root}", "--listen=127.0.0.1", f"--port={self.port}",
             str(self.root)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"git daemon exited with {self._proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"git daemon did not listen on port {self.port}")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> GitDaemon:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
