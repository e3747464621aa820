"""Separate Redis ACL users for workers and submitters, as docs/operations.md
says: a build, its checkout, ``status`` and ``cancel`` work with the
documented rules (Redis's ``default`` user switched off), nothing was denied
(``ACL LOG`` stays empty), and the admin commands are refused to both.

Real servers: redis-server, buildbox-casd, two ``remex worker`` processes
logged in as ``remex-worker``, the CLI as ``remex-submit``.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from pipeline.servers import CasdServer, RedisServer, RemexWorker
from pipeline.servers.base import remex_program
from tests.hello import copy_hello_project

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"

# The rules of docs/operations.md ("Separate Redis users"), word for word.
WORKER_RULES = (
    "-@all +@read +@write +@keyspace +@pubsub +@scripting +@transaction "
    "+@connection +time -@dangerous"
)
SUBMITTER_RULES = WORKER_RULES + " -@blocking +xread"


@dataclass
class AclStack:
    redis: RedisServer
    admin: redis.Redis
    url: dict[str, str]
    env: dict[str, str]
    project: Path
    workdir: Path

    def cli(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [remex_program(), *map(str, args)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )


def set_user(admin: redis.Redis, name: str, password: str, rules: str) -> None:
    admin.execute_command("ACL", "SETUSER", name, "reset", "on", f">{password}", "~*", "&*",
                          *rules.split())  # fmt: skip


@pytest.fixture(scope="module")
def acl_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclStack]:
    workdir = tmp_path_factory.mktemp("acl")
    with RedisServer(workdir / "redis") as server, CasdServer(workdir / "casd", jobs=2) as casd:
        client = redis.Redis(host="127.0.0.1", port=server.port)
        set_user(client, "remex-admin", "admin-pw", "+@all")
        set_user(client, "remex-worker", "worker-pw", WORKER_RULES)
        set_user(client, "remex-submit", "submit-pw", SUBMITTER_RULES)
        admin = redis.Redis(
            host="127.0.0.1", port=server.port, username="remex-admin", password="admin-pw"
        )
        # No anonymous access at all: every client below logs in as its user.
        admin.execute_command("ACL", "SETUSER", "default", "off")
        client.close()
        admin.execute_command("CLIENT", "KILL", "USER", "default")
        url = {
            name: f"redis://remex-{name}:{name}-pw@127.0.0.1:{server.port}/0"
            for name in ("worker", "submit")
        }
        (workdir / "remex.toml").touch()
        base = {k: v for k, v in os.environ.items() if not k.startswith("REMEX_")}
        base.update(
            REMEX_CONFIG=str(workdir / "remex.toml"),
            REMEX_STACK_DIR=str(workdir / "no-stack"),
            REMEX_EXECUTION_URL=casd.url,
            PYTHONUNBUFFERED="1",
        )
        workers = [
            RemexWorker(
                workdir / f"worker-{name}",
                name=name,
                env={**base, "REMEX_BROKER_URL": url["worker"]},
                concurrency=4,
            )
            for name in ("w1", "w2")
        ]
        try:
            for worker in workers:
                worker.start()
            yield AclStack(
                redis=server,
                admin=admin,
                url=url,
                env={
                    **base,
                    "REMEX_BROKER_URL": url["submit"],
                    "REMEX_CAS_DIR": str(workdir / "cli-cas"),
                },
                project=copy_hello_project(workdir / "hello"),
                workdir=workdir,
            )
        finally:
            for worker in workers:
                worker.close()


def test_a_build_runs_with_separate_worker_and_submitter_users(acl_stack: AclStack) -> None:
    # When the submitter builds, checks out, asks for the status and cancels
    build = acl_stack.cli("build", "-C", acl_stack.project, "app.bst", "--json")
    assert build.returncode == 0, build.stderr
    result = json.loads(build.stdout)
    assert {e["state"] for e in result["elements"]} == {"built"}
    out = acl_stack.workdir / "out"
    checkout = acl_stack.cli("checkout", "-C", acl_stack.project, "hello.bst", out)
    assert checkout.returncode == 0, checkout.stderr
    assert (out / "usr" / "share" / "hello" / "message").read_text() == "Hello, world!\n"
    assert acl_stack.cli("status", result["build"]).returncode == 0
    followed = acl_stack.cli("status", result["build"], "--follow", "--json-lines")
    assert followed.returncode == 0, followed.stderr
    assert json.loads(followed.stdout.splitlines()[-2])["event"] == "finished"
    assert acl_stack.cli("builds").returncode == 0
    assert acl_stack.cli("cancel", result["build"]).returncode == 0
    # Then no command of either user was refused along the way
    assert acl_stack.admin.execute_command("ACL", "LOG") == []
    # And the users were those that talked to Redis
    users = {c["user"] for c in acl_stack.admin.client_list()}
    assert "remex-worker" in users and "default" not in users


def test_admin_commands_are_refused_to_both_and_consuming_to_the_submitter(
    acl_stack: AclStack,
) -> None:
    worker = redis.Redis.from_url(acl_stack.url["worker"])
    submitter = redis.Redis.from_url(acl_stack.url["submit"])
    for client in (worker, submitter):
        for command in (("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("MONITOR",)):
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.execute_command(*command)
    # A submitter cannot take tasks off a queue (a blocking pop), a worker can
    with pytest.raises(redis.exceptions.NoPermissionError):
        submitter.execute_command("BRPOP", "remex.acl-test", "1")
    assert worker.execute_command("BRPOP", "remex.acl-test", "1") is None
    # Without a user, nothing at all
    anonymous = redis.Redis(host="127.0.0.1", port=acl_stack.redis.port)
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()


def test_the_rules_tested_are_the_documented_ones() -> None:
    text = DOCS.read_text()
    assert WORKER_RULES in text
    assert SUBMITTER_RULES.replace(WORKER_RULES, "").strip() in text


def test_a_submitter_refused_xread_follows_a_build_by_reading_its_events(
    acl_stack: AclStack,
) -> None:
    # Given a submitter with the rules of older docs (-@blocking, no +xread)
    set_user(acl_stack.admin, "remex-old", "old-pw", WORKER_RULES + " -@blocking")
    env = {**acl_stack.env, "REMEX_BROKER_URL": acl_stack.url["submit"].replace(
        "remex-submit:submit-pw", "remex-old:old-pw")}  # fmt: skip
    process = subprocess.Popen(
        [remex_program(), "build", "-C", str(acl_stack.project), "app.bst", "--json-lines"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = process.communicate(timeout=300)
    # Then it still follows the build to its end (XREAD refused: XRANGE reads)
    assert process.returncode == 0, stderr
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert lines[0]["event"] == "submitted" and lines[-2]["event"] == "finished"
    log = acl_stack.admin.execute_command("ACL", "LOG")
    refused = {(e.get(b"username"), e.get(b"object")) for e in log}
    assert (b"remex-old", b"xread") in refused, log
