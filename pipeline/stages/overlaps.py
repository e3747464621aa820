"""Overlaps and unstaged files, found and judged as BuildStream 2 finds and judges them.

BuildStream stages an element's dependencies one after the other; a file (or
symlink) of a later dependency that lands where an earlier one staged a file
*overlaps* it. Dependencies staged at the same location in one go form a
*session* (a BuildElement or compose stages all at ``/``; a script element
has one session per layout location, in sorted order). BuildStream's rules,
which this module follows:

- Within a session, the elements that overwrite a path (all but the
  bottom-most one) are checked against their own ``public: bst:
  overlap-whitelist`` (globs over the path relative to the session's location,
  written absolute: ``/usr/bin/*``). A path is reported ("[overlaps]
  Non-whitelisted overlaps detected") when one of them does not whitelist it.
- A file overwriting one staged by an *earlier session* is reported without
  looking at whitelists ("[overlaps] Overlaps detected").
- A file or symlink landing on a non-empty folder is not staged: the folder
  stays ("[unstaged-files]"). One landing on an empty folder replaces it,
  silently here (BuildStream reports it as an overlap and then trips over its
  own bookkeeping: an assertion error).
- A folder landing on a file or symlink is an error: BuildStream cannot stage
  it ("Cannot open ..., which is a 'symlink'") and the build fails.
- Identical files overlap like different ones: content is not compared.

With ``fatal-warnings: [overlaps]`` (or ``unstaged-files``) in project.conf,
such a warning fails the element (BuildStream raises it as an error). The
element's own kind never matters: the spec says what is staged where.
"""

from __future__ import annotations

import collections
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.cas import LocalCas
from pipeline.digest import Digest
from pipeline.elements.staging import glob_to_regex
from pipeline.stages.trees import read_directory

__all__ = [
    "OVERLAPS",
    "UNSTAGED_FILES",
    "ExternalOverlap",
    "Overlap",
    "StagedLayer",
    "StagingConflictError",
    "StagingReport",
    "StagingWarning",
    "analyse_staging",
    "whitelist_regex",
]

OVERLAPS = "overlaps"
"""BuildStream's warning token for overlapping files."""
UNSTAGED_FILES = "unstaged-files"
"""BuildStream's warning token for files not staged over non-empty folders."""


@dataclass(frozen=True)
class StagedLayer:
    """One dependency's files, as staged: at ``location`` ("" = ``/``)."""

    element: str
    location: str
    files: Digest
    whitelist: re.Pattern[str] | None = None
    """The element's overlap whitelist, as one regex over ``/``-rooted paths."""


@dataclass(frozen=True)
class Overlap:
    """A path several elements of one session staged, bottom-most element first."""

    path: str
    """Absolute path in the sandbox (``/usr/bin/tool``)."""
    elements: list[str]
    offenders: list[str]
    """The overwriting elements that do not whitelist the path (empty: whitelisted)."""


@dataclass(frozen=True)
class ExternalOverlap:
    """A path of an earlier session overwritten by an element of a later one."""

    path: str
    element: str
    overlapped: str
    overlapped_location: str


@dataclass(frozen=True)
class StagingWarning:
    """A warning as BuildStream words it: its token, a brief line and the detail."""

    token: str
    brief: str
    detail: str

    def text(self) -> str:
        """``[token]: brief`` then the detail, as BuildStream prints a warning."""
        return f"[{self.token}]: {self.brief}\n{self.detail}".rstrip()


@dataclass
class StagingReport:
    """What staging the dependencies did, as BuildStream would report it."""

    overlaps: list[Overlap] = field(default_factory=list)
    external: list[ExternalOverlap] = field(default_factory=list)
    unstaged: list[tuple[str, str]] = field(default_factory=list)
    """(element, absolute path) of each file not staged over a non-empty folder."""
    warnings: list[StagingWarning] = field(default_factory=list)

    def fatal(self, fatal_warnings: Sequence[str]) -> list[StagingWarning]:
        """The warnings that ``fatal-warnings`` turns into errors."""
        return [w for w in self.warnings if w.token in fatal_warnings]

    def to_state(self, shown: int) -> dict[str, Any]:
        """The report as the stage state's ``overlaps`` (small JSON; ``shown`` entries each)."""
        paths = sorted({o.path for o in self.overlaps} | {o.path for o in self.external})
        return {
            "count": len(paths),
            "paths": paths[:shown],
            "not_whitelisted": sum(1 for o in self.overlaps if o.offenders) + len(self.external),
            "details": [
                {"path": o.path, "elements": o.elements, "whitelisted": not o.offenders}
                for o in self.overlaps[:shown]
            ]
            + [
                {"path": o.path, "elements": [o.overlapped, o.element], "whitelisted": False}
                for o in self.external[:shown]
            ],
            "unstaged": [{"element": e, "path": p} for e, p in self.unstaged[:shown]],
            "warnings": [_truncated(w.text(), shown) for w in self.warnings],
        }


