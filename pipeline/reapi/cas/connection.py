"""What every part of the CAS client shares: the stubs, batch planning,
parallel requests, digest checks and the errors that name the server.

Every RPC goes through :meth:`Remote.call`, one retry unit per request (a
batch, a ByteStream stream, a GetTree page), so a server restart in the
middle of a large upload costs one unit again, not the whole upload.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2

from pipeline.digest import Digest, digest_to_str
from pipeline.errors import BlobNotFoundError, DigestMismatchError, ProtocolError, RemoteError
from pipeline.reapi.remote import Remote
from pipeline.reapi.retry import TRANSIENT_CODES
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from protos.google.bytestream import bytestream_pb2_grpc as bs_grpc

M = TypeVar("M", bound=Message)
Key = tuple[str, int]

MAX_BATCH_ENTRIES = 10_000
"""Entries per BatchUpdate/BatchRead request, however small the blobs."""

BYTESTREAM_CHUNK = 1024 * 1024
"""Bytes per ByteStream WriteRequest."""

# Requests in flight at once per upload/download call.
DEFAULT_PARALLELISM = 4
# Small batches spread over the parallel requests better than a few 4 MiB ones.
PARALLEL_BATCH_BYTES = 1024 * 1024

ENTRY_FRAMING = 128
"""Bytes a batch entry costs besides its data: its Digest (64-char hash, size),
status, compressor and the protobuf tags and lengths around them (at most ~100)."""

STREAM_MIN_RATE = 1024 * 1024
"""Bytes per second a ByteStream transfer is given before its deadline expires."""

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


class CasConnection:
    """One remote CAS as the upload, download and tree parts use it.

    Args:
        remote: the server (and instance) to talk to.
        chunk_size: bytes per ByteStream write request.
        parallelism: requests in flight at once for one upload or download.
    """

    def __init__(self, remote: Remote, *, chunk_size: int, parallelism: int) -> None:
        self.remote = remote
        self.chunk_size = chunk_size
        self.parallelism = max(1, parallelism)
        self.cas = remote.stub(re_grpc.ContentAddressableStorageStub)
        self.bytestream = remote.stub(bs_grpc.ByteStreamStub)
        prefix = remote.instance_name.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""

    @property
    def where(self) -> str:
        """The server's URL, for error messages."""
        return self.remote.endpoint.url

    def run_parallel(self, jobs: Sequence[Callable[[], None]]) -> None:
        """Run ``jobs`` with up to ``parallelism`` at once; raise the first failure.

        Each call gets its own short-lived pool, so a job never waits for a
        thread that another caller's jobs hold.
        """
        if len(jobs) <= 1 or self.parallelism == 1:
            for job in jobs:
                job()
            return
        with concurrent.futures.ThreadPoolExecutor(
            max_workers=min(self.parallelism, len(jobs)), thread_name_prefix="remex-cas"
        ) as pool:
            # Each job runs in a copy of the caller's context: what the caller
            # set there (the local CAS pin of the stage running) holds for it.
            futures = [pool.submit(contextvars.copy_context().run, job) for job in jobs]
            try:
                for future in concurrent.futures.as_completed(futures):
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def plan_batches(self, digests: Sequence[Digest]) -> tuple[list[list[Digest]], list[Digest]]:
        """Split digests into batches within the server's limit, and the too-large rest."""
        if not digests:
            return [], []
        limit = self.remote.capabilities().max_batch_total_size_bytes
        total = sum(d.size_bytes for d in digests)
        # Blobs above the server's limit go by ByteStream; below it, batches are
        # kept small enough that there are several to send at once.
        batch_limit = limit
        if self.parallelism > 1 and total > limit:
            batch_limit = min(limit, max(PARALLEL_BATCH_BYTES, total // (4 * self.parallelism)))
        batches: list[list[Digest]] = []
        large: list[Digest] = []
        batch: list[Digest] = []
        batch_bytes = 0
        for digest in digests:
            cost = digest.size_bytes + ENTRY_FRAMING
            if cost > limit:
                large.append(digest)
                continue
            if batch and (batch_bytes + cost > batch_limit or len(batch) >= MAX_BATCH_ENTRIES):
                batches.append(batch)
                batch, batch_bytes = [], 0
            batch.append(digest)
            batch_bytes += cost
        if batch:
            batches.append(batch)
        return batches, large

    # --- errors ------------------------------------------------------------

    def verify(self, digest: Digest, data: bytes) -> None:
        """Raise DigestMismatchError unless ``data`` hashes to ``digest``."""
        if len(data) != digest.size_bytes:
            raise self.mismatch(digest, hashlib.sha256(data).hexdigest(), len(data))
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest.hash:
            raise self.mismatch(digest, actual, len(data))

    def mismatch(self, digest: Digest, actual_hash: str, actual_size: int) -> DigestMismatchError:
        """The error for content that does not match ``digest``."""
        return DigestMismatchError(
            f"{self.where} sent wrong content for blob {digest_to_str(digest)}: "
            f"got {actual_hash}/{actual_size}"
        )

    def blob_error(self, status: status_pb2.Status, digest: Digest, what: str) -> RemoteError:
        """The error for a non-OK per-blob status in a batch answer."""
        code = _STATUS_CODES.get(status.code, grpc.StatusCode.UNKNOWN)
        message = status.message
        if code == grpc.StatusCode.NOT_FOUND:
            return BlobNotFoundError(
                f"blob {digest_to_str(digest)} is not in the CAS at {self.where}",
                code=code.name,
                transient=False,
            )
        return RemoteError(
            f"{what} of blob {digest_to_str(digest)} on {self.where} failed: "
            f"{code.name}: {message}",
            code=code.name,
            transient=code in TRANSIENT_CODES,
        )

    def not_found(self, exc: RemoteError, digest: Digest) -> RemoteError:
        """``exc``, or a BlobNotFoundError naming ``digest`` when it is NOT_FOUND."""
        if exc.code != "NOT_FOUND" or isinstance(exc, BlobNotFoundError):
            return exc
        return BlobNotFoundError(
            f"blob {digest_to_str(digest)} is not in the CAS at {self.where} ({exc})",
            code="NOT_FOUND",
            transient=False,
        )


def digest_key(digest: Digest) -> Key:
    """A digest as a hashable (hash, size) pair."""
    return (digest.hash, digest.size_bytes)


def unique(digests: Iterable[Digest]) -> list[Digest]:
    """Digests without repeats, in first-seen order."""
    seen: set[Key] = set()
    result: list[Digest] = []
    for digest in digests:
        k = digest_key(digest)
        if k not in seen:
            seen.add(k)
            result.append(digest)
    return result


def stream_timeout(size: int, base: float) -> float:
    """The deadline of a ByteStream transfer of ``size`` bytes: ``base`` (the
    endpoint's request timeout) plus the time at :data:`STREAM_MIN_RATE`."""
    return base + size / STREAM_MIN_RATE


def parse(data: bytes, cls: type[M], digest: Digest, where: str) -> M:
    """``data`` parsed as a ``cls`` message; ProtocolError naming the blob if it is not one."""
    message = cls()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise ProtocolError(
            f"blob {digest_to_str(digest)} from {where} is not a valid {cls.__name__}"
        ) from exc
    return message
