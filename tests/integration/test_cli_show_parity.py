"""``remex show --deps/--order/--format`` prints what ``bst show`` prints.

The ``remex`` command (a subprocess, as a user runs it) and BuildStream 2.8.1's
``bst`` show tests/projects/kinds with the same arguments; with a format
without ``%{state}`` and ``%{key}`` (BuildStream's keys are its own) their
outputs are the same bytes. No server is needed: without ``%{state}``
``remex show`` asks none.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.testing.bst import Bst

PROJECTS = Path(__file__).parents[1] / "projects"
FORMAT = "%{name: ^20}|%{kind}\n%{deps}\n%{build-deps}\n%{runtime-deps}\n%{public}"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("show-parity") / "kinds"
    shutil.copytree(PROJECTS / "kinds", dest)
    (dest / "sysroot" / "usr").mkdir(parents=True)
    (dest / "sysroot" / "usr" / "marker").write_text("x\n")
    return dest


def remex_show(project: Path, work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (work / "remex.toml").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMEX_")}
    env |= {
        "REMEX_CONFIG": str(work / "remex.toml"),
        "REMEX_STACK_DIR": str(work / "no-stack"),
        "REMEX_CAS_DIR": str(work / "cas"),
    }
    remex = Path(sys.executable).with_name("remex")
    return subprocess.run(
        [str(remex), "show", "-C", str(project), *args],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("order", ["stage", "alpha"])
@pytest.mark.parametrize("deps", ["none", "run", "build", "all"])
def test_remex_show_prints_what_bst_show_prints(
    project: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, deps: str, order: str
) -> None:
    # Given two targets sharing dependencies, shown by bst
    args = ("--deps", deps, "--order", order, "--format", FORMAT, "app.bst", "all.bst")
    expected = Bst(project, tmp_path_factory.mktemp("bh")).run("show", *args).stdout
    # When remex shows them with the same arguments
    result = remex_show(project, tmp_path, *args)
    # Then it prints the same bytes
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected


def test_show_defaults_to_all_dependencies_and_stage_order(project: Path, tmp_path: Path) -> None:
    everything = remex_show(project, tmp_path, "-f", "%{name}", "--deps", "all", "app.bst")
    default = remex_show(project, tmp_path, "-f", "%{name}", "app.bst")
    assert default.returncode == 0, default.stderr
    assert default.stdout == everything.stdout and len(default.stdout.splitlines()) > 1