class StagingConflictError(Exception):
    """A folder would be staged where a file or symlink is: BuildStream fails there."""

    def __init__(self, element: str, path: str, kind: str, previous: str | None) -> None:
        by = f" staged by {previous}" if previous else ""
        super().__init__(
            f"cannot stage {element}'s folder {path}: it is a {kind}{by} "
            "(BuildStream does not stage a folder over a file or symlink)"
        )
        self.element = element
        self.path = path


def whitelist_regex(globs: Sequence[str]) -> re.Pattern[str] | None:
    """One regex for an element's ``overlap-whitelist`` globs (variables expanded)."""
    if not globs:
        return None
    return re.compile("|".join(f"(?:{glob_to_regex(glob).pattern})" for glob in globs))


def analyse_staging(cas: LocalCas, layers: Sequence[StagedLayer]) -> StagingReport:
    """Stage ``layers`` in order on an empty sandbox, in bookkeeping only.

    Consecutive layers at the same location form one session. The trees must
    be in ``cas``.

    Raises:
        StagingConflictError: a folder lands on a file or symlink.
    """
    sandbox = _Sandbox()
    report = StagingReport()
    sessions: list[_Session] = []
    start = 0
    while start < len(layers):
        end = start
        while end < len(layers) and layers[end].location == layers[start].location:
            end += 1
        session = _Session(layers[start].location)
        for layer in layers[start:end]:
            _stage(cas, sandbox, session, layer)
        _judge(session, sessions, report)
        sessions.append(session)
        start = end
    return report


# --- private -------------------------------------------------------------------


@dataclass
class _Session:
    location: str
    # relative path -> elements that staged it, bottom-most first (only overwritten paths)
    overlaps: dict[str, list[StagedLayer]] = field(default_factory=dict)
    # relative path -> the first layer of this session that wrote it
    written: dict[str, StagedLayer] = field(default_factory=dict)
    ignored: list[tuple[str, str]] = field(default_factory=list)

    def absolute(self, relative: str) -> str:
        return "/" + "/".join(p for p in (self.location, relative) if p)


@dataclass
class _Sandbox:
    # absolute path (no leading "/") -> "dir" | "file" | "symlink"
    kinds: dict[str, str] = field(default_factory=lambda: {"": "dir"})
    # folder -> number of entries in it
    entries: dict[str, int] = field(default_factory=dict)
    # file or symlink path -> the layer and session that staged it
    owner: dict[str, tuple[StagedLayer, _Session]] = field(default_factory=dict)

    def add(self, path: str, kind: str) -> None:
        self.kinds[path] = kind
        parent = path.rpartition("/")[0]
        self.entries[parent] = self.entries.get(parent, 0) + 1

    def remove(self, path: str) -> None:
        del self.kinds[path]
        self.owner.pop(path, None)
        parent = path.rpartition("/")[0]
        self.entries[parent] -= 1


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def _ensure_folder(sandbox: _Sandbox, layer: StagedLayer, path: str) -> None:
    """Create the folders down to the session's location, as BuildStream opens it."""
    current = ""
    for part in path.split("/") if path else []:
        current = _join(current, part)
        kind = sandbox.kinds.get(current)
        if kind is None:
            sandbox.add(current, "dir")
        elif kind != "dir":
            previous = sandbox.owner.get(current)
            raise StagingConflictError(
                layer.element, "/" + current, kind, previous[0].element if previous else None
            )


# The entries of the trees walked so far, by root digest (LRU): each element
# stages its dependencies' trees (the same sysroot, again and again), and a
# tree's entries never change. Bounded by the number of entries held.
_WALKS: collections.OrderedDict[tuple[str, int], tuple[tuple[str, str], ...]] = (
    collections.OrderedDict()
)
_WALKS_MAX_ENTRIES = 1 << 18
_walks_held = 0
_walks_lock = threading.Lock()


def _entries(cas: LocalCas, digest: Digest) -> tuple[tuple[str, str], ...]:
    """(relative path, kind) of every entry of the tree (see :func:`_walk`)."""
    global _walks_held
    key = (digest.hash, digest.size_bytes)
    with _walks_lock:
        entries = _WALKS.get(key)
        if entries is not None:
            _WALKS.move_to_end(key)
            return entries
    entries = tuple(_walk(cas, digest, ""))
    if len(entries) > _WALKS_MAX_ENTRIES:
        return entries
    with _walks_lock:
        if key not in _WALKS:
            _WALKS[key] = entries
            _walks_held += len(entries)
            while _walks_held > _WALKS_MAX_ENTRIES:
                _, old = _WALKS.popitem(last=False)
                _walks_held -= len(old)
    return entries


