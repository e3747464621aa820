"""git (with a submodule) and patch sources through the whole pipeline on two workers.

A loopback smart-HTTP git server serves a superproject with a relative
submodule. Three elements use the same commit (two of them patch it), so
the build has one fetch node for it: a worker fetches it once into its
mirror, the source cache names the staged tree (submodule included), the
elements build from it with their patches applied, and a second build of the
same sources under new cache keys fetches nothing at all.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.cas import LocalCas
from pipeline.elements.sources import FetchContext, GitSource
from pipeline.servers import RemexStack
from pipeline.testing.gitserver import GitHttpServer
from tests.integration.test_git_network import commit_files, load_git, project, publish

BUILD_TIMEOUT = 240.0

PATCH = """\
--- a/top.txt
+++ b/top.txt
@@ -1 +1 @@
-top
+top, patched
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemexStack]:
    with RemexStack(tmp_path_factory.mktemp("git-stack"), workers=2) as running:
        yield running


def write_project(dest: Path, sysroot: Path, url: str, commit: str, salt: str) -> Path:
    (dest / "elements").mkdir(parents=True)
    shutil.copytree(sysroot, dest / "sysroot", symlinks=True)
    (dest / "patches").mkdir()
    (dest / "patches" / "fix.patch").write_text(PATCH)
    (dest / "project.conf").write_text(
        "name: gitpipe\nmin-version: 2.0\nelement-path: elements\n"
        f"aliases:\n  srv: {url}/\nenvironment:\n  SALT: {salt}\n"
    )
    (dest / "elements" / "base.bst").write_text(
        "kind: import\nsources:\n- kind: local\n  path: sysroot\n"
    )
    git_source = f"- kind: git\n  url: srv:super.git\n  ref: {commit}\n  directory: code\n"
    patch = "- kind: patch\n  path: patches/fix.patch\n  directory: code\n"
    for name, extra in (("plain", ""), ("patched", patch), ("again", patch)):
        (dest / "elements" / f"{name}.bst").write_text(
            "kind: manual\nbuild-depends:\n- base.bst\nsources:\n" + git_source + extra
            + "config:\n  install-commands:\n  - mkdir -p %{install-root}/out\n"
            f"  - cat code/top.txt code/ext/sub/sub.txt > %{{install-root}}/out/{name}.txt\n"
        )  # fmt: skip
    (dest / "elements" / "all.bst").write_text(
        "kind: stack\ndepends:\n- plain.bst\n- patched.bst\n- again.bst\n"
    )
    return dest


def build(stack: RemexStack, path: Path) -> tuple[int, dict[str, Any]]:
    result = stack.cli("build", "-C", path, "all.bst", "--json", timeout=BUILD_TIMEOUT)
    try:
        return result.returncode, json.loads(result.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"{result.stdout}\n{result.stderr}\n{stack.logs()}") from None


def test_git_with_a_submodule_and_patches_build_on_two_workers_fetched_once(
    stack: RemexStack, busybox_sysroot: Path, tmp_path: Path
) -> None:
    # Given a superproject with a relative submodule on a loopback HTTP server
    served = tmp_path / "served"
    served.mkdir()
    sub = commit_files(tmp_path / "work" / "sub", {"sub.txt": "sub\n"})
    publish(tmp_path / "work" / "sub", served, "sub.git")
    top = commit_files(
        tmp_path / "work" / "super",
        {"top.txt": "top\n", ".gitmodules": '[submodule "s"]\n\tpath = ext/sub\n'
         "\turl = ../sub.git\n"},
        {"ext/sub": sub},
    )  # fmt: skip
    publish(tmp_path / "work" / "super", served, "super.git")
    with GitHttpServer(served) as server:
        # And what one fetch of the source costs the server (on a scratch host)
        cas = LocalCas(tmp_path / "probe-cas")
        probe = load_git(project(tmp_path / "probe", f"{server.url}/super.git",
                                 f"  ref: {top}\n"), cas)  # fmt: skip
        request = probe.fetch_request("e", 0, "f")
        assert request is not None
        (tmp_path / "probe-work").mkdir()
        GitSource.fetch(request, FetchContext(cas, tmp_path / "probe-work", tmp_path / "probe-c"))
        one_fetch = {name: server.fetches(name) for name in ("super.git", "sub.git")}
        assert all(one_fetch.values())
        server.hits.clear()

        # When three elements using that commit build on two workers
        first = write_project(tmp_path / "p1", busybox_sysroot, server.url, top, uuid.uuid4().hex)
        code, output = build(stack, first)

        # Then one fetch node fetched it, once, submodule included
        assert code == 0, (output, stack.logs())
        nodes = [e for e in output["elements"] if e["element"].startswith("fetch:")]
        assert [n["element"].split("@")[0] for n in nodes] == ["fetch:super.git"]
        assert {name: server.fetches(name) for name in one_fetch} == one_fetch
        # And each element built from it, the patched ones patched
        out = tmp_path / "checkout"
        result = stack.cli("checkout", "-C", first, "--deps", "run", "all.bst", out)
        assert result.returncode == 0, result.stderr
        assert (out / "out" / "plain.txt").read_text() == "top\nsub\n"
        assert (out / "out" / "patched.txt").read_text() == "top, patched\nsub\n"
        assert (out / "out" / "again.txt").read_text() == "top, patched\nsub\n"

        # When the same sources build again under new cache keys
        second = write_project(tmp_path / "p2", busybox_sysroot, server.url, top, uuid.uuid4().hex)
        code, output = build(stack, second)

        # Then nothing is fetched: the source cache has the tree
        assert code == 0, (output, stack.logs())
        assert not [e for e in output["elements"] if e["element"].startswith("fetch:")]
        assert {name: server.fetches(name) for name in one_fetch} == one_fetch
