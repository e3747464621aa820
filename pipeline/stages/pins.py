"""Pinning what a running stage uses, so that a quota cleanup of the local
CAS (by this worker or another process sharing the store) never removes it.

A stage pins the trees and blobs its state names (the input root, the output
tree, the logs ...) before it starts; whatever it reads or writes while it
runs is kept by the store itself (see :meth:`pipeline.cas.LocalCas.pin`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from pipeline.cas import LocalCas, Pin
from pipeline.digest import Digest, digest_from_json

__all__ = ["BLOB_KEYS", "TREE_KEYS", "pin_state", "pinned_stage"]

TREE_KEYS = ("input_root", "files", "artifact")
"""State keys naming a Directory: the whole tree below it is pinned."""
BLOB_KEYS = ("action", "command", "stdout", "stderr")
"""State keys naming a single blob."""


def pin_state(pin: Pin, state: Mapping[str, Any]) -> None:
    """Add the trees and blobs ``state`` names to ``pin`` (what is not a
    digest is skipped: a malformed state is the stage's to report)."""
    for digest in _digests(state, TREE_KEYS):
        pin.add_tree(digest)
    for digest in _digests(state, BLOB_KEYS):
        pin.add_blob(digest)


@contextlib.contextmanager
def pinned_stage(cas: LocalCas, state: Mapping[str, Any]) -> Iterator[Pin]:
    """Pin ``state``'s trees and blobs, and everything used, while a stage runs."""
    # Given to the pin at once: its file is written once, not appended to per digest.
    with cas.pin(trees=_digests(state, TREE_KEYS), blobs=_digests(state, BLOB_KEYS)) as pin:
        yield pin


def _digests(state: Mapping[str, Any], keys: tuple[str, ...]) -> list[Digest]:
    digests: list[Digest] = []
    for key in keys:
        value = state.get(key)
        if not isinstance(value, dict):
            continue
        try:
            digests.append(digest_from_json(value))
        except (ValueError, KeyError, TypeError):
            continue
    return digests
