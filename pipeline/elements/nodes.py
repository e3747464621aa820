"""YAML files as trees of nodes that remember their file, line and field path.

Plain YAML only, read as BuildStream reads it: every scalar is kept as the
text written (``1321009871`` and ``yes`` stay strings; BuildStream converts on
use), a null is ``None``. Refused, each with the file and line: anchors and
aliases (BuildStream refuses them too), tags outside the YAML core schema,
``<<`` merge keys, duplicate keys and non-scalar keys. BuildStream's
composition directives (``(@)`` includes, ``(?)`` conditionals, ``(!)``
assertions, ``(>)``, ``(<)``, ``(=)`` list composition) are read as ordinary
keys; :mod:`pipeline.elements.composition` and
:mod:`pipeline.elements.options` apply them.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

import pipeline
from pipeline.elements.errors import LoadError

__all__ = ["MappingNode", "Mark", "Node", "ScalarNode", "SequenceNode", "load_yaml"]

_CORE = "tag:yaml.org,2002:"
_SCALAR_TAGS = {f"{_CORE}{t}" for t in ("str", "int", "float", "bool", "null", "timestamp")}


@dataclass(frozen=True, slots=True)
class Mark:
    """A place in a file: the file relative to the project folder and a 1-based line."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(slots=True)
class Node:
    """A YAML value with where it was written and its field path (``""`` = the document).

    Abstract: only its subclasses are made. Not an ``abc.ABC``: ``isinstance``
    on an ABC's subclasses goes through ``ABCMeta`` (several times slower),
    and the loader asks it a million times on a large project."""

    mark: Mark
    path: str

    def error(self, message: str, *, field: str | None = None) -> LoadError:
        """A :class:`LoadError` at this node (or at ``field`` if given)."""
        return LoadError(
            message,
            file=self.mark.file,
            line=self.mark.line,
            field=self.path if field is None else field,
        )

    # What kind of value this is, for messages (a scalar says whether it is null).
    description: ClassVar[str] = "a value"

    def describe(self) -> str:
        """What kind of value this is, for messages."""
        return self.description


@dataclass(slots=True)
class ScalarNode(Node):
    """A string (or a number or boolean, kept as its text); ``None`` for null."""

    value: str | None

    def describe(self) -> str:
        return "null" if self.value is None else "a string"

    def as_str(self) -> str:
        """The string, or a LoadError when it is null."""
        if self.value is None:
            raise self.error("expected a string, got null")
        return self.value


@dataclass(slots=True)
class SequenceNode(Node):
    """A list."""

    items: list[Node] = field(default_factory=list)

    description: ClassVar[str] = "a list"


