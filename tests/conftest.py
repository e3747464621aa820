"""Shared pytest fixtures: real servers (see pipeline/servers/) and a busybox sysroot.

Session-scoped: ``redis_server``, ``casd``, ``postgres``, ``buildgrid``,
``busybox_sysroot``.  Module-scoped: ``remex_stack`` (redis-server, an
execution and an artifact buildbox-casd, two ``remex worker`` processes; see
pipeline/servers/stack.py).  Function-scoped: ``fresh_casd`` (a private casd a test
may kill or restart).  There are no skips: a missing program makes the fixture
fail with a message naming what to install.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from pipeline.servers import CasdServer, RedisServer, RemexStack  # noqa: E402
from pipeline.servers.testing import BuildGridServer, PostgresServer  # noqa: E402
from pipeline.testing.dag import DagProject, make_dag_project  # noqa: E402
from pipeline.testing.sysroot import make_busybox_sysroot  # noqa: E402


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


@pytest.fixture(scope="module")
def remex_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemexStack]:
    """A whole remex stack of the module's own: redis-server, an execution
    buildbox-casd (jobs=4), an artifact buildbox-casd, workers ``w1`` and
    ``w2`` (4 threads each, separate local CAS folders); ``stack.cli(...)``
    runs ``remex`` with its environment. Stopped (by PID) after the module."""
    with RemexStack(tmp_path_factory.mktemp("remex-stack"), workers=2) as stack:
        yield stack


# --- BuildGrid for bots (remex bot, issue 5) ---------------------------------


@pytest.fixture(scope="module")
def bots_buildgrid(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    postgres: PostgresServer,
) -> Iterator[BuildGridServer]:
    """A BuildGrid of the module's own (its own database), bot keepalive 10 s,
    for tests that run ``remex bot`` processes against it."""
    module = request.module.__name__.rsplit(".", 1)[-1]
    database = "bgd_" + "".join(c if c.isalnum() else "_" for c in module).lower()
    with BuildGridServer(
        tmp_path_factory.mktemp("bots-buildgrid"),
        postgres,
        database=database,
        bot_session_keepalive_timeout=10,
    ) as server:
        yield server


@pytest.fixture
def project_factory(
    tmp_path: Path, busybox_sysroot: Path, request: pytest.FixtureRequest
) -> Callable[..., DagProject]:
    """make_dag_project in tmp_path, salted with the test's name (fresh cache keys)."""
    count = 0

    def make(**options: Any) -> DagProject:
        nonlocal count
        count += 1
        options.setdefault("salt", f"{request.node.name}-{count}")
        return make_dag_project(tmp_path / f"project-{count}", sysroot=busybox_sysroot, **options)

    return make
