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

import json
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.servers import RemexStack
from pipeline.servers.testing import BuildGridServer
from pipeline.testing.dag import make_dag_project
from tests.hello import EXPECTED_HELLO_FILES, copy_hello_project, file_tree


@pytest.fixture(scope="module")
def stack(
    bots_buildgrid: BuildGridServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RemexStack]:
    with RemexStack(
        tmp_path_factory.mktemp("grid-stack"),
        execution=bots_buildgrid,
        bots=2,
        bot_capacity=2,
        workers=2,
    ) as stack:
        yield stack


def leases_run(stack: RemexStack) -> Counter[str]:
    """How many leases each bot has started so far (from its log)."""
    return Counter({b.bot_id: b.log_text().count(": started (") for b in stack.bots})


def states(output: dict[str, Any]) -> dict[str, str]:
    return {e["element"]: e["state"] for e in output["elements"]}


def test_hello_builds_on_buildgrid_and_every_artifact_checks_out(
    stack: RemexStack, tmp_path: Path
) -> None:
    # Given a copy of examples/hello
    project = copy_hello_project(tmp_path / "hello")
    before = leases_run(stack)
    # When app.bst is built
    started = time.monotonic()
    code, output = stack.build_json(project, "app.bst", timeout=240)
    seconds = time.monotonic() - started
    # Then every element is built, the three manual ones by the bots
    assert code == 0, json.dumps(output, indent=1)[-3000:] + stack.logs()
    assert set(states(output).values()) == {"built"}, states(output)
    assert sum((leases_run(stack) - before).values()) == 3
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
    stack: RemexStack, tmp_path: Path, busybox_sysroot: Path
) -> None:
    # Given a generated 16-element DAG (diamonds, a fan-out)
    dag = make_dag_project(tmp_path / "dag", n=16, salt="buildgrid", sysroot=busybox_sysroot)
    before = leases_run(stack)
    # When it is built
    started = time.monotonic()
    code, output = stack.build_json(dag.path, *dag.targets, timeout=240)
    seconds = time.monotonic() - started
    # Then every element is built, and both bots ran actions
    assert code == 0, json.dumps(output, indent=1)[-3000:] + stack.logs()
    assert states(output) == dict.fromkeys(dag.all_elements, "built")
    ran = leases_run(stack) - before
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


def test_compose_filter_and_script_build_on_buildgrid(
    stack: RemexStack, tmp_path: Path, busybox_sysroot: Path
) -> None:
    # Given tests/projects/kinds (compose with integration, whose action's output
    # is the whole sandbox; filter; script with a layout) on a busybox sysroot
    project = tmp_path / "kinds"
    shutil.copytree(Path(__file__).parents[1] / "projects" / "kinds", project)
    shutil.copytree(busybox_sysroot, project / "sysroot", symlinks=True)
    # When all.bst is built with the bots doing the execution
    code, output = stack.build_json(project, "all.bst", timeout=240)
    # Then everything builds, and the integrated compose kept what integration added
    assert code == 0, json.dumps(output, indent=1)[-3000:] + stack.logs()
    assert set(states(output).values()) == {"built"}, states(output)
    result = stack.cli("checkout", "-C", project, "runtime.bst", tmp_path / "runtime")
    assert result.returncode == 0, result.stderr
    tree = file_tree(tmp_path / "runtime")
    assert tree["etc/foo.conf"] == ("file", b"integrated by lib.bst\n", False)
    assert "usr/bin/app" in tree and "usr/include/foo.h" not in tree
    result = stack.cli("checkout", "-C", project, "script.bst", tmp_path / "script")
    assert result.returncode == 0, result.stderr
    assert file_tree(tmp_path / "script")["cwd"] == ("file", b"/\n", False)
