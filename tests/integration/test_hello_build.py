"""examples/hello built by remex's stages against two real buildbox-casd servers.

One casd executes actions (CAS, ActionCache, Execution), the other stores
artifacts (CAS, Remote Asset): every blob that reaches an action's input root
or an artifact crossed from one to the other through remex's local CAS.
The stages are called in dependency order in this process (no Celery).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.servers import CasdServer
from pipeline.stages import checkout_artifact, read_artifact_meta
from tests.hello import (
    ELEMENTS,
    EXPECTED_HELLO_FILES,
    RemexBuild,
    calls,
    copy_hello_project,
    file_tree,
    load_and_build,
    stage_context,
)

MANUAL = {"greeting.bst", "name.bst", "hello.bst"}


@dataclass
class Servers:
    execution: CasdServer
    artifacts: CasdServer


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """Two private casds: the ActionCache and the artifacts start empty for this module."""
    with (
        CasdServer(tmp_path_factory.mktemp("casd-execution"), jobs=2) as execution,
        CasdServer(tmp_path_factory.mktemp("casd-artifacts"), jobs=1) as artifacts,
    ):
        yield Servers(execution, artifacts)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_hello_project(tmp_path_factory.mktemp("hello") / "hello")


@dataclass
class FirstBuild:
    build: RemexBuild
    execute_calls: int


@pytest.fixture(scope="module")
def first_build(
    servers: Servers, project: Path, tmp_path_factory: pytest.TempPathFactory
) -> FirstBuild:
    """The project built once, from scratch."""
    work = tmp_path_factory.mktemp("first-build")
    with stage_context(work / "cas", servers.execution.url, servers.artifacts.url) as ctx:
        build = load_and_build(ctx, project, ["app.bst"], scratch=work / "scratch")
        execution_calls, _ = calls(ctx)
        return FirstBuild(build, execution_calls["Execute"])


def test_every_element_builds_in_dependency_order(first_build: FirstBuild) -> None:
    # Given the hello project and empty servers, when app.bst is built:
    build = first_build.build
    # Then every element was built, each after its dependencies
    assert [e.name for e in build.plan] == list(ELEMENTS)
    assert build.outcomes() == dict.fromkeys(ELEMENTS, "built"), build.results
    # And exactly the three manual elements ran an action
    assert first_build.execute_calls == len(MANUAL)


def test_checkout_of_hello_holds_what_its_commands_produce(
    first_build: FirstBuild, servers: Servers, tmp_path: Path
) -> None:
    # Given the built project, with a local CAS that has never seen it
    spec = first_build.build.specs["hello.bst"]
    with stage_context(tmp_path / "cas", servers.execution.url, servers.artifacts.url) as ctx:
        # When hello.bst is checked out from the artifact server
        checkout_artifact(ctx, spec, tmp_path / "out")
        meta = read_artifact_meta(ctx, spec["artifact_uri"])
    # Then it holds exactly the message, the script (executable) and the link,
    # made from the files greeting.bst and name.bst installed
    assert file_tree(tmp_path / "out") == EXPECTED_HELLO_FILES
    # And the artifact's meta names the element and its key
    assert meta["element"] == "hello.bst" and meta["cache_key"] == spec["cache_key"]


def test_checkout_of_app_with_runtime_dependencies(
    first_build: FirstBuild, servers: Servers, project: Path, tmp_path: Path
) -> None:
    build = first_build.build
    with stage_context(tmp_path / "cas", servers.execution.url, servers.artifacts.url) as ctx:
        # When app.bst (a stack) is checked out with its runtime dependencies
        checkout_artifact(
            ctx,
            build.specs["app.bst"],
            tmp_path / "out",
            runtime_deps=build.runtime_uris("app.bst"),
        )
    tree = file_tree(tmp_path / "out")
    # Then hello and what it needs at run time are there: the sysroot and greeting
    for path, entry in EXPECTED_HELLO_FILES.items():
        assert tree[path] == entry
    assert tree["usr/share/hello/greeting"] == ("file", b"Hello", False)
    assert tree["bin"] == ("symlink", "usr/bin", False)
    assert tree["usr/bin/sh"] == ("symlink", "busybox", False)
    assert tree["usr/bin/busybox"][2] is True
    # But not name.bst: hello.bst needs it only to build
    assert "usr/share/hello/name" not in tree
    # And nothing else: the sysroot, greeting's file and hello's files
    sysroot = file_tree(project / "sysroot")
    assert set(tree) == set(sysroot) | set(EXPECTED_HELLO_FILES) | {"usr/share/hello/greeting"}


def test_a_second_build_hits_the_artifact_cache_without_executing(
    first_build: FirstBuild, servers: Servers, project: Path, tmp_path: Path
) -> None:
    # Given the built project, and a fresh local CAS (the servers are the truth)
    with stage_context(tmp_path / "cas", servers.execution.url, servers.artifacts.url) as ctx:
        # When it is built again
        again = load_and_build(ctx, project, ["app.bst"], scratch=tmp_path / "scratch")
        execution_calls, _ = calls(ctx)
    # Then every element is a cache hit, with the same keys and artifacts
    assert again.outcomes() == dict.fromkeys(ELEMENTS, "cached"), again.results
    for name, result in again.results.items():
        first = first_build.build.results[name]
        assert (result["cache_key"], result["artifact"]) == (first["cache_key"], first["artifact"])
    # And the execution server was not asked to run (nor even to look up) anything
    assert execution_calls["Execute"] == 0
    assert execution_calls["GetActionResult"] == 0


def test_changing_one_command_rebuilds_it_and_its_reverse_dependencies(
    first_build: FirstBuild, servers: Servers, tmp_path: Path
) -> None:
    # Given a copy of the built project where greeting.bst's build command changed
    changed = copy_hello_project(tmp_path / "hello")
    greeting = changed / "elements" / "greeting.bst"
    text = greeting.read_text()
    assert "tr -d '\\n' < greeting.txt > greeting" in text
    greeting.write_text(
        text.replace(
            "tr -d '\\n' < greeting.txt > greeting",
            "tr -d '\\n' < greeting.txt | sed 's/Hello/Howdy/' > greeting",
        )
    )
    with stage_context(tmp_path / "cas", servers.execution.url, servers.artifacts.url) as ctx:
        # When it is built
        build = load_and_build(ctx, changed, ["app.bst"], scratch=tmp_path / "scratch")
        execution_calls, _ = calls(ctx)
        checkout_artifact(ctx, build.specs["hello.bst"], tmp_path / "out")
    # Then exactly greeting.bst and the elements above it were rebuilt
    assert build.names("built") == {"greeting.bst", "hello.bst", "app.bst"}, build.results
    assert build.names("cached") == {"base.bst", "name.bst"}
    assert execution_calls["Execute"] == 2  # greeting.bst and hello.bst
    # With new keys for those, the same for the others
    first = first_build.build.results
    for name, result in build.results.items():
        assert (result["cache_key"] == first[name]["cache_key"]) == (name in build.names("cached"))
    # And hello.bst's message reads the new greeting
    assert (tmp_path / "out" / "usr/share/hello/message").read_bytes() == b"Howdy, world!\n"
