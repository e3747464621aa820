"""Writing a tracked ref into a .bst file: only the ref's text changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.elements import LoadError
from pipeline.elements.refs import write_source_block, write_source_ref

NEW = "0123456789abcdef0123456789abcdef01234567"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "e.bst"
    path.write_bytes(text.encode())
    return path


def test_a_missing_ref_is_inserted_after_the_source_keeping_comments(tmp_path: Path) -> None:
    # Given a source without a ref, with comments around and inside it
    before = (
        "# The app.\n"
        "kind: import\n"
        "sources:\n"
        "- kind: git   # upstream\n"
        "  url: srv:app.git  # through an alias\n"
        "  track: main\n"
        "\n"
        "# the second one\n"
        "- kind: local\n"
        "  path: files\n"
    )
    path = write(tmp_path, before)

    # When the ref is written
    change = write_source_ref(path, "elements/e.bst", 0, NEW)

    # Then one line is added at the source's indentation, after its last key
    after = path.read_text()
    assert after == before.replace("  track: main\n", f"  track: main\n  ref: {NEW}\n")
    assert (change.old, change.new, change.line, change.changed) == (None, NEW, 7, True)


def test_an_existing_ref_keeps_its_quotes_and_comment(tmp_path: Path) -> None:
    before = "sources:\n  - kind: git\n    url: u\n    ref: 'v1-0-gabc' # pinned\n    track: v1\n"
    path = write(tmp_path, before)
    change = write_source_ref(path, "e.bst", 0, f"v2-3-g{NEW}")
    assert path.read_text() == before.replace("'v1-0-gabc'", f"'v2-3-g{NEW}'")
    assert (change.old, change.line) == ("v1-0-gabc", 4)


def test_the_same_ref_leaves_the_file_untouched(tmp_path: Path) -> None:
    before = f"sources:\n- kind: git\n  url: u\n  ref: {NEW}\n"
    path = write(tmp_path, before)
    mtime = path.stat().st_mtime_ns
    change = write_source_ref(path, "e.bst", 0, NEW)
    assert not change.changed
    assert path.stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
    ("before", "after"),
    [
        # nested keys: after the deepest last line
        ("sources:\n- kind: git\n  submodules:\n    a:\n      checkout: false\nx: 1\n",
         "sources:\n- kind: git\n  submodules:\n    a:\n      checkout: false\n"
         f"  ref: {NEW}\nx: 1\n"),
        # a flow mapping
        ("sources:\n- {kind: git, url: u}  # c\n",
         f"sources:\n- {{kind: git, url: u, ref: {NEW}}}  # c\n"),
        # a null ref
        ("sources:\n- kind: git\n  ref:\n  url: u\n",
         f"sources:\n- kind: git\n  ref: {NEW}\n  url: u\n"),
        # CRLF line ends stay CRLF
        ("sources:\r\n- kind: git\r\n  url: u\r\nx: 1\r\n",
         f"sources:\r\n- kind: git\r\n  url: u\r\n  ref: {NEW}\r\nx: 1\r\n"),
        # the second source
        ("sources:\n- kind: local\n  path: a\n- kind: git\n  url: u\n",
         f"sources:\n- kind: local\n  path: a\n- kind: git\n  url: u\n  ref: {NEW}\n"),
    ],
)  # fmt: skip
def test_shapes_of_sources(tmp_path: Path, before: str, after: str) -> None:
    path = write(tmp_path, before)
    index = 1 if "kind: local" in before else 0
    write_source_ref(path, "e.bst", index, NEW)
    assert path.read_bytes().decode() == after


def test_a_ref_that_yaml_would_read_as_a_number_is_quoted(tmp_path: Path) -> None:
    path = write(tmp_path, "sources:\n- kind: git\n  url: u\n")
    write_source_ref(path, "e.bst", 0, "1234")
    assert path.read_text().endswith("  ref: '1234'\n")


def test_a_source_not_in_the_file_names_file_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, "kind: import\n(@): include.yml\n")
    with pytest.raises(LoadError) as info:
        write_source_ref(path, "elements/e.bst", 0, NEW)
    assert str(info.value).startswith("elements/e.bst: sources[0]: the source is not written")


TAGS = [{"tag": "v1", "commit": NEW, "annotated": True}]


def test_tags_are_written_replaced_and_removed_as_a_block(tmp_path: Path) -> None:
    # Given a source with a ref and no tags, and a key after the sources
    before = f"sources:\n- kind: git  # x\n  ref: {NEW}\n\ndepends: [a.bst]\n"
    path = write(tmp_path, before)

    # When tags are written, Then they follow the source's last key, in block style
    assert write_source_block(path, "e.bst", 0, "tags", TAGS)
    with_tags = before.replace(
        f"  ref: {NEW}\n",
        f"  ref: {NEW}\n  tags:\n  - tag: v1\n    commit: {NEW}\n    annotated: true\n",
    )
    assert path.read_text() == with_tags
    # And the same tags again change nothing
    assert not write_source_block(path, "e.bst", 0, "tags", TAGS)

    # When other tags replace them, Then only the block changes
    other = [{"tag": "v2", "commit": NEW, "annotated": False}]
    assert write_source_block(path, "e.bst", 0, "tags", other)
    assert path.read_text() == with_tags.replace("tag: v1", "tag: v2").replace(
        "annotated: true", "annotated: false"
    )

    # When no tags are found, Then the key goes away, as bst removes it
    assert write_source_block(path, "e.bst", 0, "tags", [])
    assert path.read_text() == before
    assert not write_source_block(path, "e.bst", 0, "tags", [])
