"""The Celery pipeline under faults, with real worker processes.

A stack of the module's own (pipeline/servers/stack.py): redis-server, an execution
buildbox-casd, an artifact buildbox-casd and two ``remex worker`` processes
whose heartbeat timeout is 5 s. Builds run through the CLI, as a user runs
them; the tests watch them through the scheduler's state in Redis, and
break things while they run: SIGKILL a worker, restart buildbox-casd, submit
the same elements twice, cancel.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.scheduler import BuildStatus, ElementStatus
from pipeline.servers import RemexStack
from pipeline.testing.dag import DagProject
from tests.hello import file_tree

BUILD_TIMEOUT = 120.0


def wait_for(
    what: str, predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.1
) -> Any:
    """Poll ``predicate`` until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def build_ids(stack: RemexStack) -> set[str]:
    """Every build recorded in the stack's Redis."""
    return {str(b) for b in stack.scheduler().redis.zrange("remex:builds", 0, -1)}


def executing(status: BuildStatus, host: str | None = None) -> list[ElementStatus]:
    """Elements running their execute stage (on ``host``, if given)."""
    return [
        e
        for e in status.elements
        if e.state == "running"
        and e.info.get("stage") == "execute"
        and (host is None or e.info.get("host") == host)
    ]


def start_build(stack: RemexStack, project: DagProject) -> tuple[subprocess.Popen[str], str]:
    """``remex build --json`` in the background; returns it and the build id."""
    known = build_ids(stack)
    process = stack.cli_popen("build", "-C", project.path, *project.targets, "--json")
    new = wait_for("the build to be submitted", lambda: build_ids(stack) - known, 60)
    assert len(new) == 1, new
    return process, new.pop()


