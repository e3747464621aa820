"""The remex pipeline on BuildGrid: ``remex build`` with bots doing the execution.

The stack: BuildGrid 0.4.4 (execution, CAS, ActionCache; PostgreSQL), a
buildbox-casd as the artifact server (Remote Asset + its CAS: BuildGrid has
no Remote Asset), redis-server, two ``remex bot`` processes (buildbox-run,
capacity 2) and two ``remex worker`` processes. Every ``remex`` command runs
as a subprocess with an environment naming those servers (and an empty config
file). Artifacts of dependencies live on the artifact server only: their
blobs reach BuildGrid's CAS through the upload stage.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bot.process import BotProcess
from tests.dag import make_dag_project
from tests.hello import EXPECTED_HELLO_FILES, copy_hello_project, file_tree
from tests.servers import BuildGridServer, CasdServer, RedisServer
from tests.workers import RemexWorker, remex_program


@dataclass
class GridStack:
    grid: BuildGridServer
    artifacts: CasdServer
    redis: RedisServer
    workdir: Path
    bots: list[BotProcess] = field(default_factory=list)
    workers: list[RemexWorker] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REMEX_")}
        config = self.workdir / "remex.toml"
        config.touch()
        env.update(
            REMEX_CONFIG=str(config),
            REMEX_STACK_DIR=str(self.workdir / "no-embedded-stack"),
            REMEX_BROKER_URL=self.redis.url,
            REMEX_EXECUTION_URL=self.grid.url,
            REMEX_ARTIFACTS_URL=self.artifacts.url,
            REMEX_HEARTBEAT_TIMEOUT="5",
            REMEX_RECONCILE_INTERVAL="1",
            PYTHONUNBUFFERED="1",
        )
        return env

    def cli(
        self, *args: str | os.PathLike[str], timeout: float = 240
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [remex_program(), *map(str, args)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    def build_json(self, project: Path, *targets: str) -> tuple[int, dict[str, Any]]:
        result = self.cli("build", "-C", project, *targets, "--json")
        try:
            return result.returncode, json.loads(result.stdout)
        except json.JSONDecodeError:
            raise AssertionError(
                f"remex build exited {result.returncode} without JSON:\n{result.stdout}\n"
                f"{result.stderr}\n{self.logs()}"
            ) from None

    def leases_run(self) -> Counter[str]:
        return Counter({b.bot_id: b.log_text().count(": started (") for b in self.bots})

    def logs(self, lines: int = 30) -> str:
        parts = [f"--- bot {b.bot_id}:\n{b.log_tail(lines)}" for b in self.bots]
        parts += [f"--- worker {w.worker_name}:\n{w.log_tail(lines)}" for w in self.workers]
        return "\n".join(parts)


@pytest.fixture(scope="module")
def stack(
    bots_buildgrid: BuildGridServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GridStack]:
    workdir = tmp_path_factory.mktemp("grid-stack")
    with contextlib.ExitStack() as cleanup:
        artifacts = cleanup.enter_context(CasdServer(workdir / "casd-artifacts", jobs=1))
        redis = cleanup.enter_context(RedisServer(workdir / "redis"))
        stack = GridStack(bots_buildgrid, artifacts, redis, workdir)
        stack.env = stack.base_env() | {"REMEX_CAS_DIR": str(workdir / "cli-cas")}
        for name in ("bot1", "bot2"):
            bot = BotProcess(workdir / name, remote=bots_buildgrid.url, bot_id=name, capacity=2)
            cleanup.callback(bot.close)
            stack.bots.append(bot.start())
        for name in ("w1", "w2"):
            worker = RemexWorker(workdir / f"worker-{name}", name=name, env=stack.base_env())
            cleanup.callback(worker.close)
            stack.workers.append(worker.start())
        yield stack


def states(output: dict[str, Any]) -> dict[str, str]:
    return {e["element"]: e["state"] for e in output["elements"]}


def test_hello_builds_on_buildgrid_and_every_artifact_checks_out(
    stack: GridStack, tmp_path: Path
) -> None:
    # Given a copy of examples/hello
    project = copy_hello_project(tmp_path / "hello")
    before = stack.leases_run()
    # When app.bst is built
    started = time.monotonic()
    code, output = stack.build_json(project, "app.bst")
    seconds = time.monotonic() - started
    # Then every element is built, the three manual ones by the bots
    assert code == 0, json.dumps(output, indent=1)[-3000:] + stack.logs()
    assert set(states(output).values()) == {"built"}, states(output)
    assert sum((stack.leases_run() - before).values()) == 3
    print(f"examples/hello on BuildGrid: {seconds:.1f} s")
    # And hello.bst checks out with exactly the files its commands install
    result = stack.cli("checkout", "-C", project, "hello.bst", tmp_path / "hello-out")
    assert result.returncode == 0, result.stderr
    assert file_tree(tmp_path / "hello-out") == EXPECTED_HELLO_FILES
    # And name.bst (needed only to build hello) holds the name
    result = stack.cli("checkout", "-C", project, "name.bst", tmp_path / "name-out")
    assert result.returncode == 0, result.stderr
    assert file_tree(tmp_path / "name-out")["usr/share/hello/name"] == ("file", b"world", False)
    # And app.bst with its runtime dependencies brings hello, greeting and the sysroot
    result = stack.cli("checkout", "-C", project, "--deps", "run", "app.bst", tmp_path / "app")
    assert result.returncode == 0, result.stderr
    tree = file_tree(tmp_path / "app")
    for path, entry in EXPECTED_HELLO_FILES.items():
        assert tree[path] == entry
    assert tree["usr/share/hello/message"] == ("file", b"Hello, world!\n", False)
    assert tree["usr/share/hello/greeting"] == ("file", b"Hello", False)
    assert tree["usr/bin/busybox"][2] is True


def test_a_generated_dag_builds_on_both_bots_and_checks_out(
    stack: GridStack, tmp_path: Path, busybox_sysroot: Path
) -> None:
    # Given a generated 16-element DAG (diamonds, a fan-out)
    dag = make_dag_project(tmp_path / "dag", n=16, salt="buildgrid", sysroot=busybox_sysroot)
    before = stack.leases_run()
    # When it is built
    started = time.monotonic()
    code, output = stack.build_json(dag.path, *dag.targets)
    seconds = time.monotonic() - started
    # Then every element is built, and both bots ran actions
    assert code == 0, json.dumps(output, indent=1)[-3000:] + stack.logs()
    assert states(output) == dict.fromkeys(dag.all_elements, "built")
    ran = stack.leases_run() - before
    assert sum(ran.values()) == len(dag.elements) and set(ran) == {"bot1", "bot2"}, ran
    print(f"16-element DAG on BuildGrid: {seconds:.1f} s, actions per bot {dict(ran)}")
    # And all.bst checks out with every element's file, holding the expected content
    dest = tmp_path / "all"
    result = stack.cli("checkout", "-C", dag.path, "--deps", "run", "all.bst", dest)
    assert result.returncode == 0, result.stderr
    files = {
        path: content
        for path, (kind, content, _) in file_tree(dest).items()
        if kind == "file" and path.startswith("usr/share/dag/")
    }
    expected = {path: content for e in dag.elements for path, content in dag.expected[e].items()}
    assert files == expected
