"""Overlaps, unstaged files, ``fatal-warnings: [overlaps]``, ``overlap-whitelist``
and ``build-uid``: remex and BuildStream 2.8.1 on the same project, built the same way.

tests/projects/overlaps: one.bst and two.bst install the same two files;
two.bst whitelists one of them, three.bst both. clash.bst (a manual element)
and composed.bst (a compose) stage one.bst then two.bst; listed.bst stages
one.bst then three.bst; unstaged.bst stages a file over one.bst's folder;
layout.bst (a script) stages two.bst at /sysroot over files staged at /;
usebin.bst stages a /bin folder over the sysroot's bin symlink; uid.bst runs
``id -u`` with ``build-uid: 1234``. Each element builds or fails alike under
both, and remex's staging warnings are bst's, word for word.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from pipeline.servers import CasdServer
from pipeline.stages import checkout_artifact
from pipeline.stages.artifacts import read_artifact_meta
from pipeline.stages.staging import stage_to_cas
from pipeline.stages.state import State
from pipeline.testing.bst import Bst
from tests.hello import file_tree, load_and_build, stage_context

PROJECT = Path(__file__).parents[1] / "projects" / "overlaps"
BUILT = ["clash.bst", "listed.bst", "composed.bst", "unstaged.bst", "layout.bst", "uid.bst"]
FATAL = {"clash.bst", "composed.bst", "layout.bst"}
WARNING = (
    "[overlaps]: Non-whitelisted overlaps detected\n"
    "Staged files overwrite existing files in staging area: /\n"
    "/usr/share/overlaps/same: two.bst is not permitted to overlap other elements, "
    "order two.bst above one.bst\n"
    "/usr/share/overlaps/tool: two.bst is not permitted to overlap other elements, "
    "order two.bst above one.bst"
)
# A message line of a bst log: "[time] KIND    [key] element: text"
_LOG_LINE = re.compile(r"^\[[^\]]*\] (\w+) +(?:\[[0-9a-f]+\] )?([^:]+): (.*)$")


def copy_project(dest: Path, sysroot: Path, *, fatal: bool) -> Path:
    shutil.copytree(PROJECT, dest)
    shutil.copytree(sysroot, dest / "sysroot", symlinks=True)
    if fatal:
        with (dest / "project.conf").open("a") as conf:
            conf.write("fatal-warnings:\n- overlaps\n")
    return dest


def normal(text: str) -> str:
    """Lines stripped, blank ones dropped (bst indents and spaces its details)."""
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def bst_warnings(home: Path, element: str) -> list[str]:
    """The warnings in the element's latest bst build log, normalized."""
    logs = sorted(
        (home / "cache" / "buildstream" / "logs" / "overlaps").glob(
            f"{element.removesuffix('.bst')}/*-build.*.log"
        ),
        key=lambda p: p.stat().st_mtime,
    )
    warnings: list[list[str]] = []
    current: list[str] | None = None
    for line in logs[-1].read_text().splitlines():
        match = _LOG_LINE.match(line)
        if match:
            current = None
            if match.group(1) == "WARNING":
                current = [match.group(3)]
                warnings.append(current)
        elif current is not None:
            current.append(line)
    return [normal("\n".join(w)) for w in warnings]