def _walk(cas: LocalCas, digest: Digest, prefix: str) -> Iterator[tuple[str, str]]:
    """(relative path, kind) of every entry, each folder before its content."""
    directory = read_directory(cas, digest)
    for fnode in directory.files:
        yield _join(prefix, fnode.name), "file"
    for snode in directory.symlinks:
        yield _join(prefix, snode.name), "symlink"
    for dnode in directory.directories:
        path = _join(prefix, dnode.name)
        yield path, "dir"
        yield from _walk(cas, dnode.digest, path)


def _stage(cas: LocalCas, sandbox: _Sandbox, session: _Session, layer: StagedLayer) -> None:
    location = session.location
    _ensure_folder(sandbox, layer, location)
    for relative, kind in _entries(cas, layer.files):
        path = _join(location, relative)
        existing = sandbox.kinds.get(path)
        if kind == "dir":
            if existing is None:
                sandbox.add(path, "dir")
            elif existing != "dir":
                previous = sandbox.owner.get(path)
                raise StagingConflictError(
                    layer.element, "/" + path, existing, previous[0].element if previous else None
                )
            continue
        if existing == "dir":
            if sandbox.entries.get(path, 0):
                session.ignored.append((layer.element, "/" + path))
                continue
            sandbox.remove(path)
            existing = None
        if existing is not None:
            _overwritten(session, relative, layer)
            sandbox.remove(path)
        sandbox.add(path, kind)
        sandbox.owner[path] = (layer, session)
        session.written.setdefault(relative, layer)


def _overwritten(session: _Session, relative: str, layer: StagedLayer) -> None:
    """Record an overwrite as BuildStream's overlap collector does."""
    stack = session.overlaps.get(relative)
    if stack is None:
        stack = session.overlaps[relative] = []
        bottom = session.written.get(relative)
        if bottom is not None:
            stack.append(bottom)
    stack.append(layer)


def _judge(session: _Session, previous: list[_Session], report: StagingReport) -> None:
    """Turn one session's bookkeeping into overlaps and warnings."""
    where = session.absolute("")
    flagged: list[Overlap] = []
    external: list[ExternalOverlap] = []
    for relative, stack in session.overlaps.items():
        absolute = session.absolute(relative)
        if len(stack) == 1:
            overlapped, location = _staged_before(absolute, previous)
            external.append(ExternalOverlap(absolute, stack[0].element, overlapped, location))
            continue
        offenders = [
            layer.element
            for layer in stack[1:]
            if layer.whitelist is None or not layer.whitelist.fullmatch("/" + relative)
        ]
        overlap = Overlap(absolute, [layer.element for layer in stack], offenders)
        report.overlaps.append(overlap)
        if offenders:
            flagged.append(overlap)
    if flagged:
        detail = f"Staged files overwrite existing files in staging area: {where}\n"
        for overlap in flagged:
            verb = "is" if len(overlap.offenders) == 1 else "are"
            detail += (
                f"{overlap.path}: {' and '.join(overlap.offenders)} {verb} not permitted to "
                f"overlap other elements, order {' above '.join(reversed(overlap.elements))}\n"
            )
        brief = "Non-whitelisted overlaps detected"
        report.warnings.append(StagingWarning(OVERLAPS, brief, detail))
    if session.ignored:
        detail = (
            "Not staging files which would replace non-empty directories in staging area: "
            f"{where}\n"
        )
        by_element: dict[str, list[str]] = {}
        for element, path in session.ignored:
            by_element.setdefault(element, []).append(path)
        for element, paths in by_element.items():
            detail += f"\nFrom {element}:\n" + "".join(f"  {p}\n" for p in paths)
        report.unstaged.extend(session.ignored)
        report.warnings.append(
            StagingWarning(
                UNSTAGED_FILES,
                "Not staging files which would have replaced non-empty directories",
                detail,
            )
        )
    if external:
        detail = f"Detected file overlaps while staging elements into: {where}\n"
        for ext in external:
            detail += (
                f"{ext.path}: {ext.element} overlaps files previously staged by "
                f"{ext.overlapped} in: {ext.overlapped_location}\n"
            )
        report.external.extend(external)
        report.warnings.append(StagingWarning(OVERLAPS, "Overlaps detected", detail))


def _staged_before(absolute: str, sessions: list[_Session]) -> tuple[str, str]:
    for session in reversed(sessions):
        root = session.absolute("")
        prefix = root if root == "/" else root + "/"
        if absolute.startswith(prefix):
            layer = session.written.get(absolute[len(prefix) :])
            if layer is not None:
                return layer.element, root
    # Replaced an empty folder nobody staged as a file: no element to name.
    return "(an earlier layer)", "/"


def _truncated(text: str, lines: int) -> str:
    parts = text.split("\n")
    if len(parts) <= lines + 2:
        return text
    return "\n".join([*parts[: lines + 2], f"... and {len(parts) - lines - 2} more lines"])
