"""The CAS client: one object over the upload, download and tree parts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from google.protobuf.message import Message

from pipeline.cas.store import LocalCas
from pipeline.cas.tree import tree_digests
from pipeline.digest import Digest, digest_to_str
from pipeline.errors import LocalBlobMissingError
from pipeline.reapi.cas.connection import (
    BYTESTREAM_CHUNK,
    DEFAULT_PARALLELISM,
    CasConnection,
    M,
    digest_key,
    parse,
)
from pipeline.reapi.cas.copy import BlobCopier
from pipeline.reapi.cas.download import Downloader, DownloadStats
from pipeline.reapi.cas.tree import RemoteTree, TreeReader
from pipeline.reapi.cas.upload import BlobSource, LocalBlobs, Uploader, UploadStats
from pipeline.reapi.remote import Remote
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2


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
        self._conn = CasConnection(remote, chunk_size=chunk_size, parallelism=parallelism)
        self._uploader = Uploader(self._conn)
        self._downloader = Downloader(self._conn)
        self._trees = TreeReader(self._conn, self._downloader)

    @property
    def chunk_size(self) -> int:
        return self._conn.chunk_size

    @property
    def parallelism(self) -> int:
        return self._conn.parallelism

    def __repr__(self) -> str:
        return f"CasClient({self.remote!r})"

    # --- finding -----------------------------------------------------------

    def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        """The digests the server does not have, each once, in input order.

        The empty blob is never missing (every CAS has it implicitly).

        Raises:
            RemoteError: the server failed (after retries).
        """
        return self._uploader.find_missing(digests)

    # --- uploading ---------------------------------------------------------

    def upload_from(self, local_cas: BlobSource, digests: Iterable[Digest]) -> UploadStats:
        """Send the given blobs from the local CAS, whether or not the server has them.

        Blobs that another thread of this process is sending (or finished
        sending since this call began) are not sent again.

        Raises:
            LocalBlobMissingError: a blob is not in the local CAS.
            RemoteError: the server refused a blob or failed (after retries).
        """
        return self._uploader.upload_from(local_cas, digests)

    def upload_unless_recent(self, local_cas: BlobSource, digests: Iterable[Digest]) -> UploadStats:
        """Send the given blobs without asking the server first (no
        FindMissingBlobs), except those this client sent in the last
        :data:`~pipeline.reapi.cas.upload.RECENT_UPLOAD_TTL` seconds.

        For blobs the caller has just made and the server most likely lacks:
        a round trip saved. A blob the server lost since this client sent it
        is not sent again: the caller must have a way back (an Execute that
        reports missing inputs is followed by :meth:`upload_missing_from`).

        Raises:
            LocalBlobMissingError: a blob is not in the local CAS.
            RemoteError: the server refused a blob or failed (after retries).
        """
        return self._uploader.upload_unless_recent(local_cas, digests)

    def upload_missing(self, local_cas: BlobSource, digests: Iterable[Digest]) -> UploadStats:
        """Send those of the given blobs that the server lacks.

        A blob that another thread of this process is sending at the same time
        is waited for, not sent twice.

        Raises:
            LocalBlobMissingError: a missing blob is not in the local CAS either.
            RemoteError: the server refused a blob or failed (after retries).
        """
        return self._uploader.upload_missing(local_cas, digests)

    def upload_tree(self, local_cas: LocalCas, root: Digest) -> UploadStats:
        """Send the Directory ``root`` and everything below it that the server lacks.

        Raises:
            LocalBlobMissingError: part of the tree is not in the local CAS.
            RemoteError: the server failed (after retries).
        """
        return self.upload_missing(local_cas, tree_digests(local_cas, root))

    def upload_missing_from(
        self,
        local_cas: LocalBlobs,
        digests: Iterable[Digest],
        *,
        fallback: CasClient | None = None,
    ) -> UploadStats:
        """Send what the server lacks of ``digests``, after one FindMissingBlobs:
        from ``local_cas`` when it holds a blob (the local CAS, or blobs in
        memory in front of it: :class:`MemoryBlobs`), otherwise copied server to
        server from ``fallback`` (build without the bytes: the local CAS may
        hold a tree's Directory messages and not its files).

        What comes from the local CAS is sent in ``digests``' order, in as few
        requests as the server's batch limit allows (one, for an action with a
        small input root).

        Raises:
            LocalBlobMissingError: a missing blob is neither in the local CAS
                nor (without ``fallback``) anywhere this call may take it from.
            BlobNotFoundError: ``fallback`` lacks it too.
            RemoteError: a server failed (after retries).
        """
        wanted = list(digests)
        missing = self._uploader.find_missing(wanted)
        if not missing:
            return UploadStats(0, 0, len(wanted))
        local: list[Digest] = []
        remote: list[Digest] = []
        for digest in missing:
            (local if local_cas.contains(digest) else remote).append(digest)
        stats = UploadStats(0, 0, 0)
        if remote:
            if fallback is None:
                raise LocalBlobMissingError(
                    f"blob {digest_to_str(remote[0])} is missing on {self.remote.endpoint.url} "
                    f"and not in the local CAS ({len(remote)} such blob(s))"
                )
            stats += self.copy_from(fallback, remote)
        return stats + self._uploader.upload_from(local_cas, local)

    def copy_from(self, source: CasClient, digests: Sequence[Digest]) -> UploadStats:
        """Copy ``digests`` from the server of ``source`` to this one, server to
        server (streamed, bounded memory; see :mod:`pipeline.reapi.cas.copy`);
        none of them is stored locally.

        Raises:
            BlobNotFoundError: ``source`` lacks a blob.
            DigestMismatchError, RemoteError: as the CAS client.
        """
        copier = BlobCopier(source._conn, source._downloader, self._conn, self._uploader)
        return copier.copy(digests)

    def upload_blob(self, data: bytes) -> Digest:
        """Send one blob held in memory; return its digest.

        Raises:
            RemoteError: the server refused it or failed (after retries).
        """
        return self._uploader.upload_blob(data)

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
        return self._downloader.download_into(local_cas, digests)

    def read_blob(self, digest: Digest) -> bytes:
        """One blob's bytes, verified against ``digest``.

        Raises:
            BlobNotFoundError: the server does not have it.
            DigestMismatchError: the server sent wrong content.
            RemoteError: the server failed (after retries).
        """
        return self._downloader.read_blobs([digest])[digest_key(digest)]

    def read_blobs(self, digests: Sequence[Digest]) -> dict[tuple[str, int], bytes]:
        """Blobs' bytes, each verified, keyed by ``(hash, size_bytes)``; the
        small ones in as few BatchReadBlobs as the server's limit allows.
        Everything is held in memory: for small blobs.

        Raises:
            As :meth:`read_blob`.
        """
        return self._downloader.read_blobs(digests)

    def parse_message(self, data: bytes, cls: type[M], digest: Digest) -> M:
        """Parse a blob read from this server as a ``cls`` message.

        Raises:
            ProtocolError: the blob is not a valid ``cls``.
        """
        return parse(data, cls, digest, self._conn.where)

    def read_message(self, digest: Digest, cls: type[M]) -> M:
        """Read a blob and parse it as a ``cls`` message.

        Raises:
            ProtocolError: the blob is not a valid ``cls``.
            BlobNotFoundError, DigestMismatchError, RemoteError: as :meth:`read_blob`.
        """
        return parse(self.read_blob(digest), cls, digest, self._conn.where)

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
        return self.read_tree(root).directories

    def read_tree(self, root: Digest) -> RemoteTree:
        """As :meth:`get_tree`, kept as a :class:`RemoteTree`: a subtree of it
        can then be fetched (:meth:`fetch_tree`, :meth:`fetch_directories`
        with ``within``) without asking the server again.

        Raises:
            As :meth:`get_tree`.
        """
        return self._trees.read_tree(root)

    def fetch_tree(
        self,
        local_cas: LocalCas,
        root: Digest,
        *,
        within: RemoteTree | None = None,
    ) -> int:
        """Make the whole tree under Directory ``root`` present in the local CAS.

        All directories are fetched and checked before anything is stored; the
        files come next and the directories last, so a stored root means a
        complete tree. ``within``: a tree read from this server
        (:meth:`read_tree`) that holds ``root``: its folders are not asked
        for again.

        Returns:
            How many blobs (files and directories) were fetched.

        Raises:
            UnsafePathError: a directory names ``..``, ``/`` or the like.
            BlobNotFoundError, DigestMismatchError, ProtocolError, RemoteError:
                as :meth:`download_into` and :meth:`get_tree`.
        """
        return self._trees.fetch_tree(local_cas, root, within)

    def forget_local(self) -> None:
        """Forget what this client remembers of local CAS contents (the roots
        :meth:`fetch_directories` made complete): call it when blobs were
        found gone from the local CAS (wiped, cleaned by another process)."""
        self._trees.forget_local()

    def fetch_directories(
        self,
        local_cas: LocalCas,
        root: Digest,
        *,
        within: RemoteTree | None = None,
    ) -> int:
        """Make the Directory messages of the tree under ``root`` present in the
        local CAS, not its files (build without the bytes). ``within``: as for
        :meth:`fetch_tree`.

        Cheap when they already are: this client remembers the roots it made
        complete (and checks the local CAS still holds the root, in the same
        incarnation; see :meth:`forget_local`).

        Returns:
            How many Directory messages were stored.

        Raises:
            As :meth:`get_tree`.
        """
        return self._trees.fetch_directories(local_cas, root, within)
