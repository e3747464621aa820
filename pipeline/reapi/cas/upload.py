"""Uploading to a remote CAS: FindMissingBlobs, BatchUpdateBlobs, ByteStream Write.

Small blobs travel in BatchUpdateBlobs requests packed up to the server's
batch limit; larger ones by ByteStream in chunks, resumed after a broken
stream where the server supports QueryWriteStatus. Blobs travel
uncompressed: neither buildbox-casd 1.4.25 nor BuildGrid 0.4.4 offers zstd.
Threads of one process that upload the same blob at once share the work.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import io
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

import grpc
from google.protobuf.message import Message

from pipeline.digest import Digest, digest_of, digest_to_str
from pipeline.errors import ProtocolError, RemoteError
from pipeline.reapi.cas.connection import CasConnection, Key, digest_key, stream_timeout, unique
from pipeline.reapi.cas.traffic import TRAFFIC
from pipeline.reapi.retry import TRANSIENT_CODES
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from protos.google.bytestream import bytestream_pb2 as bs_pb2

FIND_MISSING_BATCH = 10_000
"""Digests per FindMissingBlobs request (about 1 MB of request)."""

RECENT_UPLOAD_TTL = 600.0
"""Seconds an upload by this client is remembered for concurrent uploaders."""


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


class BlobSource(Protocol):
    """Where uploaded blobs are read from (a :class:`LocalCas` is one)."""

    def get(self, digest: Digest) -> bytes: ...

    def open(self, digest: Digest) -> BinaryIO: ...


class LocalBlobs(BlobSource, Protocol):
    """A :class:`BlobSource` that can say whether it holds a blob (a
    :class:`LocalCas` is one)."""

    def contains(self, digest: Digest) -> bool: ...


class Uploader:
    """The upload half of :class:`pipeline.reapi.cas.CasClient` (see there)."""

    def __init__(self, conn: CasConnection) -> None:
        self.conn = conn
        self._lock = threading.Lock()
        # Uploads in progress in this process, and when recent ones finished:
        # a second thread uploading the same blob waits for the first.
        self._inflight: dict[Key, concurrent.futures.Future[None]] = {}
        self._recent: collections.OrderedDict[Key, float] = collections.OrderedDict()
        self._query_write_status_supported = True

    def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        """See :meth:`CasClient.find_missing`."""
        wanted = [d for d in unique(digests) if d.size_bytes != 0]
        missing: list[Digest] = []
        for start in range(0, len(wanted), FIND_MISSING_BATCH):
            batch = wanted[start : start + FIND_MISSING_BATCH]
            request = re_pb2.FindMissingBlobsRequest(
                instance_name=self.conn.remote.instance_name,
                blob_digests=batch,
                digest_function=re_pb2.DigestFunction.SHA256,
            )
            response = self._find_missing_batch(request)
            # Only believe answers about what we asked, in our order.
            answered = {digest_key(d) for d in response.missing_blob_digests}
            missing.extend(d for d in batch if digest_key(d) in answered)
        return missing

    def upload_from(self, source: BlobSource, digests: Iterable[Digest]) -> UploadStats:
        """See :meth:`CasClient.upload_from`."""
        since = time.monotonic()
        wanted = unique(digests)
        stats = self._upload_once(source, [d for d in wanted if d.size_bytes != 0], since)
        return UploadStats(stats.blobs_sent, stats.bytes_sent, len(wanted) - stats.blobs_sent)

    def upload_unless_recent(self, source: BlobSource, digests: Iterable[Digest]) -> UploadStats:
        """See :meth:`CasClient.upload_unless_recent`."""
        since = time.monotonic() - RECENT_UPLOAD_TTL
        wanted = unique(digests)
        stats = self._upload_once(source, [d for d in wanted if d.size_bytes != 0], since)
        return UploadStats(stats.blobs_sent, stats.bytes_sent, len(wanted) - stats.blobs_sent)

    def upload_missing(self, source: BlobSource, digests: Iterable[Digest]) -> UploadStats:
        """See :meth:`CasClient.upload_missing`."""
        # Taken before asking the server: an upload by another thread that
        # finishes after this instant may have made the server's answer stale.
        since = time.monotonic()
        wanted = unique(digests)
        missing = self.find_missing(wanted)
        stats = self._upload_once(source, missing, since)
        return UploadStats(stats.blobs_sent, stats.bytes_sent, len(wanted) - stats.blobs_sent)

    def upload_blob(self, data: bytes) -> Digest:
        """See :meth:`CasClient.upload_blob`."""
        digest = digest_of(data)
        if digest.size_bytes != 0:
            self._upload_once(MemoryBlobs({digest.hash: data}), [digest], time.monotonic())
        return digest

    # --- private -----------------------------------------------------------

    def _find_missing_batch(
        self, request: re_pb2.FindMissingBlobsRequest
    ) -> re_pb2.FindMissingBlobsResponse:
        cas = self.conn.cas
        response: re_pb2.FindMissingBlobsResponse = self.conn.remote.call(
            lambda: cas.FindMissingBlobs(request, timeout=self.conn.remote.request_timeout),
            what="FindMissingBlobs",
        )
        return response

    def _upload_once(self, source: BlobSource, digests: list[Digest], since: float) -> UploadStats:
        """Upload ``digests`` (distinct, non-empty), sharing work with other threads.

        A digest another thread is uploading is waited for; one that another
        thread finished uploading after ``since`` is skipped. If the other
        thread failed, this one sends the blob itself.
        """
        mine: dict[Key, concurrent.futures.Future[None]] = {}
        theirs: list[tuple[Digest, concurrent.futures.Future[None]]] = []
        to_send: list[Digest] = []
        with self._lock:
            for digest in digests:
                key = digest_key(digest)
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
            key = digest_key(digest)
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
        batches, large = self.conn.plan_batches(digests)

        def write_stream(digest: Digest) -> None:
            self._write_stream(source, digest)
            sent(digest)

        # Large blobs first: they take longest, the small batches fill in around them.
        jobs: list[Callable[[], None]] = [functools.partial(write_stream, d) for d in large]
        jobs += [functools.partial(self._batch_update, source, b, sent) for b in batches]
        self.conn.run_parallel(jobs)
        return UploadStats(len(digests), sum(d.size_bytes for d in digests), 0)

    def _batch_update(
        self, source: BlobSource, batch: list[Digest], sent: Callable[[Digest], None]
    ) -> None:
        """One BatchUpdateBlobs; a retry resends only the blobs not yet accepted."""
        conn = self.conn
        pending = {digest_key(d): (d, source.get(d)) for d in batch}

        def attempt() -> None:
            request = re_pb2.BatchUpdateBlobsRequest(
                instance_name=conn.remote.instance_name,
                requests=[
                    re_pb2.BatchUpdateBlobsRequest.Request(digest=d, data=data)
                    for d, data in pending.values()
                ],
                digest_function=re_pb2.DigestFunction.SHA256,
            )
            response = conn.cas.BatchUpdateBlobs(request, timeout=conn.remote.request_timeout)
            errors: list[RemoteError] = []
            for answer in response.responses:
                key = digest_key(answer.digest)
                if key not in pending:
                    continue
                if answer.status.code == 0:
                    digest, data = pending.pop(key)
                    TRAFFIC.up(len(data))
                    sent(digest)
                else:
                    errors.append(conn.blob_error(answer.status, answer.digest, "upload"))
            if errors:
                # A permanent error ends the upload; transient ones are retried.
                errors.sort(key=lambda e: e.transient)
                raise errors[0]
            if pending:
                digest, _ = next(iter(pending.values()))
                raise ProtocolError(
                    f"{conn.where} did not answer BatchUpdateBlobs for "
                    f"{len(pending)} blob(s), e.g. {digest_to_str(digest)}"
                )

        conn.remote.call(attempt, what=f"BatchUpdateBlobs of {len(batch)} blobs")

    def _write_stream(self, source: BlobSource, digest: Digest) -> None:
        """Send one blob by ByteStream Write, resuming a broken stream if the server can."""
        conn = self.conn
        size = digest.size_bytes
        resource = ""
        offset = 0

        def new_resource() -> str:
            return f"{conn.prefix}uploads/{uuid.uuid4()}/blobs/{digest.hash}/{size}"

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
                requests = _WriteRequests(blob, resource, offset, size, conn.chunk_size)
                try:
                    response = conn.bytestream.Write(
                        iter(requests), timeout=stream_timeout(size, conn.remote.request_timeout)
                    )
                except grpc.RpcError:
                    requests.raise_error()  # a local read error, not the server's
                    raise
                requests.raise_error()
            # committed_size is the whole size, also when the server already
            # had the blob and ended the stream early.
            if response.committed_size != size:
                raise ProtocolError(
                    f"{conn.where} committed {response.committed_size} of "
                    f"{size} bytes of blob {digest_to_str(digest)}"
                )
            TRAFFIC.up(size - offset)

        conn.remote.call(attempt, what=f"ByteStream.Write of {digest_to_str(digest)}")

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
            status = self.conn.bytestream.QueryWriteStatus(
                request, timeout=self.conn.remote.request_timeout
            )
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


class MemoryBlobs:
    """A :class:`BlobSource` over blobs held in memory (keyed by hash), in
    front of another source (``below``, e.g. the local CAS) for the rest.
    What is made only to be sent is put here (:meth:`put`,
    :meth:`put_message`, as into a :class:`LocalCas`) rather than written
    to disk first."""

    def __init__(
        self, blobs: dict[str, bytes] | None = None, below: LocalBlobs | None = None
    ) -> None:
        self._blobs = {} if blobs is None else blobs
        self._below = below

    def put(self, data: bytes) -> Digest:
        """Hold ``data``; return its digest."""
        digest = digest_of(data)
        self._blobs[digest.hash] = data
        return digest

    def put_message(self, message: Message) -> Digest:
        """Hold a protobuf message, serialized deterministically; return its digest."""
        return self.put(message.SerializeToString(deterministic=True))

    def digests(self) -> list[Digest]:
        """The blobs held in memory (not those below)."""
        return [Digest(hash=h, size_bytes=len(data)) for h, data in self._blobs.items()]

    def contains(self, digest: Digest) -> bool:
        if digest.hash in self._blobs:
            return True
        return self._below is not None and self._below.contains(digest)

    def get(self, digest: Digest) -> bytes:
        data = self._blobs.get(digest.hash)
        if data is not None:
            return data
        if self._below is None:
            raise KeyError(digest.hash)
        return self._below.get(digest)

    def open(self, digest: Digest) -> BinaryIO:
        data = self._blobs.get(digest.hash)
        if data is not None:
            return io.BytesIO(data)
        if self._below is None:
            raise KeyError(digest.hash)
        return self._below.open(digest)


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
