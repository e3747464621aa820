"""examples/toolchain on the embedded stack, side by side with BuildStream.

A real C toolchain sysroot made from Debian packages (make-sysroot.sh), the
buildstream-plugins ``autotools`` and ``make`` kinds read as data, a
compose with integration, a filter, a script, options and an include:
``remex up`` + ``remex build`` + ``remex checkout`` as a user runs them, and
``bst build`` + ``bst artifact checkout`` (2.8.1, local bubblewrap sandbox)
on another copy. Every checkout holds the same paths, bytes, executable bits
and symlink targets, and the built programs run in the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.testing.bst import Bst
from tests.hello import file_tree

EXAMPLE = Path(__file__).parents[2] / "examples" / "toolchain"
REMEX = str(Path(sys.executable).with_name("remex"))
# (element, --deps, integrate): each element alone as built, and greet.bst
# with what it needs at run time, integrated (ldconfig) as bst does it.
CHECKOUTS = [
    *((name, "none", False) for name in
      ("amhello.bst", "libgreet.bst", "greet.bst", "libgreet-runtime.bst", "app.bst",
       "report.bst")),
    ("greet.bst", "run", True),
]  # fmt: skip


def folder(element: str, deps: str, integrate: bool) -> str:
    return f"{element}-{deps}{'-integrated' if integrate else ''}"


@dataclass
class Checkouts:
    bst: Path
    remex: Path


def copy_example(dest: Path, sysroot: Path) -> Path:
    shutil.copytree(EXAMPLE, dest, ignore=shutil.ignore_patterns("sysroot", "amhello"))
    shutil.copytree(sysroot, dest / "sysroot", symlinks=True)
    shutil.copytree(sysroot.parent / "amhello", dest / "amhello", symlinks=True)
    return dest


@pytest.fixture(scope="module")
def sysroot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toolchain sysroot, made by the example's own script (Debian packages
    are cached in ~/.cache/remex/debs between runs)."""
    dest = tmp_path_factory.mktemp("toolchain") / "sysroot"
    script = EXAMPLE / "make-sysroot.sh"
    result = subprocess.run(
        ["bash", str(script), str(dest)], capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return dest


@pytest.fixture(scope="module")
def checkouts(tmp_path_factory: pytest.TempPathFactory, sysroot: Path) -> Checkouts:
    work = tmp_path_factory.mktemp("toolchain-peers")
    bst = Bst(copy_example(work / "bst-project", sysroot), work / "bst-home")
    bst.run("build", "report.bst", "amhello.bst", timeout=900)
    for element, deps, integrate in CHECKOUTS:
        bst.checkout(element, deps, work / "bst" / folder(element, deps, integrate),
                     integrate=integrate)  # fmt: skip

    project = copy_example(work / "remex-project", sysroot)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMEX_")}
    env.update(REMEX_STACK_DIR=str(work / "stack"), XDG_CONFIG_HOME=str(work / "config"))

    def remex(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [REMEX, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
        )

    up = remex("up", "--detach", "--workers", "2")
    assert up.returncode == 0, up.stderr
    try:
        build = remex("build", "-C", str(project), "report.bst", "amhello.bst")
        assert build.returncode == 0, f"{build.stdout}\n{build.stderr}"
        for element, deps, integrate in CHECKOUTS:
            flag = "--integrate" if integrate else "--no-integrate"
            dest = work / "remex" / folder(element, deps, integrate)
            out = remex("checkout", "-C", str(project), "--deps", deps, flag, element, str(dest))
            assert out.returncode == 0, out.stderr
    finally:
        down = remex("down")
        assert down.returncode == 0, down.stderr
    return Checkouts(work / "bst", work / "remex")


@pytest.mark.parametrize(("element", "deps", "integrate"), CHECKOUTS)
def test_remex_checks_out_what_bst_does(
    checkouts: Checkouts, element: str, deps: str, integrate: bool
) -> None:
    name = folder(element, deps, integrate)
    mine, theirs = file_tree(checkouts.remex / name), file_tree(checkouts.bst / name)
    assert sorted(mine) == sorted(theirs)
    assert mine == theirs


def test_the_built_programs_run_in_the_checkout(checkouts: Checkouts) -> None:
    # greet, linked against libgreet, found through the integrated ld.so.cache
    root = checkouts.remex / folder("greet.bst", "run", True)
    greet = subprocess.run(
        ["chroot", str(root), "/usr/bin/greet"], capture_output=True, text=True, check=False
    )
    assert (greet.returncode, greet.stdout) == (0, "Hello, toolchain!\n"), greet.stderr
    # The script element ran amhello's hello and greet inside the composed app
    report = checkouts.remex / folder("report.bst", "none", False) / "usr/share/toolchain"
    assert (report / "hello.txt").read_text() == "Hello World!\nThis is amhello 1.0.\n"
    assert (report / "greet.txt").read_text().startswith("Hello, report")
    assert (report / "app-integrated").read_text() == "yes\n"
