"""The ``remex`` command line as a user runs it, against a real stack.

redis-server, an execution buildbox-casd, an artifact buildbox-casd and two
``remex worker`` processes (pipeline/servers/stack.py); every ``remex`` command runs as
a subprocess with an environment naming them (and an empty config file).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.servers import RemexStack
from pipeline.testing.dag import FAIL_MARKER, DagProject, file_name, make_dag_project
from tests.hello import EXPECTED_HELLO_FILES, copy_hello_project, file_tree


def states(output: dict[str, Any]) -> dict[str, str]:
    return {e["element"]: e["state"] for e in output["elements"]}


def checked_out_files(
    stack: RemexStack, project: Path, element: str, dest: Path
) -> dict[str, bytes]:
    """``remex checkout --deps run``: every file under ``dest`` -> its content."""
    result = stack.cli("checkout", "-C", project, "--deps", "run", element, dest)
    assert result.returncode == 0, result.stderr
    return {
        path: content
        for path, (kind, content, _) in file_tree(dest).items()
        if kind == "file" and isinstance(content, bytes)
    }


@dataclass
class FirstBuild:
    """What ``remex build --json`` of a fresh project gave."""

    code: int
    output: dict[str, Any]
    seconds: float


@pytest.fixture(scope="module")
def dag_build(
    remex_stack: RemexStack, tmp_path_factory: pytest.TempPathFactory, busybox_sysroot: Path
) -> tuple[DagProject, FirstBuild]:
    """The 40-element DAG, built once by ``remex build --json``."""
    project = make_dag_project(
        tmp_path_factory.mktemp("dag") / "dag", n=40, salt="e2e", sysroot=busybox_sysroot
    )
    started = time.monotonic()
    code, output = remex_stack.build_json(project.path, *project.targets)
    return project, FirstBuild(code, output, time.monotonic() - started)


@pytest.fixture
def dag(dag_build: tuple[DagProject, FirstBuild]) -> DagProject:
    """The 40-element DAG, built (successfully or not: see dag_build)."""
    return dag_build[0]


# --- examples/hello ---------------------------------------------------------------


def test_hello_builds_and_checks_out(remex_stack: RemexStack, tmp_path: Path) -> None:
    # Given a copy of examples/hello
    project = copy_hello_project(tmp_path / "hello")
    # When it is built with the live display
    result = remex_stack.cli("build", "-C", project, "app.bst")
    # Then the build succeeds, and says so
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{remex_stack.logs()}"
    assert "remex: build " in result.stderr
    assert "succeeded" in result.stdout
    # Without a terminal: a plain line per state change (the app's own, for
    # one), then the summary on a line of its own
    assert "remex: app.bst: built (built)" in result.stderr.splitlines()
    assert all(line.startswith("remex: ") for line in result.stderr.splitlines())
    assert result.stdout.splitlines()[0].startswith("build ")
    # And hello.bst's artifact holds exactly the expected files
    checkout = remex_stack.cli("checkout", "-C", project, "hello.bst", tmp_path / "out")
    assert checkout.returncode == 0, checkout.stderr
    assert file_tree(tmp_path / "out") == EXPECTED_HELLO_FILES
    # And with --deps run, app.bst brings hello's files (and the sysroot)
    files = checked_out_files(remex_stack, project, "app.bst", tmp_path / "app")
    assert files["usr/share/hello/message"] == b"Hello, world!\n"
    assert "usr/bin/busybox" in files


# --- a 40-element DAG ---------------------------------------------------------------


def test_dag_builds_every_element_on_both_workers(
    remex_stack: RemexStack, dag_build: tuple[DagProject, FirstBuild]
) -> None:
    # Given the 40-element DAG (diamonds, a fan-out) built once from scratch
    dag, first = dag_build
    code, output, seconds = first.code, first.output, first.seconds
    # Then the build succeeded, every element was built (none was cached before)
    assert code == 0, json.dumps(output, indent=1)[-3000:] + remex_stack.logs()
    assert output["status"] == "succeeded"
    assert states(output) == dict.fromkeys(dag.all_elements, "built")
    # And both workers took part
    hosts = Counter(host for e in output["elements"] for host in e.get("hosts", []))
    assert set(hosts) == {"w1", "w2"}, hosts
    print(f"40-element DAG: {seconds:.1f} s, elements per worker {dict(hosts)}")


def test_every_dag_artifact_checks_out_with_the_expected_files(
    remex_stack: RemexStack, dag: DagProject, tmp_path: Path
) -> None:
    # Given the built DAG, when all.bst is checked out with its runtime dependencies
    files = checked_out_files(remex_stack, dag.path, "all.bst", tmp_path / "all")
    # Then every element's file is there, holding its name and its dependencies' hashes
    expected = {path: content for e in dag.elements for path, content in dag.expected[e].items()}
    assert files == expected
    # And one element alone checks out as itself only
    single = checked_out_files(remex_stack, dag.path, "e039.bst", tmp_path / "e039")
    assert single == {file_name("e039.bst"): dag.expected["e039.bst"][file_name("e039.bst")]}


def test_rebuild_with_nothing_changed_is_all_cached(
    remex_stack: RemexStack, dag: DagProject
) -> None:
    # When the same targets are built again
    started = time.monotonic()
    code, output = remex_stack.build_json(dag.path, *dag.targets)
    seconds = time.monotonic() - started
    # Then every element is an artifact cache hit: no task, no Execute at all
    assert code == 0, output
    assert states(output) == dict.fromkeys(dag.all_elements, "cached")
    assert not any(e.get("task_ids") or e.get("hosts") for e in output["elements"])
    # And it is quick (the CLI's start, loading, 42 artifact lookups)
    print(f"no-op rebuild of {len(dag.all_elements)} elements: {seconds:.2f} s")
    assert seconds < 15


def test_show_lists_keys_and_cached_or_buildable(
    remex_stack: RemexStack, dag: DagProject, tmp_path: Path, busybox_sysroot: Path
) -> None:
    # Given the built DAG, show lists every element as cached, with its key
    result = remex_stack.cli("show", "-C", dag.path, "all.bst")
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert [line[2] for line in lines] == dag.all_elements
    assert {line[0] for line in lines} == {"cached"}
    assert all(len(line[1]) == 16 for line in lines)
    # And in a changed project (a new salt) only the import that did not change is
    # cached; what depends on cached elements only is buildable, the rest waits
    fresh = make_dag_project(tmp_path / "fresh", n=3, salt="never-built", sysroot=busybox_sysroot)
    result = remex_stack.cli("show", "-C", fresh.path, "all.bst")
    assert result.returncode == 0, result.stderr
    shown = {line.split()[2]: line.split()[0] for line in result.stdout.splitlines()}
    assert shown == {
        "base.bst": "cached",
        "e000.bst": "buildable",
        "e001.bst": "waiting",
        "e002.bst": "waiting",
        "all.bst": "waiting",
    }


def test_log_prints_a_built_elements_log(remex_stack: RemexStack, dag: DagProject) -> None:
    result = remex_stack.cli("log", "-C", dag.path, "e007.bst")
    assert result.returncode == 0, result.stderr
    assert "building e007" in result.stdout


def test_no_follow_prints_a_build_id_that_status_reads(
    remex_stack: RemexStack, tmp_path: Path, busybox_sysroot: Path
) -> None:
    project = make_dag_project(tmp_path / "p", n=4, salt="no-follow", sysroot=busybox_sysroot)
    # When a build is submitted without following
    result = remex_stack.cli("build", "-C", project.path, "all.bst", "--no-follow")
    # Then it prints the build id at once
    assert result.returncode == 0, result.stderr
    build_id = result.stdout.strip()
    assert build_id and " " not in build_id
    # And status reads it, as JSON and as a table, until it is done
    deadline = time.monotonic() + 60
    while True:
        status = remex_stack.cli("status", build_id, "--json")
        assert status.returncode == 0, status.stderr
        current = json.loads(status.stdout)
        assert current["build"] == build_id
        if current["status"] != "running" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert current["status"] == "succeeded", current
    assert set(states(current)) == set(project.all_elements)
    table = remex_stack.cli("status", build_id)
    assert table.returncode == 0 and build_id in table.stdout and "e003.bst" in table.stdout
    # And --json --no-follow prints JSON
    again = remex_stack.cli("build", "-C", project.path, "all.bst", "--no-follow", "--json")
    assert again.returncode == 0 and "build" in json.loads(again.stdout)
    # And an unknown build is an error
    unknown = remex_stack.cli("status", "no-such-build")
    assert unknown.returncode == 1 and "no-such-build" in unknown.stderr


# --- failures --------------------------------------------------------------------------


def test_a_failing_command_fails_its_element_and_dependents_only(
    remex_stack: RemexStack, tmp_path: Path, busybox_sysroot: Path
) -> None:
    # Given a DAG with one element in the middle whose command exits 1
    project = make_dag_project(
        tmp_path / "fail", n=20, salt="fail", fail=["e010.bst"], sysroot=busybox_sysroot
    )
    broken = project.dependents(["e010.bst"])
    # When it is built (live display)
    result = remex_stack.cli("build", "-C", project.path, "all.bst", timeout=180)
    # Then the exit code says it failed, and the failed element's log tail is shown
    assert result.returncode == 1, f"{result.stdout}\n{result.stderr}"
    assert "e010.bst failed" in result.stdout
    assert f"{FAIL_MARKER}: e010" in result.stdout
    assert "exited with code 1" in result.stdout
    # And the status: failed, its dependents skipped, every other element built
    code, output = remex_stack.build_json(project.path, "all.bst")
    assert code == 1
    final = states(output)
    # (the second build finds the independent elements cached, and fails the same way)
    assert final["e010.bst"] == "failed"
    assert {e for e, s in final.items() if s == "skipped"} == broken
    assert {e for e, s in final.items() if s == "cached"} == (
        {"base.bst"} | project.independent_of(["e010.bst"])
    )
    assert "dependency e010.bst failed" in next(
        e["error"] for e in output["elements"] if e["element"] == "all.bst"
    )
    # And an independent element's artifact is right
    element = max(project.independent_of(["e010.bst"]))
    files = checked_out_files(remex_stack, project.path, element, tmp_path / element)
    assert files == project.expected[element]
    # And remex log prints the failed command's log
    log = remex_stack.cli("log", "-C", project.path, "e010.bst")
    assert log.returncode == 0, log.stderr
    assert f"{FAIL_MARKER}: e010" in log.stdout
