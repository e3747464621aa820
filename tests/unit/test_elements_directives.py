"""BuildStream composition in remex: list directives, includes, options, conditionals.

Each behaviour was checked against BuildStream 2.8.1 (see also
tests/integration/test_format_parity_options.py, which runs the real ``bst``).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pipeline.cas import LocalCas
from pipeline.elements import LoadError, Project, load_project
from pipeline.elements.composition import (
    IncludeLoader,
    _copy,
    assert_fully_composited,
    clone,
    compose,
    compose_onto,
)
from pipeline.elements.defaults import host_arch
from pipeline.elements.nodes import MappingNode, Node, ScalarNode, SequenceNode, load_yaml
from pipeline.elements.options import OptionPool, host_os_name

CONF = "name: test\nelement-path: elements\n"


def _plain(node: Node) -> object:
    """A node as plain Python data."""
    if isinstance(node, ScalarNode):
        return node.value
    if isinstance(node, SequenceNode):
        return [_plain(item) for item in node.items]
    assert isinstance(node, MappingNode)
    return {key: _plain(value) for key, value in node.entries.items()}


def _yaml(tmp_path: Path, text: str, name: str = "x.yml") -> MappingNode:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return load_yaml(path, name)


def _write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def _project(
    tmp_path: Path,
    files: dict[str, str],
    conf: str = CONF,
    options: dict[str, str] | None = None,
) -> Project:
    root = _write(tmp_path / "project", {"project.conf": conf, **files})
    return load_project(root, cas=LocalCas(tmp_path / "cas"), options=options)


def _variables(
    tmp_path: Path,
    files: dict[str, str],
    conf: str = CONF,
    options: dict[str, str] | None = None,
    target: str = "a.bst",
) -> dict[str, str]:
    plan = _project(tmp_path, files, conf, options).load_targets([target])
    return plan[-1].variables.as_dict()


def _error(tmp_path: Path, files: dict[str, str], conf: str = CONF, **kw: object) -> LoadError:
    with pytest.raises(LoadError) as info:
        project = _project(tmp_path, files, conf, **kw)  # type: ignore[arg-type]
        project.load_targets(["a.bst"])
    return info.value


# --- composition ---------------------------------------------------------------------


def test_compose_overlay_wins_mappings_merge_lists_replace(tmp_path: Path) -> None:
    # Given a base and an overlay
    base = _yaml(tmp_path, "a: 1\nm: {x: 1, y: 2}\nl: [1, 2]\nkeep: k\n", "base.yml")
    overlay = _yaml(tmp_path, "a: 2\nm: {y: 3, z: 4}\nl: [9]\nnew: n\n", "over.yml")

    # When the overlay is composed onto the base
    result = compose(base, overlay)

    # Then scalars are replaced, mappings merged, lists replaced; inputs untouched
    assert _plain(result) == {
        "a": "2", "m": {"x": "1", "y": "3", "z": "4"}, "l": ["9"], "keep": "k", "new": "n",
    }  # fmt: skip
    assert _plain(base)["a"] == "1"  # type: ignore[index]
    # And each value still names the file and line it came from
    m = result.get_mapping("m")
    assert m is not None
    assert str(m.entries["x"].mark) == "base.yml:2"
    assert str(m.entries["z"].mark) == "over.yml:2"
    assert m.entries["z"].path == "m.z"


@pytest.mark.parametrize(
    ("overlay", "expected"),
    [
        ("l:\n  (>): [c]\n", ["a", "b", "c"]),
        ("l:\n  (<): [c]\n", ["c", "a", "b"]),
        ("l:\n  (=): [c]\n", ["c"]),
        ("l:\n  (=): [c]\n  (<): [p]\n  (>): [s]\n", ["p", "c", "s"]),
        ("l:\n  (<): [p, q]\n", ["p", "q", "a", "b"]),
    ],
)
def test_list_directives_apply_to_the_base_list(
    tmp_path: Path, overlay: str, expected: list[str]
) -> None:
    base = _yaml(tmp_path, "l: [a, b]\n", "base.yml")
    result = compose(base, _yaml(tmp_path, overlay, "over.yml"))
    assert _plain(result) == {"l": expected}
    # Items moved by a directive get their new index as their field
    listing = result.get_sequence("l")
    assert listing is not None
    assert [item.path for item in listing.items] == [f"l[{i}]" for i in range(len(expected))]


def test_list_directives_without_a_list_are_kept_then_refused_if_left_over(
    tmp_path: Path,
) -> None:
    # Given directives composed where the base has no list
    result = compose(_yaml(tmp_path, "{}\n", "b.yml"), _yaml(tmp_path, "l:\n  (>): [x]\n"))

    # Then they stay as they are (to apply to a later base)
    assert _plain(result) == {"l": {"(>)": ["x"]}}
    # And left over at the end they are an error at their line
    with pytest.raises(LoadError) as info:
        assert_fully_composited(result)
    assert (info.value.file, info.value.line, info.value.field) == ("x.yml", 2, "l.(>)")
    assert "no list" in info.value.reason


def test_two_directive_mappings_merge_as_buildstream(tmp_path: Path) -> None:
    # Given directives over directives: appends and prepends accumulate
    lower = _yaml(tmp_path, "l:\n  (<): [p1]\n  (>): [s1]\n", "lower.yml")
    upper = _yaml(tmp_path, "l:\n  (<): [p2]\n  (>): [s2]\n", "upper.yml")
    merged = compose(lower, upper)
    assert _plain(merged) == {"l": {"(<)": ["p2", "p1"], "(>)": ["s1", "s2"]}}
    # When that lands on a list, all apply
    final = compose(_yaml(tmp_path, "l: [x]\n", "base.yml"), merged)
    assert _plain(final) == {"l": ["p2", "p1", "x", "s1", "s2"]}

    # Given a replacement over directives: the lower appends and prepends are dropped
    clobber = _yaml(tmp_path, "l:\n  (=): [r]\n", "clobber.yml")
    assert _plain(compose(merged, clobber)) == {"l": {"(<)": [], "(>)": [], "(=)": ["r"]}}


def test_plain_list_replaces_directives(tmp_path: Path) -> None:
    result = compose(_yaml(tmp_path, "l:\n  (>): [x]\n", "b.yml"), _yaml(tmp_path, "l: [y]\n"))
    assert _plain(result) == {"l": ["y"]}


@pytest.mark.parametrize(
    ("base", "overlay", "line", "field", "words"),
    [
        ("v: {a: 1}\n", "v: s\n", 1, "v", "cannot replace a mapping (written at b.yml:1)"),
        ("v: [1]\n", "v: s\n", 1, "v", "cannot replace a list"),
        ("v: s\n", "v: {a: 1}\n", 1, "v", "cannot replace a string (written at b.yml:1)"),
        ("v: {a: 1}\n", "v: [1]\n", 1, "v", "with a list"),
        ("v: s\n", "v:\n  (>): [x]\n", 1, "v", "cannot apply list directives to a string"),
        ("v: [1]\n", "v:\n  (>): [x]\n  other: 1\n", 3, "v.other", "cannot have other keys"),
        ("v: [1]\n", "v:\n  (>): x\n", 2, "v.(>)", "(>) takes a list"),
    ],
)
def test_impossible_compositions_name_file_line_field(
    tmp_path: Path, base: str, overlay: str, line: int, field: str, words: str
) -> None:
    with pytest.raises(LoadError) as info:
        compose(_yaml(tmp_path, base, "b.yml"), _yaml(tmp_path, overlay, "o.yml"))
    error = info.value
    assert (error.file, error.line, error.field) == ("o.yml", line, field)
    assert words in error.reason


def test_conditionals_meeting_conditionals_are_kept_in_order(tmp_path: Path) -> None:
    target = _yaml(tmp_path, "(?):\n- a: {x: 1}\n", "b.yml")
    compose_onto(target, _yaml(tmp_path, "(?):\n- b: {x: 2}\n"))
    assert _plain(target) == {"(?)": [{"a": {"x": "1"}}, {"b": {"x": "2"}}]}


# --- includes ------------------------------------------------------------------------


def test_include_goes_under_the_including_mapping(tmp_path: Path) -> None:
    # Given a project whose element includes two files at two levels
    variables = _variables(
        tmp_path,
        {
            "common.yml": "variables:\n  a: common\n  b: common\n  c: common\n",
            "later.yml": "variables:\n  b: later\n  c: later\n",
            "vars.yml": "d: nested\ne: nested\n",
            "elements/a.bst": """\
                kind: stack
                (@): [common.yml, later.yml]
                variables:
                  c: element
                  (@): vars.yml
                  e: element
            """,
        },
    )
    # Then the element wins over its includes, a later include over an earlier
    assert {k: variables[k] for k in "abcde"} == {
        "a": "common", "b": "later", "c": "element", "d": "nested", "e": "element",
    }  # fmt: skip


def test_nested_includes_and_included_list_directives(tmp_path: Path) -> None:
    project = _project(
        tmp_path,
        {
            "inc/outer.yml": "(@): inc/inner.yml\nconfig:\n  build-commands:\n    (>): [outer]\n",
            "inc/inner.yml": "config:\n  build-commands: [inner]\n",
            "elements/a.bst": """\
                kind: manual
                (@): inc/outer.yml
                config:
                  build-commands:
                    (<): [element]
            """,
        },
    )
    [element] = project.load_targets(["a.bst"])
    assert element.plugin.commands["build-commands"] == ["element", "inner", "outer"]


def test_included_values_keep_their_file_and_line(tmp_path: Path) -> None:
    # Given an included variable that is malformed
    error = _error(
        tmp_path,
        {
            "inc.yml": "\nvariables:\n  bad: [1]\n",
            "elements/a.bst": "kind: stack\n(@): inc.yml\n",
        },
    )
    # Then the error names the included file and the line in it
    assert (error.file, error.line, error.field) == ("inc.yml", 3, "variables.bad")


def test_include_cycle_is_refused_naming_the_chain(tmp_path: Path) -> None:
    error = _error(
        tmp_path,
        {
            "one.yml": "(@): two.yml\n",
            "two.yml": "variables:\n  (@): one.yml\n",
            "elements/a.bst": "kind: stack\n(@): one.yml\n",
        },
    )
    assert (error.file, error.line, error.field) == ("two.yml", 2, "variables.(@)")
    assert error.reason == "include cycle: elements/a.bst -> one.yml -> two.yml -> one.yml"


def test_self_include_is_a_cycle(tmp_path: Path) -> None:
    error = _error(tmp_path, {"elements/a.bst": "kind: stack\n(@): elements/a.bst\n"})
    assert error.reason == "include cycle: elements/a.bst -> elements/a.bst"


def test_the_same_file_twice_is_not_a_cycle(tmp_path: Path) -> None:
    variables = _variables(
        tmp_path,
        {
            "v.yml": "x: one\n",
            "elements/a.bst": "kind: stack\nvariables:\n  (@): v.yml\nenvironment:\n  (@): v.yml\n",
        },
    )
    assert variables["x"] == "one"


@pytest.mark.parametrize(
    ("include", "words"),
    [
        ("missing.yml", "included file 'missing.yml' not found"),
        ("elements", "is a folder"),
        ("/etc/passwd", "relative to the project folder"),
        ("../outside.yml", "outside the project folder"),
        ("[1, [2]]", "(@) takes a file name or a list of file names"),
        (
            "junction.bst:file.yml",
            "junction 'junction.bst' not found (no file elements/junction.bst)",
        ),
    ],
)
def test_bad_includes_are_refused_at_the_include(tmp_path: Path, include: str, words: str) -> None:
    error = _error(tmp_path, {"elements/a.bst": f"kind: stack\n\n(@): {include}\n"})
    assert (error.file, error.line) == ("elements/a.bst", 3)
    assert words in error.reason


def test_bad_yaml_in_an_included_file_names_both_places(tmp_path: Path) -> None:
    error = _error(tmp_path, {"bad.yml": "a: [\n", "elements/a.bst": "kind: stack\n(@): bad.yml\n"})
    assert (error.file, error.line) == ("elements/a.bst", 2)
    assert "in included file: bad.yml:" in error.reason


def test_junction_includes_go_through_the_callback(tmp_path: Path) -> None:
    # Given a resolver standing in for junctions
    sub = _write(tmp_path / "sub", {"defs.yml": "x: from-junction\n"})
    calls: list[tuple[str, str]] = []

    def resolver(junction: str, file: str, node: ScalarNode) -> tuple[Path, str]:
        calls.append((junction, file))
        return sub / file, f"{junction}:{file}"

    loader = IncludeLoader(tmp_path, junction_resolver=resolver)
    node = _yaml(tmp_path, "v:\n  (@): sub.bst:defs.yml\n")
    loader.process(node)
    assert calls == [("sub.bst", "defs.yml")]
    assert _plain(node) == {"v": {"x": "from-junction"}}
    v = node.get_mapping("v")
    assert v is not None and str(v.entries["x"].mark) == "sub.bst:defs.yml:1"


# --- options -------------------------------------------------------------------------

OPTIONS_CONF = """\
name: test
element-path: elements
options:
  debug:
    type: bool
    description: debugging
    default: false
    variable: debug_var
  flavour:
    type: enum
    description: flavour
    values: [plain, fancy]
    default: plain
    variable: flavour_var
  features:
    type: flags
    description: features
    values: [x11, gtk, qt]
    default: [x11, gtk]
    variable: features_var
  machine:
    type: arch
    description: machine
    values: [x86_64, aarch64, i686, riscv64, ppc64le, armv8l]
    variable: machine_var
  system:
    type: os
    description: system
    values: [Linux, Darwin, FreeBSD]
    variable: system_var
  mask:
    type: element-mask
    description: mask
    variable: mask_var
