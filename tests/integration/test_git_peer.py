"""BuildStream as the peer for network git sources with submodules.

The same project (buildstream-plugins' ``git`` over a loopback smart-HTTP
server, through an alias) is read by the real ``bst`` (a separate process)
and by remex: the elements' cache keys must tell the same variants apart
(submodule settings change the key, a ``TAG-N-gCOMMIT`` ref keys as its
commit), and each element's sources must stage the same files as
``bst source checkout`` (where bst can fetch them: it does not resolve a
relative ``.gitmodules`` URL against the superproject's, which remex does).
"""

from __future__ import annotations

from pathlib import Path

from pipeline import api
from pipeline.cas import LocalCas, checkout
from pipeline.testing.bst import Bst
from pipeline.testing.gitserver import GitHttpServer
from tests.hello import file_tree
from tests.integration.test_git_network import commit_files, publish

CONF = """\
name: gitpeer
min-version: 2.0
element-path: elements
aliases:
  srv: {url}/
plugins:
- origin: pip
  package-name: buildstream-plugins
  sources: [git]
"""


def variants(commit: str) -> dict[str, str]:
    source = f"- kind: git\n  url: srv:super.git\n  ref: {commit}\n"
    return {
        "plain.bst": source,
        "described.bst": source.replace(f"ref: {commit}", f"ref: v1.0-0-g{commit}"),
        "nosub.bst": source + "  checkout-submodules: false\n",
        "off.bst": source + "  submodules:\n    ext/sub:\n      checkout: false\n",
        "deepoff.bst": source + "  submodules:\n    ext/sub/deep:\n      checkout: false\n",
        "url.bst": source + "  submodules:\n    ext/sub:\n      url: srv:sub.git\n"
        "    ext/sub/deep:\n      url: srv:deep.git\n",
    }


def test_bst_and_remex_key_and_stage_git_submodules_alike(tmp_path: Path) -> None:
    # Given a superproject with a submodule (relative URL) that has its own submodule
    served = tmp_path / "served"
    served.mkdir()
    work = tmp_path / "work"
    deep = commit_files(work / "deep", {"deep.txt": "deep\n"})
    publish(work / "deep", served, "deep.git")
    sub = commit_files(
        work / "sub",
        {"sub.txt": "sub\n", ".gitmodules": '[submodule "deep"]\n\tpath = deep\n'
         "\turl = ../deep.git\n"},
        {"deep": deep},
    )  # fmt: skip
    publish(work / "sub", served, "sub.git")
    top = commit_files(
        work / "super",
        {"top.txt": "top\n", ".gitmodules": '[submodule "sub"]\n\tpath = ext/sub\n'
         "\turl = ../sub.git\n"},
        {"ext/sub": sub},
        tag="v1.0",
    )  # fmt: skip
    publish(work / "super", served, "super.git")

    with GitHttpServer(served) as server:
        project = tmp_path / "project"
        (project / "elements").mkdir(parents=True)
        (project / "project.conf").write_text(CONF.format(url=server.url))
        bst = Bst(project, tmp_path / "bst-home")
        cas = LocalCas(tmp_path / "cas")

        # When both key one element written as each variant in turn (bst keys
        # depend on the element's name, so the name stays the same)
        bst_keys: dict[str, str] = {}
        remex_keys: dict[str, str] = {}
        for variant, source in variants(top).items():
            (project / "elements" / "e.bst").write_text("kind: import\nsources:\n" + source)
            shown = bst.run("show", "--deps", "none", "--format", "%{full-key}", "e.bst")
            bst_keys[variant] = shown.stdout.strip()
            remex_keys[variant] = api.plan(project, ["e.bst"], cas=cas)[0].cache_key

        # Then the same variants share a key, and the same ones differ
        def partition(keys: dict[str, str]) -> set[frozenset[str]]:
            groups: dict[str, set[str]] = {}
            for name, key in keys.items():
                groups.setdefault(key, set()).add(name)
            return {frozenset(group) for group in groups.values()}

        assert partition(bst_keys) == partition(remex_keys)
        assert frozenset({"plain.bst", "described.bst"}) in partition(remex_keys)
        assert len(partition(remex_keys)) == 5

        for name, source in variants(top).items():
            (project / "elements" / name).write_text("kind: import\nsources:\n" + source)
        plan = api.plan(project, sorted(variants(top)), cas=cas)

        # And each element's sources stage what `bst source checkout` writes
        # (bst fetches a relative .gitmodules URL as a path, so only the
        # elements whose submodules it can reach are compared)
        for element in plan:
            if element.name not in ("nosub.bst", "off.bst", "url.bst"):
                continue
            out = tmp_path / "bst-sources" / element.name
            bst.run("source", "checkout", "--directory", str(out), element.name)
            mine = tmp_path / "remex-sources" / element.name
            digest = element.sources[0].stage(cas, tmp_path / "scratch" / element.name)
            checkout(cas, digest, mine)
            assert file_tree(mine) == file_tree(out / element.normal_name), element.name
