"""Connection settings at work: a server that accepts and never answers.

A loopback TCP socket that accepts connections and stays silent is the
slowest server there is: no HTTP/2 settings ever come back, so every call
waits for its deadline. ``request-timeout`` must end each attempt and
``retry-limit`` must bound how many there are.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.api import open_context
from pipeline.config import load_config
from pipeline.errors import RemoteError


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(conn)  # held open, never answered

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self.accepted:
            conn.close()
        self.sock.close()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()


def env_for(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    return {
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "REMEX_STACK_DIR": str(tmp_path / "no-stack"),
        "REMEX_CAS_DIR": str(tmp_path / "cas"),
        "REMEX_EXECUTION_URL": f"grpc://127.0.0.1:{port}",
        **extra,
    }


def timed_lookup(env: dict[str, str]) -> tuple[float, RemoteError]:
    config = load_config(None, env)
    with open_context(config) as ctx:
        started = time.monotonic()
        with pytest.raises(RemoteError) as info:
            ctx.assets.fetch_directory(["urn:fdc:remex:2026:artifact:p/e/0"])
        return time.monotonic() - started, info.value


def test_request_timeout_ends_each_attempt_and_retry_limit_bounds_them(
    tmp_path: Path, silent_server: SilentServer
) -> None:
    # Given a server that never answers, 0.5 s per attempt, 2 retries from 50 ms
    env = env_for(
        tmp_path,
        silent_server.port,
        REMEX_EXECUTION_REQUEST_TIMEOUT="0.5",
        REMEX_EXECUTION_RETRY_LIMIT="2",
        REMEX_EXECUTION_RETRY_DELAY="50",
    )
    # When an artifact is looked up
    elapsed, error = timed_lookup(env)
    # Then the call gave up after exactly 3 attempts of 0.5 s each (plus two
    # waits of at most 50 and 100 ms), not after the 60 s default
    assert "DEADLINE_EXCEEDED" in str(error)
    assert "gave up after 3 attempts" in str(error)
    assert 1.5 <= elapsed < 1.5 + 0.15 + 1.5, elapsed
    # And the server was really connected to (the time was spent waiting on it)
    assert silent_server.accepted


def test_retry_limit_zero_is_a_single_attempt(tmp_path: Path, silent_server: SilentServer) -> None:
    env = env_for(
        tmp_path,
        silent_server.port,
        REMEX_EXECUTION_REQUEST_TIMEOUT="0.4",
        REMEX_EXECUTION_RETRY_LIMIT="0",
    )
    elapsed, error = timed_lookup(env)
    assert "gave up after 1 attempt)" in str(error)
    assert 0.4 <= elapsed < 0.4 + 1.0, elapsed


def test_the_artifacts_endpoint_has_its_own_settings(
    tmp_path: Path, silent_server: SilentServer
) -> None:
    # Given the artifact server set apart, with settings of its own, and
    # different ones on the execution server
    env = env_for(
        tmp_path,
        silent_server.port,
        REMEX_EXECUTION_REQUEST_TIMEOUT="30",
        REMEX_ARTIFACTS_URL=f"grpc://127.0.0.1:{silent_server.port}",
        REMEX_ARTIFACTS_REQUEST_TIMEOUT="0.3",
        REMEX_ARTIFACTS_RETRY_LIMIT="1",
        REMEX_ARTIFACTS_RETRY_DELAY="0",
    )
    # When an artifact is looked up (Remote Asset is on the artifact server)
    elapsed, error = timed_lookup(env)
    # Then the artifact server's settings applied
    assert "gave up after 2 attempts" in str(error)
    assert 0.6 <= elapsed < 0.6 + 1.0, elapsed
