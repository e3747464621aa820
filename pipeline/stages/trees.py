"""Small Merkle-tree helpers for the stages: paths, nesting, sub-trees, completeness."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.cas import LocalCas, read_checked_directory, tree_digests
from pipeline.digest import Digest
from pipeline.errors import LocalCasError
from protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Directory, DirectoryNode

__all__ = [
    "directories_complete",
    "empty_tree",
    "place_at",
    "read_directory",
    "split_path",
    "subtree",
    "tree_complete",
    "tree_paths",
]


def split_path(path: str) -> list[str]:
    """The components of a relative, ``/``-separated path ("" is the root).

    A leading ``/`` is allowed (paths in specs are relative to the input root
    either way); ``.`` and empty components are dropped.

    Raises:
        ValueError: the path has a ``..`` component or a NUL.
    """
    if "\0" in path:
        raise ValueError(f"path {path!r} holds a NUL character")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"path {path!r} climbs out with '..'")
    return parts


def empty_tree(cas: LocalCas) -> Digest:
    """The digest of the empty Directory (stored)."""
    return cas.put_message(Directory())


def place_at(cas: LocalCas, root: Digest, parts: Sequence[str]) -> Digest:
    """A tree holding ``root`` at the path ``parts`` and nothing else.

    ``place_at(cas, r, ["a", "b"])`` is ``{a: {b: r}}``; with no parts it is ``r``.
    """
    digest = root
    for name in reversed(parts):
        digest = cas.put_message(Directory(directories=[DirectoryNode(name=name, digest=digest)]))
    return digest


def read_directory(cas: LocalCas, digest: Digest, path: str = "") -> Directory:
    """A Directory from the local CAS, verified and checked for hostile names.

    Raises:
        LocalBlobMissingError: it is not in the local CAS.
        UnsafePathError, LocalCasError: it is malformed or hostile.
    """
    return read_checked_directory(cas, digest, path)


def subtree(cas: LocalCas, root: Digest, parts: Sequence[str]) -> Digest | None:
    """The Directory at ``parts`` under ``root``, or None when there is no folder there.

    Raises:
        LocalBlobMissingError: a Directory on the way is not in the local CAS.
    """
    digest = root
    walked: list[str] = []
    for name in parts:
        directory = read_directory(cas, digest, "/".join(walked))
        found = next((d.digest for d in directory.directories if d.name == name), None)
        if found is None:
            return None
        digest = found
        walked.append(name)
    return digest


def tree_complete(cas: LocalCas, root: Digest) -> bool:
    """Whether every Directory and file of the tree is in the local CAS."""
    try:
        return not cas.missing(tree_digests(cas, root))
    except LocalCasError:
        return False


def directories_complete(cas: LocalCas, root: Digest) -> bool:
    """Whether every Directory message of the tree is in the local CAS (its
    files need not be: what building without the bytes keeps locally)."""
    pending = [root]
    seen = {root.hash}
    try:
        while pending:
            digest = pending.pop()
            if not cas.contains(digest):
                return False
            for node in cas.get_message(digest, Directory).directories:
                if node.digest.hash not in seen:
                    seen.add(node.digest.hash)
                    pending.append(node.digest)
    except LocalCasError:
        return False
    return True


def tree_paths(cas: LocalCas, root: Digest) -> list[str]:
    """Every path of the tree (folders, files, symlinks), relative to its root, sorted.

    Raises:
        LocalBlobMissingError: a Directory is not in the local CAS.
    """
    paths: list[str] = []
    pending = [("", root)]
    while pending:
        path, digest = pending.pop()
        directory = read_directory(cas, digest, path)
        for folder in directory.directories:
            child = f"{path}/{folder.name}" if path else folder.name
            paths.append(child)
            pending.append((child, folder.digest))
        names = [f.name for f in directory.files] + [s.name for s in directory.symlinks]
        paths.extend(f"{path}/{name}" if path else name for name in names)
    return sorted(paths)
