"""Junctions built by BuildStream and by remex to the same files.

tests/projects/junctions reaches subproject/ through a junction (with an
option passed down), which reaches deeper/ through another; a link names the
subproject's sysroot; an element includes a file from the junction. ``bst``
2.8.1 builds one copy locally, remex another on buildbox-casd; the
checkouts of the project's element and of the subprojects' elements must be
the same files.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.servers import CasdServer
from pipeline.stages import checkout_artifact
from pipeline.testing.bst import Bst
from tests.hello import RemexBuild, file_tree, load_and_build, stage_context

PROJECT = Path(__file__).parents[1] / "projects" / "junctions"
CHECKED = ("app.bst", "sub.bst:lib.bst", "sub.bst:deeper.bst:leaf.bst")


@dataclass
class Peers:
    bst: Path
    remex: Path
    build: RemexBuild


def copy_project(dest: Path, sysroot: Path) -> Path:
    shutil.copytree(PROJECT, dest)
    shutil.copytree(sysroot, dest / "subproject" / "sysroot", symlinks=True)
    return dest


def folder(element: str) -> str:
    return element.replace(":", "_")


@pytest.fixture(scope="module")
def peers(
    tmp_path_factory: pytest.TempPathFactory, casd: CasdServer, busybox_sysroot: Path
) -> Peers:
    work = tmp_path_factory.mktemp("junction-peers")
    bst = Bst(copy_project(work / "bst-project", busybox_sysroot), work / "bst-home")
    bst.run("build", "all.bst")
    for element in CHECKED:
        bst.checkout(element, "none", work / "bst" / folder(element), integrate=False)

    project = copy_project(work / "remex-project", busybox_sysroot)
    with stage_context(work / "remex-cas", casd.url, casd.url) as ctx:
        build = load_and_build(ctx, project, ["all.bst"], scratch=work / "scratch")
        assert build.names("failed") | build.names("skipped") == set(), build.results
        for element in CHECKED:
            checkout_artifact(ctx, build.specs[element], work / "remex" / folder(element))
    return Peers(work / "bst", work / "remex", build)


@pytest.mark.parametrize("element", CHECKED)
def test_bst_and_remex_check_out_the_same_files(peers: Peers, element: str) -> None:
    assert file_tree(peers.remex / folder(element)) == file_tree(peers.bst / folder(element))


def test_subproject_elements_build_under_their_own_project(peers: Peers) -> None:
    app = file_tree(peers.remex / "app.bst")
    # The option passed down through the junction chose the greeting
    assert app["usr/share/app/both"][1] == (
        b"hello, fancy from sub/lib.bst\na leaf, two junctions down\n"
    )
    # The include came from the subproject
    assert app["usr/share/app/shared"][1] == b"from the subproject's include\n"
    # Each element is keyed and stored under its own project's name
    uris = {e.name: e.artifact_uri for e in peers.build.plan}
    assert uris["sub.bst:lib.bst"].startswith("urn:fdc:remex:2026:artifact:sub/lib/")
    assert uris["sub.bst:deeper.bst:leaf.bst"].startswith("urn:fdc:remex:2026:artifact:deep/leaf/")
    # The link is its target: the plan holds no link and no junction
    assert {e.kind for e in peers.build.plan} <= {"import", "manual", "stack"}
