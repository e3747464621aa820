"""Issue 11's proof: a 20-element project of network sources on a farm of two workers.

Real servers on loopback ports: a :class:`LoopbackHttpServer` serves two
tarballs, two zip archives and two plain files; a smart-HTTP git server
(:class:`GitHttpServer`) serves a superproject with a relative submodule.
The project reaches both through aliases; several elements share each
source, some add project patches on top. ``remex build`` of the whole
project on two workers downloads each HTTP file exactly once and fetches
the git repositories once (the servers' own logs); a second build of the
same sources under new cache keys, on a fresh worker with an empty local
CAS alone, downloads nothing at all.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.cas import LocalCas
from pipeline.elements.sources import FetchContext, GitSource
from pipeline.servers import RemexStack
from pipeline.testing.gitserver import GitHttpServer
from pipeline.testing.httpserver import LoopbackHttpServer
from tests.integration.test_git_network import commit_files, load_git, project, publish

BUILD_TIMEOUT = 300.0

LIB_PATCH = """\
--- a/lib.txt
+++ b/lib.txt
@@ -1 +1 @@
-lib v1
+lib v1, patched
"""

TOP_PATCH = """\
--- a/top.txt
+++ b/top.txt
@@ -1 +1 @@
-top
+top, patched
"""

GITMODULES = '[submodule "s"]\n\tpath = ext/sub\n\turl = ../sub.git\n'


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemexStack]:
    """Redis, an execution and an artifact casd, workers w1 and w2."""
    with RemexStack(tmp_path_factory.mktemp("farm-stack"), workers=2) as stack:
        yield stack


# --- what the servers serve ------------------------------------------------------------


def write_tar(path: Path, members: dict[str, bytes]) -> str:
    """A gzipped tarball of ``members`` (path -> content) at ``path``; its sha256."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def write_zip(path: Path, members: dict[str, bytes]) -> str:
    """A zip archive of ``members`` at ``path``; its sha256."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    path.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def write_file(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def http_files(root: Path) -> dict[str, str]:
    """Serve the farm's six HTTP files from ``root``; file name -> sha256."""
    noise = os.urandom(300_000)  # a file of some size: the counts are of whole downloads
    return {
        "lib-1.0.tar.gz": write_tar(root / "lib-1.0.tar.gz", {
            "lib-1.0/lib.txt": b"lib v1\n", "lib-1.0/README": b"the lib\n"}),
        "tools-2.0.tar.gz": write_tar(root / "tools-2.0.tar.gz", {
            "tools-2.0/tools.txt": b"tools v2\n", "tools-2.0/blob.bin": noise}),
        "data.zip": write_zip(root / "data.zip", {"data/data.txt": b"data\n"}),
        "assets.zip": write_zip(root / "assets.zip", {
            "assets/a.txt": b"asset a\n", "assets/img/b.txt": b"asset b\n"}),
        "run.sh": write_file(root / "run.sh", b"#!/bin/sh\necho run\n"),
        "config.txt": write_file(root / "config.txt", b"config=1\n"),
    }  # fmt: skip


def git_repositories(work: Path, served: Path) -> str:
    """``super.git`` (``top.txt`` and ``ext/sub`` -> ``../sub.git``) and ``sub.git``
    in ``served``; the superproject's commit."""
    sub = commit_files(work / "sub", {"sub.txt": "sub\n"})
    publish(work / "sub", served, "sub.git")
    top = commit_files(
        work / "super", {"top.txt": "top\n", ".gitmodules": GITMODULES}, {"ext/sub": sub}
    )
    publish(work / "super", served, "super.git")
    return top


# --- the project -------------------------------------------------------------------------


