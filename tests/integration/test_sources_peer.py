"""BuildStream as the peer for source kinds and the project.conf keys around them.

One project uses what real BuildStream 2 projects carry: ``git`` declared from
buildstream-plugins, project.conf ``sources:`` defaults for ``tar``,
``source-provenance-attributes``, ``defaults: targets:``, ``shell``,
``artifacts``, ``source-caches``, ``ref-storage``. The real ``bst`` (2.8.1 with
buildstream-plugins 2.8.0, as a separate process) and remex must both load
it, pick the same default targets, and stage the same files for each source.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
import textwrap
from pathlib import Path

from pipeline import api
from pipeline.cas import LocalCas, checkout
from pipeline.testing.bst import Bst
from tests.hello import file_tree

CONF = """\
name: srcpeer
min-version: 2.0
element-path: elements
aliases:
  files: file://{files}/
plugins:
- origin: pip
  package-name: buildstream-plugins
  sources: [git]
sources:
  tar:
    config:
      base-dir: ''
source-provenance-attributes:
  homepage: the project's home page
defaults:
  targets: [all.bst]
shell:
  command: [sh, -i]
  host-files: [/etc/resolv.conf]
artifacts: []
source-caches: []
ref-storage: inline
"""


def git(repo: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    result = subprocess.run(
        ["git", "-c", "user.name=T", "-c", "user.email=t@example.com",
         "-c", "commit.gpgsign=false", "-C", str(repo), *args],
        check=True, capture_output=True, text=True, env=env,
    )  # fmt: skip
    return result.stdout.strip()


def make_project(root: Path) -> Path:
    files = root / "files"
    files.mkdir(parents=True)
    # A tarball with a top folder: the project's `base-dir: ''` keeps it.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data, mode in (("pkg-1/README", b"read me\n", 0o644),
                                 ("pkg-1/bin/run", b"#!/bin/sh\n", 0o755)):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    (files / "pkg.tar.gz").write_bytes(buffer.getvalue())
    sha = hashlib.sha256(buffer.getvalue()).hexdigest()
    repo = files / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "src").mkdir()
    (repo / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    (repo / "link").symlink_to("src/main.c")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first")
    commit = git(repo, "rev-parse", "HEAD")
    project = root / "project"
    elements = {
        "tarred.bst": f"""\
            kind: import
            sources:
            - kind: tar
              url: files:pkg.tar.gz
              ref: {sha}
              provenance:
                homepage: https://example.com/pkg
            """,
        "gitted.bst": f"""\
            kind: import
            sources:
            - kind: git
              url: files:repo
              track: main
              ref: {commit}
              directory: code
            """,
        "all.bst": "kind: stack\ndepends: [tarred.bst, gitted.bst]\n",
    }
    for name, text in elements.items():
        path = project / "elements" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    (project / "project.conf").write_text(CONF.format(files=files))
    return project


def test_bst_and_remex_read_the_same_sources(tmp_path: Path) -> None:
    # Given the project
    project = make_project(tmp_path)
    cas = LocalCas(tmp_path / "cas")

    # When both load it with no targets
    bst = Bst(project, tmp_path / "bst-home")
    shown = bst.run("show", "--deps", "all", "--format", "%{name}")
    plan = api.plan(project, [], cas=cas)

    # Then both use defaults: targets: (all.bst and what it depends on)
    assert sorted(shown.stdout.split()) == sorted(e.name for e in plan)
    assert {e.name for e in plan} == {"all.bst", "tarred.bst", "gitted.bst"}

    # And each element's sources stage the same files as bst's source checkout
    for element in plan:
        if not element.sources:
            continue
        out = tmp_path / "bst-sources" / element.name
        bst.run("source", "checkout", "--directory", str(out), element.name)
        mine = tmp_path / "remex-sources" / element.name
        for source in element.sources:
            digest = source.stage(cas, tmp_path / "work")
            checkout(cas, digest, mine / source.directory if source.directory else mine)
        # bst checks an element's sources out into a folder named after it.
        assert file_tree(mine) == file_tree(out / element.normal_name), element.name
