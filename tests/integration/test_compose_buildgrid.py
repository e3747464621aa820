"""The compose deployment's servers, started here as docker-compose.yml starts them.

Without a Docker engine (tests/deploy/ has one), the commands of docker-compose.yml's
``buildgrid-migrate``, ``buildgrid`` and ``artifacts`` services are run as
plain processes, with what only exists inside the compose network swapped
for loopback: the listening address becomes 127.0.0.1 on a free port, the
volume paths become folders of the test, PostgreSQL is the test's own. Then:
BuildGrid serves with deploy/buildgrid.yml, and what the deployment keeps on
volumes (BuildGrid's CAS, the artifact store) is still there after a restart.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from pipeline.digest import digest_of
from pipeline.reapi.asset import AssetClient
from pipeline.reapi.cas import CasClient
from pipeline.reapi.channel import Endpoint
from pipeline.reapi.remote import Remote
from pipeline.servers import HOST, Server, buildbox_dir
from pipeline.servers.base import reapi_answers
from pipeline.servers.testing import PostgresServer
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from tests.unit.test_compose import BUILDGRID_CONFIG, argv, services

DATABASE = "compose_bgd"


class ComposeServer(Server):
    """A compose service's command (``args``), run on 127.0.0.1:``port``.

    ``{port}`` in ``args`` and in the ``files`` (path -> text) written before
    each start becomes the port the server got.
    """

    scheme = "grpc"
    start_timeout = 90.0
    exclusive_port_check = True

    def __init__(
        self,
        workdir: Path,
        name: str,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        files: dict[Path, str] | None = None,
    ) -> None:
        self.name = name  # type: ignore[misc]
        super().__init__(workdir)
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.files = dict(files or {})

    def _launch(self) -> None:
        port = str(self.port)
        for path, text in self.files.items():
            path.write_text(text.replace("{port}", port))
        self._popen([a.replace("{port}", port) for a in self.args], self.env)

    def _probe(self, timeout: float) -> bool:
        return reapi_answers(self.url, timeout)


def venv_program(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.fixture(scope="module")
def database(postgres: PostgresServer) -> str:
    """A fresh database, migrated by the ``buildgrid-migrate`` service's command."""
    postgres.create_database(DATABASE, recreate=True)
    dsn = postgres.dsn_for(DATABASE)
    args = argv(services()["buildgrid-migrate"]["command"])
    assert args[:3] == ["bgd", "migrate", "apply"]
    result = subprocess.run(
        [venv_program("bgd"), *args[1:3], dsn], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return dsn


@pytest.fixture(scope="module")
def buildgrid(tmp_path_factory: pytest.TempPathFactory, database: str) -> Iterator[ComposeServer]:
    """``bgd server start`` with deploy/buildgrid.yml, as the ``buildgrid`` service runs it."""
    workdir = tmp_path_factory.mktemp("compose-buildgrid")
    text = BUILDGRID_CONFIG.read_text()
    # Inside the compose network it listens on 0.0.0.0:50051 and keeps its
    # CAS on the buildgrid-cas volume.
    assert '"0.0.0.0:50051"' in text and "/var/lib/buildgrid/cas" in text
    (workdir / "cas").mkdir()
    args = argv(services()["buildgrid"]["command"])
    assert args == ["bgd", "server", "start", "/etc/remex/buildgrid.yml"]
    config = workdir / "buildgrid.yml"
    server = ComposeServer(
        workdir,
        "buildgrid",
        [venv_program("bgd"), "server", "start", str(config)],
        env={"BGD_DATABASE_URL": database, "PYTHONUNBUFFERED": "1"},
        files={
            config: text.replace('"0.0.0.0:50051"', f'"{HOST}:{{port}}"').replace(
                "/var/lib/buildgrid/cas", str(workdir / "cas")
            )
        },
    )
    with server:
        yield server


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeServer]:
    """buildbox-casd as the ``artifacts`` service runs it."""
    workdir = tmp_path_factory.mktemp("compose-artifacts")
    args = argv(services()["artifacts"]["command"])
    assert args[0] == "buildbox-casd" and "--bind=0.0.0.0:50052" in args
    args = [
        str(buildbox_dir() / "buildbox-casd"),
        *(f"--bind={HOST}:{{port}}" if a.startswith("--bind=") else a for a in args[1:-1]),
        str(workdir / "store"),
    ]
    with ComposeServer(workdir, "artifacts", args, env={"TMPDIR": str(workdir)}) as server:
        yield server


def test_buildgrid_serves_with_the_deploy_config_and_keeps_its_cas_across_a_restart(
    buildgrid: ComposeServer,
) -> None:
    # Given BuildGrid started as the compose file starts it
    blob = b"kept on the buildgrid-cas volume\n"
    with Remote(Endpoint(buildgrid.url)) as remote:
        # When a blob is uploaded to its CAS
        digest = CasClient(remote).upload_blob(blob)
    # And BuildGrid is killed and started again (its container was lost; the
    # volume stays)
    buildgrid.kill()
    buildgrid.start()
    with Remote(Endpoint(buildgrid.url)) as remote:
        cas = CasClient(remote)
        # Then the blob is still there
        assert cas.find_missing([digest]) == []
        assert cas.read_blob(digest) == blob
        # And a blob never uploaded is missing, as it should be
        absent = digest_of(b"never uploaded")
        assert cas.find_missing([absent]) == [absent]


def test_the_artifact_server_keeps_named_artifacts_across_a_restart(
    artifacts: ComposeServer,
) -> None:
    # Given the artifact server started as the compose file starts it
    uri = "urn:fdc:remex:2026:artifact:compose/test/0"
    with Remote(Endpoint(artifacts.url)) as remote:
        # When a directory is pushed and named by Remote Asset
        cas = CasClient(remote)
        file_digest = cas.upload_blob(b"artifact file\n")
        root = re_pb2.Directory(files=[re_pb2.FileNode(name="file", digest=file_digest)])
        root_digest = cas.upload_message(root)
        AssetClient(remote).push_directory([uri], root_digest)
    # And the server is killed and started again (the artifacts-data volume stays)
    artifacts.kill()
    artifacts.start()
    with Remote(Endpoint(artifacts.url)) as remote:
        # Then the name still finds the directory, and its file is there
        fetched = AssetClient(remote).fetch_directory([uri])
        assert fetched is not None
        assert fetched.digest == root_digest
        assert CasClient(remote).read_blob(file_digest) == b"artifact file\n"
