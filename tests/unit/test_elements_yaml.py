"""YAML with provenance: every node knows its file, line and field; refusals name them."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.elements import LoadError
from pipeline.elements.nodes import MappingNode, ScalarNode, SequenceNode, load_yaml
from pipeline.errors import ConfigError


def _load(tmp_path: Path, text: str, name: str = "elements/x.bst") -> MappingNode:
    path = tmp_path / "x.bst"
    path.write_text(text)
    return load_yaml(path, name)


def _load_error(tmp_path: Path, text: str) -> LoadError:
    with pytest.raises(LoadError) as info:
        _load(tmp_path, text)
    return info.value


def test_scalars_keep_their_text_and_null_is_none(tmp_path: Path) -> None:
    # Given YAML with numbers, booleans, quoted and null values
    node = _load(tmp_path, 'a: 1321009871\nb: yes\nc: "x"\nd: ~\ne:\nf: 1.50\n')

    # Then each scalar is its text as written (BuildStream converts on use), null is None
    values = {k: v.value for k, v in node.entries.items() if isinstance(v, ScalarNode)}
    assert values == {"a": "1321009871", "b": "yes", "c": "x", "d": None, "e": None, "f": "1.50"}


def test_every_node_knows_its_line_and_field(tmp_path: Path) -> None:
    # Given a nested document
    text = "# comment\nkind: manual\n\nconfig:\n  build-commands:\n  - one\n  - two\n"

    # When it is loaded
    node = _load(tmp_path, text)

    # Then keys, mapping values and list items carry file, line and dotted path
    config = node.get_mapping("config")
    assert config is not None
    assert (config.mark.file, config.mark.line, config.path) == ("elements/x.bst", 4, "config")
    commands = config.get("build-commands")
    assert isinstance(commands, SequenceNode)
    # A mapping's value is marked at its key's line, items at their own.
    assert commands.mark.line == 5
    assert commands.path == "config.build-commands"
    assert [(i.mark.line, i.path) for i in commands.items] == [
        (6, "config.build-commands[0]"),
        (7, "config.build-commands[1]"),
    ]
    assert node.key_marks["kind"].line == 2


def test_type_errors_name_file_line_and_field(tmp_path: Path) -> None:
    # Given a list of strings that holds a mapping
    node = _load(tmp_path, "config:\n  build-commands:\n  - ok\n  - {a: b}\n")
    config = node.get_mapping("config")
    assert config is not None

    # When it is read as a list of strings
    with pytest.raises(LoadError) as info:
        config.get_str_list("build-commands")

    # Then the message names file, line and field
    assert str(info.value) == (
        "elements/x.bst:2: config.build-commands: expected a list of strings"
    )
    assert (info.value.file, info.value.line, info.value.field) == (
        "elements/x.bst",
        2,
        "config.build-commands",
    )


def test_malformed_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    # Given a file with an unclosed flow list on line 3
    error = _load_error(tmp_path, "kind: manual\nconfig:\n  build-commands: [a, b\n")

    # Then the error names the file and a line, and says it is malformed
    assert str(error).startswith("elements/x.bst:")
    assert "malformed YAML" in str(error)
    assert error.line is not None and error.line >= 3
    assert isinstance(error, ConfigError) and not error.transient


def test_bad_indentation_is_malformed_yaml_at_its_line(tmp_path: Path) -> None:
    error = _load_error(tmp_path, "kind: manual\nsources:\n- kind: local\n   path: x\n")
    assert error.file == "elements/x.bst"
    assert error.line == 4
    assert "malformed YAML" in error.reason


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "x.bst"
    path.write_bytes(b"kind: manual\ndescription: caf\xe9\n")
    with pytest.raises(LoadError) as info:
        load_yaml(path, "x.bst")
    assert str(info.value) == "x.bst:2: not valid UTF-8"


def test_buildstream_directives_are_read_as_keys(tmp_path: Path) -> None:
    # Given BuildStream composition directives (applied later, by the loader)
    path = tmp_path / "x.bst"
    path.write_text("(@): inc.yml\nlist:\n  (>): [x]\n  (<): [y]\n  (=): [z]\n(?):\n- a: {}\n")

    # When the file is read
    node = load_yaml(path, "x.bst")

    # Then each is an ordinary key, with its line
    assert list(node.entries) == ["(@)", "list", "(?)"]
    listing = node.get_mapping("list")
    assert listing is not None and list(listing.entries) == ["(>)", "(<)", "(=)"]
    assert node.key_marks["(?)"].line == 6


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("a: &x 1\nb: *x\n", 1, "anchors and aliases"),
        ("a: 1\nb: !custom 2\n", 2, "unsupported YAML tag"),
        ("a: 1\nb: !!binary aGk=\n", 2, "unsupported YAML tag"),
        ("base: {x: 1}\nc:\n  <<: {y: 2}\n", 3, "merge keys"),
        ("a: 1\nb: 2\na: 3\n", 3, "duplicate key 'a'"),
        ("? [a, b]\n: 1\n", 1, "keys must be strings"),
    ],
)
def test_refused_yaml_constructs_name_the_line(
    tmp_path: Path, text: str, line: int, words: str
) -> None:
    error = _load_error(tmp_path, text)
    assert error.file == "elements/x.bst"
    assert error.line == line
    assert words in error.reason


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    error = _load_error(tmp_path, "- a\n- b\n")
    assert str(error) == "elements/x.bst:1: expected a mapping at the top of the file, got a list"


def test_empty_file_is_an_empty_mapping(tmp_path: Path) -> None:
    node = _load(tmp_path, "# nothing\n")
    assert node.entries == {}


def test_unknown_key_names_its_own_line(tmp_path: Path) -> None:
    # Given a mapping with an unexpected key on line 3
    node = _load(tmp_path, "kind: manual\nconfig: {}\nbogus: 1\n")

    # When keys are validated
    with pytest.raises(LoadError) as info:
        node.validate_keys(("kind", "config"))

    # Then the error is at the key's line, naming it and what is allowed
    assert str(info.value) == (
        "elements/x.bst:3: bogus: unknown key (expected one of: config, kind)"
    )


@pytest.mark.parametrize(
    "text",
    [
        "kind: manual\nx: " + "[" * 500 + "]" * 500 + "\n",
        "kind: manual\nx: " + "{a: " * 500 + "1" + "}" * 500 + "\n",
    ],
    ids=["sequences", "mappings"],
)
def test_deep_nesting_is_one_load_error_at_its_line(tmp_path: Path, text: str) -> None:
    # Given a .bst nesting 500 flow collections (PyYAML composes recursively)
    # When it is loaded
    error = _load_error(tmp_path, text)

    # Then it is one LoadError naming the file and the line, not a RecursionError
    assert str(error).startswith("elements/x.bst:2: ")
    assert "nested more than 100 levels" in str(error)


def test_nesting_up_to_the_limit_loads(tmp_path: Path) -> None:
    # Given nesting just inside the limit (the top mapping is one level)
    node = _load(tmp_path, "x: " + "[" * 98 + "]" * 98 + "\n")

    # Then it loads
    assert isinstance(node.entries["x"], SequenceNode)


@pytest.mark.parametrize(
    ("data", "line"),
    [(b"\0" * 64, 1), (b"kind: manual\nvariables:\n  a: \0\x01\n", 3)],
    ids=["all-nul", "nul-on-line-3"],
)
def test_binary_content_is_one_load_error_with_its_line(
    tmp_path: Path, data: bytes, line: int
) -> None:
    # Given a file with NUL bytes (valid UTF-8, but not characters YAML allows)
    path = tmp_path / "x.bst"
    path.write_bytes(data)

    # When it is loaded
    with pytest.raises(LoadError) as info:
        load_yaml(path, "elements/x.bst")

    # Then the one-line message names the file, the line and the character
    message = str(info.value)
    assert message.startswith(f"elements/x.bst:{line}: malformed YAML: character #x0000")
    assert "\n" not in message
