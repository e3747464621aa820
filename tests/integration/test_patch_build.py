"""``patch`` sources in real builds on buildbox-casd: applied to the sources before them.

The element's sources are a git repository on a loopback smart-HTTP server
(with a submodule), a local folder, and patches: one for the git checkout's
folder (``directory``) touching the superproject and its submodule, one at
the top with ``strip-level: 0``. The build's commands read the patched files.
A patch that does not apply fails the element with patch's own words.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from pipeline.servers import CasdServer
from pipeline.stages import checkout_artifact
from pipeline.testing.gitserver import GitHttpServer
from tests.hello import copy_hello_project, load_and_build, stage_context
from tests.integration.test_git_network import commit_files, publish

FIX_CODE = """\
--- a/top.txt
+++ b/top.txt
@@ -1 +1 @@
-top
+top, patched
--- a/ext/sub/sub.txt
+++ b/ext/sub/sub.txt
@@ -1 +1,2 @@
 sub
+sub, patched
"""

FIX_NOTE = """\
--- note.txt
+++ note.txt
@@ -1 +1 @@
-note
+note, patched
"""

BROKEN = """\
--- a/top.txt
+++ b/top.txt
@@ -1 +1 @@
-something else
+never
"""


def make_repos(served: Path, work: Path) -> str:
    sub = commit_files(work / "sub", {"sub.txt": "sub\n"})
    publish(work / "sub", served, "sub.git")
    top = commit_files(
        work / "super",
        {"top.txt": "top\n", ".gitmodules": '[submodule "s"]\n\tpath = ext/sub\n'
         "\turl = ../sub.git\n"},
        {"ext/sub": sub},
    )  # fmt: skip
    publish(work / "super", served, "super.git")
    return top


def element(commit: str, patch: str) -> str:
    return textwrap.dedent(
        f"""\
        kind: manual
        build-depends:
        - base.bst
        sources:
        - kind: git
          url: srv:super.git
          ref: {commit}
          directory: code
        - kind: local
          path: files/notes
        - kind: patch
          path: patches/{patch}
          directory: code
        - kind: patch
          path: patches/note.patch
          strip-level: 0
        config:
          install-commands:
          - mkdir -p "%{{install-root}}/out"
          - cat code/top.txt code/ext/sub/sub.txt note.txt > "%{{install-root}}/out/all.txt"
        """
    )


def test_patches_apply_to_the_sources_staged_before_them(tmp_path: Path, casd: CasdServer) -> None:
    # Given the hello project with an element patching a network git checkout
    served = tmp_path / "served"
    served.mkdir()
    commit = make_repos(served, tmp_path / "work")
    project = copy_hello_project(tmp_path / "project")
    (project / "files" / "notes").mkdir()
    (project / "files" / "notes" / "note.txt").write_text("note\n")
    (project / "patches").mkdir()
    (project / "patches" / "fix.patch").write_text(FIX_CODE)
    (project / "patches" / "note.patch").write_text(FIX_NOTE)
    (project / "patches" / "broken.patch").write_text(BROKEN)
    (project / "elements" / "patched.bst").write_text(element(commit, "fix.patch"))
    (project / "elements" / "broken.bst").write_text(element(commit, "broken.patch"))
    with GitHttpServer(served) as server:
        conf = project / "project.conf"
        conf.write_text(conf.read_text() + f"aliases:\n  srv: {server.url}/\n")

        # When it is built on buildbox-casd
        with stage_context(tmp_path / "cas", casd.url, casd.url) as ctx:
            build = load_and_build(
                ctx, project, ["patched.bst", "broken.bst"], scratch=tmp_path / "scratch"
            )
            assert build.names("failed") == {"broken.bst"}, build.results
            checkout_artifact(ctx, build.specs["patched.bst"], tmp_path / "out")

    # Then the build saw every patch applied, in the submodule too
    assert (tmp_path / "out" / "out" / "all.txt").read_text() == (
        "top, patched\nsub\nsub, patched\nnote, patched\n"
    )
    # And the spec says how to apply each patch, without naming the kind
    sources = build.specs["patched.bst"]["sources"]
    assert [s.get("apply") for s in sources] == [
        None, None, {"patch": "fix.patch", "strip": 1}, {"patch": "note.patch", "strip": 0}
    ]  # fmt: skip
    # And a patch that does not apply fails its element for good, with patch's output
    error = build.results["broken.bst"]["error"] or ""
    assert "sources[2]: patch broken.patch does not apply in 'code'" in error
    assert "Hunk #1 FAILED" in error