def finish(process: subprocess.Popen[str], stack: RemexStack) -> tuple[int, dict[str, Any]]:
    try:
        stdout, stderr = process.communicate(timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        raise AssertionError(f"remex build did not finish:\n{stderr}\n{stack.logs()}") from None
    try:
        return process.returncode, json.loads(stdout)
    except json.JSONDecodeError:
        raise AssertionError(
            f"exit {process.returncode}, no JSON:\n{stdout}\n{stderr}\n{stack.logs()}"
        ) from None


def states(output: dict[str, Any]) -> dict[str, str]:
    return {e["element"]: e["state"] for e in output["elements"]}


def states_count(output: dict[str, Any]) -> dict[str, int]:
    """State -> how many elements of a whole status (``--json``) are in it."""
    counts: dict[str, int] = {}
    for state in states(output).values():
        counts[state] = counts.get(state, 0) + 1
    return counts


def assert_all_built(output: dict[str, Any], project: DagProject) -> None:
    """Every element built (the base import may be cached: it never changes)."""
    built = states(output)
    assert built.pop("base.bst") in ("built", "cached")
    assert built == dict.fromkeys([*project.elements, "all.bst"], "built")


def assert_artifacts(stack: RemexStack, project: DagProject, dest: Path) -> None:
    """Every element's artifact, checked out through all.bst, holds the expected file."""
    result = stack.cli("checkout", "-C", project.path, "--deps", "run", "all.bst", dest)
    assert result.returncode == 0, result.stderr
    files = {
        path: content for path, (kind, content, _) in file_tree(dest).items() if kind == "file"
    }
    assert files == {p: c for e in project.elements for p, c in project.expected[e].items()}


# --- a worker dies -------------------------------------------------------------------------


def test_a_build_survives_a_worker_killed_while_executing(
    remex_stack: RemexStack, project_factory: Callable[..., DagProject], tmp_path: Path
) -> None:
    # Given a build whose actions take 2 s each, running on both workers
    project = project_factory(n=10, shape="dag", layers=2, sleep=2)
    victim = remex_stack.workers[0]
    process, build_id = start_build(remex_stack, project)
    scheduler = remex_stack.scheduler()
    # When the first worker is SIGKILLed while it follows an execution
    try:
        wait_for(
            f"elements executing on {victim.worker_name}",
            lambda: len(executing(scheduler.status(build_id), victim.worker_name)) >= 2,
        )
        victim.kill()
        killed_at = time.monotonic()
        # Then the build still succeeds
        code, output = finish(process, remex_stack)
        seconds = time.monotonic() - killed_at
    finally:
        # (the module's later tests get two workers again)
        remex_stack.workers.remove(victim)
        remex_stack.add_worker()
    assert code == 0, json.dumps(output, indent=1)[-4000:] + remex_stack.logs()
    assert_all_built(output, project)
    # And the elements the dead worker held were sent again, and built elsewhere
    resent = {e["element"]: e for e in output["elements"] if e.get("resent_because")}
    assert resent, "no element was re-sent"
    for info in resent.values():
        # (taken by the dead worker, or handed on to its own queue)
        reason = info["resent_because"]
        assert "is gone" in reason or "no worker holds it" in reason, reason
        assert info["attempt"] >= 2
    print(f"build finished {seconds:.1f} s after the kill; re-sent {sorted(resent)}")
    # And the counts the scheduler kept through the re-sends match the states
    assert scheduler.verify_counts(build_id) == []
    summary = scheduler.status(build_id, every=False)
    assert summary.summary and summary.counts() == states_count(output)
    assert summary.elements == []  # nothing live or failed is left
    # And every artifact is right
    assert_artifacts(remex_stack, project, tmp_path / "checkout")


def test_a_build_survives_a_worker_whose_local_cas_is_wiped(
    remex_stack: RemexStack, project_factory: Callable[..., DagProject], tmp_path: Path
) -> None:
    # Given a build whose actions take 1 s each, running on both workers
    project = project_factory(n=10, shape="dag", layers=3, sleep=1)
    victim = remex_stack.workers[0]
    process, build_id = start_build(remex_stack, project)
    scheduler = remex_stack.scheduler()
    # When that worker's whole local CAS folder is deleted while it executes
    # (a disk cleaned by hand, a tmpfs lost): the remote CAS is the truth
    wait_for(
        f"elements executing on {victim.worker_name}",
        lambda: len(executing(scheduler.status(build_id), victim.worker_name)) >= 1,
    )
    shutil.rmtree(victim.cas_dir, ignore_errors=True)
    # Then the build still succeeds, every artifact right
    code, output = finish(process, remex_stack)
    assert code == 0, json.dumps(output, indent=1)[-4000:] + remex_stack.logs()
    assert_all_built(output, project)
    assert_artifacts(remex_stack, project, tmp_path / "checkout")


# --- the execution server restarts ------------------------------------------------------------


@pytest.mark.parametrize("store", ["kept", "wiped"])
def test_a_build_survives_a_restart_of_the_execution_server(
    remex_stack: RemexStack,
    project_factory: Callable[..., DagProject],
    tmp_path: Path,
    store: str,
) -> None:
    # Given a build whose actions take 3 s each
    project = project_factory(n=6, shape="dag", layers=2, sleep=3)
    process, build_id = start_build(remex_stack, project)
    scheduler = remex_stack.scheduler()
    # When buildbox-casd is killed while an action runs (its operation is
    # known: the execute task re-queued itself after 2 s), and started again
    # on the same port: the running operations are lost; with the store
    # wiped, so are the blobs uploaded and the ActionCache
    in_flight = wait_for(
        "an operation in flight",
        lambda: [e for e in executing(scheduler.status(build_id)) if e.info.get("operation")],
    )
    casd = remex_stack.execution
    casd.kill()
    if store == "wiped":
        shutil.rmtree(casd.cas_dir)
        casd.cas_dir.mkdir()
    time.sleep(1)
    casd.start()
    # Then the build completes, every element built, every artifact right
    code, output = finish(process, remex_stack)
    assert code == 0, json.dumps(output, indent=1)[-4000:] + remex_stack.logs()
    assert_all_built(output, project)
    assert_artifacts(remex_stack, project, tmp_path / "checkout")
    print(f"lost operations of {[e.element for e in in_flight]} ({store} store): executed again")


# --- two builds, shared elements ----------------------------------------------------------------


def test_two_builds_at_once_build_each_shared_element_once(
    remex_stack: RemexStack, project_factory: Callable[..., DagProject]
) -> None:
    # Given one project (2 s per action), built by two builds submitted at once
    project = project_factory(n=6, shape="dag", layers=2, sleep=2)
    first, first_id = start_build(remex_stack, project)
    second, second_id = start_build(remex_stack, project)
    assert first_id != second_id
    scheduler = remex_stack.scheduler()
    # Then while they run, the second build's elements wait on the first's (or
    # the other way round), instead of building them again
    waiting = wait_for(
        "an element waiting on the other build",
        lambda: [
            e
            for b in (first_id, second_id)
            for e in scheduler.status(b).elements
            if e.state == "queued" and e.info.get("waiting_on")
        ],
        timeout=60,
    )
    assert waiting[0].info["waiting_on"].split("\t")[0] in (first_id, second_id)
    # And both succeed
    outputs = [finish(first, remex_stack), finish(second, remex_stack)]
    for code, output in outputs:
        assert code == 0, json.dumps(output, indent=1)[-3000:]
        assert set(states(output).values()) <= {"built", "cached"}
    # And each element was built by exactly one of them: the other has it
    # from the first's artifact lookup (cached) or from the same finish (built_by)
    infos = [{e["element"]: e for e in output["elements"]} for _, output in outputs]
    shared = 0
    for element in [*project.elements, "all.bst"]:  # (base.bst is cached by now)
        builders = [
            info[element]
            for info in infos
            if info[element]["state"] == "built" and not info[element].get("built_by")
        ]
        assert len(builders) == 1, (element, [info[element] for info in infos])
        shared += sum(1 for info in infos if info[element].get("built_by"))
    assert shared > 0
    # And each build's counts (moved by the other build's finishes too) are right
    for build_id in (first_id, second_id):
        assert scheduler.verify_counts(build_id) == []


# --- cancel --------------------------------------------------------------------------------------


def test_cancel_stops_a_running_build(
    remex_stack: RemexStack, project_factory: Callable[..., DagProject]
) -> None:
    # Given a long build (a chain of 2 s actions) followed by remex build
    project = project_factory(n=5, shape="chain", sleep=2)
    process, build_id = start_build(remex_stack, project)
    scheduler = remex_stack.scheduler()
    wait_for("an element executing", lambda: executing(scheduler.status(build_id)))
    # When it is cancelled
    result = remex_stack.cli("cancel", build_id)
    assert result.returncode == 0, result.stderr
    assert "cancelled" in result.stdout
    # Then the following remex build stops, and its exit code says it did not succeed
    code, output = finish(process, remex_stack)
    assert code != 0
    assert output["status"] == "cancelled"
    final = states(output)
    assert "cancelled" in final.values()
    assert set(final.values()) <= {"built", "cached", "cancelled"}
    # And nothing of it runs any more: no element starts or finishes later
    time.sleep(2)
    later = remex_stack.cli("status", build_id, "--json")
    assert later.returncode == 0
    assert states(json.loads(later.stdout)) == final
    assert json.loads(later.stdout)["status"] == "cancelled"
    # And its counts say the same (remex status reads them, not every element)
    assert scheduler.verify_counts(build_id) == []
    assert json.loads(later.stdout)["counts"] == states_count(output)
    # And its elements still build afterwards (the cancelled claims are released)
    code, output = remex_stack.build_json(project.path, "e000.bst", timeout=BUILD_TIMEOUT)
    assert code == 0, output
