"""``show --format``: BuildStream 2's element report, placeholder for placeholder.

Scripts written for ``bst show --format`` parse its output, so remex prints the
same bytes. Facts learnt from bst 2.8.1 (``_frontend/widget.py``, ``_yaml.pyx``,
``element.py``) and checked against its output:

- A placeholder is ``%{NAME}`` or ``%{NAME<python format spec>}``: the text
  between ``%{`` and ``}`` is handed to ``str.format`` with the one value, so
  ``%{name:^30}``, ``%{key:.4}`` and ``%{name!r}`` all work. Placeholders are
  replaced one name after another in a fixed order (name, kind, key, full-key,
  description, state, config, vars, env, public, deps, build-deps,
  runtime-deps); a later placeholder inside an earlier value is replaced too,
  as in bst.
- ``%{key}`` is the first 8 hex digits of the cache key (bst's default
  ``logging: key-length``), ``%{full-key}`` all 64.
- ``%{config}``, ``%{vars}``, ``%{env}``, ``%{public}`` are YAML documents as
  ruamel.yaml's round-trip dumper writes them with every scalar a plain
  string: keys in their order, block style, lists not indented under their key,
  ``{}``/``[]`` when empty, no line folding, and a trailing newline.
- ``%{deps}``, ``%{build-deps}``, ``%{runtime-deps}`` are the direct
  dependencies' names as a YAML list (``- a.bst`` lines) without the last
  newline, ``[]`` when there are none; ``deps`` is build then runtime
  dependencies, each named once.
- Lines are joined by newlines; the report's trailing newlines are removed
  only where the format itself ends in newlines (:func:`format_report`).
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import cmp_to_key
from typing import Any, Literal, Protocol, TypeVar

from yaml.emitter import Emitter, ScalarAnalysis
from yaml.representer import SafeRepresenter
from yaml.resolver import BaseResolver
from yaml.serializer import Serializer

__all__ = [
    "BRIEF_KEY_LENGTH",
    "DepsSelection",
    "Showable",
    "bst_dependency_order",
    "dump_yaml",
    "format_element",
    "format_report",
    "select_elements",
]

#: bst's default ``logging: key-length``: how many hex digits ``%{key}`` shows.
BRIEF_KEY_LENGTH = 8

DepsSelection = Literal["none", "run", "build", "all"]


class _Variables(Protocol):
    def as_dict(self) -> dict[str, str]: ...


class _Dependency(Protocol):
    @property
    def element(self) -> Showable: ...

    @property
    def build(self) -> bool: ...

    @property
    def runtime(self) -> bool: ...


_DependencyT = TypeVar("_DependencyT", bound=_Dependency)


class Showable(Protocol):
    """What :func:`format_element` reads from an element.

    ``dependencies`` are in BuildStream's order for the element (the loader's
    sorted order: a dependency that another dependency needs comes first, then
    build-only or both before runtime-only, then by name).
    """

    @property
    def name(self) -> str: ...

    @property
    def cache_key(self) -> str: ...

    @property
    def variables(self) -> _Variables: ...

    @property
    def environment(self) -> Mapping[str, str]: ...

    @property
    def config(self) -> Mapping[str, Any]: ...

    @property
    def public(self) -> Mapping[str, Any]: ...

    @property
    def dependencies(self) -> Sequence[_Dependency]: ...


def format_element(element: Showable, fmt: str, *, state: str) -> str:
    """One element's line of ``show --format`` (it may span several lines).

    Args:
        element: the element to describe.
        fmt: the format with ``%{...}`` placeholders.
        state: what ``%{state}`` says (``cached``, ``buildable``, ``waiting``,
            ``fetch needed``, ``no reference``, ``junction``, ``failed``).

    Returns:
        ``fmt`` with every known placeholder replaced; unknown ones stay as written.

    Raises:
        ValueError: a placeholder's format spec does not fit its value
            (``%{name:d}``), or names a second field (``%{name-x}``), as
            ``str.format`` says.
    """
    return _ANSI.sub("", _styled_line(element, fmt, state))


def format_report(elements: Iterable[Showable], fmt: str, state: Callable[[Showable], str]) -> str:
    """The whole ``show --format`` report: one formatted line per element.

    bst joins the lines with newlines and strips the report's trailing
    newlines, but each substituted value carries a colour reset code (removed
    only when printed), so only newlines written in the format after the last
    placeholder are stripped: ``%{vars}`` keeps its final newline.

    Args:
        elements: in the order to print (see :func:`select_elements`).
        fmt: the format.
        state: gives each element's ``%{state}``.

    Returns:
        The report as bst prints it, without the one newline ``click.echo`` adds.
    """
    report = "".join(_styled_line(e, fmt, state(e)) + "\n" for e in elements)
    # click.echo drops every ANSI sequence when not writing to a colour terminal.
    return _ANSI.sub("", report.rstrip("\n"))


def _styled_line(element: Showable, fmt: str, state: str) -> str:
    line = fmt
    # The order matters (a value may hold a later placeholder) and is bst's.
    line = _subst(line, "name", lambda: element.name)
    line = _subst(line, "kind", lambda: str(getattr(element, "kind", "")))
    line = _subst(line, "key", lambda: element.cache_key[:BRIEF_KEY_LENGTH])
    line = _subst(line, "full-key", lambda: element.cache_key)
    line = _subst(line, "description", lambda: _one_line(getattr(element, "description", "")))
    line = _subst(line, "state", lambda: state)
    if "%{config" in fmt:
        line = _subst(line, "config", lambda: dump_yaml(element.config))
    if "%{vars" in fmt:
        line = _subst(line, "vars", lambda: dump_yaml(element.variables.as_dict()))
    if "%{env" in fmt:
        line = _subst(line, "env", lambda: dump_yaml(element.environment))
    if "%{public" in fmt:
        line = _subst(line, "public", lambda: dump_yaml(element.public))
    if "%{deps" in fmt:
        line = _subst(line, "deps", lambda: _names(_direct(element, build=True, runtime=True)))
    if "%{build-deps" in fmt:
        line = _subst(line, "build-deps", lambda: _names(_direct(element, build=True)))
    if "%{runtime-deps" in fmt:
        line = _subst(line, "runtime-deps", lambda: _names(_direct(element, runtime=True)))
    return line


def select_elements(targets: Sequence[Showable], deps: DepsSelection) -> list[Showable]:
    """The elements ``show --deps DEPS TARGETS`` lists, in bst's order.

    ``none`` is the targets; ``run`` each target after its runtime closure;
    ``build`` the build dependencies' runtime closures without the targets;
    ``all`` everything the targets need to build and run. Each list is a
    depth-first post-order walk shared by all targets (an element is listed
    once, where it is first reached), as bst's ``Element._dependencies``.

    Raises:
        ValueError: ``deps`` is not one of the four selections.
    """
    if deps == "none":
        return list(targets)
    if deps not in ("run", "build", "all"):
        raise ValueError(f"unknown dependency selection {deps!r}")
    visited: tuple[set[int], set[int]] = (set(), set())  # (build scope, run scope)
    result: list[Showable] = []
    for target in targets:
        if deps in ("build", "all") and id(target) in visited[0]:
            continue
        if deps in ("run", "all") and id(target) in visited[1]:
            continue
        result.extend(_walk(target, deps, visited))
    return result


def bst_dependency_order(declared: Sequence[_DependencyT]) -> list[_DependencyT]:
    """An element's direct dependencies in the order BuildStream 2.8 keeps them.

    bst sorts them with a comparison that is not a total order (``a`` after
    ``b`` when ``a`` needs ``b``, directly or not; else runtime-only ones last;
    else by name; else non-junction first, then by junction name), so the
    result depends on the input order and on the sort algorithm: bst uses
    CPython's list sort, as this does. Two direct dependencies that bst's sort
    never compares stay unsorted between them (``alpha`` needing ``zlib`` may
    come first).

    Args:
        declared: the dependencies as the element file lists them: its
            ``build-depends`` entries, then ``runtime-depends``, then
            ``depends``; an element named twice appears once, at its first
            place, with both flags merged. ``dep.element.dependencies`` must
            already be set (they decide who needs whom).
    """
    closure: dict[int, set[int]] = {}

    def needs(element: Showable) -> set[int]:
        # Every element reachable through any kind of dependency.
        key = id(element)
        if key not in closure:
            found: set[int] = set()
            stack = [element]
            while stack:
                for dep in stack.pop().dependencies:
                    if id(dep.element) not in found:
                        found.add(id(dep.element))
                        stack.append(dep.element)
            closure[key] = found
        return closure[key]

    def compare(a: _DependencyT, b: _DependencyT) -> int:
        if id(b.element) in needs(a.element):
            return 1
        if id(a.element) in needs(b.element):
            return -1
        a_runtime_only = a.runtime and not a.build
        b_runtime_only = b.runtime and not b.build
        if (a.build, a.runtime) != (b.build, b.runtime):
            if a_runtime_only:
                return 1
            if b_runtime_only:
                return -1
        if a.element.name != b.element.name:
            return 1 if a.element.name > b.element.name else -1
        a_junction = getattr(a.element, "junction", None)
        b_junction = getattr(b.element, "junction", None)
        if a_junction and b_junction:
            return (a_junction > b_junction) - (a_junction < b_junction)
        if a_junction:
            return -1
        if b_junction:
            return 1
        return 0

    return sorted(declared, key=cmp_to_key(compare))


def dump_yaml(value: Any) -> str:
    """``value`` as bst's ``_yaml.roundtrip_dump_string`` writes it.

    bst dumps with ruamel.yaml's round-trip dumper, every scalar resolved as a
    string (never quoted for looking like a number or a boolean), width 9999.
    Scalars other than strings are written as bst's nodes hold them: ``None``
    as an empty string, booleans as ``True``/``False``, numbers as their text.
    """
    stream = io.StringIO()
    dumper = _Dumper(stream)
    try:
        dumper.open()
        dumper.represent(_as_node_values(value))
        dumper.close()
    finally:
        dumper.dispose()
    return stream.getvalue()


# ---------------------------------------------------------------------------


_SCOPE_BUILD, _SCOPE_RUN, _SCOPE_ALL = "build", "run", "all"


def _walk(target: Showable, scope: str, visited: tuple[set[int], set[int]]) -> Iterator[Showable]:
    """bst's recursive ``visit`` as an explicit stack (deep chains would overflow recursion)."""

    def enter(element: Showable, scope: str) -> Iterator[tuple[Showable, str]]:
        # Marks the element and gives the (child, child scope) pairs, checked
        # lazily: a child visited meanwhile by a sibling is skipped, as in bst.
        if scope == _SCOPE_ALL:
            visited[0].add(id(element))
            visited[1].add(id(element))
            for dep in _build_deps(element) + _runtime_deps(element):
                if id(dep) not in visited[0] and id(dep) not in visited[1]:
                    yield dep, _SCOPE_ALL
        elif scope == _SCOPE_BUILD:
            visited[0].add(id(element))
            for dep in _build_deps(element):
                if id(dep) not in visited[1]:
                    yield dep, _SCOPE_RUN
        else:
            visited[1].add(id(element))
            for dep in _runtime_deps(element):
                if id(dep) not in visited[1]:
                    yield dep, _SCOPE_RUN

    stack = [(target, scope, enter(target, scope))]
    while stack:
        element, element_scope, children = stack[-1]
        child = next(children, None)
        if child is not None:
            stack.append((child[0], child[1], enter(*child)))
            continue
        stack.pop()
        # The build scope lists what the element needs, never the element itself.
        if element_scope != _SCOPE_BUILD:
            yield element


