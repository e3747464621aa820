"""Merkle trees of REAPI ``Directory`` messages in the local CAS.

Import a folder into a tree, merge trees (dependency artifacts into one
sysroot), list a tree's blobs, and check a tree out to a folder safely.

Every Directory read here, from the local CAS or from a server's ``Tree``
message, passes :func:`check_directory` first: a hostile tree naming ``..``,
``a/b`` or the same name twice never reaches the filesystem. Directory
messages are verified against their hash when read (``LocalCas.get_message``),
and :func:`checkout` verifies every file's hash while copying it, so a
damaged local CAS is noticed (and the damaged blob removed) instead of being
checked out.

Paths reported (overlaps, errors, :func:`iter_tree`) are relative, ``/``
separated, and ``""`` for the root.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cas.store import LocalCas
from pipeline.digest import Digest, digest_to_str
from pipeline.errors import (
    DigestMismatchError,
    LocalBlobMissingError,
    LocalCasError,
    UnsafePathError,
)
from protos.build.bazel.remote.execution.v2.remote_execution_pb2 import (
    Directory,
    DirectoryNode,
    FileNode,
    SymlinkNode,
    Tree,
)

__all__ = [
    "MergeResult",
    "check_directory",
    "checkout",
    "import_directory",
    "iter_tree",
    "merge_trees",
    "read_checked_directory",
    "store_tree_message",
    "tree_digests",
    "tree_from_directories",
    "tree_message",
]

_HASH_RE = re.compile(r"[0-9a-f]{64}")

# Checkout safety rests on these flags: taken from os directly, so that a
# platform without them fails at import instead of checking out unsafely.
_O_CLOEXEC = os.O_CLOEXEC
_O_NOFOLLOW = os.O_NOFOLLOW
_O_NONBLOCK = os.O_NONBLOCK
_O_DIRECTORY = os.O_DIRECTORY

_USER_X = stat.S_IXUSR


@dataclass(frozen=True)
class MergeResult:
    """The outcome of :func:`merge_trees`.

    ``overlaps`` lists, sorted, the relative paths where a later tree replaced
    an entry of an earlier one (a path replaced twice appears twice).
    """

    digest: Digest
    overlaps: list[str] = field(default_factory=list)


# --- validation ----------------------------------------------------------------


def check_directory(directory: Directory, path: str = "") -> None:
    """Check that a Directory message is safe and well-formed.

    Names must be non-empty, not ``.`` or ``..``, and free of ``/`` and NUL;
    each node list sorted by name (by UTF-8 bytes, as REAPI requires); every
    name unique across files, directories and symlinks; digests well-formed;
    symlink targets non-empty and free of NUL.

    Args:
        directory: the message to check.
        path: where it sits in its tree, for error messages.

    Raises:
        UnsafePathError: a name could escape a checkout folder or names clash.
        LocalCasError: the message is otherwise malformed (unsorted, bad digest).
    """
    seen: set[str] = set()
    for kind, nodes in (
        ("file", directory.files),
        ("directory", directory.directories),
        ("symlink", directory.symlinks),
    ):
        previous: str | None = None
        for node in nodes:
            name = node.name
            _check_name(name, path)
            if name in seen:
                raise UnsafePathError(f"name {_join(path, name)!r} appears twice in one directory")
            seen.add(name)
            # str order is code point order, which is UTF-8 byte order.
            if previous is not None and name < previous:
                raise LocalCasError(
                    f"{kind} nodes in directory {path or '.'!r} are not sorted by name "
                    f"({previous!r} before {name!r})"
                )
            previous = name
    for node in directory.files:
        _check_digest(node.digest, path, node.name)
    for dnode in directory.directories:
        _check_digest(dnode.digest, path, dnode.name)
    for snode in directory.symlinks:
        if not snode.target or "\0" in snode.target:
            raise UnsafePathError(
                f"symlink {_join(path, snode.name)!r} has an invalid target {snode.target!r}"
            )


def _check_name(name: str, path: str) -> None:
    if not name or name == "." or name == ".." or "/" in name or "\0" in name:
        raise UnsafePathError(f"unsafe name {name!r} in directory {path or '.'!r}")


def _check_digest(digest: Digest, path: str, name: str) -> None:
    if not _HASH_RE.fullmatch(digest.hash) or digest.size_bytes < 0:
        raise LocalCasError(
            f"entry {_join(path, name)!r} has a malformed digest "
            f"{digest.hash!r}/{digest.size_bytes}"
        )


def _join(path: str, name: str) -> str:
    return f"{path}/{name}" if path else name


# Hashes of Directory messages that passed check_directory. The check depends
# on the message's content alone (the path only names it in errors), so a
# digest checked once needs no check again: walks of the same trees (every
# stage reads the dependencies' trees) skip it. Bounded; cleared when full.
_CHECKED: set[str] = set()
_CHECKED_MAX = 1 << 17


class _DirectoryReader:
    """Reads, verifies and checks Directory messages, each digest once."""

    def __init__(self, cas: LocalCas) -> None:
        self.cas = cas
        self.cache: dict[str, Directory] = {}

    def read(self, digest: Digest, path: str) -> Directory:
        directory = self.cache.get(digest.hash)
        if directory is None:
            directory = read_checked_directory(self.cas, digest, path)
            self.cache[digest.hash] = directory
        return directory


def read_checked_directory(cas: LocalCas, digest: Digest, path: str = "") -> Directory:
    """A Directory from the local CAS, verified and checked (:func:`check_directory`;
    once per digest and process).

    Args:
        path: where it sits in its tree, for error messages.

    Raises:
        LocalBlobMissingError: it is not in the local CAS.
        UnsafePathError, LocalCasError: it is malformed or hostile.
    """
    directory = cas.get_message(digest, Directory)
    if digest.hash not in _CHECKED:
        check_directory(directory, path)
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.clear()
        _CHECKED.add(digest.hash)
    return directory


# --- import --------------------------------------------------------------------


def import_directory(cas: LocalCas, path: Path) -> Digest:
    """Import a folder into the CAS as a Merkle tree of Directory messages.

    Files keep only their user-x bit (``is_executable``); symlinks are stored
    with their target verbatim and never followed; empty folders are kept.
    ``path`` itself may be a symlink to a folder.

    Args:
        cas: the store to write to.
        path: the folder to import.

    Returns:
        The digest of the root Directory.

    Raises:
        LocalCasError: a special file (socket, fifo, device), a name that is not
            valid UTF-8, or an unreadable entry; the message names the path.
    """
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise LocalCasError(f"cannot import {root}: not a directory")
    # One thread on purpose: a pool importing small files in parallel measured
    # 3-4x slower (GIL hand-offs cost more than the syscalls they overlap).
    # Big files still hash on a second core (LocalCas.put_fd).
    try:
        return _import_folder(cas, root)
    except RecursionError as exc:
        raise LocalCasError(f"cannot import {root}: folders nested too deep") from exc


def _import_folder(cas: LocalCas, folder: str) -> Digest:
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=_entry_name)
    except OSError as exc:
        raise LocalCasError(f"cannot list {folder}: {exc.strerror}") from exc
    files: list[FileNode] = []
    directories: list[DirectoryNode] = []
    symlinks: list[SymlinkNode] = []
    # Sorting by str sorts by code point, which is UTF-8 byte order; names
    # that are not valid UTF-8 are refused below.
    for entry in entries:
        name = entry.name
        if not name.isascii():
            _check_utf8(name, entry.path)
        try:
            if entry.is_symlink():
                symlinks.append(SymlinkNode(name=name, target=os.readlink(entry.path)))
            elif entry.is_dir(follow_symlinks=False):
                directories.append(DirectoryNode(name=name, digest=_import_folder(cas, entry.path)))
            elif entry.is_file(follow_symlinks=False):
                digest, executable = _import_file(cas, entry.path)
                files.append(FileNode(name=name, digest=digest, is_executable=executable))
            else:
                raise LocalCasError(
                    f"cannot import special file (socket, fifo or device): {entry.path}"
                )
        except OSError as exc:
            raise LocalCasError(f"cannot import {entry.path}: {exc.strerror}") from exc
    return cas.put_message(Directory(files=files, directories=directories, symlinks=symlinks))


def _entry_name(entry: os.DirEntry[str]) -> str:
    return entry.name


def _check_utf8(name: str, path: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalCasError(f"cannot import {path!r}: its name is not valid UTF-8") from None


def _import_file(cas: LocalCas, path: str) -> tuple[Digest, bool]:
    # O_NOFOLLOW and O_NONBLOCK: if the entry was swapped for a symlink or a
    # fifo since it was listed, fail (or refuse below) rather than follow or hang.
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC | _O_NOFOLLOW | _O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LocalCasError(f"cannot import {path}: no longer a regular file")
        return cas.put_fd(fd, st.st_size), bool(st.st_mode & _USER_X)
    finally:
        os.close(fd)


# --- merge ---------------------------------------------------------------------


def merge_trees(cas: LocalCas, roots: Sequence[Digest]) -> MergeResult:
    """Merge trees in order, later over earlier, like BuildStream stacks artifacts.

    Folders present in several trees are merged recursively. Any other clash
    is won by the later tree and reported in ``overlaps``, even when both
    entries are identical, as BuildStream reports them; except that, as in
    BuildStream, a file or symlink never replaces a non-empty folder (it is
    left out; BuildStream's ``unstaged-files``). A folder over a file
    replaces it here; staging refuses that earlier (see
    :mod:`pipeline.stages.overlaps`). Folders appearing in one tree only are reused by
    digest, unread.

    Args:
        cas: the store holding the trees; merged Directory messages are written to it.
        roots: root Directory digests, earliest first.

    Returns:
        The merged root digest and the overlapping paths.

    Raises:
        LocalBlobMissingError: a Directory of a tree is not in the store.
        UnsafePathError, LocalCasError: a Directory is hostile or malformed.
    """
    if not roots:
        return MergeResult(digest=cas.put_message(Directory()))
    reader = _DirectoryReader(cas)
    if len(roots) == 1:
        reader.read(roots[0], "")
        return MergeResult(digest=roots[0])
    overlaps: list[str] = []
    digest = _merge(reader, roots, "", overlaps)
    return MergeResult(digest=digest, overlaps=sorted(overlaps))


def _merge(
    reader: _DirectoryReader, digests: Sequence[Digest], path: str, overlaps: list[str]
) -> Digest:
    # name -> the winning file/symlink node, or the list of folder digests to merge
    entries: dict[str, FileNode | SymlinkNode | list[Digest]] = {}
    for digest in digests:
        directory = reader.read(digest, path)
        nodes: list[FileNode | SymlinkNode] = [*directory.files, *directory.symlinks]
        for node in nodes:
            current = entries.get(node.name)
            if isinstance(current, list) and any(d.size_bytes for d in current):
                # As BuildStream: a file is not staged over a non-empty folder
                # (an empty Directory message is 0 bytes long).
                continue
            if current is not None:
                overlaps.append(_join(path, node.name))
            entries[node.name] = node
        for dnode in directory.directories:
            current = entries.get(dnode.name)
            if isinstance(current, list):
                current.append(dnode.digest)
            else:
                if current is not None:
                    overlaps.append(_join(path, dnode.name))
                entries[dnode.name] = [dnode.digest]
    merged = Directory()
    for name in sorted(entries):
        entry = entries[name]
        if isinstance(entry, FileNode):
            merged.files.append(entry)
        elif isinstance(entry, SymlinkNode):
            merged.symlinks.append(entry)
        elif len(entry) == 1:
            merged.directories.add(name=name, digest=entry[0])
        else:
            merged.directories.add(
                name=name, digest=_merge(reader, entry, _join(path, name), overlaps)
            )
    return reader.cas.put_message(merged)


# --- walking -------------------------------------------------------------------


def iter_tree(cas: LocalCas, root: Digest) -> Iterator[tuple[str, Directory]]:
    """Every folder of a tree with its relative path, depth first, sorted.

    A Directory shared by several paths is yielded at each of them.

    Raises:
        LocalBlobMissingError: a Directory is not in the store.
        UnsafePathError, LocalCasError: a Directory is hostile or malformed.
    """
    reader = _DirectoryReader(cas)
    stack = [("", root)]
    while stack:
        path, digest = stack.pop()
        directory = reader.read(digest, path)
        yield path, directory
        for dnode in reversed(directory.directories):
            stack.append((_join(path, dnode.name), dnode.digest))


def tree_digests(cas: LocalCas, root: Digest) -> list[Digest]:
    """Every Directory and file digest reachable from ``root``, each once.

    The root comes first. This is what must be in a remote CAS for the tree to
    be usable there.

    Raises:
        LocalBlobMissingError: a Directory is not in the store.
        UnsafePathError, LocalCasError: a Directory is hostile or malformed.
    """
    reader = _DirectoryReader(cas)
    seen: set[tuple[str, int]] = {(root.hash, root.size_bytes)}
    result = [root]
    queue = [("", root)]
    while queue:
        path, digest = queue.pop()
        directory = reader.read(digest, path)
        for fnode in directory.files:
            key = (fnode.digest.hash, fnode.digest.size_bytes)
            if key not in seen:
                seen.add(key)
                result.append(fnode.digest)
        for dnode in directory.directories:
            key = (dnode.digest.hash, dnode.digest.size_bytes)
            if key not in seen:
                seen.add(key)
                result.append(dnode.digest)
                queue.append((_join(path, dnode.name), dnode.digest))
    return result


# --- REAPI Tree messages -------------------------------------------------------


def tree_from_directories(root: Directory, children: Iterable[Directory]) -> Tree:
    """A REAPI Tree message (as in ``OutputDirectory.tree_digest``)."""
    return Tree(root=root, children=list(children))


def tree_message(cas: LocalCas, root: Digest) -> Tree:
    """Gather a tree from the store into one REAPI Tree message (children deduplicated).

    Raises:
        LocalBlobMissingError: a Directory is not in the store.
        UnsafePathError, LocalCasError: a Directory is hostile or malformed.
    """
    reader = _DirectoryReader(cas)
    root_directory = reader.read(root, "")
    children: list[Directory] = []
    seen = {root.hash}
    stack = [("", root_directory)]
    while stack:
        path, directory = stack.pop()
        for dnode in directory.directories:
            if dnode.digest.hash not in seen:
                seen.add(dnode.digest.hash)
                child = reader.read(dnode.digest, _join(path, dnode.name))
                children.append(child)
                stack.append((_join(path, dnode.name), child))
    return tree_from_directories(root_directory, children)


def store_tree_message(cas: LocalCas, tree: Tree) -> Digest:
    """Store the Directory messages of a REAPI Tree (fetched output directories).

    Every Directory is checked, and every folder reachable from the root must
    be among the Tree's children (or already in the store).

    Returns:
        The digest of the root Directory.

    Raises:
        UnsafePathError, LocalCasError: a Directory is hostile or malformed.
        DigestMismatchError: the Tree lacks a Directory its root refers to.
    """
    by_hash: dict[str, Directory] = {}
    for child in tree.children:
        check_directory(child, "<tree child>")
        by_hash[cas.put_message(child).hash] = child
    check_directory(tree.root, "")
    root = cas.put_message(tree.root)
    # Walk from the root: checks completeness and gives errors a real path.
    reader = _DirectoryReader(cas)
    seen: set[str] = set()
    stack = [("", tree.root)]
    while stack:
        path, directory = stack.pop()
        for dnode in directory.directories:
            if dnode.digest.hash in seen:
                continue
            seen.add(dnode.digest.hash)
            child_path = _join(path, dnode.name)
            found = by_hash.get(dnode.digest.hash)
            if found is not None:
                child = found
            else:
                try:
                    child = reader.read(dnode.digest, child_path)
                except LocalBlobMissingError:
                    raise DigestMismatchError(
                        f"tree lacks directory {child_path!r} "
                        f"({digest_to_str(dnode.digest)}) among its children"
                    ) from None
            stack.append((child_path, child))
    return root


# --- checkout ------------------------------------------------------------------


def checkout(cas: LocalCas, root: Digest, dest: Path) -> None:
    """Write a tree out to a folder, safely.

    ``dest`` is created if missing and may already hold files: existing real
    folders are entered, but nothing existing is replaced: a file or symlink
    already at a path the tree writes is an error (as BuildStream's checkout
    without ``--force``). Nothing is ever written through a symlink or outside
    ``dest``: files are created with ``O_EXCL | O_NOFOLLOW`` and folders
    opened with ``O_NOFOLLOW`` relative to their parent's descriptor.

    The whole tree is read and checked before anything is written, so a hostile
    or incomplete tree writes nothing. A failure while writing (an existing
    path, a damaged blob, a full disk) leaves what was written so far.

    A Directory shared by several paths is written at each of them, so the
    checkout may be far bigger than the tree's blobs.

    Files get mode 0o755 when executable, else 0o644; new folders 0o755
    (regardless of umask). Files are copied, not hard-linked, so a checkout
    cannot change the store; their hashes are verified while copying.

    Args:
        cas: the store holding the tree and its files.
        root: the root Directory digest.
        dest: the folder to write into.

    Raises:
        UnsafePathError: a hostile tree, or a symlink in ``dest`` where the tree
            needs a folder.
        LocalBlobMissingError: a Directory or file is not in the store (or damaged).
        LocalCasError: an existing path is in the way, or writing failed.
    """
    reader = _DirectoryReader(cas)
    file_digests: dict[tuple[str, int], Digest] = {}
    for _, directory in _unique_directories(reader, root):
        for fnode in directory.files:
            file_digests.setdefault((fnode.digest.hash, fnode.digest.size_bytes), fnode.digest)
    missing = cas.missing(file_digests.values())
    if missing:
        shown = ", ".join(digest_to_str(d) for d in missing[:5])
        raise LocalBlobMissingError(
            f"{len(missing)} file blob(s) of tree {digest_to_str(root)} are not in the "
            f"local CAS: {shown}{' ...' if len(missing) > 5 else ''}"
        )

    dest_str = os.fspath(dest)
    try:
        os.makedirs(dest_str, exist_ok=True)
        dest_fd = os.open(dest_str, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    except OSError as exc:
        raise LocalCasError(f"cannot check out into {dest_str}: {exc.strerror}") from exc
    try:
        _checkout_folder(cas, reader, reader.read(root, ""), dest_fd, "", dest_str)
    except RecursionError as exc:
        raise LocalCasError(f"tree {digest_to_str(root)} is nested too deep") from exc
    finally:
        os.close(dest_fd)


def _unique_directories(reader: _DirectoryReader, root: Digest) -> Iterator[tuple[str, Directory]]:
    """Each distinct Directory of a tree once, with the first path it was met at."""
    seen = {root.hash}
    stack = [("", root)]
    while stack:
        path, digest = stack.pop()
        directory = reader.read(digest, path)
        yield path, directory
        for dnode in directory.directories:
            if dnode.digest.hash not in seen:
                seen.add(dnode.digest.hash)
                stack.append((_join(path, dnode.name), dnode.digest))


def _checkout_folder(
    cas: LocalCas,
    reader: _DirectoryReader,
    directory: Directory,
    dir_fd: int,
    path: str,
    dest: str,
) -> None:
    for fnode in directory.files:
        _checkout_file(cas, fnode, dir_fd, _join(path, fnode.name), dest)
    for snode in directory.symlinks:
        try:
            os.symlink(snode.target, snode.name, dir_fd=dir_fd)
        except FileExistsError:
            raise _exists_error(dir_fd, snode.name, _join(path, snode.name), dest) from None
        except OSError as exc:
            raise _write_error(exc, _join(path, snode.name), dest) from exc
    for dnode in directory.directories:
        child_path = _join(path, dnode.name)
        created = True
        try:
            os.mkdir(dnode.name, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            created = False  # fine if it is a real folder: the open below checks
        except OSError as exc:
            raise _write_error(exc, child_path, dest) from exc
        try:
            child_fd = os.open(
                dnode.name, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=dir_fd
            )
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafePathError(
                    f"cannot check out {child_path!r} into {dest}: "
                    "a symlink or file is in the way of a folder"
                ) from None
            raise _write_error(exc, child_path, dest) from exc
        try:
            if created:
                os.fchmod(child_fd, 0o755)
            child = reader.read(dnode.digest, child_path)
            _checkout_folder(cas, reader, child, child_fd, child_path, dest)
        finally:
            os.close(child_fd)


def _checkout_file(cas: LocalCas, fnode: FileNode, dir_fd: int, path: str, dest: str) -> None:
    try:
        fd = os.open(
            fnode.name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC,
            0o600,
            dir_fd=dir_fd,
        )
    except FileExistsError:
        raise _exists_error(dir_fd, fnode.name, path, dest) from None
    except OSError as exc:
        raise _write_error(exc, path, dest) from exc
    try:
        try:
            if fnode.digest.size_bytes:
                cas.copy_to(fnode.digest, fd)
            os.fchmod(fd, 0o755 if fnode.is_executable else 0o644)
        finally:
            os.close(fd)
    except BaseException as exc:
        # Leave no half-written file that looks complete.
        with contextlib.suppress(OSError):
            os.unlink(fnode.name, dir_fd=dir_fd)
        if isinstance(exc, OSError):
            raise _write_error(exc, path, dest) from exc
        raise


def _exists_error(dir_fd: int, name: str, path: str, dest: str) -> LocalCasError:
    try:
        is_link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        is_link = False
    if is_link:
        return UnsafePathError(f"cannot check out {path!r} into {dest}: a symlink is in the way")
    return LocalCasError(f"cannot check out {path!r} into {dest}: it already exists")


def _write_error(exc: OSError, path: str, dest: str) -> LocalCasError:
    transient = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return LocalCasError(
        f"cannot check out {path!r} into {dest}: {exc.strerror}", transient=transient
    )