variables:
  debug_var: overridden-by-the-option
"""
STACK = {"elements/a.bst": "kind: stack\n", "elements/sub/b.bst": "kind: stack\n"}


def _option_vars(tmp_path: Path, options: dict[str, str] | None = None) -> dict[str, str]:
    variables = _variables(tmp_path, STACK, OPTIONS_CONF, options)
    return {k: v for k, v in variables.items() if k.endswith("_var")}


def test_option_defaults_are_exported_as_buildstream_renders_them(tmp_path: Path) -> None:
    machine = {
        "x86-64": "x86_64", "aarch64": "aarch64", "x86-32": "i686", "rv64g": "riscv64",
        "power-isa-le": "ppc64le",
    }.get(host_arch(), host_arch())  # fmt: skip
    assert _option_vars(tmp_path) == {
        "debug_var": "0",  # a bool is 1 or 0; the option wins over project variables
        "flavour_var": "plain",
        "features_var": "x11,gtk",  # the default as written, not sorted
        "machine_var": machine,  # the value as the project spells the host's arch
        "system_var": host_os_name(),
        "mask_var": "",
    }


def test_option_values_from_outside(tmp_path: Path) -> None:
    assert _option_vars(
        tmp_path,
        {"debug": "True", "flavour": "fancy", "features": " qt , x11", "machine": "aarch64",
         "system": "FreeBSD", "mask": "sub/b.bst,a.bst"},
    ) == {
        "debug_var": "1",
        "flavour_var": "fancy",
        "features_var": "qt,x11",  # given values are sorted
        "machine_var": "aarch64",
        "system_var": "FreeBSD",
        "mask_var": "a.bst,sub/b.bst",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("name", "value", "line", "words"),
    [
        ("debug", "yes", 4, "invalid value 'yes' for bool option 'debug' (allowed: true, false)"),
        ("flavour", "odd", 9, "invalid value 'odd' for enum option 'flavour' is not allowed "
                              "(allowed: plain, fancy)"),
        ("features", "x11,motif", 15, "'motif' for flags option 'features'"),
        ("features", "", 15, "invalid value '' for flags option 'features'"),
        ("machine", "x86-64", 21, "allowed: x86_64, aarch64"),  # aliases only in values
        ("system", "linux", 26, "allowed: Linux, Darwin, FreeBSD"),
        ("mask", "c.bst", 31, "allowed: a.bst, sub/b.bst"),
    ],
)  # fmt: skip
def test_bad_option_values_name_the_option_its_declaration_and_the_values(
    tmp_path: Path, name: str, value: str, line: int, words: str
) -> None:
    error = _error(tmp_path, STACK, OPTIONS_CONF, options={name: value})
    assert (error.file, error.line, error.field) == ("project.conf", line, f"options.{name}")
    assert words in error.reason


def test_unknown_option_lists_the_declared_ones(tmp_path: Path) -> None:
    error = _error(tmp_path, STACK, OPTIONS_CONF, options={"nosuch": "1"})
    assert error.field == "options.nosuch"
    assert error.reason == (
        "unknown option 'nosuch' given (declared options: debug, features, flavour, "
        "machine, mask, system)"
    )


def test_option_values_from_yaml_user_configuration(tmp_path: Path) -> None:
    root = _write(tmp_path / "p", {"project.conf": OPTIONS_CONF, **STACK})
    values = _yaml(tmp_path, "debug: 'true'\nfeatures: [qt, gtk]\n", "user.yml")
    project = load_project(root, cas=LocalCas(tmp_path / "cas"), option_values=values)
    assert project.options.values_as_strings()["features"] == "gtk,qt"
    assert project.options["debug"].value is True
    bad = _yaml(tmp_path, "features: qt\n", "bad.yml")
    with pytest.raises(LoadError) as info:
        load_project(root, cas=LocalCas(tmp_path / "cas"), option_values=bad)
    assert (info.value.file, info.value.line) == ("bad.yml", 1)
    unknown = _yaml(tmp_path, "nosuch: 1\n", "unknown.yml")
    with pytest.raises(LoadError) as info:
        load_project(root, cas=LocalCas(tmp_path / "cas"), option_values=unknown)
    assert (info.value.file, info.value.line, info.value.field) == ("unknown.yml", 1, "nosuch")


def test_host_arch_not_allowed_is_refused_unless_given(tmp_path: Path) -> None:
    conf = CONF + "options:\n  m:\n    type: arch\n    description: m\n    values: [sparc64]\n"
    error = _error(tmp_path, STACK, conf)
    assert (error.line, error.field) == (4, "options.m")
    assert f"the host's value {host_arch()!r}" in error.reason
    assert "allowed: sparc64" in error.reason
    project = _project(tmp_path / "ok", STACK, conf, options={"m": "sparc64"})
    assert project.options["m"].value == "sparc64"


@pytest.mark.parametrize(
    ("declaration", "line", "field", "words"),
    [
        ("my-opt:\n    type: bool\n    description: d\n    default: true\n", 4, "options.my-opt",
         "invalid option name 'my-opt'"),
        ("o:\n    type: number\n    description: d\n", 5, "options.o.type",
         "unknown option type 'number'"),
        ("o:\n    type: bool\n    default: true\n", 4, "options.o.description",
         "missing required key 'description'"),
        ("o:\n    type: bool\n    description: d\n", 4, "options.o.default",
         "missing required key 'default'"),
        ("o:\n    type: bool\n    description: d\n    default: yes\n", 7, "options.o.default",
         "invalid value 'yes'"),
        ("o:\n    type: enum\n    description: d\n    default: a\n", 4, "options.o.values",
         "no values given for enum option 'o'"),
        ("o:\n    type: enum\n    description: d\n    values: [a]\n    default: b\n", 8,
         "options.o.default", "invalid value 'b'"),
        ("o:\n    type: flags\n    description: d\n    values: [a]\n    default: [b]\n", 8,
         "options.o.default[0]", "invalid value 'b'"),
        ("o:\n    type: arch\n    description: d\n    values: [pdp11]\n", 7,
         "options.o.values[0]", "unknown architecture 'pdp11'"),
        ("o:\n    type: arch\n    description: d\n    values: [x86_64]\n    default: x\n", 8,
         "options.o.default", "unknown key"),
        ("o:\n    type: bool\n    description: d\n    default: true\n    variable: 1x\n", 8,
         "options.o.variable", "invalid variable name '1x'"),
        ("o:\n    type: bool\n    description: d\n    default: true\n    variable: max-jobs\n",
         8, "options.o.variable", "option variable 'max-jobs' is set by remex"),
    ],
)  # fmt: skip
def test_bad_option_declarations(
    tmp_path: Path, declaration: str, line: int, field: str, words: str
) -> None:
    error = _error(tmp_path, STACK, CONF + "options:\n  " + declaration)
    assert (error.file, error.line, error.field) == ("project.conf", line, field)
    assert words in error.reason


# --- conditionals and assertions --------------------------------------------------------


def test_conditionals_compose_true_branches_in_order_at_any_level(tmp_path: Path) -> None:
    files = {
        **STACK,
        "elements/a.bst": """\
            kind: stack
            variables:
              v: base
              (?):
              - debug:
                  v: debug
              - flavour == 'fancy':
                  v: fancy
                  w: fancy
              - "'qt' in features":
                  nested:
                    (?):
                    - not debug:
                        deep: deep
            environment:
              LIST: x
            (?):
            - debug and flavour == 'fancy':
                variables:
                  both: both
        """,
    }
    plain = _variables(tmp_path / "1", files, OPTIONS_CONF)
    assert (plain["v"], "w" in plain, "both" in plain) == ("base", False, False)
    fancy = _variables(tmp_path / "2", files, OPTIONS_CONF, {"debug": "true", "flavour": "fancy"})
    assert (fancy["v"], fancy["w"], fancy["both"]) == ("fancy", "fancy", "both")


def test_conditional_branches_can_bring_conditionals_and_includes(tmp_path: Path) -> None:
    variables = _variables(
        tmp_path,
        {
            **STACK,
            "debug.yml": "variables:\n  from_include: yes\n  (?):\n  - flavour == 'plain':\n"
            "      included_plain: yes\n",
            "elements/a.bst": """\
                kind: stack
                (?):
                - debug:
                    (@): debug.yml
                    (?):
                    - flavour == 'plain':
                        variables:
                          inner: yes
            """,
        },
        OPTIONS_CONF,
        {"debug": "true"},
    )
    assert (variables["from_include"], variables["included_plain"], variables["inner"]) == (
        "yes", "yes", "yes",
    )  # fmt: skip


def test_project_conf_conditionals_and_included_options(tmp_path: Path) -> None:
    conf = """\
        name: test
        element-path: elements
        (@): opts.yml
        environment-nocache:
          (>): [EXTRA]
        variables:
          v: project
          (?):
          - level == 'high':
              v: high
    """
    files = {
        **STACK,
        "opts.yml": """\
            options:
              level:
                type: enum
                description: level
                values: [low, high]
                default: low
                variable: level
            variables:
              (?):
              - level == 'low':
                  from_include: low
        """,
    }
    project = _project(tmp_path, files, textwrap.dedent(conf), {"level": "high"})
    [element] = project.load_targets(["a.bst"])
    variables = element.variables.as_dict()
    assert (variables["v"], variables["level"], "from_include" in variables) == (
        "high", "high", False,
    )  # fmt: skip
    assert element.environment_nocache == frozenset({"EXTRA"})
    low = _variables(tmp_path / "low", files, textwrap.dedent(conf))
    assert (low["v"], low["from_include"]) == ("project", "low")


@pytest.mark.parametrize(
    ("element", "line", "field", "words"),
    [
        ("variables:\n  (?):\n  - nosuch: {}\n", 4, "variables.(?)[0]",
         "cannot evaluate condition 'nosuch': 'nosuch' is undefined"),
        ("variables:\n  (?):\n  - 'debug ==': {}\n", 4, "variables.(?)[0]",
         "cannot evaluate condition 'debug =='"),
        ("variables:\n  (?):\n  - debug: x\n", 4, "variables.(?)[0]",
         "condition 'debug': only a mapping can be composed, got a string"),
        ("variables:\n  (?):\n  - debug: {}\n    flavour: {}\n", 4, "variables.(?)[0]",
         "a condition is a mapping with one key"),
        ("variables:\n  (?): {debug: {}}\n", 3, "variables.(?)", "(?) takes a list"),
        ("variables:\n  (!): |\n    this is broken\n", 3, "variables.(!)",
         "assertion failed: this is broken"),
        ("(?):\n- not debug:\n    (!): not without debug\n", 4, "(!)",
         "assertion failed: not without debug"),
    ],
)  # fmt: skip
def test_bad_conditionals_and_assertions_name_file_line_field(
    tmp_path: Path, element: str, line: int, field: str, words: str
) -> None:
    error = _error(tmp_path, {**STACK, "elements/a.bst": "kind: stack\n" + element}, OPTIONS_CONF)
    assert (error.file, error.line, error.field) == ("elements/a.bst", line, field)
    assert words in error.reason


def test_a_mapping_keeps_its_place_after_a_conditional(tmp_path: Path) -> None:
    # Given an element whose kind is missing, with a conditional at the top
    error = _error(
        tmp_path, {**STACK, "elements/a.bst": "(?):\n- debug:\n    kind: stack\n"}, OPTIONS_CONF
    )
    # Then the missing key is reported at the element's mapping, line 1
    assert (error.file, error.line, error.field) == ("elements/a.bst", 1, "kind")


def test_project_conf_restricted_keys_cannot_be_conditional(tmp_path: Path) -> None:
    conf = OPTIONS_CONF + "(?):\n- debug:\n    name: other\n"
    error = _error(tmp_path, STACK, conf)
    assert (error.file, error.line, error.field) == ("project.conf", 39, "name")
    assert error.reason == "'name' cannot be set conditionally"


def test_project_conf_leftover_directive_is_refused(tmp_path: Path) -> None:
    error = _error(tmp_path, STACK, CONF + "variables:\n  foo:\n    (>): [x]\n")
    assert (error.file, error.line, error.field) == ("project.conf", 5, "variables.foo.(>)")


def test_project_conf_include_cycle_and_missing_include(tmp_path: Path) -> None:
    files = {**STACK, "a.yml": "(@): b.yml\n", "b.yml": "(@): a.yml\n"}
    error = _error(tmp_path / "1", files, CONF + "(@): a.yml\n")
    assert (error.file, error.line) == ("b.yml", 1)
    assert error.reason == "include cycle: project.conf -> a.yml -> b.yml -> a.yml"
    error = _error(tmp_path / "2", STACK, CONF + "\n(@): nope.yml\n")
    assert (error.file, error.line, error.field) == ("project.conf", 4, "(@)")


def test_option_pool_alone(tmp_path: Path) -> None:
    # The pool the lead's code uses: declared, given values, conditionals applied
    pool = OptionPool(tmp_path)
    pool.declare(_yaml(tmp_path, "b:\n  type: bool\n  description: b\n  default: true\n"))
    pool.set_string_values({"b": "false"})
    pool.resolve()
    node = _yaml(tmp_path, "(?):\n- b: {x: yes}\n- not b: {x: no}\n", "n.yml")
    pool.process_node(node)
    assert _plain(node) == {"x": "no"}
    assert pool.names() == {"b": False}


def _nodes(node: Node) -> list[Node]:
    """``node`` and every node below it."""
    found = [node]
    if isinstance(node, SequenceNode):
        for item in node.items:
            found.extend(_nodes(item))
    elif isinstance(node, MappingNode):
        for value in node.entries.values():
            found.extend(_nodes(value))
    return found


def test_every_node_loaded_or_composed_has_its_childrens_paths_derived_from_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given files with includes, conditionals and list directives, loaded
    # (the parsed-file cache off, then on: decoded), composed and re-composed
    # (what composition's copy at an unchanged path relies on)
    files = {
        "include/common.yml": """\
            variables:
              extra: common
            config:
              build-commands:
                (>):
                - echo included
            """,
        "elements/a.bst": """\
            kind: manual
            (@): include/common.yml
            (?):
            - debug:
                config:
                  install-commands:
                    (<):
                    - echo debug
            config:
              build-commands:
                (<):
                - echo first
              install-commands:
              - echo %{extra}
            public:
              mine:
              - [nested, {deep: list}]
              bst:
                split-rules:
                  devel:
                    (>): [/usr/include/x.h]
            """,
    }
    conf = CONF + "options:\n  debug:\n    type: bool\n    description: d\n    default: true\n"
    seen: list[Node] = []
    for cache in ("off", str(tmp_path / "cache"), str(tmp_path / "cache")):
        monkeypatch.setenv("REMEX_PARSED_CACHE", cache)
        project = _project(tmp_path / cache.replace("/", "_"), files, conf)
        project.load_targets(["a.bst"])
        node = project._files["a.bst"].node
        config = node.get_mapping("config")
        assert config is not None
        base = _yaml(tmp_path, "config:\n  build-commands: [a]\n  strip-commands: [b]\n")
        base_config = base.get_mapping("config")
        assert base_config is not None
        composed = compose(base_config, config)
        again = compose(composed, composed)
        seen.extend([*_nodes(node), *_nodes(composed), *_nodes(again)])
    # Then re-rooting any of them at its own path changes nothing
    for each in seen:
        assert clone(each, each.path) == _copy(each), each.path


def test_an_elements_config_composed_without_copies_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given elements whose config replaces, extends and leaves the kind's lists
    files = {
        "elements/plain.bst": """\
            kind: manual
            config:
              build-commands: [echo a, echo b]
              install-commands:
              - echo %{install-root}
            """,
        "elements/directives.bst": """\
            kind: manual
            build-depends: [plain.bst]
            config:
              build-commands:
                (>): [echo later]
              strip-commands:
                (=): [echo replaced]
            """,
        "elements/none.bst": "kind: manual\nbuild-depends: [directives.bst]\n",
    }
    shared = _project(tmp_path / "shared", files)
    loaded = shared.load_targets(["none.bst"])
    # When the same project is loaded with every overlay copied
    real = compose

    def copying(base: MappingNode, overlay: MappingNode, *, share: bool = False) -> MappingNode:
        return real(base, overlay)

    monkeypatch.setattr("pipeline.elements.project.compose", copying)
    copied = _project(tmp_path / "copied", files)
    expected = copied.load_targets(["none.bst"])
    # Then the elements are the same, and so are the element files' nodes
    assert [(e.config, e.cache_key) for e in loaded] == [(e.config, e.cache_key) for e in expected]
    for name, file in shared._files.items():
        assert _plain(file.node) == _plain(copied._files[name].node), name
