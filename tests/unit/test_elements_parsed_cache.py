"""The parsed-file cache (nodes.load_yaml) and variables shared between elements."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from pipeline.elements import nodes
from pipeline.elements.errors import LoadError
from pipeline.elements.nodes import FolderCache, MappingNode, load_yaml
from pipeline.elements.variables import Definition, SharedVariables, Variables

TEXT = """\
kind: manual
description: |
  two lines
  of text
build-depends:
- base.bst
- filename: lib.bst
  config: ~
variables:
  prefix: /opt
  empty:
  number: 12
config:
  build-commands:
  - echo %{prefix}
  - [nested, list]
"""


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "parsed"
    monkeypatch.setenv("REMEX_PARSED_CACHE", str(folder))
    return folder


def uncached(path: Path, display: str, monkeypatch: pytest.MonkeyPatch) -> object:
    with monkeypatch.context() as patch:
        patch.setenv("REMEX_PARSED_CACHE", "off")
        return load_yaml(path, display)


def entries(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file()]


def test_a_hit_gives_the_same_nodes_and_marks(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a file loaded once (a miss, which writes the entry)
    path = tmp_path / "a.bst"
    path.write_text(TEXT)
    first = load_yaml(path, "elements/a.bst")
    assert len(entries(cache)) == 1

    # When it is loaded again
    second = load_yaml(path, "elements/a.bst")

    # Then both equal what parsing gives, marks, field paths and key marks included
    expected = uncached(path, "elements/a.bst", monkeypatch)
    assert first == expected
    assert second == expected
    deps = second.get_sequence("build-depends")
    assert deps is not None
    assert str(deps.items[1].mark) == "elements/a.bst:7"
    assert deps.items[1].path == "build-depends[1]"
    assert second.key_marks["config"].line == 13
    assert second.get_str("description") == "two lines\nof text"


def test_the_same_text_elsewhere_is_marked_with_its_own_name(tmp_path: Path, cache: Path) -> None:
    # Given two files with the same text
    (tmp_path / "a.bst").write_text(TEXT)
    (tmp_path / "b.bst").write_text(TEXT)
    load_yaml(tmp_path / "a.bst", "a.bst")

    # When the second is loaded (a hit on the first's entry)
    node = load_yaml(tmp_path / "b.bst", "b.bst")

    # Then its marks name the second file
    assert len(entries(cache)) == 1
    assert node.mark.file == "b.bst"
    variables = node.get_mapping("variables")
    assert variables is not None
    assert str(variables.entries["prefix"].mark) == "b.bst:10"


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[: len(raw) // 2],  # torn write
        lambda raw: raw.replace(b"/opt", b"/usr"),  # changed body
        lambda raw: b"",
        lambda raw: b"not an entry\n[]",
    ],
)
def test_a_damaged_entry_is_a_miss_and_is_rewritten(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, damage: object
) -> None:
    # Given an entry that was damaged after it was written
    path = tmp_path / "a.bst"
    path.write_text(TEXT)
    load_yaml(path, "a.bst")
    (entry,) = entries(cache)
    entry.write_bytes(damage(entry.read_bytes()))  # type: ignore[operator]

    # When the file is loaded
    node = load_yaml(path, "a.bst")

    # Then it is parsed again (right nodes) and the entry is whole again
    assert node == uncached(path, "a.bst", monkeypatch)
    assert load_yaml(path, "a.bst") == node
    assert b"/opt" in entry.read_bytes()


def test_a_well_formed_entry_of_the_wrong_shape_is_a_miss(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an entry whose checksum is right but whose body is no node tree
    import hashlib

    path = tmp_path / "a.bst"
    path.write_text(TEXT)
    load_yaml(path, "a.bst")
    (entry,) = entries(cache)
    body = b'[2, 1, ["kind", [7, 1, "x"]]]'
    checksum = hashlib.blake2b(body, digest_size=16).hexdigest().encode()
    entry.write_bytes(b"remex-parsed 1 " + checksum + b"\n" + body)

    # Then loading parses the file again
    assert load_yaml(path, "a.bst") == uncached(path, "a.bst", monkeypatch)


def test_bad_files_are_not_cached_and_still_refused(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "bad.bst"
    path.write_text("kind: manual\nkind: stack\n")
    for _ in range(2):
        with pytest.raises(LoadError, match="duplicate key 'kind'") as info:
            load_yaml(path, "bad.bst")
        assert info.value.line == 2
    assert entries(cache) == []


def test_an_edit_is_a_new_entry(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "a.bst"
    path.write_text(TEXT)
    load_yaml(path, "a.bst")
    path.write_text(TEXT.replace("/opt", "/srv"))
    node = load_yaml(path, "a.bst")
    variables = node.get_mapping("variables")
    assert variables is not None and variables.get_str("prefix") == "/srv"
    assert len(entries(cache)) == 2


def test_another_remex_version_does_not_read_the_entries(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a file loaded (and cached) by this remex
    path = tmp_path / "a.bst"
    path.write_text(TEXT)
    first = load_yaml(path, "a.bst")
    assert len(entries(cache)) == 1
    # When another version of remex loads it
    monkeypatch.setattr("pipeline.__version__", "99.0.0")
    # Then it parses the file again, into an entry of its own
    assert load_yaml(path, "a.bst") == first
    assert len(entries(cache)) == 2
    # And loads it from that entry afterwards
    assert load_yaml(path, "a.bst") == first
    assert len(entries(cache)) == 2


def test_concurrent_loads_agree(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given many threads loading the same new file at once (all may miss and write)
    path = tmp_path / "a.bst"
    path.write_text(TEXT)
    results: list[object] = []

    def load() -> None:
        for _ in range(20):
            results.append(load_yaml(path, "a.bst"))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Then every load gave the parsed nodes, and one whole entry is left (no temporaries)
    expected = uncached(path, "a.bst", monkeypatch)
    assert len(results) == 160
    assert all(result == expected for result in results)
    assert len(entries(cache)) == 1


def test_an_unwritable_cache_only_costs_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("REMEX_PARSED_CACHE", str(blocker / "parsed"))
    path = tmp_path / "a.bst"
    path.write_text(TEXT)
    assert load_yaml(path, "a.bst").get_str("kind") == "manual"


# --- variables shared between elements -----------------------------------------


def definitions(**values: str) -> dict[str, Definition]:
    return {name.replace("_", "-"): Definition(v, None, name) for name, v in values.items()}


BASE = definitions(
    prefix="/usr", bindir="%{prefix}/bin", libdir="%{prefix}/lib", name="", tool="%{bindir}/%{name}"
)


def test_shared_values_equal_unshared_ones() -> None:
    shared = SharedVariables(BASE)
    cases = [
        definitions(
            prefix="/usr",
            bindir="%{prefix}/bin",
            libdir="%{prefix}/lib",
            name="app",
            tool="%{bindir}/%{name}",
        ),
        definitions(
            prefix="/opt",
            bindir="%{prefix}/bin",
            libdir="%{prefix}/lib",
            name="",
            tool="%{bindir}/%{name}",
        ),
        definitions(
            prefix="/usr",
            bindir="%{prefix}/sbin",
            libdir="%{prefix}/lib",
            name="x",
            tool="%{bindir}/%{name}",
            extra="%{tool}-1",
        ),
    ]
    texts = ["%{tool} --libdir=%{libdir}", "plain", "%{libdir}/x", "%{bindir}"]
    # Twice: the second pass expands from the shared texts the first one left.
    for _ in range(2):
        for case in cases:
            with_shared = Variables(dict(case), shared=shared)
            without = Variables(dict(case))
            with_shared.check()
            assert with_shared.as_dict() == without.as_dict()
            for text in texts:
                assert with_shared.expand(text, mark=None, field="f") == without.expand(  # type: ignore[arg-type]
                    text,
                    mark=None,
                    field="f",  # type: ignore[arg-type]
                )


def test_an_element_redefining_a_variable_into_a_cycle_is_refused() -> None:
    shared = SharedVariables(BASE)
    case = dict(BASE)
    case["prefix"] = Definition("%{tool}", None, "prefix")
    with pytest.raises(LoadError, match="circular variable reference"):
        Variables(case, shared=shared).check()


def test_a_broken_shared_layer_is_refused_when_shared() -> None:
    with pytest.raises(LoadError, match="undefined variable 'nope'"):
        SharedVariables(definitions(a="%{nope}"))


@pytest.mark.parametrize(
    ("text", "plain", "plain_when_cached"),
    [
        (TEXT, True, True),
        ("kind: manual\nconfig:\n  (?):\n  - debug:\n      x: y\n", False, False),
        ("kind: manual\n(@): inc.yml\n", False, False),
        ("kind: manual\nconfig:\n  build-commands:\n    (>):\n    - make\n", False, False),
        ("kind: manual\nsources:\n- kind: local\n  x:\n  - {(!): no}\n", False, False),
        # A value starting with "(" looks like a key in an entry: walked, to be safe.
        ('kind: manual\ndescription: "(?) is only text here"\n', True, False),
    ],
)
def test_a_file_says_whether_it_holds_directives_parsed_or_cached(
    tmp_path: Path, cache: Path, text: str, plain: bool, plain_when_cached: bool
) -> None:
    # Given a file with or without a directive key (at any depth)
    path = tmp_path / "a.bst"
    path.write_text(text)

    # When it is parsed (a miss), then read from its cache entry (a hit)
    parsed = load_yaml(path, "a.bst")
    cached = load_yaml(path, "a.bst")

    # Then both say so (a hit may only err towards "walk it", never miss a
    # directive); a copy never claims it
    assert parsed.plain is plain
    assert cached.plain is plain_when_cached
    from pipeline.elements.composition import clone_mapping

    assert clone_mapping(parsed).plain is False


def test_a_directive_deep_in_a_cached_file_is_still_applied(tmp_path: Path, cache: Path) -> None:
    # Given an element whose conditional sits below the top, loaded twice
    # (the second time from its cache entry)
    from pipeline.cas import LocalCas
    from pipeline.elements import load_project

    root = tmp_path / "project"
    (root / "elements").mkdir(parents=True)
    (root / "project.conf").write_text(
        "name: test\nelement-path: elements\n"
        "options:\n  debug:\n    type: bool\n    description: d\n    default: 'False'\n"
    )
    (root / "elements" / "a.bst").write_text(
        "kind: manual\nvariables:\n  mode: plain\n  (?):\n  - debug:\n      mode: debug\n"
    )
    for _ in range(2):
        # When it is loaded with the option set
        project = load_project(root, cas=LocalCas(tmp_path / "cas"), options={"debug": "true"})
        element = project.load_targets(["a.bst"])[-1]
        # Then the conditional applied both times
        assert element.variables.as_dict()["mode"] == "debug"


# --- a folder's files by stat (FolderCache) ------------------------------------------


@pytest.fixture
def settled_now(monkeypatch: pytest.MonkeyPatch) -> None:
    # Files written by a test are seconds old at most: trust their stat at once.
    monkeypatch.setattr(nodes, "SETTLED_NS", 0)


def counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files FolderCache hands to load_yaml (those it could not skip)."""
    reads: list[str] = []
    real = nodes.load_yaml

    def load(path: Path | str, display: str) -> MappingNode:
        reads.append(display)
        return real(path, display)

    monkeypatch.setattr(nodes, "load_yaml", load)
    return reads


def test_an_unchanged_folder_is_loaded_without_reading_its_files(
    tmp_path: Path, cache: Path, settled_now: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a folder's files loaded once through its FolderCache, saved
    (tmp_path / "a.bst").write_text(TEXT)
    (tmp_path / "b.bst").write_text("kind: stack\n")
    first = FolderCache.open(str(tmp_path))
    assert first is not None
    loaded = {n: first.load(str(tmp_path / n), n) for n in ("a.bst", "b.bst")}
    first.save()
    reads = counting_reads(monkeypatch)

    # When a new one loads them again
    again = FolderCache.open(str(tmp_path))
    assert again is not None
    reloaded = {n: again.load(str(tmp_path / n), n) for n in ("a.bst", "b.bst")}

    # Then no file was read, and the nodes, marks and flags are the same
    assert reads == []
    assert reloaded == loaded
    assert reloaded["a.bst"].mark == loaded["a.bst"].mark
    assert [n.plain for n in reloaded.values()] == [True, True]


def test_an_edit_keeping_size_and_mtime_is_read_again(
    tmp_path: Path, cache: Path, settled_now: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a file kept by its stat
    path = tmp_path / "a.bst"
    path.write_text("kind: manual\nvariables:\n  x: '1'\n")
    folder = FolderCache.open(str(tmp_path))
    assert folder is not None
    folder.load(str(path), "a.bst")
    folder.save()
    before = path.stat()

    # When it is rewritten with the same size, its mtime put back (its ctime
    # moves: a later tick of the kernel's coarse clock, hence the pause;
    # within one tick only the settling delay, off here, protects)
    time.sleep(0.05)
    path.write_text("kind: manual\nvariables:\n  x: '2'\n")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    reads = counting_reads(monkeypatch)
    again = FolderCache.open(str(tmp_path))
    assert again is not None
    node = again.load(str(path), "a.bst")

    # Then it was read, and the new value is loaded
    assert reads == ["a.bst"]
    variables = node.get_mapping("variables")
    assert variables is not None and variables.get_str("x") == "2"


def test_a_file_changed_moments_ago_is_not_kept_by_its_stat(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a file just written (its stat could be that of a later rewrite
    # within the file system's timestamp granularity)
    path = tmp_path / "a.bst"
    path.write_text(TEXT)
    folder = FolderCache.open(str(tmp_path))
    assert folder is not None
    folder.load(str(path), "a.bst")
    folder.save()

    # When it is loaded again
    reads = counting_reads(monkeypatch)
    again = FolderCache.open(str(tmp_path))
    assert again is not None
    again.load(str(path), "a.bst")

    # Then it was read (through its content-addressed entry)
    assert reads == ["a.bst"]


def test_a_damaged_folder_cache_is_ignored_and_rewritten(
    tmp_path: Path, cache: Path, settled_now: None
) -> None:
    # Given a folder cache file that was damaged
    path = tmp_path / "a.bst"
    path.write_text(TEXT)
    folder = FolderCache.open(str(tmp_path))
    assert folder is not None
    expected = folder.load(str(path), "a.bst")
    folder.save()
    kept = Path(folder.file)
    kept.write_bytes(kept.read_bytes()[:-7] + b"garbage")

    # When the folder is loaded again
    again = FolderCache.open(str(tmp_path))
    assert again is not None

    # Then the file is read as if there were no cache, and the cache is rewritten
    assert again.load(str(path), "a.bst") == expected
    again.save()
    third = FolderCache.open(str(tmp_path))
    assert third is not None and third._entries.keys() == {str(path)}


def test_an_edited_element_changes_its_key_through_the_folder_cache(
    tmp_path: Path, cache: Path, settled_now: None
) -> None:
    # Given a project loaded once (its element files kept by stat)
    from pipeline.cas import LocalCas
    from pipeline.elements import load_project

    root = tmp_path / "project"
    (root / "elements").mkdir(parents=True)
    (root / "project.conf").write_text("name: test\nelement-path: elements\n")
    element = root / "elements" / "a.bst"
    element.write_text("kind: manual\nconfig:\n  build-commands:\n  - echo 1\n")

    def key() -> str:
        project = load_project(root, cas=LocalCas(tmp_path / "cas"))
        return project.load_targets(["a.bst"])[-1].cache_key

    first = key()
    assert key() == first

    # When the element is edited (same size; a later clock tick, see above)
    time.sleep(0.05)
    element.write_text("kind: manual\nconfig:\n  build-commands:\n  - echo 2\n")

    # Then its key changes, as without the cache
    assert key() != first


def test_elements_redefining_shared_variables_load_as_without_sharing(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given elements of one kind that share its variables, some redefining
    # one (notparallel both ways, a variable others use, a new one)
    from pipeline.cas import LocalCas
    from pipeline.elements import load_project
    from pipeline.elements.project import Project

    root = tmp_path / "project"
    (root / "elements").mkdir(parents=True)
    (root / "project.conf").write_text(
        "name: test\nelement-path: elements\n"
        "variables:\n  prefix: /usr\n  tool: '%{prefix}/bin/x'\n  notparallel: 'true'\n"
    )
    own = {
        "a.bst": "",
        "b.bst": "variables:\n  notparallel: 'false'\n",
        "c.bst": "variables:\n  prefix: /opt\n",
        "d.bst": "variables:\n  extra: '%{tool} %{element-name}'\n",
    }
    for name, text in own.items():
        (root / "elements" / name).write_text(
            "kind: manual\n" + text + "config:\n  build-commands:\n  - '%{tool} -j%{max-jobs}'\n"
        )

    def loaded() -> list[tuple[str, dict[str, str], str]]:
        project = load_project(root, cas=LocalCas(tmp_path / "cas"))
        return [
            (e.name, e.variables.as_dict(), e.cache_key) for e in project.load_targets(list(own))
        ]

    # When they are loaded with the shared layer, and without it
    shared = loaded()
    monkeypatch.setattr(Project, "_shared_variables", lambda self, kind, defaults: None)
    unshared = loaded()

    # Then every variable and key is the same
    assert shared == unshared
    by_name = {name: variables for name, variables, _ in shared}
    assert by_name["a.bst"]["max-jobs"] == "1"
    assert by_name["b.bst"]["max-jobs"] != "1"
    assert by_name["c.bst"]["tool"] == "/opt/bin/x"
    assert by_name["d.bst"]["extra"] == "/usr/bin/x d.bst"