@dataclass(slots=True)
class MappingNode(Node):
    """A mapping with string keys; ``key_marks`` holds where each key was written."""

    entries: dict[str, Node] = field(default_factory=dict)
    key_marks: dict[str, Mark] = field(default_factory=dict)
    plain: bool = field(default=False, compare=False, repr=False)
    """True only on a file's top mapping as :func:`load_yaml` returns it, when
    no key anywhere in the file is a directive (``(@)``, ``(?)``, ``(!)``,
    ``(=)``, ``(<)``, ``(>)``): the loader then skips walking the file for
    them. Copies and changed nodes say False (unknown)."""

    description: ClassVar[str] = "a mapping"

    def child_path(self, key: str) -> str:
        """The field path of ``key`` in this mapping."""
        return f"{self.path}.{key}" if self.path else key

    def key_error(self, key: str, message: str) -> LoadError:
        """A LoadError at the line where ``key`` was written."""
        mark = self.key_marks.get(key, self.mark)
        return LoadError(message, file=mark.file, line=mark.line, field=self.child_path(key))

    def validate_keys(self, allowed: Collection[str], *, unsupported: Collection[str] = ()) -> None:
        """Refuse keys outside ``allowed``; ``unsupported`` keys get a kinder message.

        Raises:
            LoadError: at the first offending key, in file order.
        """
        for key in self.entries:
            if key in allowed:
                continue
            if key in unsupported:
                raise self.key_error(key, "not supported by remex")
            where = f" in {self.path}" if self.path else ""
            raise self.key_error(
                key, f"unknown key{where} (expected one of: {', '.join(sorted(allowed))})"
            )

    def get(self, key: str) -> Node | None:
        """The node under ``key``, or None."""
        return self.entries.get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def get_scalar(self, key: str) -> ScalarNode | None:
        """The scalar under ``key``; None when absent. A null is returned as is."""
        node = self.entries.get(key)
        if node is None:
            return None
        if not isinstance(node, ScalarNode):
            raise node.error(f"expected a string, got {node.describe()}")
        return node

    def get_str(self, key: str, default: str | None = None) -> str | None:
        """The string under ``key``; ``default`` when absent or null."""
        node = self.get_scalar(key)
        if node is None or node.value is None:
            return default
        return node.value

    def require_str(self, key: str) -> ScalarNode:
        """The non-null scalar under ``key``; a LoadError naming the key when missing."""
        node = self.get_scalar(key)
        if node is None:
            raise self.error(f"missing required key {key!r}", field=self.child_path(key))
        node.as_str()
        return node

    def get_mapping(self, key: str) -> MappingNode | None:
        """The mapping under ``key``; None when absent or null."""
        node = self.entries.get(key)
        if node is None or (isinstance(node, ScalarNode) and node.value is None):
            return None
        if not isinstance(node, MappingNode):
            raise node.error(f"expected a mapping, got {node.describe()}")
        return node

    def get_sequence(self, key: str) -> SequenceNode | None:
        """The list under ``key``; None when absent or null."""
        node = self.entries.get(key)
        if node is None or (isinstance(node, ScalarNode) and node.value is None):
            return None
        if not isinstance(node, SequenceNode):
            raise node.error(f"expected a list, got {node.describe()}")
        return node

    def get_str_list(self, key: str) -> list[ScalarNode] | None:
        """The list of strings under ``key``; None when absent or null."""
        node = self.entries.get(key)
        if node is None or (isinstance(node, ScalarNode) and node.value is None):
            return None
        if not isinstance(node, SequenceNode):
            raise node.error("expected a list of strings")
        # A loop, not all() over a generator: asked several times per element.
        for item in node.items:
            if not isinstance(item, ScalarNode) or item.value is None:
                raise node.error("expected a list of strings")
        return list(node.items)  # type: ignore[arg-type]  # (all scalars: checked)

    def get_str_mapping(self, key: str) -> dict[str, ScalarNode]:
        """A mapping of string values (variables, environment); empty when absent."""
        mapping = self.get_mapping(key)
        if mapping is None:
            return {}
        result: dict[str, ScalarNode] = {}
        for name, node in mapping.entries.items():
            if not isinstance(node, ScalarNode) or node.value is None:
                raise node.error(f"expected a string, got {node.describe()}")
            result[name] = node
        return result


def load_yaml(path: Path | str, display: str) -> MappingNode:
    """Read a YAML file whose document is a mapping (an empty file is an empty mapping).

    The mapping's :attr:`MappingNode.plain` says whether the file holds no
    directive key.

    Args:
        path: the file to read.
        display: its name in messages (relative to the project folder).

    Raises:
        LoadError: the file cannot be read, is not UTF-8, is malformed YAML, uses
            a refused construct, or is not a mapping; the message names the line.
    """
    try:
        with open(path, "rb") as file:
            data = file.read()
            if _READS.get() is not None:
                note_read(os.fspath(path), os.fstat(file.fileno()))
    except OSError as exc:
        raise LoadError(f"cannot read file: {exc.strerror}", file=display) from exc
    cache = parsed_cache_dir()
    if cache is None:
        return _parse(data, display)
    digest = hashlib.blake2b(
        data, digest_size=20, person=_CACHE_FORMAT, key=_cache_version()
    ).hexdigest()
    # Strings, not Paths: this runs for every file of the project.
    entry = os.path.join(cache, digest[:2], digest[2:])
    node = _read_entry(entry, display)
    if node is None:
        node = _parse(data, display)
        _write_entry(entry, node)
    return node


