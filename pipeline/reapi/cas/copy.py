"""Copy blobs from one remote CAS to another, server to server, in bounded memory.

What "build without the bytes" needs when the artifact server is not the
execution server's CAS: the blobs one lacks are read from the other and
written on at once, never stored on the local disk. Small blobs travel in
batches (at most one batch, within both servers' limits, in memory per
request in flight); a blob too large for a batch is piped from a ByteStream
Read into a ByteStream Write chunk by chunk, its hash checked on the way
(the destination also checks it, and the write is refused on a mismatch).
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import Iterator, Sequence

import grpc

from pipeline.digest import Digest, digest_to_str
from pipeline.errors import DigestMismatchError, ProtocolError
from pipeline.reapi.cas.connection import CasConnection, digest_key, stream_timeout
from pipeline.reapi.cas.download import Downloader
from pipeline.reapi.cas.traffic import TRAFFIC
from pipeline.reapi.cas.upload import MemoryBlobs, Uploader, UploadStats
from protos.google.bytestream import bytestream_pb2 as bs_pb2

__all__ = ["BlobCopier"]


class BlobCopier:
    """Copies blobs from ``source`` to ``dest`` (two CAS connections)."""

    def __init__(
        self,
        source: CasConnection,
        source_reader: Downloader,
        dest: CasConnection,
        dest_writer: Uploader,
    ) -> None:
        self.source = source
        self.reader = source_reader
        self.dest = dest
        self.writer = dest_writer

    def copy(self, digests: Sequence[Digest]) -> UploadStats:
        """Copy ``digests`` (which ``dest`` lacks) from ``source``.

        Raises:
            BlobNotFoundError: ``source`` lacks a blob.
            DigestMismatchError: ``source`` sent wrong content.
            RemoteError: a server failed (after retries).
        """
        wanted = [d for d in digests if d.size_bytes != 0]
        if not wanted:
            return UploadStats(0, 0, len(digests))
        # Batches must fit both servers' limits: plan with the smaller one.
        conn = self.source
        if (
            self.dest.remote.capabilities().max_batch_total_size_bytes
            < self.source.remote.capabilities().max_batch_total_size_bytes
        ):
            conn = self.dest
        batches, large = conn.plan_batches(wanted)
        jobs = [functools.partial(self._copy_batch, b) for b in batches]
        jobs += [functools.partial(self._copy_stream, d) for d in large]
        self.dest.run_parallel(jobs)
        return UploadStats(len(wanted), sum(d.size_bytes for d in wanted), 0)

    def _copy_batch(self, batch: list[Digest]) -> None:
        blobs = self.reader.read_blobs(batch)  # verified
        source = MemoryBlobs({d.hash: blobs[digest_key(d)] for d in batch})
        self.writer._batch_update(source, batch, lambda _digest: None)

    def _copy_stream(self, digest: Digest) -> None:
        dest = self.dest

        def attempt() -> None:
            pipe = _Pipe(self.source, digest, f"{dest.prefix}uploads/{uuid.uuid4()}")
            try:
                response = dest.bytestream.Write(
                    iter(pipe),
                    timeout=stream_timeout(digest.size_bytes, dest.remote.request_timeout),
                )
            except grpc.RpcError:
                pipe.raise_error()  # the source's failure, not the destination's
                raise
            pipe.raise_error()
            if response.committed_size != digest.size_bytes:
                raise ProtocolError(
                    f"{dest.where} committed {response.committed_size} of "
                    f"{digest.size_bytes} bytes of blob {digest_to_str(digest)}"
                )
            TRAFFIC.up(digest.size_bytes)

        dest.remote.call(attempt, what=f"copy of {digest_to_str(digest)} by ByteStream")


class _Pipe:
    """WriteRequests made from the chunks of a ByteStream Read, as they arrive.

    gRPC swallows an exception raised while iterating requests (it cancels
    the call), so the read's error is kept and re-raised by the caller.
    """

    def __init__(self, source: CasConnection, digest: Digest, upload_prefix: str) -> None:
        self.source = source
        self.digest = digest
        self.resource = f"{upload_prefix}/blobs/{digest.hash}/{digest.size_bytes}"
        self._error: BaseException | None = None

    def __iter__(self) -> Iterator[bs_pb2.WriteRequest]:
        try:
            yield from self._requests()
        except Exception as exc:
            self._error = exc
            raise

    def _requests(self) -> Iterator[bs_pb2.WriteRequest]:
        digest, size = self.digest, self.digest.size_bytes
        read = bs_pb2.ReadRequest(
            resource_name=f"{self.source.prefix}blobs/{digest.hash}/{size}", read_offset=0
        )
        hasher = hashlib.sha256()
        offset = 0
        for response in self.source.bytestream.Read(
            read, timeout=stream_timeout(size, self.source.remote.request_timeout)
        ):
            data = response.data
            if not data:
                continue
            if offset + len(data) > size:
                raise DigestMismatchError(
                    f"{self.source.where} sent more than {size} bytes for blob "
                    f"{digest_to_str(digest)}"
                )
            hasher.update(data)
            TRAFFIC.down(len(data), 0)
            last = offset + len(data) == size
            if last and hasher.hexdigest() != digest.hash:
                # Not sent: the destination never sees the wrong last chunk.
                raise self.source.mismatch(digest, hasher.hexdigest(), size)
            request = bs_pb2.WriteRequest(write_offset=offset, data=data, finish_write=last)
            if offset == 0:
                request.resource_name = self.resource
            offset += len(data)
            yield request
        if offset != size:
            raise DigestMismatchError(
                f"{self.source.where} sent {offset} of {size} bytes "
                f"for blob {digest_to_str(digest)}"
            )
        TRAFFIC.down(0)

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error
