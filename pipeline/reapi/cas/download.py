"""Downloading from a remote CAS: BatchReadBlobs and ByteStream Read.

Everything downloaded is verified against its digest before it is stored or
returned: a server that sends wrong bytes gets a :class:`DigestMismatchError`,
never a poisoned local CAS.
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from pipeline.cas.store import LocalCas
from pipeline.digest import Digest, digest_to_str
from pipeline.errors import DigestMismatchError, ProtocolError, RemoteError
from pipeline.reapi.cas.connection import CasConnection, Key, digest_key, stream_timeout, unique
from pipeline.reapi.cas.traffic import TRAFFIC
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from protos.google.bytestream import bytestream_pb2 as bs_pb2


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


class Downloader:
    """The download half of :class:`pipeline.reapi.cas.CasClient` (see there)."""

    def __init__(self, conn: CasConnection) -> None:
        self.conn = conn

    def download_into(self, local_cas: LocalCas, digests: Iterable[Digest]) -> DownloadStats:
        """See :meth:`CasClient.download_into`."""
        wanted = unique(digests)
        missing = local_cas.missing(wanted)

        def store(digest: Digest, data: bytes) -> None:
            local_cas.put_verified(data, digest)

        batches, large = self.conn.plan_batches(missing)
        jobs: list[Callable[[], None]] = [
            functools.partial(self._stream_into, local_cas, d) for d in large
        ]
        jobs += [functools.partial(self._batch_read, b, store) for b in batches]
        self.conn.run_parallel(jobs)
        return DownloadStats(
            len(missing), sum(d.size_bytes for d in missing), len(wanted) - len(missing)
        )

    def read_blobs(self, digests: Sequence[Digest]) -> dict[Key, bytes]:
        """Read blobs into memory, verified; keyed by (hash, size)."""
        result: dict[Key, bytes] = {}
        wanted = unique(digests)
        for digest in wanted:
            if digest.size_bytes == 0:
                self.conn.verify(digest, b"")
                result[digest_key(digest)] = b""
        batches, large = self.conn.plan_batches([d for d in wanted if d.size_bytes != 0])

        def keep(digest: Digest, data: bytes) -> None:
            result[digest_key(digest)] = data

        for batch in batches:
            self._batch_read(batch, keep)
        for digest in large:
            buffer = io.BytesIO()
            self._stream_read(digest, buffer.write)
            data = buffer.getvalue()
            self.conn.verify(digest, data)
            result[digest_key(digest)] = data
        return result

    # --- private -----------------------------------------------------------

    def _batch_read(self, batch: list[Digest], store: Callable[[Digest, bytes], None]) -> None:
        """One BatchReadBlobs; each blob is verified, then handed to ``store``.

        A retry asks only for the blobs not yet received.
        """
        conn = self.conn
        pending = {digest_key(d): d for d in batch}

        def attempt() -> None:
            request = re_pb2.BatchReadBlobsRequest(
                instance_name=conn.remote.instance_name,
                digests=list(pending.values()),
                digest_function=re_pb2.DigestFunction.SHA256,
            )
            response = conn.cas.BatchReadBlobs(request, timeout=conn.remote.request_timeout)
            errors: list[RemoteError] = []
            for answer in response.responses:
                digest = pending.get(digest_key(answer.digest))
                if digest is None:
                    continue
                if answer.status.code != 0:
                    errors.append(conn.blob_error(answer.status, digest, "download"))
                    continue
                if answer.compressor != re_pb2.Compressor.IDENTITY:
                    raise ProtocolError(
                        f"{conn.where} sent blob {digest_to_str(digest)} compressed "
                        f"({answer.compressor}) although remex did not accept compression"
                    )
                conn.verify(digest, answer.data)
                TRAFFIC.down(len(answer.data))
                store(digest, answer.data)
                del pending[digest_key(digest)]
            if errors:
                errors.sort(key=lambda e: e.transient)
                raise errors[0]
            if pending:
                digest = next(iter(pending.values()))
                raise ProtocolError(
                    f"{conn.where} did not answer BatchReadBlobs for "
                    f"{len(pending)} blob(s), e.g. {digest_to_str(digest)}"
                )

        conn.remote.call(attempt, what=f"BatchReadBlobs of {len(batch)} blobs")

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
                raise self.conn.mismatch(digest, hasher.hexdigest(), digest.size_bytes)

    def _stream_read(self, digest: Digest, write: Callable[[bytes], object]) -> None:
        """ByteStream Read of a whole blob into ``write``; resumes at the offset reached."""
        conn = self.conn
        size = digest.size_bytes
        resource = f"{conn.prefix}blobs/{digest.hash}/{size}"
        received = 0

        def attempt() -> None:
            nonlocal received
            request = bs_pb2.ReadRequest(resource_name=resource, read_offset=received)
            for response in conn.bytestream.Read(
                request, timeout=stream_timeout(size, conn.remote.request_timeout)
            ):
                data = response.data
                if received + len(data) > size:
                    raise DigestMismatchError(
                        f"{conn.where} sent more than {size} bytes for blob {digest_to_str(digest)}"
                    )
                write(data)
                received += len(data)
                TRAFFIC.down(len(data), 0)
            if received != size:
                raise DigestMismatchError(
                    f"{conn.where} sent {received} of {size} bytes for blob {digest_to_str(digest)}"
                )
            TRAFFIC.down(0)

        try:
            conn.remote.call(attempt, what=f"ByteStream.Read of {digest_to_str(digest)}")
        except RemoteError as exc:
            raise conn.not_found(exc, digest) from exc