def _parse(data: bytes, display: str) -> MappingNode:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = data[: exc.start].count(b"\n") + 1
        raise LoadError("not valid UTF-8", file=display, line=bad_line) from None
    try:
        root = yaml.compose(text, Loader=_loader_for(text))
    except _RefusedError as exc:
        raise LoadError(exc.message, file=display, line=exc.line) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        what = exc.problem or "parse error"
        if exc.context:
            what = f"{what} ({exc.context})"
        raise LoadError(f"malformed YAML: {what}", file=display, line=line) from None
    except yaml.reader.ReaderError as exc:
        # A character YAML refuses (a NUL byte, a binary file): PyYAML gives an
        # offset into the text, not a line.
        line = text[: exc.position].count("\n") + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise LoadError(
            f"malformed YAML: character #x{code:04x} is not allowed (a binary file?)",
            file=display,
            line=line,
        ) from None
    except yaml.YAMLError as exc:
        raise LoadError(f"malformed YAML: {exc}", file=display) from None
    if root is None:
        return MappingNode(mark=Mark(display, 1), path="")
    node = _convert(root, display, "")
    if not isinstance(node, MappingNode):
        raise node.error(f"expected a mapping at the top of the file, got {node.describe()}")
    node.plain = not _has_directive_key(node)
    return node


def _has_directive_key(node: Node) -> bool:
    """Whether a key anywhere in ``node``'s tree starts with ``(`` (a directive
    or a key the loader will refuse: either way, the tree must be walked)."""
    if type(node) is MappingNode:
        for key, value in node.entries.items():
            if key[:1] == "(" or _has_directive_key(value):
                return True
    elif type(node) is SequenceNode:
        return any(_has_directive_key(item) for item in node.items)
    return False


# --- what a load read ------------------------------------------------------------
#
# A resolved plan kept between loads (pipeline.elements.resolved) is valid
# only while every file its load read is unchanged: while one is recorded,
# every file read through load_yaml or FolderCache (and the plugin files
# plugins.py reads) is noted with its stat, or None when it was missing.

FileStat = list[int] | None
"""A file as :func:`file_stat` knows it: size, mtime, ctime and inode (ns), or None."""

_READS: contextvars.ContextVar[dict[str, FileStat] | None] = contextvars.ContextVar(
    "remex_reads", default=None
)


def file_stat(stat: os.stat_result | None) -> FileStat:
    """What identifies a file's content while it is unchanged (as git's index)."""
    if stat is None:
        return None
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def note_read(path: str, stat: os.stat_result | None) -> None:
    """Note that the load being recorded read ``path`` (``stat`` None: it was
    looked for and missing). Does nothing when no load is recorded."""
    reads = _READS.get()
    if reads is not None:
        reads[path] = file_stat(stat)


def reading() -> bool:
    """Whether a load is being recorded (callers skip a stat otherwise)."""
    return _READS.get() is not None


@contextlib.contextmanager
def recording_reads() -> Iterator[dict[str, FileStat]]:
    """Record the files read inside the block: path -> :func:`file_stat`."""
    reads: dict[str, FileStat] = {}
    token = _READS.set(reads)
    try:
        yield reads
    finally:
        _READS.reset(token)


# --- the parsed-file cache -----------------------------------------------------
#
# Parsing is most of the cost of loading a large project, and most of its
# files do not change between runs: each parsed file is kept as JSON (never
# pickle: the folder is only as trusted as the user's home) under the BLAKE2b
# of its bytes, so an edit is a new entry and no entry is ever stale. The
# display name is not part of an entry (the same text at two places is one
# entry; marks get the name of the file being loaded). An entry holds a
# checksum of its body: a torn or corrupt entry is a miss, parsed again and
# rewritten. Writers write a private temporary file and rename it into place,
# so concurrent loads never see half an entry.

# Changes with the entry layout or with what parsing produces (new refusals,
# stripping rules): old entries are then simply never found.
_CACHE_FORMAT = b"remex-parsed-1"
# An entry: this header, the hex BLAKE2b of the body, a newline, the body.
_ENTRY_HEADER = b"remex-parsed 1 "


def _cache_version() -> bytes:
    """The remex version, part of every entry's name: another remex (which
    may parse differently) never reads this one's entries."""
    return pipeline.__version__.encode()[:64]


def parsed_cache_dir() -> Path | None:
    """Where parsed files are cached: ``$REMEX_PARSED_CACHE`` if set (``off``
    or empty: no cache), else ``$XDG_CACHE_HOME/remex/parsed``
    (``~/.cache/remex/parsed``)."""
    return _cache_dir(os.environ.get("REMEX_PARSED_CACHE"), os.environ.get("XDG_CACHE_HOME"))


@functools.lru_cache(maxsize=8)
def _cache_dir(setting: str | None, cache_home: str | None) -> Path | None:
    # Asked for each file: memoized by the environment it depends on.
    if setting is not None:
        return None if setting in ("", "off") else Path(setting)
    home = cache_home or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(home) / "remex" / "parsed"