def farm_elements(refs: dict[str, str], commit: str) -> dict[str, tuple[list[str], list[str]]]:
    """The 18 manual elements: name -> (sources as YAML entries, dependencies)."""

    def tar(name: str, where: str = "") -> str:
        return entry("tar", f"http:{name}", refs[name], where)

    def zip_(name: str, where: str = "") -> str:
        return entry("zip", f"http:{name}", refs[name], where)

    def remote(name: str, where: str = "", executable: bool = False) -> str:
        extra = "  executable: true\n" if executable else ""
        return entry("remote", f"http:{name}", refs[name], where) + extra

    def git(where: str = "") -> str:
        return entry("git", "git:super.git", commit, where)

    def patch(name: str, where: str = "") -> str:
        return f"- kind: patch\n  path: patches/{name}\n" + (
            f"  directory: {where}\n" if where else ""
        )

    lib, tools = "lib-1.0.tar.gz", "tools-2.0.tar.gz"
    return {
        "lib": ([tar(lib), patch("lib.patch")], []),
        "lib-plain": ([tar(lib)], []),
        "lib-again": ([tar(lib), patch("lib.patch")], []),
        "tools": ([tar(tools)], []),
        "tools-data": ([tar(tools), zip_("data.zip", "data")], []),
        "data": ([zip_("data.zip")], []),
        "assets": ([zip_("assets.zip")], []),
        "assets-data": ([zip_("assets.zip"), zip_("data.zip", "d")], []),
        "script": ([remote("run.sh", executable=True)], []),
        "config": ([remote("config.txt")], []),
        "script-config": ([remote("run.sh", "bin", True), remote("config.txt", "etc")], []),
        "code": ([git()], []),
        "code-patched": ([git("code"), patch("top.patch", "code")], []),
        "code-lib": ([git("code"), tar(lib, "lib"), patch("lib.patch", "lib")], []),
        "mixed": ([tar(tools), zip_("assets.zip", "assets"), remote("config.txt"), git("g")], []),
        "app": ([remote("config.txt")], ["lib", "code-patched"]),
        "app2": ([tar(lib, "lib")], ["app"]),
        "everything": (
            [
                tar(lib, "lib"),
                patch("lib.patch", "lib"),
                zip_("data.zip", "data"),
                remote("run.sh", "bin", True),
                git("code"),
                patch("top.patch", "code"),
            ],
            [],
        ),
    }


def entry(kind: str, url: str, ref: str, where: str) -> str:
    """One source entry (YAML)."""
    return f"- kind: {kind}\n  url: {url}\n  ref: {ref}\n" + (
        f"  directory: {where}\n" if where else ""
    )


def write_project(
    dest: Path, sysroot: Path, http: str, git: str, refs: dict[str, str], commit: str, salt: str
) -> Path:
    """The 20-element project: ``base`` (the sysroot), 18 manual elements, ``all``.

    Each manual element copies its staged sources to ``/src/NAME/``; ``app``
    also copies what its dependencies installed there.
    """
    (dest / "elements").mkdir(parents=True)
    shutil.copytree(sysroot, dest / "sysroot", symlinks=True)
    (dest / "patches").mkdir()
    (dest / "patches" / "lib.patch").write_text(LIB_PATCH)
    (dest / "patches" / "top.patch").write_text(TOP_PATCH)
    (dest / "project.conf").write_text(
        "name: farm\nmin-version: 2.0\nelement-path: elements\n"
        f"aliases:\n  http: {http}/\n  git: {git}/\n"
        f"environment:\n  FARM_SALT: {salt}\n"
    )
    (dest / "elements" / "base.bst").write_text(
        "kind: import\nsources:\n- kind: local\n  path: sysroot\n"
    )
    elements = farm_elements(refs, commit)
    for name, (sources, deps) in elements.items():
        into = f"%{{install-root}}/src/{name}"
        commands = [f"mkdir -p {into}", f"cp -a . {into}/"]
        if name == "app":
            commands.append(
                f"cat /src/lib/lib.txt /src/code-patched/code/top.txt > {into}/deps.txt"
            )
        (dest / "elements" / f"{name}.bst").write_text(
            "kind: manual\nbuild-depends:\n- base.bst\n"
            + "".join(f"- {d}.bst\n" for d in deps)
            + "sources:\n" + "".join(sources)
            + "config:\n  install-commands:\n" + "".join(f"  - {c}\n" for c in commands)
        )  # fmt: skip
    (dest / "elements" / "all.bst").write_text(
        "kind: stack\ndepends:\n" + "".join(f"- {n}.bst\n" for n in elements)
    )
    assert len(list((dest / "elements").glob("*.bst"))) == 20
    return dest


