"""Flower watching a real build: ``remex up --flower``, ``remex build``, Flower's REST API.

The embedded stack as a user starts it (redis-server, buildbox-casd, one
``remex worker``, Flower), in a state folder of the test's own; examples/hello
is built with ``remex build``; then Flower's ``/api/tasks`` must list the five
stage tasks of every element, named ``remex.<stage>``, with the element and
the build in their arguments and SUCCESS as their final state.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.broker import STAGES
from pipeline.servers import pid_alive, remex_program
from tests.hello import ELEMENTS, copy_hello_project

# Flower gets task events asynchronously: the last ones may arrive a moment
# after `remex build` returned.
EVENTS_DEADLINE = 15.0


@dataclass
class FlowerBuild:
    """A stack with Flower, and one finished build of examples/hello on it."""

    env: dict[str, str]
    stack_dir: Path
    up_output: str
    build: dict[str, Any]

    def cli(self, *args: str | os.PathLike[str], timeout: float = 120.0) -> str:
        result = subprocess.run(
            [remex_program(), *map(str, args)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, f"remex {args}: {result.stdout}\n{result.stderr}"
        return result.stdout

    @property
    def state(self) -> dict[str, Any]:
        return dict(json.loads((self.stack_dir / "stack.json").read_text()))

    @property
    def flower_url(self) -> str:
        return str(self.state["flower"]["url"])

    @property
    def password(self) -> str:
        return Path(self.state["flower"]["password_file"]).read_text().strip()

    def get(self, path: str, *, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
        """GET ``path`` on Flower: (HTTP status, body); ``auth`` defaults to
        the stack's credentials, ``("", "")`` sends none."""
        user, password = auth if auth is not None else ("remex", self.password)
        request = urllib.request.Request(self.flower_url + path)
        if user or password:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def tasks(self, search: str) -> dict[str, dict[str, Any]]:
        """Flower's ``/api/tasks?search=...``: task id -> task."""
        status, body = self.get(f"/api/tasks?search={search}")
        assert status == 200, body
        return dict(json.loads(body))


@pytest.fixture(scope="module")
def flower_build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerBuild]:
    """``remex up --detach --flower`` (one worker), then ``remex build`` of examples/hello."""
    root = tmp_path_factory.mktemp("flower")
    project = copy_hello_project(root / "hello")
    (root / "remex.toml").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REMEX_", "FLOWER_"))}
    env.update(
        REMEX_STACK_DIR=str(root / "stack"),
        REMEX_CONFIG=str(root / "remex.toml"),
        REMEX_CAS_DIR=str(root / "cli-cas"),
        PYTHONUNBUFFERED="1",
    )
    up = FlowerBuild(env, root / "stack", "", {})
    try:
        up_output = up.cli("up", "--detach", "--workers", "1", "--flower")
        output = up.cli("build", "-C", project, "app.bst", "--json")
        yield FlowerBuild(env, root / "stack", up_output, json.loads(output))
    finally:
        subprocess.run(
            [remex_program(), "down"], env=env, capture_output=True, timeout=120, check=False
        )


def wait_for_final_states(
    flower_build: FlowerBuild, build_id: str, count: int
) -> dict[str, dict[str, Any]]:
    """The build's tasks as Flower lists them, once ``count`` of them have
    reached a final state (or the deadline passed)."""
    deadline = time.monotonic() + EVENTS_DEADLINE
    while True:
        tasks = flower_build.tasks(build_id)
        final = [t for t in tasks.values() if t["state"] in ("SUCCESS", "FAILURE", "REVOKED")]
        if len(final) >= count or time.monotonic() > deadline:
            return tasks
        time.sleep(0.25)


def test_up_prints_flower_url_and_credentials(flower_build: FlowerBuild) -> None:
    # Given the stack started with --flower
    # Then `remex up` printed where Flower is and how to log in
    assert f"{flower_build.flower_url}/tasks" in flower_build.up_output
    assert "user remex" in flower_build.up_output
    assert flower_build.password in flower_build.up_output
    # And the password file is for the owner only
    password_file = Path(flower_build.state["flower"]["password_file"])
    assert password_file.stat().st_mode & 0o077 == 0