def _checked_body(raw: bytes, header: bytes) -> bytes | None:
    """The body of a cache file (``header``, the body's hex BLAKE2b, a newline,
    the body); None when it is torn or damaged."""
    newline = raw.find(b"\n")
    if newline < 0 or not raw.startswith(header):
        return None
    body = raw[newline + 1 :]
    checksum = hashlib.blake2b(body, digest_size=16).hexdigest().encode()
    if raw[len(header) : newline] != checksum:
        return None
    return body


def _read_entry(entry: str, display: str) -> MappingNode | None:
    try:
        with open(entry, "rb") as file:
            raw = file.read()
    except OSError:
        return None
    body = _checked_body(raw, _ENTRY_HEADER)
    if body is None:
        return None
    try:
        node = _decode(json.loads(body), display, "", {})
    except (ValueError, TypeError, IndexError, KeyError, RecursionError):
        return None
    if not isinstance(node, MappingNode):
        return None
    # A key starting with "(" is written '"(' by json.dumps (which never
    # escapes "("); a string value may be too, which only costs a walk.
    node.plain = b'"(' not in body
    return node


def _write_entry(entry: str, node: MappingNode) -> None:
    body = json.dumps(_encode(node), ensure_ascii=False, separators=(",", ":")).encode()
    _write_file(entry, _ENTRY_HEADER, body)


