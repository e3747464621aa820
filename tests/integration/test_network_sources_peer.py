"""BuildStream as the peer for network ``tar`` and ``remote`` sources at load time.

A project with http sources through aliases and mirrors is shown by the real
``bst`` (2.8.1, a separate process) and by remex without downloading anything
(``bst show`` computes keys from refs). Their keys are each their own, so
what is compared is what they print besides keys, and which edits of the
project change an element's key: the ref, the kind's options (``base-dir``,
``filename``, ``executable``) do; the alias's value and the mirrors do not.

``zip`` is not compared: buildstream-plugins 2.8.0 declares it but does not
ship it, so bst cannot load a ``zip`` source.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.cas import LocalCas
from pipeline.elements import load_project
from pipeline.elements.show import format_element
from pipeline.testing.bst import Bst

CONF = """\
name: netpeer
min-version: 2.0
element-path: elements
aliases:
  upstream: http://127.0.0.1:9/releases/
  tools: https://127.0.0.1:9/tools/
mirrors:
- name: near
  aliases:
    upstream:
    - http://127.0.0.1:10/mirror/releases/
"""
ELEMENTS = {
    "lib.bst": f"""\
        kind: import
        sources:
        - kind: tar
          url: upstream:lib-1.0.tar.gz
          ref: {"1" * 64}
        """,
    "direct.bst": f"""\
        kind: import
        sources:
        - kind: tar
          url: http://127.0.0.1:9/direct/d.tar.xz
          ref: {"2" * 64}
          base-dir: ''
        """,
    "tool.bst": f"""\
        kind: import
        depends: [lib.bst]
        sources:
        - kind: remote
          url: tools:bin/run.sh
          ref: {"3" * 64}
          executable: true
          directory: usr/bin
        - kind: remote
          url: tools:data.bin
          ref: {"4" * 64}
          filename: data
        """,
    "all.bst": "kind: stack\ndepends: [tool.bst, direct.bst]\n",
}
FORMAT = "%{name: ^12}|%{kind}\n%{deps}\n%{build-deps}\n%{runtime-deps}"


def write_project(root: Path, edit: Callable[[dict[str, str]], None] | None = None) -> Path:
    files = {"project.conf": CONF, **{f"elements/{k}": v for k, v in ELEMENTS.items()}}
    if edit is not None:
        edit(files)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


def bst_keys(project: Path, home: Path) -> dict[str, str]:
    out = Bst(project, home).run(
        "show", "--deps", "all", "--format", "%{name} %{full-key}", "all.bst"
    )
    return dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.strip())


def remex_keys(project: Path, cas: Path) -> dict[str, str]:
    plan = load_project(project, cas=LocalCas(cas)).load_targets(["all.bst"])
    return {e.name: format_element(e, "%{full-key}", state="buildable") for e in plan}


def test_remex_show_prints_what_bst_show_prints(tmp_path: Path) -> None:
    # Given the project, shown by bst without fetching anything
    project = write_project(tmp_path / "p")
    args = ("--deps", "all", "--format", FORMAT, "all.bst")
    expected = Bst(project, tmp_path / "bh").run("show", *args).stdout
    # When remex shows it (a subprocess, as a user runs it; no server asked)
    (tmp_path / "remex.toml").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMEX_")}
    env |= {
        "REMEX_CONFIG": str(tmp_path / "remex.toml"),
        "REMEX_STACK_DIR": str(tmp_path / "no-stack"),
        "REMEX_CAS_DIR": str(tmp_path / "cas"),
    }
    remex = Path(sys.executable).with_name("remex")
    result = subprocess.run(
        [str(remex), "show", "-C", str(project), *args],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    # Then it prints the same bytes
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected


def _replace(name: str, old: str, new: str) -> Callable[[dict[str, str]], None]:
    def edit(files: dict[str, str]) -> None:
        assert old in files[name], (name, old)
        files[name] = files[name].replace(old, new)

    return edit


# (what is edited, the elements whose keys change: directly or through a dependency)
EDITS = [
    ("tar ref", _replace("elements/lib.bst", "1" * 64, "5" * 64),
     {"lib.bst", "tool.bst", "all.bst"}),
    ("tar base-dir", _replace("elements/direct.bst", "base-dir: ''", "base-dir: 'd*'"),
     {"direct.bst", "all.bst"}),
    ("remote executable", _replace("elements/tool.bst", "executable: true", "executable: false"),
     {"tool.bst", "all.bst"}),
    ("remote filename", _replace("elements/tool.bst", "filename: data", "filename: data2"),
     {"tool.bst", "all.bst"}),
    ("alias value", _replace("project.conf", "http://127.0.0.1:9/releases/",
                             "http://127.0.0.1:11/other/"), set()),
    ("mirrors", _replace("project.conf", "mirror/releases/", "mirror2/releases/"), set()),
]  # fmt: skip


@pytest.mark.parametrize(("what", "edit", "changed"), EDITS, ids=[e[0] for e in EDITS])
def test_the_same_edits_change_keys_in_bst_and_remex(
    tmp_path: Path,
    what: str,
    edit: Callable[[dict[str, str]], None],
    changed: set[str],
) -> None:
    # Given the project and an edited copy, keyed by bst and by remex
    before = write_project(tmp_path / "a")
    after = write_project(tmp_path / "b", edit)
    bst_before = bst_keys(before, tmp_path / "bh1")
    bst_after = bst_keys(after, tmp_path / "bh2")
    remex_before = remex_keys(before, tmp_path / "cas")
    remex_after = remex_keys(after, tmp_path / "cas")
    # Then the same elements' keys changed, for both
    assert set(bst_before) == set(remex_before) == set(ELEMENTS)
    bst_changed = {n for n in bst_before if bst_before[n] != bst_after[n]}
    remex_changed = {n for n in remex_before if remex_before[n] != remex_after[n]}
    assert bst_changed == changed, what
    assert remex_changed == changed, what