def _build_deps(element: Showable) -> list[Showable]:
    return [dep.element for dep in element.dependencies if dep.build]


def _runtime_deps(element: Showable) -> list[Showable]:
    return [dep.element for dep in element.dependencies if dep.runtime]


def _direct(element: Showable, *, build: bool = False, runtime: bool = False) -> list[str]:
    names: list[str] = []
    seen: set[int] = set()
    candidates = (_build_deps(element) if build else []) + (
        _runtime_deps(element) if runtime else []
    )
    for dep in candidates:
        if id(dep) not in seen:
            seen.add(id(dep))
            names.append(dep.name)
    return names


def _names(names: list[str]) -> str:
    return dump_yaml(names).rstrip("\n")


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def _subst(line: str, name: str, value: Callable[[], str]) -> str:
    # Lazy, like bst's regular expression: after the name, anything up to the
    # first "}" that crosses no "%".
    pattern = re.compile(r"%(\{(" + re.escape(name) + r")[^%]*?\})")
    if not pattern.search(line):
        return line
    text = value()

    def replace(match: re.Match[str]) -> str:
        try:
            # bst styles every value with click, which ends it with a reset code.
            return match.group(1).format(**{name: text}) + _RESET
        except (KeyError, IndexError) as exc:
            raise ValueError(f"bad placeholder %{match.group(1)}: {exc}") from None

    return pattern.sub(replace, line)