def test_staging_warns_as_bst_without_fatal_warnings(
    tmp_path_factory: pytest.TempPathFactory, casd: CasdServer, busybox_sysroot: Path
) -> None:
    work = tmp_path_factory.mktemp("ovw")
    home = work / "h"
    # Given the project without fatal warnings, built by bst
    bst = Bst(copy_project(work / "bst-project", busybox_sysroot, fatal=False), home)
    bst.run("build", *BUILT)
    with pytest.raises(AssertionError, match=r"Destination is a symlink, not a directory: /bin"):
        bst.run("build", "usebin.bst")
    for element in ("clash.bst", "uid.bst", "layout.bst", "unstaged.bst"):
        bst.checkout(element, "none", work / "bst" / element, integrate=False)

    with stage_context(work / "cas", casd.url, casd.url) as ctx:
        # When remex builds it
        project = copy_project(work / "remex-project", busybox_sysroot, fatal=False)
        build = load_and_build(ctx, project, [*BUILT, "usebin.bst"], scratch=work / "scratch")

        # Then the same elements build, and the same files come out
        assert build.names("built") | build.names("cached") >= set(BUILT), build.results
        assert build.names("failed") == {"usebin.bst"}
        error = build.results["usebin.bst"]["error"]
        assert error == (
            "usebin.bst: staging its dependencies failed: cannot stage binapp.bst's folder "
            "/bin: it is a symlink staged by base.bst "
            "(BuildStream does not stage a folder over a file or symlink)"
        )
        for element in ("clash.bst", "uid.bst", "layout.bst", "unstaged.bst"):
            checkout_artifact(ctx, build.specs[element], work / "remex" / element)
            assert file_tree(work / "remex" / element) == file_tree(work / "bst" / element)
        assert (work / "remex" / "clash.bst" / "seen").read_text() == "two\ntwo\n"

        # And the staging warnings are bst's, word for word
        states = {e: stage_to_cas(ctx, build.specs[e], State())["overlaps"] for e in BUILT}
        for element in BUILT:
            remex = [normal(w) for w in states[element]["warnings"]]
            assert remex == bst_warnings(home, element), element
        assert states["clash.bst"]["warnings"] == [WARNING]
        # (kept in the artifact's meta too)
        meta = read_artifact_meta(ctx, build.specs["clash.bst"]["artifact_uri"])
        assert meta["overlaps"] == 3 and meta["warnings"] == [WARNING]
        assert states["listed.bst"]["warnings"] == [] and states["listed.bst"]["count"] == 2

        # And the state names the elements of each overlap, bottom-most first
        clash = states["clash.bst"]
        assert clash["count"] == 3 and clash["not_whitelisted"] == 2
        assert clash["details"] == [
            {
                "path": "/usr/share/overlaps/data",
                "elements": ["one.bst", "two.bst"],
                "whitelisted": True,
            },
            {
                "path": "/usr/share/overlaps/same",
                "elements": ["one.bst", "two.bst"],
                "whitelisted": False,
            },
            {
                "path": "/usr/share/overlaps/tool",
                "elements": ["one.bst", "two.bst"],
                "whitelisted": False,
            },
        ]
        assert states["unstaged.bst"]["unstaged"] == [
            {"element": "zfile.bst", "path": "/usr/share/overlaps"}
        ]

        # And build-uid / build-gid reached the sandbox, as with bst
        assert (work / "remex" / "uid.bst" / "uid").read_text() == "1234\n"
        assert (work / "remex" / "uid.bst" / "gid").read_text() == "4321\n"


def test_fatal_overlaps_fail_the_same_elements_as_bst(
    tmp_path_factory: pytest.TempPathFactory, casd: CasdServer, busybox_sysroot: Path
) -> None:
    work = tmp_path_factory.mktemp("ovf")
    # Given the project with fatal-warnings: [overlaps]; bst fails exactly FATAL
    bst = Bst(copy_project(work / "bst-project", busybox_sysroot, fatal=True), work / "h")
    bst.run("build", *(e for e in BUILT if e not in FATAL))
    for element in sorted(FATAL):
        with pytest.raises(AssertionError, match=r"FAILURE \[overlaps\]: "):
            bst.run("build", element)

    with stage_context(work / "cas", casd.url, casd.url) as ctx:
        # When remex builds it
        project = copy_project(work / "remex-project", busybox_sysroot, fatal=True)
        build = load_and_build(ctx, project, BUILT, scratch=work / "scratch")

        # Then the same elements fail
        assert build.names("failed") == FATAL, build.results
        for element in sorted(FATAL):
            # with the paths and the elements in the message
            error = build.results[element]["error"]
            assert error is not None
            assert error.startswith(
                f"{element}: fatal warnings while staging its dependencies "
                "(project.conf fatal-warnings: overlaps):\n[overlaps]: "
            )
            assert "/usr/share/overlaps/tool: two.bst " in error
            # and nothing was pushed for it
            assert ctx.assets.fetch_directory([build.specs[element]["artifact_uri"]]) is None
        assert WARNING in (build.results["clash.bst"]["error"] or "")
