"""Build priorities with real workers: a later high-priority build overtakes.

A stack of the module's own with one worker of two threads and an execution
buildbox-casd of two jobs, so that a build of many 1 s actions keeps every
thread busy and the rest of its elements wait in the queue: which messages
the worker takes next is then the priorities' doing alone (with two workers,
data locality keeps an element's later stages on its worker, which mixes in).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.servers import RemexStack
from pipeline.testing.dag import DagProject, make_dag_project

BUILD_TIMEOUT = 180.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemexStack]:
    with RemexStack(
        tmp_path_factory.mktemp("priority-stack"), workers=1, concurrency=2, jobs=2
    ) as remex:
        yield remex


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll ``predicate`` until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)
    return value


def build_ids(stack: RemexStack) -> set[str]:
    return {str(b) for b in stack.scheduler().redis.zrange("remex:builds", 0, -1)}


def start_build(
    stack: RemexStack, project: DagProject, priority: int
) -> tuple[subprocess.Popen[str], str]:
    """``remex build --json --priority N`` in the background; it and its build id."""
    known = build_ids(stack)
    process = stack.cli_popen(
        "build", "-C", project.path, *project.targets, "--json", "--priority", str(priority)
    )
    new = wait_for("the build to be submitted", lambda: build_ids(stack) - known)
    assert len(new) == 1, new
    return process, new.pop()


def finish(process: subprocess.Popen[str], stack: RemexStack) -> dict[str, Any]:
    """The JSON of a successful ``remex build --json``."""
    try:
        stdout, stderr = process.communicate(timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        raise AssertionError(f"remex build did not finish:\n{stderr}\n{stack.logs()}") from None
    assert process.returncode == 0, f"{stdout[-3000:]}\n{stderr}\n{stack.logs()}"
    output: dict[str, Any] = json.loads(stdout)
    return output


LATER_STAGES = ("execute", "fetch_outputs", "push_artifact")


def test_a_later_high_priority_build_finishes_first(
    stack: RemexStack, tmp_path: Path, busybox_sysroot: Path
) -> None:
    # Given a priority-9 build of 24 independent 1 s actions that keeps both
    # worker threads busy (its elements wait in the queue at their execute
    # stage: the first two stages are quick)
    low_project = make_dag_project(
        tmp_path / "low", sysroot=busybox_sysroot, n=24, shape="wide", sleep=1, salt="low"
    )
    high_project = make_dag_project(
        tmp_path / "high", sysroot=busybox_sysroot, n=4, shape="wide", sleep=1, salt="high"
    )
    scheduler = stack.scheduler()
    low, low_id = start_build(stack, low_project, 9)
    # When each element reached its execute stage, watched from here
    reached: dict[tuple[str, str], float] = {}
    builds = [low_id]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for build in list(builds):
                for e in scheduler.status(build).elements:
                    if e.state == "built" or e.info.get("stage") in LATER_STAGES:
                        reached.setdefault((build, e.element), time.time())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        wait_for("low elements executing", lambda: len(reached) >= 2)
        # When a priority-0 build is submitted later
        high, high_id = start_build(stack, high_project, 0)
        builds.append(high_id)
        assert json.loads(scheduler.redis.hget(f"remex:build:{high_id}:meta", "priority")) == 0

        def high_sent() -> bool:
            mine = {e.element: e.state for e in scheduler.status(high_id).elements}
            return all(mine.get(e) not in (None, "pending") for e in high_project.elements)

        wait_for("the high build's elements to be sent", high_sent)
        submitted = time.time()
        time.sleep(0.2)  # (a message the worker has just taken is seen)
        queued = {e for e in low_project.elements if (low_id, e) not in reached}
        assert len(queued) >= 8, queued  # (the low build was still queued)
        # Then the high build finishes first
        high_output = finish(high, stack)
        high_done = time.time() - submitted
        assert {e["state"] for e in high_output["elements"]} <= {"built", "cached"}
        assert scheduler.status(low_id).status == "running"
        low_output = finish(low, stack)
        low_done = time.time() - submitted
        assert {e["state"] for e in low_output["elements"]} <= {"built", "cached"}
    finally:
        stop.set()
        watcher.join()
    # And its elements reached their execute stage ahead of the queued low
    # ones: all but the one that a thread freed while the last high element
    # was between its quick stages (no high message queued) may take
    high_at = sorted(reached[(high_id, e)] - submitted for e in high_project.elements)
    low_at = sorted(reached[(low_id, e)] - submitted for e in queued)
    overtaken = sum(1 for t in low_at if t < high_at[-1])
    print(
        f"\nhigh build done {high_done:.1f} s after its submission, low build {low_done:.1f} s;"
        f" high elements at execute {[round(t, 2) for t in high_at]} s; of the"
        f" {len(queued)} queued low ones the first at {low_at[0]:.2f} s, {overtaken} before"
        " the last high one"
    )
    assert overtaken <= stack.concurrency - 1, (high_at, low_at)


def test_a_priority_out_of_range_is_a_usage_error(stack: RemexStack, tmp_path: Path) -> None:
    result = stack.cli("build", "-C", tmp_path, "--priority", "10", "x.bst")
    assert result.returncode == 2
    assert "--priority" in result.stderr
    assert "Traceback" not in result.stderr
