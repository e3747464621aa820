"""Overlaps, ``fatal-warnings: [overlaps]``, ``overlap-whitelist`` and ``build-uid``:
remex and BuildStream 2.8.1 on the same project, built the same way.

tests/projects/overlaps: one.bst and two.bst install the same two files;
two.bst whitelists one of them, three.bst both. clash.bst (a manual element)
and composed.bst (a compose) stage one.bst then two.bst; listed.bst stages
one.bst then three.bst; uid.bst runs ``id -u`` with ``build-uid: 1234``.
Without fatal warnings everything builds and the overlap is reported; with
``fatal-warnings: [overlaps]`` clash.bst and composed.bst fail, with the
message, and nothing is pushed for them, while listed.bst builds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.stages import checkout_artifact
from pipeline.stages.context import StageContext
from pipeline.stages.staging import stage_to_cas
from pipeline.stages.state import State
from tests.bst import Bst
from tests.hello import RemexBuild, file_tree, load_and_build, stage_context
from tests.servers import CasdServer

PROJECT = Path(__file__).parents[1] / "projects" / "overlaps"
TARGETS = ["clash.bst", "listed.bst", "composed.bst", "uid.bst"]
WARNING = (
    "[overlaps]: Non-whitelisted overlaps detected\n"
    "Staged files overwrite existing files in staging area: /\n"
    "/usr/share/overlaps/tool: two.bst is not permitted to overlap other elements, "
    "order two.bst above one.bst"
)


def copy_project(dest: Path, sysroot: Path, *, fatal: bool) -> Path:
    shutil.copytree(PROJECT, dest)
    shutil.copytree(sysroot, dest / "sysroot", symlinks=True)
    if fatal:
        with (dest / "project.conf").open("a") as conf:
            conf.write("fatal-warnings:\n- overlaps\n")
    return dest


def remex_build(
    work: Path, ctx: StageContext, sysroot: Path, *, fatal: bool
) -> tuple[Path, RemexBuild]:
    project = copy_project(work / "remex-project", sysroot, fatal=fatal)
    build = load_and_build(ctx, project, TARGETS, scratch=work / "scratch")
    return project, build


def test_overlaps_warn_by_default_as_in_bst(
    tmp_path_factory: pytest.TempPathFactory, casd: CasdServer, busybox_sysroot: Path
) -> None:
    # A short folder: bst's casd socket path must fit in 108 bytes
    tmp_path = tmp_path_factory.mktemp("ovw")
    # Given the project without fatal warnings, built by bst
    bst = Bst(copy_project(tmp_path / "bst-project", busybox_sysroot, fatal=False), tmp_path / "h")
    bst.run("build", *TARGETS)
    logs = list(
        (tmp_path / "h" / "cache" / "buildstream" / "logs").glob("overlaps/clash/*-build.*")
    )
    lines = [line.strip() for line in logs[0].read_text().splitlines() if line.strip()]
    assert f"clash.bst: {WARNING}" in "\n".join(lines)
    for element in ("clash.bst", "uid.bst"):
        bst.checkout(element, "none", tmp_path / "bst" / element, integrate=False)

    with stage_context(tmp_path / "cas", casd.url, casd.url) as ctx:
        # When remex builds it
        _, build = remex_build(tmp_path, ctx, busybox_sysroot, fatal=False)

        # Then everything builds, as with bst, and the later file wins
        assert build.names("built") | build.names("cached") >= set(TARGETS), build.results
        for element in ("clash.bst", "uid.bst"):
            checkout_artifact(ctx, build.specs[element], tmp_path / "remex" / element)
            assert file_tree(tmp_path / "remex" / element) == file_tree(tmp_path / "bst" / element)
        assert (tmp_path / "remex" / "clash.bst" / "seen").read_text() == "two\ntwo\n"

        # And the state records the overlaps with the elements, the warning as bst words it
        state = stage_to_cas(ctx, build.specs["clash.bst"], State())
        overlaps = state["overlaps"]
        assert overlaps["count"] == 2 and overlaps["not_whitelisted"] == 1
        assert overlaps["details"] == [
            {
                "path": "/usr/share/overlaps/data",
                "elements": ["one.bst", "two.bst"],
                "whitelisted": True,
            },
            {
                "path": "/usr/share/overlaps/tool",
                "elements": ["one.bst", "two.bst"],
                "whitelisted": False,
            },
        ]
        assert overlaps["warnings"] == [WARNING]
        listed = stage_to_cas(ctx, build.specs["listed.bst"], State())["overlaps"]
        assert listed["count"] == 2 and listed["warnings"] == []

        # And build-uid / build-gid reached the sandbox, as with bst
        assert (tmp_path / "remex" / "uid.bst" / "uid").read_text() == "1234\n"
        assert (tmp_path / "remex" / "uid.bst" / "gid").read_text() == "4321\n"


def test_fatal_overlaps_fail_the_element_as_in_bst(
    tmp_path_factory: pytest.TempPathFactory, casd: CasdServer, busybox_sysroot: Path
) -> None:
    tmp_path = tmp_path_factory.mktemp("ovf")
    # Given the project with fatal-warnings: [overlaps]; bst fails clash and composed
    bst = Bst(copy_project(tmp_path / "bst-project", busybox_sysroot, fatal=True), tmp_path / "h")
    bst.run("build", "listed.bst", "uid.bst")
    for element in ("clash.bst", "composed.bst"):
        with pytest.raises(AssertionError, match=r"Non-whitelisted overlaps detected"):
            bst.run("build", element)

    with stage_context(tmp_path / "cas", casd.url, casd.url) as ctx:
        # When remex builds it
        _, build = remex_build(tmp_path, ctx, busybox_sysroot, fatal=True)

        # Then the same elements fail, with the paths and elements in the message
        outcomes = build.outcomes()
        assert outcomes["clash.bst"] == "failed" and outcomes["composed.bst"] == "failed"
        assert {outcomes["listed.bst"], outcomes["uid.bst"]} <= {"built", "cached"}
        for element in ("clash.bst", "composed.bst"):
            error = build.results[element]["error"]
            assert error is not None
            assert error.startswith(
                f"{element}: fatal warnings while staging its dependencies "
                "(project.conf fatal-warnings: overlaps):\n"
            )
            assert WARNING in error

            # And nothing was pushed for it
            assert ctx.assets.fetch_directory([build.specs[element]["artifact_uri"]]) is None
