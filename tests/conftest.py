"""Shared pytest fixtures: real servers (see tests/servers.py) and a busybox sysroot.

Session-scoped: ``redis_server``, ``casd``, ``postgres``, ``buildgrid``,
``busybox_sysroot``.  Function-scoped: ``fresh_casd`` (a private casd a test
may kill or restart).  There are no skips: a missing program makes the fixture
fail with a message naming what to install.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from tests.servers import (  # noqa: E402
    BuildGridServer,
    CasdServer,
    PostgresServer,
    RedisServer,
)
from tests.sysroot import make_busybox_sysroot  # noqa: E402


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def casd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CasdServer]:
    with CasdServer(tmp_path_factory.mktemp("casd"), jobs=2) as server:
        yield server


@pytest.fixture
def fresh_casd(tmp_path: Path) -> Iterator[CasdServer]:
    """A private buildbox-casd (jobs=2) for tests that kill or restart it."""
    with CasdServer(tmp_path / "casd", jobs=2) as server:
        yield server


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    with PostgresServer(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture(scope="session")
def buildgrid(
    tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer
) -> Iterator[BuildGridServer]:
    with BuildGridServer(tmp_path_factory.mktemp("buildgrid"), postgres) as server:
        yield server


@pytest.fixture(scope="session")
def busybox_sysroot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_busybox_sysroot(tmp_path_factory.mktemp("sysroot") / "busybox")
