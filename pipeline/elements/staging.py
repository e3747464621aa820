"""Build Directory trees in the local CAS straight from archives, never touching disk.

Tarballs (and git trees) are read member by member into an in-memory tree
whose files go to the local CAS as blobs; nothing is extracted to the
filesystem, so a hostile archive has nothing to write through. What is still
refused, because the tree would be wrong or surprising: absolute member
paths, ``..`` components, a member under a path that is a symlink or a file,
a hard link to anything but an earlier regular file of the same tree, a
relative symlink climbing above the tree's root, devices, fifos and other
special members, and names that are not UTF-8.

Absolute symlink targets are kept as they are, as BuildStream keeps them: in
a sysroot they mean the sandbox's root, and neither the CAS nor a checkout
ever follows a symlink.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from typing import IO

from pipeline.cas import LocalCas
from pipeline.digest import Digest
from protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Directory,
    DirectoryNode,
    FileNode,
    SymlinkNode,
)

__all__ = [
    "TreeBuilder",
    "UnsafeArchiveError",
    "find_base_dir",
    "glob_to_regex",
    "split_member_path",
    "tree_from_tar",
]

_CHUNK = 1 << 20
_SMALL = 1 << 20


class UnsafeArchiveError(Exception):
    """An archive member that remex refuses to stage; the message names it."""


class _Folder:
    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: dict[str, _Folder | FileNode | SymlinkNode] = {}


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # surrogate escapes of undecodable bytes
        return False
    return True


def split_member_path(name: str) -> list[str]:
    """A member path as components: ``./a//b/`` -> ``["a", "b"]``; ``""`` for the root.

    Raises:
        UnsafeArchiveError: an absolute path, a ``..`` component, NUL, or not UTF-8.
    """
    if name.startswith("/"):
        raise UnsafeArchiveError(f"member {name!r} has an absolute path")
    if "\0" in name:
        raise UnsafeArchiveError(f"member {name!r} has a NUL in its name")
    if not _is_utf8(name):
        raise UnsafeArchiveError(f"member {name!r}: its name is not valid UTF-8")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"member {name!r} has a '..' component")
    return parts


class TreeBuilder:
    """Collects folders, files and symlinks by path, then stores them as a tree.

    A later entry replaces an earlier one at the same path (as extracting an
    archive would), except that folders merge; replacing a folder by a file
    or symlink, or adding anything under a file or symlink, is refused.
    """

    def __init__(self, cas: LocalCas) -> None:
        self.cas = cas
        self._root = _Folder()

    def add_folder(self, parts: Sequence[str]) -> None:
        """Make sure the folder ``parts`` exists."""
        self._folder(parts, create=True)

    def add_file(self, parts: Sequence[str], digest: Digest, executable: bool) -> None:
        """Put a file (whose blob is already in the CAS) at ``parts``."""
        self._put(parts, FileNode(name=parts[-1], digest=digest, is_executable=executable))

    def add_symlink(self, parts: Sequence[str], target: str) -> None:
        """Put a symlink at ``parts``; a relative target must stay inside the tree."""
        if not target or "\0" in target or not _is_utf8(target):
            raise UnsafeArchiveError(f"symlink {'/'.join(parts)!r} has an invalid target")
        if not target.startswith("/"):
            depth = len(parts) - 1
            for part in target.split("/"):
                if part == "..":
                    depth -= 1
                    if depth < 0:
                        raise UnsafeArchiveError(
                            f"symlink {'/'.join(parts)!r} -> {target!r} points outside the tree"
                        )
                elif part not in ("", "."):
                    depth += 1
        self._put(parts, SymlinkNode(name=parts[-1], target=target))

    def find_file(self, parts: Sequence[str]) -> FileNode | None:
        """The regular file at ``parts``, if there is one."""
        folder: _Folder | FileNode | SymlinkNode | None = self._root
        for part in parts:
            if not isinstance(folder, _Folder):
                return None
            folder = folder.entries.get(part)
        return folder if isinstance(folder, FileNode) else None

    def finish(self) -> Digest:
        """Store every Directory message; return the root's digest."""
        return self._store(self._root)

    def _folder(self, parts: Sequence[str], *, create: bool) -> _Folder:
        folder = self._root
        for i, part in enumerate(parts):
            entry = folder.entries.get(part)
            if entry is None:
                entry = _Folder()
                folder.entries[part] = entry
            elif not isinstance(entry, _Folder):
                kind = "symlink" if isinstance(entry, SymlinkNode) else "file"
                raise UnsafeArchiveError(
                    f"path {'/'.join(parts)!r} goes through {'/'.join(parts[: i + 1])!r}, "
                    f"which is a {kind}"
                )
            folder = entry
        return folder

    def _put(self, parts: Sequence[str], node: FileNode | SymlinkNode) -> None:
        if not parts:
            raise UnsafeArchiveError("a file or symlink member names the archive's root")
        parent = self._folder(parts[:-1], create=True)
        if isinstance(parent.entries.get(parts[-1]), _Folder):
            raise UnsafeArchiveError(f"member {'/'.join(parts)!r} replaces a folder")
        parent.entries[parts[-1]] = node

    def _store(self, folder: _Folder) -> Digest:
        directory = Directory()
        # Names sort by code point, which is UTF-8 byte order, as REAPI wants.
        for name in sorted(folder.entries):
            entry = folder.entries[name]
            if isinstance(entry, _Folder):
                directory.directories.append(DirectoryNode(name=name, digest=self._store(entry)))
            elif isinstance(entry, FileNode):
                directory.files.append(entry)
            else:
                directory.symlinks.append(entry)
        return self.cas.put_message(directory)


