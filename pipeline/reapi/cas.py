"""Client of a remote CAS: find, upload and download blobs and trees.

Every RPC goes through :meth:`Remote.call`, one retry unit per request (a
batch, a ByteStream stream, a GetTree page), so a server restart in the middle
of a large upload costs one unit again, not the whole upload.

Everything downloaded is verified against its digest before it is stored or
returned: a server that sends wrong bytes gets a :class:`DigestMismatchError`,
never a poisoned local CAS. Directories are also checked for hostile names
before anything of their tree is stored.

Small blobs travel in BatchUpdateBlobs/BatchReadBlobs requests packed up to
the server's batch limit; larger ones by ByteStream in chunks. Blobs travel
uncompressed: neither buildbox-casd 1.4.25 nor BuildGrid 0.4.4 offers zstd.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import io
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2

from pipeline.cas.store import LocalCas
from pipeline.cas.tree import check_directory, tree_digests
from pipeline.digest import Digest, digest_of, digest_of_message, digest_to_str
from pipeline.errors import (
    BlobNotFoundError,
    DigestMismatchError,
    LocalCasError,
    ProtocolError,
    RemoteError,
    UnsafePathError,
)
from pipeline.reapi.remote import DEFAULT_RPC_TIMEOUT, Remote
from pipeline.reapi.retry import TRANSIENT_CODES
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from protos.google.bytestream import bytestream_pb2 as bs_pb2
from protos.google.bytestream import bytestream_pb2_grpc as bs_grpc

__all__ = ["BlobSource", "CasClient", "DownloadStats", "UploadStats"]

M = TypeVar("M", bound=Message)
_Key = tuple[str, int]

FIND_MISSING_BATCH = 10_000
"""Digests per FindMissingBlobs request (about 1 MB of request)."""

MAX_BATCH_ENTRIES = 10_000
"""Entries per BatchUpdate/BatchRead request, however small the blobs."""

BYTESTREAM_CHUNK = 1024 * 1024
# Requests in flight at once per upload/download call.
DEFAULT_PARALLELISM = 4
# Small batches spread over the parallel requests better than a few 4 MiB ones.
PARALLEL_BATCH_BYTES = 1024 * 1024
"""Bytes per ByteStream WriteRequest."""

ENTRY_FRAMING = 128
"""Bytes a batch entry costs besides its data: its Digest (64-char hash, size),
status, compressor and the protobuf tags and lengths around them (at most ~100)."""

STREAM_MIN_RATE = 1024 * 1024
"""Bytes per second a ByteStream transfer is given before its deadline expires."""

RECENT_UPLOAD_TTL = 600.0
"""Seconds an upload by this client is remembered for concurrent uploaders."""

GET_TREE_PAGE_SIZE = 10_000

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True)
class UploadStats:
    """What an upload did.

    ``blobs_skipped`` counts the distinct blobs asked for but not sent by this
    call: already on the server, empty, or sent by another thread meanwhile.
    """

    blobs_sent: int = 0
    bytes_sent: int = 0
    blobs_skipped: int = 0

    def __add__(self, other: UploadStats) -> UploadStats:
        return UploadStats(
            self.blobs_sent + other.blobs_sent,
            self.bytes_sent + other.bytes_sent,
            self.blobs_skipped + other.blobs_skipped,
        )


@dataclass(frozen=True)
class DownloadStats:
    """What a download did; ``blobs_skipped`` were already in the local CAS."""

    blobs_fetched: int = 0
    bytes_fetched: int = 0
    blobs_skipped: int = 0

    def __add__(self, other: DownloadStats) -> DownloadStats:
        return DownloadStats(
            self.blobs_fetched + other.blobs_fetched,
            self.bytes_fetched + other.bytes_fetched,
            self.blobs_skipped + other.blobs_skipped,
        )


class BlobSource(Protocol):
    """Where uploaded blobs are read from (a :class:`LocalCas` is one)."""

    def get(self, digest: Digest) -> bytes: ...

    def open(self, digest: Digest) -> BinaryIO: ...


@dataclass(frozen=True)
class _TreeDirectory:
    digest: Digest
    directory: re_pb2.Directory
    data: bytes
    """Bytes that hash to ``digest`` (what the local CAS stores)."""


class CasClient:
    """The ContentAddressableStorage and ByteStream services of one :class:`Remote`.

    One client may be used from several threads at once.

    Args:
        remote: the server (and instance) to talk to.
        chunk_size: bytes per ByteStream write request.
        parallelism: requests (batches, streams) in flight at once for one
            upload or download; servers such as buildbox-casd write each blob
            to disk, so several requests at once keep them busy.
    """

    def __init__(
        self,
        remote: Remote,
        *,
        chunk_size: int = BYTESTREAM_CHUNK,
        parallelism: int = DEFAULT_PARALLELISM,
    ) -> None:
        self.remote = remote
        self.chunk_size = chunk_size
        self.parallelism = max(1, parallelism)
        self._cas = remote.stub(re_grpc.ContentAddressableStorageStub)
        self._bytestream = remote.stub(bs_grpc.ByteStreamStub)
        prefix = remote.instance_name.strip("/")
        self._prefix = f"{prefix}/" if prefix else ""
        self._lock = threading.Lock()
        # Uploads in progress in this process, and when recent ones finished:
        # a second thread uploading the same blob waits for the first.
        self._inflight: dict[_Key, concurrent.futures.Future[None]] = {}
        self._recent: collections.OrderedDict[_Key, float] = collections.OrderedDict()
        self._query_write_status_supported = True

    def __repr__(self) -> str:
        return f"CasClient({self.remote!r})"

    # --- finding -----------------------------------------------------------

    def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        """The digests the server does not have, each once, in input order.

        The empty blob is never missing (every CAS has it implicitly).

        Raises:
            RemoteError: the server failed (after retries).
        """
        wanted = [d for d in _unique(digests) if d.size_bytes != 0]
        missing: list[Digest] = []
        for start in range(0, len(wanted), FIND_MISSING_BATCH):
            batch = wanted[start : start + FIND_MISSING_BATCH]
            request = re_pb2.FindMissingBlobsRequest(
                instance_name=self.remote.instance_name,
                blob_digests=batch,
                digest_function=re_pb2.DigestFunction.SHA256,
            )
            response = self._find_missing_batch(request)
            # Only believe answers about what we asked, in our order.
            answered = {_key(d) for d in response.missing_blob_digests}
            missing.extend(d for d in batch if _key(d) in answered)
        return missing

    # --- uploading ---------------------------------------------------------

    def upload_from(self, local_cas: BlobSource, digests: Iterable[Digest]) -> UploadStats:
        """Send the given blobs from the local CAS, whether or not the server has them.

        Blobs that another thread of this process is sending (or finished
        sending since this call began) are not sent again.

        Raises:
            LocalBlobMissingError: a blob is not in the local CAS.
            RemoteError: the server refused a blob or failed (after retries).
        """
        since = time.monotonic()
        wanted = _unique(digests)
        stats = self._upload_once(local_cas, [d for d in wanted if d.size_bytes != 0], since)
        return UploadStats(stats.blobs_sent, stats.bytes_sent, len(wanted) - stats.blobs_sent)

    def upload_missing(self, local_cas: BlobSource, digests: Iterable[Digest]) -> UploadStats:
        """Send those of the given blobs that the server lacks.

        A blob that another thread of this process is sending at the same time
        is waited for, not sent twice.

        Raises:
            LocalBlobMissingError: a missing blob is not in the local CAS either.
            RemoteError: the server refused a blob or failed (after retries).
        """
        # Taken before asking the server: an upload by another thread that
        # finishes after this instant may have made the server's answer stale.
        since = time.monotonic()
        wanted = _unique(digests)
        missing = self.find_missing(wanted)
        stats = self._upload_once(local_cas, missing, since)
        return UploadStats(stats.blobs_sent, stats.bytes_sent, len(wanted) - stats.blobs_sent)

    def upload_tree(self, local_cas: LocalCas, root: Digest) -> UploadStats:
        """Send the Directory ``root`` and everything below it that the server lacks.

        Raises:
            LocalBlobMissingError: part of the tree is not in the local CAS.
            RemoteError: the server failed (after retries).
        """
        return self.upload_missing(local_cas, tree_digests(local_cas, root))

    def upload_blob(self, data: bytes) -> Digest:
        """Send one blob held in memory; return its digest.

        Raises:
            RemoteError: the server refused it or failed (after retries).
        """
        digest = digest_of(data)
        if digest.size_bytes != 0:
            self._upload_once(_MemorySource({digest.hash: data}), [digest], time.monotonic())
        return digest

    def upload_message(self, message: Message) -> Digest:
        """Send a protobuf message, serialized deterministically; return its digest."""
        return self.upload_blob(message.SerializeToString(deterministic=True))

    # --- downloading -------------------------------------------------------

    def download_into(self, local_cas: LocalCas, digests: Iterable[Digest]) -> DownloadStats:
        """Fetch those of the given blobs that the local CAS lacks, verifying each.

        Raises:
            BlobNotFoundError: the server does not have a blob.
            DigestMismatchError: the server sent wrong content for a blob (it is
                not stored).
            RemoteError: the server failed (after retries).
        """
        wanted = _unique(digests)
        missing = local_cas.missing(wanted)

        def store(digest: Digest, data: bytes) -> None:
            local_cas.put_verified(data, digest)

        batches, large = self._plan_batches(missing)
        jobs: list[Callable[[], None]] = [
            functools.partial(self._stream_into, local_cas, d) for d in large
        ]
        jobs += [functools.partial(self._batch_read, b, store) for b in batches]
        self._run_parallel(jobs)
        return DownloadStats(
            len(missing), sum(d.size_bytes for d in missing), len(wanted) - len(missing)
        )

    def read_blob(self, digest: Digest) -> bytes:
        """One blob's bytes, verified against ``digest``.

        Raises:
            BlobNotFoundError: the server does not have it.
            DigestMismatchError: the server sent wrong content.
            RemoteError: the server failed (after retries).
        """
        return self._read_blobs([digest])[_key(digest)]

    def read_message(self, digest: Digest, cls: type[M]) -> M:
        """Read a blob and parse it as a ``cls`` message.

        Raises:
            ProtocolError: the blob is not a valid ``cls``.
            BlobNotFoundError, DigestMismatchError, RemoteError: as :meth:`read_blob`.
        """
        return _parse(self.read_blob(digest), cls, digest, self._where)

    # --- trees -------------------------------------------------------------

    def get_tree(self, root: Digest) -> list[re_pb2.Directory]:
        """Every Directory of the tree under ``root`` (root first, each once).

        Uses GetTree, with paging; each directory is identified by hashing it
        and every one reachable from ``root`` must be accounted for. Those the
        answer lacks (or a server without GetTree) are read as blobs, verified.
        Every directory is checked for hostile names.

        Raises:
            UnsafePathError: a directory names ``..``, ``/`` or the like.
            BlobNotFoundError: the root or a directory is not on the server.
            DigestMismatchError, ProtocolError: the server sent something wrong.
            RemoteError: the server failed (after retries).
        """
        return [entry.directory for entry in self._tree_directories(root)]

    def fetch_tree(self, local_cas: LocalCas, root: Digest) -> int:
        """Make the whole tree under Directory ``root`` present in the local CAS.

        All directories are fetched and checked before anything is stored; the
        files come next and the directories last, so a stored root means a
        complete tree.

        Returns:
            How many blobs (files and directories) were fetched.

        Raises:
            UnsafePathError: a directory names ``..``, ``/`` or the like.
            BlobNotFoundError, DigestMismatchError, ProtocolError, RemoteError:
                as :meth:`download_into` and :meth:`get_tree`.
        """
        if local_cas.contains(root) and _complete_locally(local_cas, root):
            return 0
        entries = self._tree_directories(root)
        files = [f.digest for e in entries for f in e.directory.files]
        stats = self.download_into(local_cas, files)
        stored = 0
        # Children before parents (reverse breadth-first order), root last.
        for entry in reversed(entries):
            if not local_cas.contains(entry.digest):
                local_cas.put_verified(entry.data, entry.digest)
                stored += 1
        return stats.blobs_fetched + stored

    # --- private: find and upload ------------------------------------------

    def _find_missing_batch(
        self, request: re_pb2.FindMissingBlobsRequest
    ) -> re_pb2.FindMissingBlobsResponse:
        response: re_pb2.FindMissingBlobsResponse = self.remote.call(
            lambda: self._cas.FindMissingBlobs(request, timeout=DEFAULT_RPC_TIMEOUT),
            what="FindMissingBlobs",
        )
        return response

    @property
    def _where(self) -> str:
        return self.remote.endpoint.url

    def _upload_once(self, source: BlobSource, digests: list[Digest], since: float) -> UploadStats:
        """Upload ``digests`` (distinct, non-empty), sharing work with other threads.

        A digest another thread is uploading is waited for; one that another
        thread finished uploading after ``since`` is skipped. If the other
        thread failed, this one sends the blob itself.
        """
        mine: dict[_Key, concurrent.futures.Future[None]] = {}
        theirs: list[tuple[Digest, concurrent.futures.Future[None]]] = []
        to_send: list[Digest] = []
        with self._lock:
            for digest in digests:
                key = _key(digest)
                finished = self._recent.get(key)
                if finished is not None and finished >= since:
                    continue
                future = self._inflight.get(key)
                if future is not None:
                    theirs.append((digest, future))
                    continue
                future = concurrent.futures.Future()
                self._inflight[key] = mine[key] = future
                to_send.append(digest)

        def sent(digest: Digest) -> None:
            key = _key(digest)
            with self._lock:
                future = mine.pop(key)
                self._inflight.pop(key, None)
                self._recent[key] = time.monotonic()
                self._recent.move_to_end(key)
                self._forget_old_uploads()
            future.set_result(None)

        try:
            stats = self._send(source, to_send, sent)
        except BaseException as exc:
            with self._lock:
                failed = list(mine.items())
                mine.clear()
                for key, _ in failed:
                    self._inflight.pop(key, None)
            for _, future in failed:
                future.set_exception(exc)
            raise
        retry: list[Digest] = []
        for digest, future in theirs:
            try:
                future.result()
            except BaseException:
                # The other thread's failure may be its own (its local CAS,
                # its cancellation): try ourselves, without sharing this time.
                retry.append(digest)
        if retry:
            stats = stats + self._send(source, retry, lambda _: None)
        return stats

    def _forget_old_uploads(self) -> None:
        """Drop remembered uploads older than the TTL (caller holds the lock)."""
        horizon = time.monotonic() - RECENT_UPLOAD_TTL
        while self._recent:
            key, finished = next(iter(self._recent.items()))
            if finished >= horizon:
                break
            del self._recent[key]

    def _send(
        self, source: BlobSource, digests: list[Digest], sent: Callable[[Digest], None]
    ) -> UploadStats:
        """Upload ``digests`` unconditionally, calling ``sent`` for each one done."""
        batches, large = self._plan_batches(digests)

        def write_stream(digest: Digest) -> None:
            self._write_stream(source, digest)
            sent(digest)

        # Large blobs first: they take longest, the small batches fill in around them.
        jobs: list[Callable[[], None]] = [functools.partial(write_stream, d) for d in large]
        jobs += [functools.partial(self._batch_update, source, b, sent) for b in batches]
        self._run_parallel(jobs)
        return UploadStats(len(digests), sum(d.size_bytes for d in digests), 0)

    def _run_parallel(self, jobs: Sequence[Callable[[], None]]) -> None:
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
            futures = [pool.submit(job) for job in jobs]
            try:
                for future in concurrent.futures.as_completed(futures):
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def _plan_batches(self, digests: Sequence[Digest]) -> tuple[list[list[Digest]], list[Digest]]:
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

    def _batch_update(
        self, source: BlobSource, batch: list[Digest], sent: Callable[[Digest], None]
    ) -> None:
        """One BatchUpdateBlobs; a retry resends only the blobs not yet accepted."""
        pending = {_key(d): (d, source.get(d)) for d in batch}

        def attempt() -> None:
            request = re_pb2.BatchUpdateBlobsRequest(
                instance_name=self.remote.instance_name,
                requests=[
                    re_pb2.BatchUpdateBlobsRequest.Request(digest=d, data=data)
                    for d, data in pending.values()
                ],
                digest_function=re_pb2.DigestFunction.SHA256,
            )
            response = self._cas.BatchUpdateBlobs(request, timeout=DEFAULT_RPC_TIMEOUT)
            errors: list[RemoteError] = []
            for answer in response.responses:
                key = _key(answer.digest)
                if key not in pending:
                    continue
                if answer.status.code == 0:
                    digest, _ = pending.pop(key)
                    sent(digest)
                else:
                    errors.append(self._blob_error(answer.status, answer.digest, "upload"))
            if errors:
                # A permanent error ends the upload; transient ones are retried.
                errors.sort(key=lambda e: e.transient)
                raise errors[0]
            if pending:
                digest, _ = next(iter(pending.values()))
                raise ProtocolError(
                    f"{self._where} did not answer BatchUpdateBlobs for "
                    f"{len(pending)} blob(s), e.g. {digest_to_str(digest)}"
                )

        self.remote.call(attempt, what=f"BatchUpdateBlobs of {len(batch)} blobs")

    def _write_stream(self, source: BlobSource, digest: Digest) -> None:
        """Send one blob by ByteStream Write, resuming a broken stream if the server can."""
        size = digest.size_bytes
        resource = ""
        offset = 0

        def new_resource() -> str:
            return f"{self._prefix}uploads/{uuid.uuid4()}/blobs/{digest.hash}/{size}"

        def attempt() -> None:
            nonlocal resource, offset
            if not resource:
                resource = new_resource()
            else:
                resumed = self._committed_size(resource, size)
                if resumed is None:
                    # Unknown to the server: start over under a new name, so
                    # that no half-written upload is appended to.
                    resource, offset = new_resource(), 0
                elif resumed >= size:
                    return
                else:
                    offset = resumed
            with source.open(digest) as blob:
                blob.seek(offset)
                requests = _WriteRequests(blob, resource, offset, size, self.chunk_size)
                try:
                    response = self._bytestream.Write(iter(requests), timeout=_stream_timeout(size))
                except grpc.RpcError:
                    requests.raise_error()  # a local read error, not the server's
                    raise
                requests.raise_error()
            # committed_size is the whole size, also when the server already
            # had the blob and ended the stream early.
            if response.committed_size != size:
                raise ProtocolError(
                    f"{self._where} committed {response.committed_size} of "
                    f"{size} bytes of blob {digest_to_str(digest)}"
                )

        self.remote.call(attempt, what=f"ByteStream.Write of {digest_to_str(digest)}")

    def _committed_size(self, resource: str, size: int) -> int | None:
        """How much of an interrupted upload the server kept (QueryWriteStatus).

        Returns:
            The offset to resume from (``size`` when complete), or None when
            the upload must start again from 0.
        """
        if not self._query_write_status_supported:
            return None
        request = bs_pb2.QueryWriteStatusRequest(resource_name=resource)
        try:
            status = self._bytestream.QueryWriteStatus(request, timeout=DEFAULT_RPC_TIMEOUT)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
            if code == grpc.StatusCode.UNIMPLEMENTED:
                self._query_write_status_supported = False
            elif code in TRANSIENT_CODES:
                raise  # still down: the retry loop waits and asks again
            return None
        if status.complete:
            return size
        if 0 < status.committed_size <= size:
            return int(status.committed_size)
        return None

    # --- private: download -------------------------------------------------

    def _read_blobs(self, digests: Sequence[Digest]) -> dict[_Key, bytes]:
        """Read blobs into memory, verified; keyed by (hash, size)."""
        result: dict[_Key, bytes] = {}
        wanted = _unique(digests)
        for digest in wanted:
            if digest.size_bytes == 0:
                self._verify(digest, b"")
                result[_key(digest)] = b""
        batches, large = self._plan_batches([d for d in wanted if d.size_bytes != 0])

        def keep(digest: Digest, data: bytes) -> None:
            result[_key(digest)] = data

        for batch in batches:
            self._batch_read(batch, keep)
        for digest in large:
            buffer = io.BytesIO()
            self._stream_read(digest, buffer.write)
            data = buffer.getvalue()
            self._verify(digest, data)
            result[_key(digest)] = data
        return result

    def _batch_read(self, batch: list[Digest], store: Callable[[Digest, bytes], None]) -> None:
        """One BatchReadBlobs; each blob is verified, then handed to ``store``.

        A retry asks only for the blobs not yet received.
        """
        pending = {_key(d): d for d in batch}

        def attempt() -> None:
            request = re_pb2.BatchReadBlobsRequest(
                instance_name=self.remote.instance_name,
                digests=list(pending.values()),
                digest_function=re_pb2.DigestFunction.SHA256,
            )
            response = self._cas.BatchReadBlobs(request, timeout=DEFAULT_RPC_TIMEOUT)
            errors: list[RemoteError] = []
            for answer in response.responses:
                digest = pending.get(_key(answer.digest))
                if digest is None:
                    continue
                if answer.status.code != 0:
                    errors.append(self._blob_error(answer.status, digest, "download"))
                    continue
                if answer.compressor != re_pb2.Compressor.IDENTITY:
                    raise ProtocolError(
                        f"{self._where} sent blob {digest_to_str(digest)} compressed "
                        f"({answer.compressor}) although remex did not accept compression"
                    )
                self._verify(digest, answer.data)
                store(digest, answer.data)
                del pending[_key(digest)]
            if errors:
                errors.sort(key=lambda e: e.transient)
                raise errors[0]
            if pending:
                digest = next(iter(pending.values()))
                raise ProtocolError(
                    f"{self._where} did not answer BatchReadBlobs for "
                    f"{len(pending)} blob(s), e.g. {digest_to_str(digest)}"
                )

        self.remote.call(attempt, what=f"BatchReadBlobs of {len(batch)} blobs")

    def _stream_into(self, local_cas: LocalCas, digest: Digest) -> None:
        """Download one blob by ByteStream Read straight into the local CAS."""
        with local_cas.blob_writer(digest) as writer:
            hasher = hashlib.sha256()

            def write(chunk: bytes) -> None:
                hasher.update(chunk)
                writer.write(chunk)

            self._stream_read(digest, write)
            # Checked here, inside the block, so that a mismatch leaves nothing
            # behind and the error names the server.
            if hasher.hexdigest() != digest.hash:
                raise self._mismatch(digest, hasher.hexdigest(), digest.size_bytes)

    def _stream_read(self, digest: Digest, write: Callable[[bytes], object]) -> None:
        """ByteStream Read of a whole blob into ``write``; resumes at the offset reached."""
        size = digest.size_bytes
        resource = f"{self._prefix}blobs/{digest.hash}/{size}"
        received = 0

        def attempt() -> None:
            nonlocal received
            request = bs_pb2.ReadRequest(resource_name=resource, read_offset=received)
            for response in self._bytestream.Read(request, timeout=_stream_timeout(size)):
                data = response.data
                if received + len(data) > size:
                    raise DigestMismatchError(
                        f"{self._where} sent more than {size} bytes for blob "
                        f"{digest_to_str(digest)}"
                    )
                write(data)
                received += len(data)
            if received != size:
                raise DigestMismatchError(
                    f"{self._where} sent {received} of {size} bytes for blob "
                    f"{digest_to_str(digest)}"
                )

        try:
            self.remote.call(attempt, what=f"ByteStream.Read of {digest_to_str(digest)}")
        except RemoteError as exc:
            raise self._not_found(exc, digest) from exc

    # --- private: trees ----------------------------------------------------

    def _tree_directories(self, root: Digest) -> list[_TreeDirectory]:
        """All directories under ``root``, breadth-first, verified and checked."""
        answered: list[re_pb2.Directory] = []
        if root.size_bytes != 0:  # the empty Directory needs no server
            try:
                answered = self._get_tree_pages(root)
            except RemoteError as exc:
                if exc.code != "UNIMPLEMENTED":
                    raise self._not_found(exc, root) from exc
        known: dict[_Key, _TreeDirectory] = {}
        for directory in answered:
            digest, data = digest_of_message(directory)
            known.setdefault(_key(digest), _TreeDirectory(digest, directory, data))

        result: list[_TreeDirectory] = []
        seen: set[_Key] = set()
        level = [root]
        while level:
            # What GetTree did not give us (or gave under a serialization we
            # cannot reproduce) is read as blobs, verified byte for byte.
            absent = [d for d in level if _key(d) not in known]
            if absent:
                blobs = self._read_blobs(absent)
                for digest in absent:
                    data = blobs[_key(digest)]
                    directory = _parse(data, re_pb2.Directory, digest, self._where)
                    known[_key(digest)] = _TreeDirectory(digest, directory, data)
            next_level: list[Digest] = []
            for digest in level:
                entry = known[_key(digest)]
                self._check_directory(entry)
                result.append(entry)
                for node in entry.directory.directories:
                    key = _key(node.digest)
                    if key not in seen:
                        seen.add(key)
                        next_level.append(node.digest)
            level = next_level
        return result

    def _get_tree_pages(self, root: Digest) -> list[re_pb2.Directory]:
        """Directories GetTree returns for ``root``, following page tokens.

        A broken stream resumes from the last page token received.
        """
        directories: list[re_pb2.Directory] = []
        token = ""
        done = False
        tokens_seen: set[str] = set()

        def attempt() -> None:
            nonlocal token, done
            request = re_pb2.GetTreeRequest(
                instance_name=self.remote.instance_name,
                root_digest=root,
                page_size=GET_TREE_PAGE_SIZE,
                page_token=token,
                digest_function=re_pb2.DigestFunction.SHA256,
            )
            uncommitted: list[re_pb2.Directory] = []
            for response in self._cas.GetTree(request, timeout=DEFAULT_RPC_TIMEOUT):
                uncommitted.extend(response.directories)
                if response.next_page_token:
                    if response.next_page_token in tokens_seen:
                        raise ProtocolError(
                            f"{self._where} repeated GetTree page token "
                            f"{response.next_page_token!r}"
                        )
                    tokens_seen.add(response.next_page_token)
                    directories.extend(uncommitted)
                    uncommitted = []
                    token = response.next_page_token
                else:
                    directories.extend(uncommitted)
                    uncommitted = []
                    token = ""
            if not token:
                done = True

        while not done:
            self.remote.call(attempt, what=f"GetTree of {digest_to_str(root)}")
        return directories

    def _check_directory(self, entry: _TreeDirectory) -> None:
        """Refuse a hostile or malformed Directory from the server, naming it."""
        try:
            check_directory(entry.directory)
        except UnsafePathError as exc:
            raise UnsafePathError(
                f"{self._where} sent directory {digest_to_str(entry.digest)}: {exc}"
            ) from exc
        except LocalCasError as exc:
            raise ProtocolError(
                f"{self._where} sent a malformed directory {digest_to_str(entry.digest)}: {exc}"
            ) from exc

    # --- private: errors ---------------------------------------------------

    def _verify(self, digest: Digest, data: bytes) -> None:
        if len(data) != digest.size_bytes:
            raise self._mismatch(digest, hashlib.sha256(data).hexdigest(), len(data))
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest.hash:
            raise self._mismatch(digest, actual, len(data))

    def _mismatch(self, digest: Digest, actual_hash: str, actual_size: int) -> DigestMismatchError:
        return DigestMismatchError(
            f"{self._where} sent wrong content for blob {digest_to_str(digest)}: "
            f"got {actual_hash}/{actual_size}"
        )

    def _blob_error(self, status: status_pb2.Status, digest: Digest, what: str) -> RemoteError:
        """The error for a non-OK per-blob status in a batch answer."""
        code = _STATUS_CODES.get(status.code, grpc.StatusCode.UNKNOWN)
        message = status.message
        if code == grpc.StatusCode.NOT_FOUND:
            return BlobNotFoundError(
                f"blob {digest_to_str(digest)} is not in the CAS at {self._where}",
                code=code.name,
                transient=False,
            )
        return RemoteError(
            f"{what} of blob {digest_to_str(digest)} on {self._where} failed: "
            f"{code.name}: {message}",
            code=code.name,
            transient=code in TRANSIENT_CODES,
        )

    def _not_found(self, exc: RemoteError, digest: Digest) -> RemoteError:
        """``exc``, or a BlobNotFoundError naming ``digest`` when it is NOT_FOUND."""
        if exc.code != "NOT_FOUND" or isinstance(exc, BlobNotFoundError):
            return exc
        return BlobNotFoundError(
            f"blob {digest_to_str(digest)} is not in the CAS at {self._where} ({exc})",
            code="NOT_FOUND",
            transient=False,
        )


class _MemorySource:
    """A :class:`BlobSource` over blobs held in memory."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self._blobs = blobs

    def get(self, digest: Digest) -> bytes:
        return self._blobs[digest.hash]

    def open(self, digest: Digest) -> BinaryIO:
        return io.BytesIO(self._blobs[digest.hash])