def _write_file(entry: str, header: bytes, body: bytes) -> None:
    # Best effort: a cache that cannot be written only makes the next load slower.
    checksum = hashlib.blake2b(body, digest_size=16).hexdigest().encode()
    try:
        folder = os.path.dirname(entry)
        os.makedirs(folder, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(header + checksum + b"\n" + body)
            os.replace(temporary, entry)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    except OSError:
        pass


# Encoded nodes (JSON arrays): [0, line, value] a scalar (value a string or
# null); [1, line, [items]] a list; [2, line, [key, value, key, value ...]] a
# mapping, each value marked at its key's line (as _convert marks them), so
# key marks need no room of their own. Field paths are derived again.


def _encode(node: Node) -> list[Any]:
    if isinstance(node, ScalarNode):
        return [0, node.mark.line, node.value]
    if isinstance(node, SequenceNode):
        return [1, node.mark.line, [_encode(item) for item in node.items]]
    assert isinstance(node, MappingNode)
    flat: list[Any] = []
    for key, value in node.entries.items():
        flat.append(key)
        flat.append(_encode(value))
    return [2, node.mark.line, flat]


def _decode(data: list[Any], file: str, path: str, marks: dict[int, Mark]) -> Node:
    tag, line, body = data
    mark = _mark(line, file, marks)
    if tag == 0:
        if body is not None and type(body) is not str:
            raise TypeError("a scalar must be a string or null")
        return ScalarNode(mark, path, body)
    if tag == 1:
        items: list[Node] = []
        for i, item in enumerate(body):
            items.append(_decode_child(item, file, f"{path}[{i}]", marks))
        return SequenceNode(mark, path, items)
    if tag != 2:
        raise ValueError("unknown node tag")
    entries: dict[str, Node] = {}
    key_marks: dict[str, Mark] = {}
    prefix = f"{path}." if path else ""
    for index in range(0, len(body), 2):
        key = body[index]
        if type(key) is not str or key in entries:
            raise TypeError("a key must be a new string")
        child = _decode_child(body[index + 1], file, prefix + key, marks)
        entries[key] = child
        key_marks[key] = child.mark
    return MappingNode(mark, path, entries, key_marks)


def _decode_child(data: list[Any], file: str, path: str, marks: dict[int, Mark]) -> Node:
    # Most nodes are scalars: decoded here without a second call.
    if data[0] == 0:
        _, line, body = data
        mark = marks.get(line)
        if mark is None:
            if type(line) is not int:
                raise TypeError("a line must be a number")
            mark = marks[line] = Mark(file, line)
        if body is not None and type(body) is not str:
            raise TypeError("a scalar must be a string or null")
        return ScalarNode(mark, path, body)
    return _decode(data, file, path, marks)


def _mark(line: int, file: str, marks: dict[int, Mark]) -> Mark:
    # Marks are immutable: one per line, shared by every node written on it.
    mark = marks.get(line)
    if mark is None:
        if type(line) is not int:
            raise TypeError("a line must be a number")
        mark = marks[line] = Mark(file, line)
    return mark


# --- a folder's parsed files, by stat -------------------------------------------
#
# Loading a large project still reads every file twice (the file, to hash it,
# then its entry). FolderCache keeps, in one file per folder (a project's
# element-path), each file's stat (size, mtime, ctime, inode) beside its
# encoded nodes: a file whose stat is unchanged is not read at all, and the
# folder's entries come in one read. Only "settled" stats are kept (the file
# last changed more than a few seconds before it was looked at), so a file
# rewritten within the file system's timestamp granularity, with the same
# size, is never mistaken for the one kept: the same rule as git's index.
# Any other file goes through load_yaml (and its per-file entry) as before.

_FOLDER_HEADER = b"remex-parsed-folder 1 "
# How long after its last change a file's stat is trusted to identify it.
SETTLED_NS = 3_000_000_000
# Entries of files not read by a load are kept, up to this many in all.
_FOLDER_MAX_ENTRIES = 200_000


class FolderCache:
    """The parsed files of one folder as last loaded, known by their stat.

    Made by :meth:`open` (None when the parsed-file cache is off); read with
    :meth:`load`, written back once with :meth:`save`. Not thread-safe (one
    per project load)."""

    def __init__(self, file: str, entries: dict[str, list[Any]], now_ns: int) -> None:
        self.file = file
        self._entries = entries
        self._settled_before = now_ns - SETTLED_NS
        self._changed = False

    @classmethod
    def open(cls, folder: str) -> FolderCache | None:
        """The cache of ``folder`` (empty when there is none or it is damaged)."""
        cache = parsed_cache_dir()
        if cache is None:
            return None
        name = hashlib.blake2b(
            os.fsencode(folder), digest_size=20, person=_CACHE_FORMAT, key=_cache_version()
        ).hexdigest()
        file = os.path.join(cache, "folders", name)
        return cls(file, _read_folder(file), time.time_ns())

    def load(self, path: str, display: str, stat: os.stat_result | None = None) -> MappingNode:
        """:func:`load_yaml` of ``path``, without reading it when its stat
        (``stat``, if the caller has it) is the one kept with its nodes.

        Raises:
            LoadError: as :func:`load_yaml`.
        """
        if stat is None:
            try:
                stat = os.stat(path)
            except OSError:
                return load_yaml(path, display)  # which says why it cannot be read
        key = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
        reads = _READS.get()
        if reads is not None:
            reads[path] = key  # (file_stat(stat): the same list, not changed by anyone)
        entry = self._entries.get(path)
        if entry is not None and entry[:4] == key:
            try:
                node = _decode(entry[5], display, "", {})
            except (ValueError, TypeError, IndexError, KeyError, RecursionError):
                node = None
            if isinstance(node, MappingNode):
                node.plain = entry[4] is True
                return node
        node = load_yaml(path, display)
        if max(stat.st_mtime_ns, stat.st_ctime_ns) < self._settled_before:
            # Encoded now: the loader changes the nodes it is given.
            self._entries[path] = [*key, node.plain, _encode(node)]
            self._changed = True
        elif entry is not None:
            del self._entries[path]
            self._changed = True
        return node

    def save(self) -> None:
        """Write the entries back if any changed (best effort, atomically)."""
        if not self._changed:
            return
        self._changed = False
        entries = self._entries
        if len(entries) > _FOLDER_MAX_ENTRIES:
            entries = dict(list(entries.items())[-_FOLDER_MAX_ENTRIES:])
        body = json.dumps(entries, ensure_ascii=False, separators=(",", ":")).encode()
        _write_file(self.file, _FOLDER_HEADER, body)


def _read_folder(file: str) -> dict[str, list[Any]]:
    try:
        with open(file, "rb") as stream:
            raw = stream.read()
    except OSError:
        return {}
    body = _checked_body(raw, _FOLDER_HEADER)
    if body is None:
        return {}
    try:
        entries = json.loads(body)
    except ValueError:
        return {}
    if not isinstance(entries, dict):
        return {}
    # Entries of the wrong shape are dropped here; a bad node is a miss in load.
    # (Spelt out, not all() over a generator: once per file of the folder.)
    return {
        path: entry
        for path, entry in entries.items()
        if type(entry) is list
        and len(entry) == 6
        and type(entry[0]) is int
        and type(entry[1]) is int
        and type(entry[2]) is int
        and type(entry[3]) is int
        and type(entry[4]) is bool
    }


class _RefusedError(Exception):
    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


# Where an anchor (&a) or an alias (*a) could start a node: after a line's
# indentation, a space, or a flow indicator. Also matches some plain text
# ("a && b", "- *.h" is an alias anyway): those files take the slow path.
_MAYBE_ANCHOR = re.compile(r"(?:^|[\s\[\{,])[&*]\S", re.MULTILINE)


def _loader_for(text: str) -> type[Any]:
    """libyaml's loader (several times faster) when the text can hold no
    anchor nor alias; else the Python loader, which sees and refuses them
    (libyaml resolves aliases before we could)."""
    if _CLoader is not None and not _MAYBE_ANCHOR.search(text):
        return _CLoader
    return _Loader


_CLoader: type[Any] | None = getattr(yaml, "CSafeLoader", None)


# Deeper nesting is refused: PyYAML composes (and _convert walks) recursively,
# and a file of 500 '[' would otherwise end in a RecursionError. No real
# element comes near this.
MAX_NESTING = 100


class _Loader(yaml.SafeLoader):  # type: ignore[misc]
    """SafeLoader refusing anchors and aliases while composing (where we see
    them), and nesting deeper than :data:`MAX_NESTING`."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _RefusedError(
                "YAML anchors and aliases are not supported", event.start_mark.line + 1
            )
        if self._depth >= MAX_NESTING:
            raise _RefusedError(
                f"YAML nested more than {MAX_NESTING} levels deep", event.start_mark.line + 1
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _convert(node: Any, file: str, path: str, mark: Mark | None = None, depth: int = 0) -> Node:
    # A mapping's value is marked at its key's line: "field: expected ..." then
    # points at the field as written, even when the value starts a line later.
    if mark is None:
        mark = Mark(file, node.start_mark.line + 1)
    if isinstance(node, yaml.ScalarNode):
        if node.tag not in _SCALAR_TAGS:
            raise _refused(f"unsupported YAML tag {node.tag!r}", mark, path)
        # BuildStream strips every string it loads (a `|` block loses its newline).
        value = None if node.tag == f"{_CORE}null" else str(node.value).strip()
        return ScalarNode(mark=mark, path=path, value=value)
    if isinstance(node, yaml.SequenceNode):
        if node.tag != f"{_CORE}seq":
            raise _refused(f"unsupported YAML tag {node.tag!r}", mark, path)
        _check_depth(node, file, depth)
        items = [
            _convert(item, file, f"{path}[{i}]", depth=depth + 1)
            for i, item in enumerate(node.value)
        ]
        return SequenceNode(mark=mark, path=path, items=items)
    if isinstance(node, yaml.MappingNode):
        _check_depth(node, file, depth)
        if node.tag != f"{_CORE}map":
            raise _refused(f"unsupported YAML tag {node.tag!r}", mark, path)
        result = MappingNode(mark=mark, path=path)
        for key_node, value_node in node.value:
            key_mark = Mark(file, key_node.start_mark.line + 1)
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == f"{_CORE}null":
                raise _refused("mapping keys must be strings", key_mark, path)
            if key_node.tag == f"{_CORE}merge":
                raise _refused("YAML merge keys (<<) are not supported", key_mark, path)
            key = str(key_node.value)
            child = result.child_path(key)
            if key in result.entries:
                raise _refused(f"duplicate key {key!r}", key_mark, child)
            result.entries[key] = _convert(value_node, file, child, key_mark, depth + 1)
            result.key_marks[key] = key_mark
        return result
    raise _refused(f"unsupported YAML node {type(node).__name__}", mark, path)


def _refused(message: str, mark: Mark, path: str) -> LoadError:
    return LoadError(message, file=mark.file, line=mark.line, field=path or None)


def _check_depth(node: Any, file: str, depth: int) -> None:
    """Refuse nesting past MAX_NESTING (libyaml composes it without complaint,
    and converting it would recurse too deep)."""
    if depth >= MAX_NESTING:
        raise LoadError(
            f"YAML nested more than {MAX_NESTING} levels deep",
            file=file,
            line=node.start_mark.line + 1,
        )