def build(stack: RemexStack, path: Path) -> tuple[int, dict[str, Any]]:
    result = stack.cli("build", "-C", path, "all.bst", "--json", timeout=BUILD_TIMEOUT)
    try:
        return result.returncode, json.loads(result.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"{result.stdout}\n{result.stderr}\n{stack.logs()}") from None


def fetch_nodes(output: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in output["elements"] if e["element"].startswith("fetch:")]


def one_git_fetch(tmp_path: Path, server: GitHttpServer, commit: str) -> dict[str, int]:
    """What one fetch of the superproject (submodule included) asks of the git
    server, by request path: done once on a scratch host, then forgotten."""
    cas = LocalCas(tmp_path / "probe-cas")
    source = load_git(project(tmp_path / "probe", f"{server.url}/super.git",
                              f"  ref: {commit}\n"), cas)  # fmt: skip
    request = source.fetch_request("e", 0, "f")
    assert request is not None
    (tmp_path / "probe-work").mkdir()
    GitSource.fetch(request, FetchContext(cas, tmp_path / "probe-work", tmp_path / "probe-cache"))
    cost = dict(server.hits)
    server.hits.clear()
    # one session per repository (one ref advertisement), objects asked for
    assert cost["/super.git/info/refs"] == cost["/sub.git/info/refs"] == 1, cost
    assert cost["/super.git/git-upload-pack"] and cost["/sub.git/git-upload-pack"], cost
    return cost


def test_a_farm_fetches_each_source_once_and_a_fresh_worker_downloads_nothing(
    farm: RemexStack, busybox_sysroot: Path, tmp_path: Path
) -> None:
    # Given six files on an HTTP server and a superproject with a submodule on a git server
    (tmp_path / "www").mkdir()
    (tmp_path / "git").mkdir()
    commit = git_repositories(tmp_path / "work", tmp_path / "git")
    with (
        LoopbackHttpServer(tmp_path / "www") as http,
        GitHttpServer(tmp_path / "git") as git_server,
    ):
        refs = http_files(tmp_path / "www")
        git_cost = one_git_fetch(tmp_path, git_server, commit)
        # And a project of 20 elements sharing them (through aliases), some patching them
        first = write_project(tmp_path / "p1", busybox_sysroot, http.base_url, git_server.url,
                              refs, commit, uuid.uuid4().hex)  # fmt: skip

        # When it builds with remex build on two workers
        code, output = build(farm, first)

        # Then it succeeded, every element built
        assert code == 0, (output, farm.logs())
        states = {e["element"]: e["state"] for e in output["elements"]}
        assert [n for n, s in states.items() if s != "built"] == [], states
        # And each HTTP file was downloaded exactly once, the git repositories
        # fetched once (what one fetch costs the git server), by seven fetch nodes
        assert {n: http.count(file=n) for n in refs} == dict.fromkeys(refs, 1)
        assert len(http.entries) == len(refs), http.entries
        assert dict(git_server.hits) == git_cost
        nodes = fetch_nodes(output)
        assert sorted(n["element"].split("@")[0] for n in nodes) == sorted(
            [f"fetch:{n}" for n in refs] + ["fetch:super.git"]
        )
        assert {h for n in nodes for h in n["hosts"]} <= {"w1", "w2"}
        # (the farm shared the work)
        assert {h for e in output["elements"] for h in e.get("hosts") or ()} == {"w1", "w2"}

        # And the top element checks out with every source, patched where asked
        out = tmp_path / "checkout"
        result = farm.cli("checkout", "-C", first, "--deps", "run", "all.bst", out)
        assert result.returncode == 0, result.stderr
        check_files(out / "src")

        # When the same sources build again under new cache keys, on a fresh
        # worker with an empty local CAS, alone (the first two stopped)
        for worker in list(farm.workers):
            worker.stop()
            farm.workers.remove(worker)
        assert not farm.worker_dir("w3").exists()  # a new folder: an empty local CAS
        farm.add_worker("w3")
        second = write_project(tmp_path / "p2", busybox_sysroot, http.base_url, git_server.url,
                               refs, commit, uuid.uuid4().hex)  # fmt: skip
        code, output = build(farm, second)

        # Then it built every element whose key changed (base's did not: it has no
        # environment), downloading nothing from either server
        assert code == 0, (output, farm.logs())
        states = {e["element"]: e["state"] for e in output["elements"]}
        assert [n for n, s in states.items() if s != "built"] == ["base.bst"], states
        assert states["base.bst"] == "cached"
        assert not fetch_nodes(output)
        assert {h for e in output["elements"] for h in e.get("hosts") or ()} == {"w3"}
        assert len(http.entries) == len(refs), http.entries
        assert dict(git_server.hits) == git_cost
        # And its artifacts are the same files
        again = tmp_path / "checkout-again"
        result = farm.cli("checkout", "-C", second, "--deps", "run", "all.bst", again)
        assert result.returncode == 0, result.stderr
        check_files(again / "src")


