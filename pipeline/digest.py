"""SHA-256 digests: the names of everything in a CAS.

A leaf module: the local CAS, the REAPI client and the stages all use it.
``Digest`` is the REAPI message; on the wire between tasks it travels as
JSON ``{"hash": ..., "size_bytes": ...}`` and in logs as ``"hash/size"``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from google.protobuf.message import Message

from protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Digest

__all__ = [
    "EMPTY_DIGEST",
    "Digest",
    "digest_from_json",
    "digest_from_str",
    "digest_of",
    "digest_of_message",
    "digest_to_json",
    "digest_to_str",
    "new_hasher",
]

_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


def new_hasher() -> Any:
    """A fresh SHA-256 hasher (the only digest function remex speaks)."""
    return hashlib.sha256()


def digest_of(data: bytes) -> Digest:
    """The digest of ``data``."""
    return Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def digest_of_message(message: Message) -> tuple[Digest, bytes]:
    """Serialize ``message`` deterministically; return its digest and its bytes."""
    data = message.SerializeToString(deterministic=True)
    return digest_of(data), data


def digest_to_str(digest: Digest) -> str:
    """``"hash/size"``, the form used in resource names and messages."""
    return f"{digest.hash}/{digest.size_bytes}"


def digest_from_str(text: str) -> Digest:
    """Parse ``"hash/size"``; raise ValueError when it is not a SHA-256 digest."""
    hash_, sep, size = text.partition("/")
    if not sep or not size.isdigit():
        raise ValueError(f"not a digest (want 'hash/size'): {text!r}")
    return checked_digest(hash_, int(size))


def digest_to_json(digest: Digest) -> dict[str, Any]:
    """The JSON form passed between tasks."""
    return {"hash": digest.hash, "size_bytes": digest.size_bytes}


def digest_from_json(value: dict[str, Any]) -> Digest:
    """Inverse of :func:`digest_to_json`; validates the hash and size."""
    try:
        return checked_digest(str(value["hash"]), int(value["size_bytes"]))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a digest: {value!r}") from exc


def checked_digest(hash_: str, size_bytes: int) -> Digest:
    """A Digest after checking that ``hash_`` is 64 lowercase hex digits and size >= 0."""
    if not _HASH_RE.match(hash_) or size_bytes < 0:
        raise ValueError(f"not a SHA-256 digest: {hash_!r}/{size_bytes}")
    return Digest(hash=hash_, size_bytes=size_bytes)


EMPTY_DIGEST = digest_of(b"")