def _as_node_values(value: Any) -> Any:
    """Plain dicts, lists and strings, as bst's nodes would hold ``value``."""
    if isinstance(value, Mapping):
        return {str(k): _as_node_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_node_values(v) for v in value]
    if value is None:
        return ""
    return str(value)


_RESET = "\x1b[0m"
# click's pattern for the ANSI sequences it strips from output.
_ANSI = re.compile(r"\033\[[;?0-9]*[a-zA-Z]")

_BREAKS = "\n\x85\u2028\u2029"
_SPACE_OR_END = "\0 \t\r\n\x85\u2028\u2029"


class _Emitter(Emitter):  # type: ignore[misc]
    """PyYAML's emitter with ruamel.yaml's choices of scalar style (YAML 1.2 rules).

    ruamel differs from PyYAML in three ways that show in bst's output: ``:``
    and ``?`` inside a scalar do not force quotes unless ``:`` is followed by a
    space; a scalar holding ``'`` or a line break is double-quoted rather than
    single-quoted; and an empty string is written plain (nothing at all).
    """

    def analyze_scalar(self, scalar: str) -> ScalarAnalysis:
        if not scalar:
            return ScalarAnalysis(
                scalar=scalar,
                empty=True,
                multiline=False,
                allow_flow_plain=False,
                allow_block_plain=True,
                allow_single_quoted=True,
                allow_double_quoted=True,
                allow_block=False,
            )
        block_ind = flow_ind = line_breaks = special = False
        leading_space = leading_break = trailing_space = trailing_break = False
        break_space = space_break = False
        if scalar.startswith(("---", "...")):
            block_ind = flow_ind = True
        after_space = True
        before_space = len(scalar) == 1 or scalar[1] in _SPACE_OR_END
        prev_space = prev_break = False
        last = len(scalar) - 1
        for index, ch in enumerate(scalar):
            if index == 0:
                if ch in "#,[]{}&*!|>'\"%@`":
                    flow_ind = block_ind = True
                if ch in "?:":
                    if len(scalar) == 1:
                        flow_ind = True
                    if before_space:
                        block_ind = True
                if ch == "-" and before_space:
                    flow_ind = block_ind = True
            else:
                if ch in ",[]{}":
                    flow_ind = True
                if ch == ":" and before_space:
                    flow_ind = block_ind = True
                if ch == "#" and after_space:
                    flow_ind = block_ind = True
            if ch in _BREAKS:
                line_breaks = True
            if not (ch == "\n" or "\x20" <= ch <= "\x7e"):
                printable = (
                    ch == "\x85"
                    or "\xa0" <= ch <= "\ud7ff"
                    or "\ue000" <= ch <= "\ufffd"
                    or "\U00010000" <= ch <= "\U0010ffff"
                ) and ch != "\ufeff"
                if not printable:
                    special = True
            if ch == " ":
                leading_space = leading_space or index == 0
                trailing_space = trailing_space or index == last
                break_space = break_space or prev_break
                prev_space, prev_break = True, False
            elif ch in _BREAKS:
                leading_break = leading_break or index == 0
                trailing_break = trailing_break or index == last
                space_break = space_break or prev_space
                prev_space, prev_break = False, True
            else:
                prev_space = prev_break = False
            after_space = ch in _SPACE_OR_END
            before_space = index + 2 > last or scalar[index + 2] in _SPACE_OR_END
        flow_plain = block_plain = single = block = True
        if leading_space or leading_break or trailing_space or trailing_break:
            flow_plain = block_plain = False
        if trailing_space:
            block = False
        if break_space:
            flow_plain = block_plain = single = False
        # ruamel allows a block scalar after a space-break only on request; never here.
        if special or space_break:
            flow_plain = block_plain = single = block = False
        if line_breaks:
            flow_plain = block_plain = False
        if flow_ind:
            flow_plain = False
        if block_ind:
            block_plain = False
        return ScalarAnalysis(
            scalar=scalar,
            empty=False,
            multiline=line_breaks,
            allow_flow_plain=flow_plain,
            allow_block_plain=block_plain,
            allow_single_quoted=single,
            allow_double_quoted=True,
            allow_block=block,
        )

    def choose_scalar_style(self) -> str:
        if self.analysis is None:
            self.analysis = self.analyze_scalar(getattr(self.event, "value", ""))
        analysis = self.analysis
        if not (self.simple_key_context and (analysis.empty or analysis.multiline)) and (
            (self.flow_level and analysis.allow_flow_plain)
            or (not self.flow_level and analysis.allow_block_plain)
        ):
            return ""
        value: str = getattr(self.event, "value", "")
        if "'" in value or "\n" in value:
            return '"'
        if analysis.allow_single_quoted and not (self.simple_key_context and analysis.multiline):
            return "'"
        return '"'

    def write_double_quoted(self, text: str, split: bool = True) -> None:
        # ruamel writes characters beyond U+FFFF as they are; PyYAML escapes
        # them. Both fold only past the line width (9999), so a scalar that
        # fits is written here whole; a longer one keeps PyYAML's folding.
        escaped = "".join(_escape_double_quoted(ch) for ch in text)
        if self.column + len(escaped) + 2 > self.best_width:
            super().write_double_quoted(text, split)
            return
        self.write_indicator('"', True)
        self.column += len(escaped)
        self.stream.write(escaped)
        self.write_indicator('"', False)

    def write_plain(self, text: str, split: bool = True) -> None:
        # ruamel writes a sequence item's indicator with its space ("- "), so
        # an empty item leaves "- " where PyYAML would leave "-".
        if not text and self.sequence_context and not self.flow_level and not self.whitespace:
            self.stream.write(" ")
            self.column += 1
            self.whitespace = True
            return
        super().write_plain(text, split)