class _WriteRequests:
    """The WriteRequests of one ByteStream Write, read from ``blob`` chunk by chunk.

    gRPC swallows an exception raised while iterating requests (it cancels the
    call), so a local read error is kept here and re-raised by the caller.
    """

    def __init__(self, blob: BinaryIO, resource: str, offset: int, size: int, chunk: int) -> None:
        self._blob = blob
        self._resource = resource
        self._offset = offset
        self._size = size
        self._chunk = chunk
        self._error: BaseException | None = None

    def __iter__(self) -> Iterator[bs_pb2.WriteRequest]:
        try:
            yield from self._requests()
        except Exception as exc:
            self._error = exc
            raise

    def _requests(self) -> Iterator[bs_pb2.WriteRequest]:
        offset = self._offset
        first = True
        while True:
            data = self._blob.read(min(self._chunk, self._size - offset))
            if not data and offset < self._size:
                raise ProtocolError(f"local blob ended at {offset} of {self._size} bytes")
            request = bs_pb2.WriteRequest(
                write_offset=offset, data=data, finish_write=offset + len(data) >= self._size
            )
            if first:
                # Only the first request must name the resource.
                request.resource_name = self._resource
                first = False
            offset += len(data)
            yield request
            if offset >= self._size:
                return

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error


def _key(digest: Digest) -> _Key:
    return (digest.hash, digest.size_bytes)


def _unique(digests: Iterable[Digest]) -> list[Digest]:
    """Digests without repeats, in first-seen order."""
    seen: set[_Key] = set()
    result: list[Digest] = []
    for digest in digests:
        key = _key(digest)
        if key not in seen:
            seen.add(key)
            result.append(digest)
    return result


def _stream_timeout(size: int) -> float:
    return DEFAULT_RPC_TIMEOUT + size / STREAM_MIN_RATE


def _parse(data: bytes, cls: type[M], digest: Digest, where: str) -> M:
    message = cls()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise ProtocolError(
            f"blob {digest_to_str(digest)} from {where} is not a valid {cls.__name__}"
        ) from exc
    return message


def _complete_locally(local_cas: LocalCas, root: Digest) -> bool:
    """Whether the whole tree under ``root`` is already in the local CAS."""
    try:
        return not local_cas.missing(tree_digests(local_cas, root))
    except LocalCasError:
        # A directory of the tree is missing or unreadable: fetch the tree.
        return False
