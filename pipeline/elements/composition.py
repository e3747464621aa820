"""BuildStream's YAML composition: one mapping over another, list directives, includes.

Composition (``compose_onto(target, overlay)``) follows BuildStream 2's
``MappingNode._composite``: the overlay wins; mappings merge key by key,
recursively; a plain list replaces whatever list (or list directives) was
there; a scalar replaces a scalar. A mapping holding only list directives,
``(=)`` (replace), ``(<)`` (prepend) and ``(>)`` (append), is applied to the
list under it; when there is no list under it yet, the directives are kept
as they are (to be applied when this is composed onto something else, e.g.
an element onto its kind's defaults); when two directive mappings meet, they
merge as BuildStream merges them. Directives left over once everything is
composed are an error (:func:`assert_fully_composited`).

Includes (``(@)``, a file name or a list of them, at any mapping level) are
composed UNDER the mapping that names them: the including mapping wins over
the included files, and of several included files the later one wins. Files
are relative to the project folder; ``junction.bst:file.yml`` is handed to a
callback (remex has no junctions yet).

Every node copied into place gets the field path of where it lands, and keeps
the file and line where it was written, so errors after composition still
name the right file and line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.elements.errors import LoadError
from pipeline.elements.nodes import MappingNode, Mark, Node, ScalarNode, SequenceNode, load_yaml

__all__ = [
    "LIST_DIRECTIVES",
    "IncludeLoader",
    "JunctionIncludeResolver",
    "assert_fully_composited",
    "clone",
    "compose",
    "compose_onto",
    "compose_under",
    "refuse_junction_includes",
]

LIST_DIRECTIVES = ("(=)", "(<)", "(>)")

JunctionIncludeResolver = Callable[[str, str, ScalarNode], tuple[Path, str]]
"""``(junction, file, node) -> (absolute path, display name)`` for ``junction.bst:file``."""


def clone(node: Node, path: str | None = None) -> Node:
    """A deep copy of ``node`` (marks kept); with ``path``, re-rooted at that field path."""
    if path is None:
        return _copy(node)
    new_path = path
    if isinstance(node, ScalarNode):
        return ScalarNode(mark=node.mark, path=new_path, value=node.value)
    if isinstance(node, SequenceNode):
        items = [
            clone(item, None if path is None else f"{new_path}[{i}]")
            for i, item in enumerate(node.items)
        ]
        return SequenceNode(mark=node.mark, path=new_path, items=items)
    assert isinstance(node, MappingNode)
    result = MappingNode(mark=node.mark, path=new_path, key_marks=dict(node.key_marks))
    for key, value in node.entries.items():
        result.entries[key] = clone(value, None if path is None else result.child_path(key))
    return result


def _copy(node: Node) -> Node:
    # clone() without re-rooting: the loader's hottest path (every element
    # copies its kind's defaults and its includes), so exact-type dispatch
    # and no path strings.
    kind = type(node)
    if kind is ScalarNode:
        return ScalarNode(node.mark, node.path, node.value)  # type: ignore[attr-defined]
    if kind is SequenceNode:
        return SequenceNode(node.mark, node.path, [_copy(i) for i in node.items])  # type: ignore[attr-defined]
    if kind is MappingNode:
        entries = {key: _copy(value) for key, value in node.entries.items()}  # type: ignore[attr-defined]
        return MappingNode(node.mark, node.path, entries, dict(node.key_marks))  # type: ignore[attr-defined]
    return clone(node, node.path)


def clone_mapping(node: MappingNode, path: str | None = None) -> MappingNode:
    """:func:`clone` for a mapping, typed as one."""
    result = clone(node, path)
    assert isinstance(result, MappingNode)
    return result


def compose(base: MappingNode, overlay: MappingNode, *, share: bool = False) -> MappingNode:
    """A new mapping: ``overlay`` composed onto a copy of ``base`` (neither is changed).

    ``share``: the overlay's own scalars and lists go into the result as
    they are, not copied: for an overlay composed once whose nodes nobody
    changes afterwards (an element's own ``config``, read by its kind). The
    result is then not to be changed either.

    Raises:
        LoadError: the two cannot be composed (a list onto a mapping, a scalar
            onto a list, directives mixed with other keys); names the overlay's
            file and line.
    """
    result = clone_mapping(base)
    # compose_onto copies what it takes from the overlay: a copy first only
    # to give the overlay the base's field paths (a different place).
    rooted = overlay if overlay.path == base.path else clone_mapping(overlay, base.path)
    compose_onto(result, rooted, share=share)
    return result


def compose_onto(target: MappingNode, overlay: MappingNode, *, share: bool = False) -> None:
    """Compose ``overlay`` onto ``target`` in place (the overlay wins).

    Nodes of ``overlay`` are copied, never shared, so ``overlay`` can be
    composed again elsewhere; unless ``share`` (see :func:`compose`).

    Raises:
        LoadError: as :func:`compose`.
    """
    for key, value in overlay.entries.items():
        _compose_value(key, value, target, overlay.key_marks.get(key, value.mark), share)
    # As BuildStream: the composed mapping now reports the overlay's place.
    target.mark = overlay.mark


def compose_under(under: MappingNode, target: MappingNode) -> None:
    """Compose ``under`` beneath ``target`` in place: ``target``'s own values win.

    Used for includes: the included file's mapping goes under the mapping
    that includes it. Keys from ``under`` come first, as in BuildStream.
    """
    merged = clone_mapping(under, target.path)
    mark = target.mark
    compose_onto(merged, target)
    target.entries = merged.entries
    target.key_marks = merged.key_marks
    target.mark = mark


def assert_fully_composited(node: Node) -> None:
    """Refuse list directives still present, which had no list to apply to.

    Raises:
        LoadError: at the first leftover directive (BuildStream: "Attempt to
            override non-existing list").
    """
    if isinstance(node, MappingNode):
        for key, value in node.entries.items():
            if key in LIST_DIRECTIVES:
                raise node.key_error(
                    key, f"{key} applies to a list, but there is no list here to apply it to"
                )
            assert_fully_composited(value)
    elif isinstance(node, SequenceNode):
        for item in node.items:
            assert_fully_composited(item)


def is_list_directives(node: Node) -> bool:
    """True when ``node`` is a mapping of list directives only.

    Raises:
        LoadError: the mapping mixes list directives with other keys.
    """
    if not isinstance(node, MappingNode):
        return False
    directives = [key for key in node.entries if key in LIST_DIRECTIVES]
    if directives and len(directives) != len(node.entries):
        other = next(key for key in node.entries if key not in LIST_DIRECTIVES)
        raise node.key_error(
            other,
            f"a mapping with list directives ({', '.join(directives)}) cannot have other keys",
        )
    return bool(directives)


def apply_list_directives(directives: MappingNode, target: SequenceNode) -> None:
    """Apply ``(=)``, then ``(<)``, then ``(>)`` to ``target`` in place.

    Raises:
        LoadError: a directive's value is not a list.
    """
    clobber, prefix, suffix = (_directive_list(directives, key) for key in LIST_DIRECTIVES)
    if clobber is not None:
        target.items = [clone(item) for item in clobber.items]
    if prefix is not None:
        target.items[:0] = [clone(item) for item in prefix.items]
    if suffix is not None:
        target.items.extend(clone(item) for item in suffix.items)
    _renumber(target)


# --- includes --------------------------------------------------------------------


def refuse_junction_includes(junction: str, file: str, node: ScalarNode) -> tuple[Path, str]:
    """The default junction callback: remex has no junctions yet.

    Raises:
        LoadError: always, at the include.
    """
    raise node.error(
        f"include {node.value!r}: including files from junction {junction!r} is not "
        "supported by remex yet"
    )


class IncludeLoader:
    """Reads and applies ``(@)`` includes for one project.

    Args:
        project_dir: the project folder; included files are relative to it.
        junction_resolver: finds ``junction.bst:file`` includes.
        on_included: called on each included file's mapping before its own
            includes are processed (the option pool's conditionals, for
            element files, as BuildStream does); None to leave them.
    """

    def __init__(
        self,
        project_dir: Path,
        *,
        junction_resolver: JunctionIncludeResolver = refuse_junction_includes,
        on_included: Callable[[MappingNode], None] | None = None,
    ) -> None:
        self.project_dir = project_dir
        self.junction_resolver = junction_resolver
        self.on_included = on_included
        self._cache: dict[Path, MappingNode] = {}

    def process(self, node: MappingNode, chain: tuple[str, ...] = ()) -> None:
        """Apply every ``(@)`` in ``node`` and below, in place.

        Args:
            node: a file's mapping (already through its conditionals, if any).
            chain: the files being included, outermost first (for cycles).

        Raises:
            LoadError: a missing or unreadable included file (at the ``(@)``
                line), an include cycle (naming the chain), bad YAML in an
                included file, an ``(@)`` that is not a file name or a list of them.
        """
        includes_node = node.entries.get("(@)")
        if includes_node is not None:
            includes = self._include_names(includes_node)
            del node.entries["(@)"]
            node.key_marks.pop("(@)", None)
            # In reverse, each under the last: the later include wins.
            for include in reversed(includes):
                path, display = self._resolve(include)
                if display in chain:
                    cycle = " -> ".join([*chain, display])
                    raise include.error(f"include cycle: {cycle}")
                included = clone_mapping(self._read(path, display, include), node.path)
                if self.on_included is not None:
                    self.on_included(included)
                self.process(included, (*chain, display))
                compose_under(included, node)
        for value in node.entries.values():
            self._process_value(value, chain)

    def _process_value(self, value: Node, chain: tuple[str, ...]) -> None:
        if isinstance(value, MappingNode):
            self.process(value, chain)
        elif isinstance(value, SequenceNode):
            for item in value.items:
                self._process_value(item, chain)

    def _include_names(self, node: Node) -> list[ScalarNode]:
        if isinstance(node, ScalarNode) and node.value is not None:
            return [node]
        if isinstance(node, SequenceNode) and all(
            isinstance(item, ScalarNode) and item.value is not None for item in node.items
        ):
            return [item for item in node.items if isinstance(item, ScalarNode)]
        raise node.error("(@) takes a file name or a list of file names")

    def _resolve(self, include: ScalarNode) -> tuple[Path, str]:
        name = include.as_str()
        if ":" in name:
            junction, file = name.rsplit(":", 1)
            return self.junction_resolver(junction, file, include)
        if not name or name.startswith("/") or "\0" in name:
            raise include.error(f"include {name!r} must be a path relative to the project folder")
        path = (self.project_dir / name).resolve()
        try:
            display = path.relative_to(self.project_dir).as_posix()
        except ValueError:
            raise include.error(f"include {name!r} is outside the project folder") from None
        if path.is_dir():
            raise include.error(f"include {name!r} is a folder, not a file")
        if not path.is_file():
            raise include.error(f"included file {name!r} not found")
        return path, display

    def _read(self, path: Path, display: str, include: ScalarNode) -> MappingNode:
        cached = self._cache.get(path)
        if cached is None:
            try:
                cached = load_yaml(path, display)
            except LoadError as exc:
                # Where the file was included from, then what is wrong in it.
                raise include.error(f"in included file: {exc}") from exc
            self._cache[path] = cached
        return cached


# --- composing one value -----------------------------------------------------------


def _compose_value(
    key: str, value: Node, target: MappingNode, key_mark: Mark, share: bool = False
) -> None:
    existing = target.entries.get(key)
    path = target.child_path(key)
    if isinstance(value, ScalarNode):
        if existing is not None and not isinstance(existing, ScalarNode):
            raise _compose_error(
                value, path, f"cannot replace {_described(existing)} with {value.describe()}"
            )
        _put(
            target, key, value if share and value.path == path else _clone_at(value, path), key_mark
        )
    elif isinstance(value, SequenceNode):
        if existing is not None and not (
            isinstance(existing, SequenceNode) or is_list_directives(existing)
        ):
            raise _compose_error(value, path, f"cannot replace {_described(existing)} with a list")
        if key == "(?)" and isinstance(existing, SequenceNode):
            # Conditionals meeting conditionals: keep both, in order, to be
            # evaluated later (as BuildStream).
            existing.items.extend(clone(item) for item in value.items)
            _renumber(existing)
        elif share and value.path == path:
            _put(target, key, value, key_mark)
        else:
            _put(target, key, _clone_at(value, path), key_mark)
    else:
        assert isinstance(value, MappingNode)
        if is_list_directives(value):
            if existing is None:
                _put(target, key, clone(value, path), key_mark)
            elif isinstance(existing, SequenceNode):
                apply_list_directives(value, existing)
            elif is_list_directives(existing):
                assert isinstance(existing, MappingNode)
                _merge_directives(value, existing)
            else:
                raise _compose_error(
                    value, path, f"cannot apply list directives to {_described(existing)}"
                )
            return
        if existing is None:
            existing = MappingNode(mark=value.mark, path=path)
            _put(target, key, existing, key_mark)
        elif not isinstance(existing, MappingNode):
            message = f"cannot replace {_described(existing)} with a mapping"
            raise _compose_error(value, path, message)
        compose_onto(existing, value)


def _merge_directives(overlay: MappingNode, target: MappingNode) -> None:
    """Two directive mappings meet: merge them as BuildStream does."""
    clobber, prefix, suffix = (_directive_list(overlay, key) for key in LIST_DIRECTIVES)
    if clobber is not None:
        # The overlay replaces the list, so the target's prepends and appends
        # no longer apply (BuildStream empties them).
        for key, given in (("(=)", clobber), ("(<)", prefix), ("(>)", suffix)):
            if given is not None:
                _put(target, key, clone(given, target.child_path(key)), overlay.key_marks[key])
            else:
                old = target.entries.get(key)
                if isinstance(old, SequenceNode):
                    old.items.clear()
        return
    if prefix is not None:
        old = _directive_list(target, "(<)")
        if old is None:
            _put(target, "(<)", clone(prefix, target.child_path("(<)")), overlay.key_marks["(<)"])
        else:
            old.items[:0] = [clone(item) for item in prefix.items]
            _renumber(old)
    if suffix is not None:
        old = _directive_list(target, "(>)")
        if old is None:
            _put(target, "(>)", clone(suffix, target.child_path("(>)")), overlay.key_marks["(>)"])
        else:
            old.items.extend(clone(item) for item in suffix.items)
            _renumber(old)


def _directive_list(node: MappingNode, key: str) -> SequenceNode | None:
    value = node.entries.get(key)
    if value is None:
        return None
    if not isinstance(value, SequenceNode):
        raise value.error(f"{key} takes a list, got {value.describe()}")
    return value


def _clone_at(node: Node, path: str) -> Node:
    """``clone(node, path)``. A node already at ``path`` (the usual case: an
    element's values composed onto its kind's defaults at the same field) is
    copied as it is: every node keeps its children's paths derived from its
    own (loading, cloning and directives all do), so re-deriving them would
    give the same strings."""
    return _copy(node) if node.path == path else clone(node, path)


def _put(target: MappingNode, key: str, value: Node, key_mark: Mark) -> None:
    target.entries[key] = value
    target.key_marks[key] = key_mark


def _renumber(sequence: SequenceNode) -> None:
    """Items moved by a directive get their new index in their field path."""
    for index, item in enumerate(sequence.items):
        _reroot(item, f"{sequence.path}[{index}]")


def _reroot(node: Node, path: str) -> None:
    node.path = path
    if isinstance(node, SequenceNode):
        for index, item in enumerate(node.items):
            _reroot(item, f"{path}[{index}]")
    elif isinstance(node, MappingNode):
        for key, value in node.entries.items():
            _reroot(value, node.child_path(key))


def _described(node: Node) -> str:
    return f"{node.describe()} (written at {node.mark})"


def _compose_error(node: Node, path: str, message: str) -> LoadError:
    return LoadError(message, file=node.mark.file, line=node.mark.line, field=path)