# YAML's short escapes in double-quoted scalars (the YAML 1.1/1.2 spec).
_SHORT_ESCAPES = {
    "\0": "0", "\x07": "a", "\x08": "b", "\t": "t", "\n": "n", "\x0b": "v", "\x0c": "f",
    "\r": "r", "\x1b": "e", '"': '"', "\\": "\\", "\x85": "N", "\xa0": "_", "\u2028": "L",
    "\u2029": "P",
}  # fmt: skip


def _escape_double_quoted(ch: str) -> str:
    """``ch`` inside a double-quoted scalar, as ruamel (with unicode allowed) writes it."""
    printable = ("\x20" <= ch <= "\x7e" or "\xa0" <= ch <= "\ud7ff" or "\ue000" <= ch <= "\ufffd"
                 or "\U00010000" <= ch <= "\U0010ffff")  # fmt: skip
    if printable and ch not in '"\\\x85\u2028\u2029\ufeff':
        return ch
    if ch in _SHORT_ESCAPES:
        return "\\" + _SHORT_ESCAPES[ch]
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02X}"
    if code <= 0xFFFF:
        return f"\\u{code:04X}"
    return f"\\U{code:08X}"


class _Resolver(BaseResolver):  # type: ignore[misc]
    """Every scalar is a plain string: nothing is quoted for looking like a number."""


class _Dumper(_Emitter, Serializer, SafeRepresenter, _Resolver):  # type: ignore[misc]
    def __init__(self, stream: io.StringIO) -> None:
        _Emitter.__init__(self, stream, width=9999, allow_unicode=True)
        Serializer.__init__(self)
        SafeRepresenter.__init__(self, default_flow_style=False, sort_keys=False)
        _Resolver.__init__(self)
