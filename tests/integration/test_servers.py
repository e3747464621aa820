"""The real servers of pipeline/servers/ start, answer, restart and die cleanly."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg2  # type: ignore[import-untyped]
import pytest
import redis

from pipeline.reapi.remote import probe_capabilities
from pipeline.servers import CasdServer, RedisServer, mounts_under, pid_alive
from pipeline.servers import base as server_base
from pipeline.servers.testing import BuildGridServer, PostgresServer
from pipeline.testing.sysroot import is_complete_sysroot, make_busybox_sysroot


def _no_process_left(server_pid: int) -> None:
    assert not pid_alive(server_pid), f"pid {server_pid} still alive"
    # Nothing left in the server's own process group either (helpers, backends).
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] not in ("Z", "X"):
            assert int(fields[2]) != server_pid, f"pid {entry} left in group {server_pid}"


@pytest.fixture
def taken_port(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[int]:
    """A port another socket listens on, handed out first by free_port.

    Parametrize with ``reuseport=True`` to set SO_REUSEPORT on it, as a gRPC
    server would: then binding it again "succeeds" and only the ownership
    check after start notices the port is shared.
    """
    reuseport = getattr(request, "param", False)
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if reuseport:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    real_free_port = server_base.free_port
    handed: list[int] = []

    def free_port_taken_first(host: str = "127.0.0.1") -> int:
        handed.append(port if not handed else real_free_port(host))
        return handed[-1]

    monkeypatch.setattr(server_base, "free_port", free_port_taken_first)
    try:
        yield port
    finally:
        blocker.close()


# ----------------------------------------------------------------------------- Redis


def test_redis_ping_set_get(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.ping()
        client.set("remex:test", b"value")
        assert client.get("remex:test") == b"value"
    finally:
        client.close()


def test_redis_appendonly_restart_keeps_data_and_kill_leaves_nothing(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis", appendonly=True) as server:
        client = redis.Redis.from_url(server.url)
        client.rpush("queue", b"job-1")
        client.close()
        port, old_pid = server.port, server.pid
        server.restart()
        assert server.port == port
        assert server.pid != old_pid
        client = redis.Redis.from_url(server.url)
        assert client.lrange("queue", 0, -1) == [b"job-1"]
        client.close()
        pid = server.pid
        assert pid is not None
        server.kill()
        _no_process_left(pid)


def test_redis_start_moves_to_another_port_when_taken(tmp_path: Path, taken_port: int) -> None:
    with RedisServer(tmp_path / "redis") as server:
        assert server.port != taken_port
        assert redis.Redis.from_url(server.url).ping()


# ----------------------------------------------------------------------------- casd


def test_casd_answers_get_capabilities(casd: CasdServer) -> None:
    assert casd.url == f"grpc://127.0.0.1:{casd.port}"
    assert probe_capabilities(casd.url)


def test_casd_restart_keeps_port_and_cache(fresh_casd: CasdServer) -> None:
    port, old_pid = fresh_casd.port, fresh_casd.pid
    marker = fresh_casd.cas_dir / "remex-restart-marker"
    marker.write_text("kept")
    fresh_casd.restart()
    assert fresh_casd.port == port
    assert fresh_casd.pid != old_pid
    assert marker.read_text() == "kept"
    assert probe_capabilities(fresh_casd.url)


def test_casd_kill_leaves_no_process_and_no_mount(fresh_casd: CasdServer) -> None:
    pid = fresh_casd.pid
    assert pid is not None and pid_alive(pid)
    fresh_casd.kill()
    _no_process_left(pid)
    assert not fresh_casd.running
    assert mounts_under(fresh_casd.workdir) == []
    # ... and it comes back on the same port after a kill.
    port = fresh_casd.port
    fresh_casd.start()
    assert fresh_casd.port == port
    assert probe_capabilities(fresh_casd.url)


@pytest.mark.parametrize("taken_port", [False, True], ids=["plain", "reuseport"], indirect=True)
def test_casd_start_moves_to_another_port_when_taken(tmp_path: Path, taken_port: int) -> None:
    with CasdServer(tmp_path / "casd") as server:
        assert server.port != taken_port
        assert probe_capabilities(server.url)


# ----------------------------------------------------------------------------- PostgreSQL


def test_postgres_accepts_psycopg2_connection(postgres: PostgresServer) -> None:
    assert postgres.dsn == f"postgresql+psycopg2://bgd@127.0.0.1:{postgres.port}/bgd"
    conn = psycopg2.connect(host="127.0.0.1", port=postgres.port, user="bgd", dbname="bgd")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    finally:
        conn.close()


def test_postgres_restart_keeps_data_and_kill_leaves_nothing(tmp_path: Path) -> None:
    with PostgresServer(tmp_path / "pg") as server:
        conn = psycopg2.connect(host="127.0.0.1", port=server.port, user="bgd", dbname="bgd")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (7)")
        conn.close()
        port = server.port
        server.restart()
        assert server.port == port
        conn = psycopg2.connect(host="127.0.0.1", port=server.port, user="bgd", dbname="bgd")
        with conn.cursor() as cur:
            cur.execute("SELECT v FROM kept")
            assert cur.fetchone() == (7,)
        conn.close()
        pid = server.pid
        assert pid is not None
        server.kill()
        _no_process_left(pid)


def test_postgres_start_moves_to_another_port_when_taken(tmp_path: Path, taken_port: int) -> None:
    with PostgresServer(tmp_path / "pg") as server:
        assert server.port != taken_port
        conn = psycopg2.connect(host="127.0.0.1", port=server.port, user="bgd", dbname="bgd")
        conn.close()


# ----------------------------------------------------------------------------- BuildGrid


def test_buildgrid_answers_get_capabilities(buildgrid: BuildGridServer) -> None:
    assert buildgrid.url == f"grpc://127.0.0.1:{buildgrid.port}"
    assert probe_capabilities(buildgrid.url)


def test_buildgrid_restart_keeps_port_and_kill_leaves_nothing(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    # A database of its own: the session's BuildGrid keeps using "bgd".
    with BuildGridServer(tmp_path / "bgd", postgres, database="bgd_restart") as server:
        port = server.port
        server.restart()
        assert server.port == port
        assert probe_capabilities(server.url)
        pid = server.pid
        assert pid is not None
        server.kill()
        _no_process_left(pid)


# ----------------------------------------------------------------------------- sysroot


def test_busybox_sysroot_layout(busybox_sysroot: Path) -> None:
    assert is_complete_sysroot(busybox_sysroot)
    assert os.readlink(busybox_sysroot / "bin") == "usr/bin"
    assert os.readlink(busybox_sysroot / "sbin") == "usr/bin"
    assert os.readlink(busybox_sysroot / "usr/bin/sh") == "busybox"
    assert (busybox_sysroot / "tmp").is_dir()
    assert make_busybox_sysroot(busybox_sysroot) == busybox_sysroot  # cached


def test_busybox_sysroot_runs_in_bwrap(busybox_sysroot: Path) -> None:
    # As root on Debian 12, bwrap needs no extra flags (no user namespace setup).
    result = subprocess.run(
        ["bwrap", "--bind", str(busybox_sysroot), "/", "--proc", "/proc", "--dev", "/dev",
         "/bin/sh", "-c", "echo hi"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hi\n"
