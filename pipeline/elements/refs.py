"""Writing a source's new ``ref`` into its ``.bst`` file, touching nothing else.

``remex source track`` resolves refs; this module puts them in the element
file as text edits at the positions the YAML parser reports: an existing
``ref:`` has only its value replaced (its quoting style and any comment on the
line are kept), a missing one is added as a new line at the source's key
indentation right after the source's last line (or before the ``}`` of a flow
mapping). Every other byte of the file stays as it was.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.elements.errors import LoadError

__all__ = ["RefChange", "write_source_block", "write_source_ref"]


@dataclass(frozen=True)
class RefChange:
    """What :func:`write_source_ref` did.

    Attributes:
        old: the ref written before (None: there was none).
        new: the ref written now.
        line: the 1-based line the ref is on now.
    """

    old: str | None
    new: str
    line: int

    @property
    def changed(self) -> bool:
        return self.old != self.new


def write_source_ref(path: Path, display: str, index: int, ref: str) -> RefChange:
    """Set ``sources[index].ref`` of the element file ``path`` to ``ref``.

    The file is replaced atomically, and only when the ref changes.

    Args:
        display: the file as shown in messages.

    Raises:
        LoadError: the file cannot be read or parsed, or its ``sources[index]``
            is not a mapping written in it; names the file, line and field.
    """
    field = f"sources[{index}]"
    text, source = _read_source(path, display, index)
    for key, value in source.value:
        if isinstance(key, yaml.ScalarNode) and key.value == "ref":
            if not isinstance(value, yaml.ScalarNode):
                raise LoadError("expected a string", file=display,
                                line=value.start_mark.line + 1, field=f"{field}.ref")  # fmt: skip
            old = value.value if value.tag != "tag:yaml.org,2002:null" else None
            if old == ref:
                return RefChange(old, ref, value.start_mark.line + 1)
            new_text = _scalar(ref, value.style)
            start, end = value.start_mark.index, value.end_mark.index
            if old is None and start == end:
                new_text = " " + new_text if text[start - 1 : start] == ":" else new_text
            _replace(path, text[:start] + new_text + text[end:])
            return RefChange(old, ref, value.start_mark.line + 1)
    if source.flow_style:
        close = source.end_mark.index - 1  # the "}"
        separator = ", " if source.value else ""
        insertion = f"{separator}ref: {_scalar(ref, None)}"
        _replace(path, text[:close].rstrip() + insertion + text[close:])
        return RefChange(None, ref, source.end_mark.line + 1)
    if not source.value:
        raise LoadError("the source is an empty mapping", file=display, field=field)
    column = source.value[0][0].start_mark.column
    text, at = _after(text, _last_mark(source))
    eol = "\r\n" if text[max(0, at - 2) : at] == "\r\n" else "\n"
    line = text.count("\n", 0, at) + 1
    _replace(path, text[:at] + " " * column + f"ref: {_scalar(ref, None)}{eol}" + text[at:])
    return RefChange(None, ref, line)


def write_source_block(path: Path, display: str, index: int, key: str, value: Any) -> bool:
    """Set ``sources[index].KEY`` to ``value`` (a list or mapping, written in block
    style at the source's indentation); an empty value removes the key, as bst
    does with git's ``tags``. Returns whether the file changed.

    Raises:
        LoadError: as :func:`write_source_ref`, or the source is a flow mapping.
    """
    field = f"sources[{index}]"
    text, source = _read_source(path, display, index)
    existing = next(
        ((k, v) for k, v in source.value if isinstance(k, yaml.ScalarNode) and k.value == key),
        None,
    )
    if existing is not None and _python(existing[1]) == (value or None):
        return False
    if existing is None and not value:
        return False
    if source.flow_style or not source.value:
        raise LoadError(f"cannot write {key!r} into this source's mapping", file=display,
                        field=field)  # fmt: skip
    column = source.value[0][0].start_mark.column
    eol = "\r\n" if "\r\n" in text else "\n"
    rendered = yaml.safe_dump({key: value}, default_flow_style=False, sort_keys=False)
    lines = [(" " * column if i else "") + line for i, line in enumerate(rendered.splitlines())]
    block = eol.join(lines) + eol if value else ""
    if existing is not None:
        start = existing[0].start_mark.index
        text, end = _after(text, _last_mark(existing[1]))
        if not value:  # drop the whole line(s), indentation included
            start = text.rfind("\n", 0, start) + 1
        _replace(path, text[:start] + block + text[end:])
        return True
    text, at = _after(text, _last_mark(source))
    _replace(path, text[:at] + " " * column + block + text[at:])
    return True


def _python(node: yaml.Node) -> Any:
    return yaml.SafeLoader("").construct_object(node, deep=True)


def _read_source(path: Path, display: str, index: int) -> tuple[str, yaml.MappingNode]:
    try:
        text = path.read_bytes().decode("utf-8")  # newlines kept as they are
    except (OSError, UnicodeDecodeError) as exc:
        raise LoadError(f"cannot read the element file: {exc}", file=display) from exc
    try:
        document = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise LoadError(f"cannot parse the element file: {exc}", file=display) from exc
    source = _source_node(document, index)
    if source is None:
        raise LoadError(
            "the source is not written in this file (an include or a project default?), "
            "so its ref cannot be written here",
            file=display,
            field=f"sources[{index}]",
        )
    return text, source


def _after(text: str, end: yaml.Mark) -> tuple[str, int]:
    """Where the line after the one ``end`` is on starts (a newline is added
    to a file that ends without one)."""
    if end.column == 0 and end.index > 0:
        return text, end.index  # a block scalar ends at the start of the next line
    newline = text.find("\n", end.index)
    if newline < 0:
        text += "\r\n" if "\r\n" in text else "\n"
        newline = len(text) - 1
    return text, newline + 1


def _source_node(document: yaml.Node | None, index: int) -> yaml.MappingNode | None:
    if not isinstance(document, yaml.MappingNode):
        return None
    for key, value in document.value:
        is_sources = isinstance(key, yaml.ScalarNode) and key.value == "sources"
        if is_sources and isinstance(value, yaml.SequenceNode) and index < len(value.value):
            item = value.value[index]
            return item if isinstance(item, yaml.MappingNode) else None
    return None


def _last_mark(node: yaml.Node) -> yaml.Mark:
    """Where a block node's content ends (its last scalar or flow collection)."""
    if isinstance(node, yaml.MappingNode) and not node.flow_style and node.value:
        return _last_mark(node.value[-1][1])
    if isinstance(node, yaml.SequenceNode) and not node.flow_style and node.value:
        return _last_mark(node.value[-1])
    return node.end_mark


def _scalar(ref: str, style: str | None) -> str:
    """``ref`` as YAML, in the old value's quoting style where it had one."""
    if style == "'":
        return "'" + ref.replace("'", "''") + "'"
    if style == '"':
        return '"' + ref.replace("\\", "\\\\").replace('"', '\\"') + '"'
    plain = yaml.safe_load(ref) if ref else None
    if isinstance(plain, str) and plain == ref and "#" not in ref and ": " not in ref:
        return ref
    return "'" + ref.replace("'", "''") + "'"


def _replace(path: Path, text: str) -> None:
    mode = path.stat().st_mode & 0o7777
    fd, scratch = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.chmod(scratch, mode)
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise
