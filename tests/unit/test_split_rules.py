"""split_rules.py against what BuildStream 2.8.1 staged.

EXPECTED is what ``bst build`` + ``bst artifact checkout`` gave for the compose
elements c1..c6 of tests/format_projects/split_rules/ (the import element's
tree is FILES and FOLDERS below): a parity test can rebuild them with bst.
"""

from __future__ import annotations

import pytest

from pipeline.elements.split_rules import (
    DEFAULT_SPLIT_RULES,
    bst_path_order,
    compile_domains,
    domains_of_paths,
    select_paths,
    staged_paths,
)

# bst's default variables, for expanding the default rules.
VARIABLES = {
    "bindir": "/usr/bin",
    "sbindir": "/usr/sbin",
    "libexecdir": "/usr/libexec",
    "libdir": "/usr/lib",
    "includedir": "/usr/include",
    "datadir": "/usr/share",
    "debugdir": "/usr/lib/debug",
    "docdir": "/usr/share/doc",
    "infodir": "/usr/share/info",
    "mandir": "/usr/share/man",
}


def _expand(rule: str) -> str:
    for name, value in VARIABLES.items():
        rule = rule.replace(f"%{{{name}}}", value)
    return rule


DOMAINS = {name: [_expand(r) for r in rules] for name, rules in DEFAULT_SPLIT_RULES.items()}

FOLDERS = [
    "etc", "usr", "usr/bin", "usr/include", "usr/include/sub", "usr/lib", "usr/lib/pkgconfig",
    "usr/share", "usr/share/doc", "usr/share/doc/x", "usr/share/empty",
]  # fmt: skip
FILES = [
    "etc/conf", "usr/bin/hello", "usr/include/a.h", "usr/include/sub/b.h", "usr/lib/binlink",
    "usr/lib/libx.a", "usr/lib/libx.so", "usr/lib/libx.so.1", "usr/lib/pkgconfig/x.pc",
    "usr/share/doc/x/README", "usr/share/empty/.keep",
]  # fmt: skip

# element: (compose config, what bst staged)
EXPECTED = {
    "c1": (
        {"include": ["runtime"]},
        "etc etc/conf usr usr/bin usr/bin/hello usr/lib usr/lib/binlink usr/lib/libx.so "
        "usr/lib/libx.so.1 usr/lib/pkgconfig usr/share usr/share/empty usr/share/empty/.keep",
    ),
    "c2": (
        {"include": ["devel"]},
        "etc etc/conf usr usr/include usr/include/a.h usr/include/sub usr/include/sub/b.h usr/lib "
        "usr/lib/binlink usr/lib/libx.a usr/lib/pkgconfig usr/lib/pkgconfig/x.pc usr/share "
        "usr/share/empty usr/share/empty/.keep",
    ),
    "c3": (
        {"exclude": ["devel"]},
        "etc etc/conf usr usr/bin usr/bin/hello usr/lib usr/lib/binlink usr/lib/libx.so "
        "usr/lib/libx.so.1 usr/lib/pkgconfig usr/share usr/share/doc usr/share/doc/x "
        "usr/share/doc/x/README usr/share/empty usr/share/empty/.keep",
    ),
    "c4": (
        {"orphans": False, "exclude": ["doc"]},
        "usr usr/bin usr/bin/hello usr/include usr/include/a.h usr/include/sub "
        "usr/include/sub/b.h usr/lib usr/lib/libx.a usr/lib/libx.so usr/lib/libx.so.1 "
        "usr/lib/pkgconfig usr/lib/pkgconfig/x.pc",
    ),
    "c5": (
        {"include": ["runtime", "nosuch"], "orphans": False},
        "usr usr/bin usr/bin/hello usr/lib usr/lib/libx.so usr/lib/libx.so.1",
    ),
    "c6": (
        {"include": ["doc"], "exclude": ["doc"]},
        "etc etc/conf usr usr/lib usr/lib/binlink usr/lib/pkgconfig usr/share usr/share/empty "
        "usr/share/empty/.keep",
    ),
}


@pytest.mark.parametrize("element", sorted(EXPECTED))
def test_staged_like_bst(element: str) -> None:
    # Given a compose configuration bst staged
    config, staged = EXPECTED[element]
    # When remex stages the same artifact by split rules
    result = staged_paths(DOMAINS, FILES, FOLDERS, **config)  # type: ignore[arg-type]
    # Then the same paths appear
    assert sorted(result) == staged.split()


def test_no_filtering_keeps_everything_in_order() -> None:
    paths = bst_path_order(FILES, FOLDERS)
    assert select_paths(DOMAINS, paths) == paths


def test_manifest_order_and_selection() -> None:
    # Given the artifact listed in bst's order (files of a folder before its sub-folders)
    paths = bst_path_order(FILES, FOLDERS)
    assert paths[:4] == ["etc", "etc/conf", "usr", "usr/bin"]
    assert paths.index("usr/lib/binlink") < paths.index("usr/lib/pkgconfig")
    # When the runtime domain is selected without orphans
    manifest = select_paths(DOMAINS, paths, include=["runtime"], orphans=False)
    # Then only the paths the domain claims, folders included, in that order
    assert manifest == ["usr/bin", "usr/bin/hello", "usr/lib/libx.so", "usr/lib/libx.so.1"]


def test_domains_of_paths() -> None:
    claimed = domains_of_paths(DOMAINS, ["usr/include/sub/b.h", "/usr/lib/libx.so", "etc/conf"])
    assert claimed["devel"] == ["usr/include/sub/b.h"]
    assert claimed["runtime"] == ["/usr/lib/libx.so"]
    assert set(claimed) == set(DEFAULT_SPLIT_RULES)


def test_globs_stop_at_slash_and_rules_are_absolute() -> None:
    compiled = compile_domains({"one": ["/a/*"], "deep": ["/a/**"], "rel": ["a/*"], "none": []})
    assert compiled["one"].match("/a/b")
    assert not compiled["one"].match("/a/b/c")
    assert compiled["deep"].match("/a/b/c")
    # bst matches rules against "/path": a rule without "/" matches nothing
    assert not compiled["rel"].match("/a/b")
    assert not compiled["none"].match("/a")


def test_default_split_rules_are_bsts() -> None:
    assert list(DEFAULT_SPLIT_RULES) == ["runtime", "devel", "debug", "doc", "locale"]
    assert DEFAULT_SPLIT_RULES["runtime"][-1] == "%{libdir}/lib*.so*"
    assert DEFAULT_SPLIT_RULES["devel"][0:2] == ("%{includedir}", "%{includedir}/**")
    assert len(DEFAULT_SPLIT_RULES["locale"]) == 6


def test_path_filter_reads_an_empty_include_as_every_domain_and_ignores_unknown_ones() -> None:
    from pipeline.elements.split_rules import path_filter

    domains = {"runtime": ["/usr/bin/*"], "doc": ["/usr/share/doc/**"]}
    # Given no include: every domain, not the orphans
    everything = path_filter(domains, orphans=False)
    assert everything("usr/bin/sh") and everything("usr/share/doc/x/README")
    assert not everything("etc/conf")
    # Given only a domain this element does not define: nothing of its domains
    unknown = path_filter(domains, include=["devel"], orphans=False)
    assert not unknown("usr/bin/sh") and not unknown("usr/share/doc/x/README")
    # An exclude wins over an include
    assert not path_filter(domains, include=["runtime"], exclude=["runtime"])("usr/bin/sh")
