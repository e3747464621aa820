"""compose, filter and script built by BuildStream and by remex to the same files.

tests/projects/kinds has, on a busybox sysroot, a library-shaped manual
element with files in each split domain and an integration command, and
compose (integrated or not, include / exclude / orphans), filter (a domain,
orphans with pass-integration) and script (a layout with a dependency under
/sysroot) elements over it. ``bst`` 2.8.1 builds one copy locally; remex
builds another on buildbox-casd; each element's checkout must be the same
paths, bytes, executable bits and symlink targets.
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

PROJECT = Path(__file__).parents[1] / "projects" / "kinds"
CHECKED = (
    "lib.bst",
    "app.bst",
    "runtime.bst",
    "integrated.bst",
    "plain.bst",
    "devel.bst",
    "orphans.bst",
    "use-orphans.bst",
    "script.bst",
)


@dataclass
class Peers:
    bst: Path
    remex: Path
    build: RemexBuild


def copy_project(dest: Path, sysroot: Path) -> Path:
    shutil.copytree(PROJECT, dest)
    shutil.copytree(sysroot, dest / "sysroot", symlinks=True)
    return dest


@pytest.fixture(scope="module")
def peers(
    tmp_path_factory: pytest.TempPathFactory, casd: CasdServer, busybox_sysroot: Path
) -> Peers:
    work = tmp_path_factory.mktemp("kinds-peers")
    bst = Bst(copy_project(work / "bst-project", busybox_sysroot), work / "bst-home")
    bst.run("build", "all.bst")
    for element in CHECKED:
        bst.checkout(element, "none", work / "bst" / element, integrate=False)

    project = copy_project(work / "remex-project", busybox_sysroot)
    with stage_context(work / "remex-cas", casd.url, casd.url) as ctx:
        build = load_and_build(ctx, project, ["all.bst"], scratch=work / "scratch")
        assert build.names("failed") | build.names("skipped") == set(), build.results
        for element in CHECKED:
            checkout_artifact(ctx, build.specs[element], work / "remex" / element)
    return Peers(work / "bst", work / "remex", build)


@pytest.mark.parametrize("element", CHECKED)
def test_bst_and_remex_check_out_the_same_files(peers: Peers, element: str) -> None:
    assert file_tree(peers.remex / element) == file_tree(peers.bst / element)


def test_the_selections_hold_what_bst_semantics_say(peers: Peers) -> None:
    # Spot checks that the comparison above is not between two empty trees
    runtime = file_tree(peers.remex / "runtime.bst")
    assert "usr/bin/app" in runtime and "usr/lib/libfoo.so" in runtime
    assert "usr/include/foo.h" not in runtime
    # Integration added /etc/foo.conf: kept, though it is in no included domain
    assert runtime["etc/foo.conf"] == ("file", b"integrated by lib.bst\n", False)
    integrated = file_tree(peers.remex / "integrated.bst")
    assert "usr/share/doc/foo/README" not in integrated and "usr/include/foo.h" in integrated
    assert set(file_tree(peers.remex / "devel.bst")) == {"usr", "usr/include", "usr/include/foo.h"}
    plain = file_tree(peers.remex / "plain.bst")
    assert "usr/share/foo/data.txt" not in plain and "usr/share/orphan.txt" in plain
    orphans = file_tree(peers.remex / "orphans.bst")
    assert "usr/share/orphan.txt" in orphans and "usr/bin/foo-tool" not in orphans
    used = file_tree(peers.remex / "use-orphans.bst")
    assert used["out/foo.conf"] == ("file", b"integrated by lib.bst\n", False)
    script = file_tree(peers.remex / "script.bst")
    assert script["cwd"] == ("file", b"/\n", False)
    assert b"usr/include/foo.h" in script["listing"][1]