def test_every_stage_task_is_listed_with_element_build_and_final_state(
    flower_build: FlowerBuild,
) -> None:
    # Given a finished build of examples/hello
    build = flower_build.build
    assert build["status"] == "succeeded", build
    build_id = build["build"]
    by_element = {e["element"]: e for e in build["elements"]}
    assert set(by_element) == set(ELEMENTS)

    # When Flower is asked for the tasks mentioning the build
    tasks = wait_for_final_states(flower_build, build_id, len(ELEMENTS) * len(STAGES))

    # Then every element's five stage tasks are there, under the ids the
    # scheduler gave them, named remex.<stage>, each saying which element of
    # which build it worked on, and each succeeded; the first stages carry
    # the label remex gives them
    labels = {t["args"] for t in tasks.values() if t["name"] == "remex.stage_to_cas"}
    assert labels == {f"{e} [build {build_id}, attempt 1]" for e in ELEMENTS}
    for element, info in by_element.items():
        expected_ids = info["task_ids"]
        assert len(expected_ids) == len(STAGES)
        for stage, task_id in zip(STAGES, expected_ids, strict=True):
            task = tasks.get(task_id)
            assert task is not None, f"{element} {stage}: task {task_id} not in Flower"
            assert task["name"] == f"remex.{stage}"
            # (the label "<element> [build <id>, attempt N]"; a task that
            # re-queued itself shows its payload, which names both too)
            assert element in task["args"] and build_id in task["args"], task["args"]
            assert task["state"] == "SUCCESS", task
            assert task["worker"].startswith("remex-embedded-0@")
    # And nothing else mentions the build
    assert len(tasks) == len(ELEMENTS) * len(STAGES)


def test_a_stage_task_shows_its_chain_and_result(flower_build: FlowerBuild) -> None:
    # Given hello.bst's execute task (a real action ran)
    build_id = flower_build.build["build"]
    hello = next(e for e in flower_build.build["elements"] if e["element"] == "hello.bst")
    _, upload, execute, _, _ = hello["task_ids"]

    # When Flower's task page data is read
    status, body = flower_build.get(f"/api/task/info/{execute}")

    # Then it belongs to the element's chain (its parent: the upload task) and
    # its result is the small JSON state passed on, naming the element
    assert status == 200, body
    task = json.loads(body)
    assert task["parent_id"] == upload
    assert "'element': 'hello.bst'" in task["result"]
    assert f"'build': '{build_id}'" in task["result"]


def test_the_api_and_pages_need_the_password(flower_build: FlowerBuild) -> None:
    # Given Flower started with basic auth
    # Then no credentials, or a wrong password, are refused
    assert flower_build.get("/api/tasks", auth=("", ""))[0] == 401
    assert flower_build.get("/tasks", auth=("remex", "wrong"))[0] == 401
    # And the right ones open the pages
    status, body = flower_build.get("/tasks")
    assert status == 200
    assert b"Flower" in body


def test_prometheus_metrics_need_the_password_and_count_the_stage_tasks(
    flower_build: FlowerBuild,
) -> None:
    # Given the finished build
    wait_for_final_states(flower_build, flower_build.build["build"], len(ELEMENTS) * len(STAGES))
    # When Prometheus scrapes /metrics without the password, it is refused
    # (remex puts /metrics behind the pages' basic auth; /healthcheck stays open)
    assert flower_build.get("/metrics", auth=("", ""))[0] == 401
    assert flower_build.get("/metrics", auth=("remex", "wrong"))[0] == 401
    assert flower_build.get("/healthcheck", auth=("", "")) == (200, b"OK")
    # When it scrapes with the password (a scrape job's basic_auth)
    status, body = flower_build.get("/metrics")
    # Then Flower's counters and runtimes name remex's tasks
    assert status == 200
    text = body.decode()
    for stage in STAGES:
        assert f'flower_events_total{{task="remex.{stage}",type="task-succeeded"' in text
    assert 'flower_task_runtime_seconds_count{task="remex.execute"' in text
    assert "flower_worker_online" in text


def test_down_stops_flower_and_up_brings_its_history_back(flower_build: FlowerBuild) -> None:
    # Given the stack with Flower, after the build
    wait_for_final_states(flower_build, flower_build.build["build"], len(ELEMENTS) * len(STAGES))
    flower_pid = int(flower_build.state["flower"]["pid"])
    password = flower_build.password

    # When the stack goes down
    down = flower_build.cli("down")

    # Then Flower was stopped with the rest, and its state was saved
    assert f"flower (pid {flower_pid})" in down
    assert not pid_alive(flower_pid)
    assert any(flower_build.stack_dir.glob("flower/flower.db*"))

    # When it comes up again
    flower_build.cli("up", "--detach", "--workers", "1", "--flower")

    # Then the password is the same and the earlier build's tasks are still listed
    assert flower_build.password == password
    tasks = flower_build.tasks(flower_build.build["build"])
    assert len(tasks) == len(ELEMENTS) * len(STAGES)
    assert {t["state"] for t in tasks.values()} == {"SUCCESS"}
