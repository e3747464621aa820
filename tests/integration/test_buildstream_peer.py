"""BuildStream as the peer: `bst` and remex build examples/hello to the same files.

BuildStream 2.8.1 (the ``bst`` of this venv) builds a private copy of the
project locally, sandboxed with bubblewrap; remex builds another copy on
buildbox-casd. The checkouts must hold the same paths, contents, executable
bits and symlink targets (owners and mtimes are not compared: a CAS keeps
neither).

``bst`` always runs as a separate process: BuildStream's generated REAPI
modules would collide with remex's in one process (TEST-STACK.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.servers import CasdServer
from pipeline.stages import checkout_artifact
from pipeline.testing.bst import Bst
from tests.hello import (
    EXPECTED_HELLO_FILES,
    RemexBuild,
    copy_hello_project,
    file_tree,
    load_and_build,
    stage_context,
)


@dataclass
class Peers:
    """Checkouts of the same elements by BuildStream (``bst``) and remex (``remex``)."""

    bst: Path
    remex: Path
    build: RemexBuild


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory, casd: CasdServer) -> Peers:
    work = tmp_path_factory.mktemp("peers")
    bst_out, remex_out = work / "bst", work / "remex"

    # BuildStream: build app.bst, then check out as a user would
    bst = Bst(copy_hello_project(work / "bst-project"), work / "bst-home")
    bst.run("build", "app.bst")
    bst.checkout("hello.bst", "none", bst_out / "hello")
    bst.checkout("app.bst", "run", bst_out / "app-run")
    bst.checkout("hello.bst", "build", bst_out / "hello-build")

    # remex: the same project, another copy, built on buildbox-casd (both roles)
    project = copy_hello_project(work / "remex-project")
    with stage_context(work / "remex-cas", casd.url, casd.url) as ctx:
        build = load_and_build(ctx, project, ["app.bst"], scratch=work / "scratch")
        assert build.names("failed") | build.names("skipped") == set(), build.results
        specs = build.specs
        checkout_artifact(ctx, specs["hello.bst"], remex_out / "hello")
        checkout_artifact(
            ctx, specs["app.bst"], remex_out / "app-run", runtime_deps=build.runtime_uris("app.bst")
        )
        # --deps build: what is staged at / to build hello.bst, its own files excluded
        staged = [dep["artifact_uri"] for dep in specs["hello.bst"]["dependencies"]]
        checkout_artifact(ctx, staged[-1], remex_out / "hello-build", runtime_deps=staged[:-1])
    return Peers(bst_out, remex_out, build)


def test_bst_and_remex_build_the_same_hello(peers: Peers) -> None:
    # Given examples/hello built by bst and by remex, when hello.bst is checked
    # out alone, then both hold exactly the files hello.bst's commands make
    assert file_tree(peers.bst / "hello") == EXPECTED_HELLO_FILES
    assert file_tree(peers.remex / "hello") == file_tree(peers.bst / "hello")


def test_bst_and_remex_agree_on_the_runtime_closure_of_app(peers: Peers) -> None:
    # `bst artifact checkout --deps run app.bst` against remex's checkout of
    # app.bst with its runtime dependencies: base, greeting and hello, not name
    bst_tree = file_tree(peers.bst / "app-run")
    assert "usr/share/hello/greeting" in bst_tree
    assert "usr/share/hello/name" not in bst_tree
    assert file_tree(peers.remex / "app-run") == bst_tree


def test_bst_and_remex_agree_on_what_is_staged_to_build_hello(peers: Peers) -> None:
    # `--deps build hello.bst` is what BuildStream stages at / to build it;
    # remex's build spec lists the same artifacts, and they merge to the same files
    bst_tree = file_tree(peers.bst / "hello-build")
    assert bst_tree["usr/share/hello/name"] == ("file", b"world", False)
    assert file_tree(peers.remex / "hello-build") == bst_tree