def store_stream(cas: LocalCas, stream: IO[bytes], size: int) -> Digest:
    """Store ``size`` bytes read from ``stream`` as one blob.

    Raises:
        UnsafeArchiveError: the stream ended early.
    """
    if size <= _SMALL:
        data = stream.read(size)
        if len(data) != size:
            raise UnsafeArchiveError("archive ended inside a member")
        return cas.put(data)
    with cas.blob_writer() as writer:
        left = size
        while left:
            chunk = stream.read(min(_CHUNK, left))
            if not chunk:
                raise UnsafeArchiveError("archive ended inside a member")
            writer.write(chunk)
            left -= len(chunk)
    assert writer.digest is not None
    return writer.digest


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """BuildStream's glob: ``*`` and ``?`` stop at ``/``, ``**`` crosses it, ``[!a-z]`` classes."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            negate = body.startswith("!")
            body = body[1:] if negate else body
            body = body.replace("\\", "\\\\").replace("^", "\\^")
            out.append(f"[{'^' if negate else ''}{body}]")
            i = end + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _archive_paths(members: Iterable[tarfile.TarInfo]) -> Iterator[str]:
    """Every folder path an archive has, listed or only implied by a member's path."""
    seen: set[str] = set()
    for member in members:
        parts = split_member_path(member.name)
        upto = len(parts) if member.isdir() else len(parts) - 1
        for i in range(1, upto + 1):
            path = "/".join(parts[:i])
            if path not in seen:
                seen.add(path)
                yield path


def find_base_dir(members: Sequence[tarfile.TarInfo], pattern: str) -> list[str]:
    """The components of the first folder (sorted) matching ``pattern``, as BuildStream
    picks it (so ``*`` on an archive without folders matches nothing).

    Raises:
        UnsafeArchiveError: no path matches, or a member path is unsafe.
    """
    regex = glob_to_regex(pattern)
    matches = sorted(path for path in _archive_paths(members) if regex.match(path))
    if not matches:
        raise UnsafeArchiveError(f"no folder of the archive matches base-dir {pattern!r}")
    return matches[0].split("/")


def tree_from_tar(cas: LocalCas, tar: tarfile.TarFile, base_dir: str) -> Digest:
    """Store an archive's content (under the ``base_dir`` glob, if not "") as a tree.

    Executable bits are kept (the owner's x bit); owners, times and other modes
    are not part of a REAPI tree.

    Raises:
        UnsafeArchiveError: a member remex refuses (see the module docstring).
        tarfile.TarError, OSError: the archive cannot be read.
    """
    members = tar.getmembers()
    prefix = find_base_dir(members, base_dir) if base_dir else []
    builder = TreeBuilder(cas)
    for member in members:
        parts = _strip(split_member_path(member.name), prefix)
        if parts is None:
            continue
        if member.isdir():
            builder.add_folder(parts)
        elif member.isreg():
            stream = tar.extractfile(member)
            if stream is None:
                raise UnsafeArchiveError(f"member {member.name!r} cannot be read")
            with stream:
                digest = store_stream(cas, stream, member.size)
            builder.add_file(parts, digest, bool(member.mode & 0o100))
        elif member.issym():
            builder.add_symlink(parts, member.linkname)
        elif member.islnk():
            target = _strip(split_member_path(member.linkname), prefix)
            found = builder.find_file(target) if target is not None else None
            if found is None:
                raise UnsafeArchiveError(
                    f"hard link {member.name!r} -> {member.linkname!r} does not point to an "
                    "earlier regular file of the staged tree"
                )
            builder.add_file(parts, found.digest, found.is_executable)
        else:
            raise UnsafeArchiveError(
                f"member {member.name!r} is a device, fifo or other special file"
            )
    return builder.finish()


def _strip(parts: list[str], prefix: list[str]) -> list[str] | None:
    """``parts`` below ``prefix``; None when outside it (or the prefix folder itself)."""
    if not prefix:
        return parts
    if len(parts) <= len(prefix) or parts[: len(prefix)] != prefix:
        return None
    return parts[len(prefix) :]