def check_files(src: Path) -> None:
    """What each element copied from its sources (``/src/NAME/``) is right."""
    read = {
        str(p.relative_to(src)): p.read_bytes()
        for p in sorted(src.rglob("*"))
        if p.is_file() and p.name != "blob.bin"
    }
    assert len({p.split("/")[0] for p in read}) == 18, sorted(read)
    expected = {
        "lib/lib.txt": b"lib v1, patched\n",
        "lib/README": b"the lib\n",
        "lib-plain/lib.txt": b"lib v1\n",
        "lib-again/lib.txt": b"lib v1, patched\n",
        "tools/tools.txt": b"tools v2\n",
        "tools-data/data/data.txt": b"data\n",
        "data/data.txt": b"data\n",
        "assets/a.txt": b"asset a\n",
        "assets/img/b.txt": b"asset b\n",
        "assets-data/d/data.txt": b"data\n",
        "script/run.sh": b"#!/bin/sh\necho run\n",
        "config/config.txt": b"config=1\n",
        "script-config/bin/run.sh": b"#!/bin/sh\necho run\n",
        "script-config/etc/config.txt": b"config=1\n",
        "code/top.txt": b"top\n",
        "code/ext/sub/sub.txt": b"sub\n",
        "code-patched/code/top.txt": b"top, patched\n",
        "code-patched/code/ext/sub/sub.txt": b"sub\n",
        "code-lib/code/top.txt": b"top\n",
        "code-lib/lib/lib.txt": b"lib v1, patched\n",
        "mixed/tools.txt": b"tools v2\n",
        "mixed/assets/img/b.txt": b"asset b\n",
        "mixed/config.txt": b"config=1\n",
        "mixed/g/ext/sub/sub.txt": b"sub\n",
        "app/config.txt": b"config=1\n",
        "app/deps.txt": b"lib v1, patched\ntop, patched\n",
        "app2/lib/lib.txt": b"lib v1\n",
        "everything/lib/lib.txt": b"lib v1, patched\n",
        "everything/data/data.txt": b"data\n",
        "everything/bin/run.sh": b"#!/bin/sh\necho run\n",
        "everything/code/top.txt": b"top, patched\n",
        "everything/code/ext/sub/sub.txt": b"sub\n",
    }
    assert {p: read.get(p) for p in expected} == expected
    # the big file of the tools tarball came through whole, once per user
    blobs = sorted(src.rglob("blob.bin"))
    assert sorted(str(b.relative_to(src)) for b in blobs) == [
        "mixed/blob.bin",
        "tools-data/blob.bin",
        "tools/blob.bin",
    ]
    assert len({hashlib.sha256(b.read_bytes()).hexdigest() for b in blobs}) == 1
    # remote's executable flag, kept by the checkout; off where not asked
    assert os.access(src / "script" / "run.sh", os.X_OK)
    assert os.access(src / "everything" / "bin" / "run.sh", os.X_OK)
    assert not os.access(src / "config" / "config.txt", os.X_OK)
