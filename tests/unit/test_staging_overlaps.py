"""Overlaps and unstaged files while staging dependencies, judged as BuildStream 2.8 judges them.

The semantics come from BuildStream's ``_overlapcollector.py`` and its CAS
directory import; tests/integration/test_overlaps_peer.py checks the same
cases against the real ``bst``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline.cas import LocalCas, import_directory
from pipeline.digest import Digest
from pipeline.reapi.channel import Endpoint
from pipeline.reapi.remote import Remote
from pipeline.spec import BuildSpec, DependencySpec, artifact_uri
from pipeline.stages import BuildFailedError, StageContext
from pipeline.stages.overlaps import (
    OVERLAPS,
    UNSTAGED_FILES,
    StagedLayer,
    StagingConflictError,
    analyse_staging,
    whitelist_regex,
)
from pipeline.stages.staging import check_staging

KEY = hashlib.sha256(b"key").hexdigest()


@pytest.fixture
def cas(tmp_path: Path) -> LocalCas:
    return LocalCas(tmp_path / "cas")


def tree(cas: LocalCas, folder: Path, entries: dict[str, str | None]) -> Digest:
    """A tree of files (text), symlinks (``-> target``) and empty folders (None)."""
    folder.mkdir(parents=True)
    for name, content in entries.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir()
        elif content.startswith("-> "):
            path.symlink_to(content[3:])
        else:
            path.write_text(content)
    return import_directory(cas, folder)


def layer(
    cas: LocalCas, tmp_path: Path, name: str, entries: dict[str, str | None], **kw: object
) -> StagedLayer:
    whitelist = kw.pop("whitelist", None)
    location = str(kw.pop("location", ""))
    return StagedLayer(
        element=name,
        location=location,
        files=tree(cas, tmp_path / f"{name}-{location}", entries),
        whitelist=whitelist_regex(list(whitelist)) if whitelist else None,  # type: ignore[call-overload]
    )


def test_a_later_file_over_an_earlier_one_is_an_overlap_naming_both(
    cas: LocalCas, tmp_path: Path
) -> None:
    # Given two dependencies shipping the same tool, and a third without it
    layers = [
        layer(cas, tmp_path, "a.bst", {"usr/bin/tool": "a", "usr/bin/a": "a"}),
        layer(cas, tmp_path, "b.bst", {"usr/bin/tool": "b"}),
        layer(cas, tmp_path, "c.bst", {"usr/bin/c": "c"}),
    ]

    # When they are staged
    report = analyse_staging(cas, layers)

    # Then one overlap, bottom-most first, with BuildStream's warning text
    assert [(o.path, o.elements, o.offenders) for o in report.overlaps] == [
        ("/usr/bin/tool", ["a.bst", "b.bst"], ["b.bst"])
    ]
    [warning] = report.warnings
    assert warning.token == OVERLAPS
    assert warning.text() == (
        "[overlaps]: Non-whitelisted overlaps detected\n"
        "Staged files overwrite existing files in staging area: /\n"
        "/usr/bin/tool: b.bst is not permitted to overlap other elements, order b.bst above a.bst"
    )


def test_identical_files_overlap_like_different_ones(cas: LocalCas, tmp_path: Path) -> None:
    layers = [
        layer(cas, tmp_path, "a.bst", {"share/LICENSE": "same"}),
        layer(cas, tmp_path, "b.bst", {"share/LICENSE": "same"}),
    ]
    assert [o.path for o in analyse_staging(cas, layers).overlaps] == ["/share/LICENSE"]


def test_the_overwriting_elements_whitelist_counts_not_the_overwritten_ones(
    cas: LocalCas, tmp_path: Path
) -> None:
    # Given the bottom element whitelisting the path: still a warning
    bottom = [
        layer(cas, tmp_path / "1", "a.bst", {"etc/conf": "a"}, whitelist=["/etc/*"]),
        layer(cas, tmp_path / "1", "b.bst", {"etc/conf": "b"}),
    ]
    report = analyse_staging(cas, bottom)
    assert [w.token for w in report.warnings] == [OVERLAPS]

    # Given the overwriting element whitelisting it (a ** glob): no warning,
    # but the overlap is still recorded as whitelisted
    top = [
        layer(cas, tmp_path / "2", "a.bst", {"etc/conf": "a", "etc/x/y": "a"}),
        layer(
            cas, tmp_path / "2", "b.bst", {"etc/conf": "b", "etc/x/y": "b"}, whitelist=["/etc/**"]
        ),
    ]
    report = analyse_staging(cas, top)
    assert report.warnings == []
    assert [(o.path, o.offenders) for o in report.overlaps] == [
        ("/etc/conf", []),
        ("/etc/x/y", []),
    ]


def test_three_elements_on_one_path_list_every_offender_in_order(
    cas: LocalCas, tmp_path: Path
) -> None:
    layers = [
        layer(cas, tmp_path, "a.bst", {"f": "a"}),
        layer(cas, tmp_path, "b.bst", {"f": "b"}),
        layer(cas, tmp_path, "c.bst", {"f": "c"}),
    ]
    [warning] = analyse_staging(cas, layers).warnings
    assert "/f: b.bst and c.bst are not permitted to overlap other elements" in warning.detail
    assert "order c.bst above b.bst above a.bst" in warning.detail


def test_a_symlink_overlaps_a_file(cas: LocalCas, tmp_path: Path) -> None:
    layers = [
        layer(cas, tmp_path, "a.bst", {"usr/bin/sh": "a"}),
        layer(cas, tmp_path, "b.bst", {"usr/bin/sh": "-> busybox"}),
    ]
    assert [o.path for o in analyse_staging(cas, layers).overlaps] == ["/usr/bin/sh"]


def test_a_file_over_a_non_empty_folder_is_not_staged(cas: LocalCas, tmp_path: Path) -> None:
    # Given a file where an earlier element has a non-empty folder, and one
    # where it has an empty folder
    layers = [
        layer(cas, tmp_path, "a.bst", {"share/doc/README": "a", "empty": None}),
        layer(cas, tmp_path, "b.bst", {"share/doc": "b", "empty": "b"}),
    ]

    # Then the first is an unstaged file, the second replaces the folder silently
    report = analyse_staging(cas, layers)
    assert report.unstaged == [("b.bst", "/share/doc")]
    assert report.overlaps == []
    [warning] = report.warnings
    assert warning.token == UNSTAGED_FILES
    assert "From b.bst:\n  /share/doc" in warning.detail


def test_a_folder_over_a_symlink_cannot_be_staged(cas: LocalCas, tmp_path: Path) -> None:
    layers = [
        layer(cas, tmp_path, "sysroot.bst", {"usr/bin/sh": "x", "bin": "-> usr/bin"}),
        layer(cas, tmp_path, "app.bst", {"bin/app": "app"}),
    ]
    with pytest.raises(StagingConflictError, match=r"app.bst's folder /bin: it is a symlink"):
        analyse_staging(cas, layers)


def test_overlaps_across_locations_ignore_whitelists(cas: LocalCas, tmp_path: Path) -> None:
    # Given a script layout: a.bst at / then b.bst at /sysroot over a file of a.bst
    layers = [
        layer(cas, tmp_path, "a.bst", {"sysroot/etc/conf": "a"}),
        layer(cas, tmp_path, "b.bst", {"etc/conf": "b"}, location="sysroot", whitelist=["/etc/**"]),
    ]

    report = analyse_staging(cas, layers)

    [overlap] = report.external
    assert (overlap.path, overlap.element, overlap.overlapped) == (
        "/sysroot/etc/conf",
        "b.bst",
        "a.bst",
    )
    [warning] = report.warnings
    assert warning.text() == (
        "[overlaps]: Overlaps detected\n"
        "Detected file overlaps while staging elements into: /sysroot\n"
        "/sysroot/etc/conf: b.bst overlaps files previously staged by a.bst in: /"
    )


# --- in the stage, with fatal-warnings ----------------------------------------


def staging_spec(names: list[str], *, whitelist: list[str], fatal: list[str]) -> BuildSpec:
    dependencies = [
        DependencySpec(
            element=name,
            cache_key=KEY,
            artifact_uri=artifact_uri("p", name, KEY),
            path="",
            select=None,
            overlap_whitelist=whitelist if name == names[-1] else [],
        )
        for name in names
    ]
    return BuildSpec(
        project="p",
        element="app.bst",
        kind="manual",
        cache_key=KEY,
        artifact_uri=artifact_uri("p", "app", KEY),
        dependencies=dependencies,
        runtime_dependencies=[],
        sources=[],
        source_root="",
        command=None,
        files_root="",
        files_target="",
        select_outputs=False,
        fatal_warnings=fatal,
    )


@pytest.fixture
def ctx(tmp_path: Path, cas: LocalCas) -> StageContext:
    # Nothing listens there: a test that reaches a server fails loudly.
    remote = Remote(Endpoint("grpc://127.0.0.1:9"))
    return StageContext(cas, remote, remote)


def two_overlapping(cas: LocalCas, tmp_path: Path) -> list[Digest]:
    return [
        tree(cas, tmp_path / "a", {"usr/bin/tool": "a", "usr/lib/x": "a"}),
        tree(cas, tmp_path / "b", {"usr/bin/tool": "b", "usr/lib/x": "b"}),
    ]


def test_overlaps_are_recorded_in_the_state(
    ctx: StageContext, cas: LocalCas, tmp_path: Path
) -> None:
    state = check_staging(
        ctx,
        staging_spec(["a.bst", "b.bst"], whitelist=["/usr/lib/*"], fatal=[]),
        two_overlapping(cas, tmp_path),
    )
    assert state["count"] == 2 and state["paths"] == ["/usr/bin/tool", "/usr/lib/x"]
    assert state["not_whitelisted"] == 1
    assert state["details"] == [
        {"path": "/usr/bin/tool", "elements": ["a.bst", "b.bst"], "whitelisted": False},
        {"path": "/usr/lib/x", "elements": ["a.bst", "b.bst"], "whitelisted": True},
    ]
    assert "b.bst is not permitted to overlap" in state["warnings"][0]


def test_fatal_overlaps_fail_the_element_naming_paths_and_elements(
    ctx: StageContext, cas: LocalCas, tmp_path: Path
) -> None:
    with pytest.raises(BuildFailedError) as info:
        check_staging(
            ctx,
            staging_spec(["a.bst", "b.bst"], whitelist=[], fatal=["overlaps"]),
            two_overlapping(cas, tmp_path),
        )
    message = str(info.value)
    assert message.startswith(
        "app.bst: fatal warnings while staging its dependencies "
        "(project.conf fatal-warnings: overlaps):\n[overlaps]: Non-whitelisted overlaps detected"
    )
    assert "/usr/bin/tool: b.bst is not permitted to overlap other elements" in message
    assert "/usr/lib/x: b.bst" in message
    assert info.value.transient is False


def test_whitelisted_overlaps_are_not_fatal(
    ctx: StageContext, cas: LocalCas, tmp_path: Path
) -> None:
    state = check_staging(
        ctx,
        staging_spec(["a.bst", "b.bst"], whitelist=["/usr/**"], fatal=["overlaps"]),
        two_overlapping(cas, tmp_path),
    )
    assert state["count"] == 2 and state["not_whitelisted"] == 0 and state["warnings"] == []


def test_unstaged_files_are_fatal_only_when_listed(
    ctx: StageContext, cas: LocalCas, tmp_path: Path
) -> None:
    files = [
        tree(cas, tmp_path / "a", {"share/doc/README": "a"}),
        tree(cas, tmp_path / "b", {"share/doc": "b"}),
    ]
    names = ["a.bst", "b.bst"]
    state = check_staging(ctx, staging_spec(names, whitelist=[], fatal=["overlaps"]), files)
    assert state["unstaged"] == [{"element": "b.bst", "path": "/share/doc"}]
    with pytest.raises(BuildFailedError, match=r"fatal-warnings: unstaged-files"):
        check_staging(ctx, staging_spec(names, whitelist=[], fatal=["unstaged-files"]), files)
