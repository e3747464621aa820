"""The local content-addressable store and Merkle trees of REAPI Directory messages.

A cache in front of the remote CAS: :class:`LocalCas` holds blobs on disk,
:mod:`pipeline.cas.tree` imports folders into trees, merges them, lists their
blobs and checks them out safely.
"""

from __future__ import annotations

from pipeline.cas.store import BlobWriter, CasStats, CleanupStats, LocalCas, Pin
from pipeline.cas.tree import (
    MergeResult,
    check_directory,
    checkout,
    import_directory,
    iter_tree,
    merge_trees,
    read_checked_directory,
    store_tree_message,
    tree_digests,
    tree_from_directories,
    tree_message,
)

__all__ = [
    "BlobWriter",
    "CasStats",
    "CleanupStats",
    "LocalCas",
    "MergeResult",
    "Pin",
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
