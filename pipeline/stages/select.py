"""Taking part of an artifact's files: BuildStream's split rules applied to a tree.

A :class:`~pipeline.spec.SelectSpec` names domains (lists of BuildStream
globs over paths relative to the files' root) and which of them to take.
Files and symlinks are taken one by one; a folder comes along when anything
under it is taken, and an empty folder when its own path is taken.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.cas import LocalCas
from pipeline.digest import Digest
from pipeline.elements.split_rules import path_filter
from pipeline.spec import SelectSpec
from pipeline.stages.trees import read_directory
from protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Directory, DirectoryNode

__all__ = ["filter_tree", "select_tree"]


def select_tree(cas: LocalCas, root: Digest, select: SelectSpec) -> Digest:
    """The part of the tree at ``root`` that ``select`` takes (stored in ``cas``)."""
    return filter_tree(cas, root, path_selector(select))


def filter_tree(cas: LocalCas, root: Digest, keep: Callable[[str], bool]) -> Digest:
    """The tree with only the paths ``keep`` accepts (and the folders leading to them).

    Args:
        keep: called with each path relative to the root (``usr/bin/sh``).
    """
    filtered = _filter(cas, root, "", keep)
    return filtered if filtered is not None else cas.put_message(Directory())


def _filter(cas: LocalCas, digest: Digest, path: str, keep: Callable[[str], bool]) -> Digest | None:
    directory = read_directory(cas, digest, path)
    result = Directory()
    for folder in directory.directories:
        child = f"{path}/{folder.name}" if path else folder.name
        kept = _filter(cas, folder.digest, child, keep)
        if kept is not None:
            result.directories.append(DirectoryNode(name=folder.name, digest=kept))
    result.files.extend(f for f in directory.files if keep(f"{path}/{f.name}" if path else f.name))
    result.symlinks.extend(
        s for s in directory.symlinks if keep(f"{path}/{s.name}" if path else s.name)
    )
    if result.directories or result.files or result.symlinks:
        return cas.put_message(result)
    if path and keep(path):
        return cas.put_message(Directory())
    return None


def path_selector(select: SelectSpec) -> Callable[[str], bool]:
    """The predicate of ``select``: is this path (relative, ``usr/bin/sh``) taken?"""
    return path_filter(
        select["domains"],
        include=select["include"],
        exclude=select["exclude"],
        orphans=select["orphans"],
    )
