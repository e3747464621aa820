"""Reading whole Directory trees from a remote CAS: GetTree with paging, and
blob reads for what its answer lacks.

Directories are checked for hostile names before anything of their tree is
stored.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from pipeline.cas.store import LocalCas
from pipeline.cas.tree import check_directory, tree_digests
from pipeline.digest import Digest, digest_of_message, digest_to_str
from pipeline.errors import LocalCasError, ProtocolError, RemoteError, UnsafePathError
from pipeline.reapi.cas.connection import CasConnection, Key, digest_key, parse
from pipeline.reapi.cas.download import Downloader
from pipeline.reapi.cas.traffic import TRAFFIC
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

GET_TREE_PAGE_SIZE = 10_000
# How many roots a TreeReader remembers as complete in Directory messages.
MAX_KNOWN_ROOTS = 100_000


@dataclass(frozen=True)
class _TreeDirectory:
    digest: Digest
    directory: re_pb2.Directory
    data: bytes
    """Bytes that hash to ``digest`` (what the local CAS stores)."""


@dataclass(frozen=True)
class RemoteTree:
    """Every Directory of a tree on one server, read once (verified by hash and
    checked for hostile names): a subtree of it can be fetched without asking
    the server for its folders again (:meth:`TreeReader.fetch_tree` ``within``)."""

    root: Digest
    entries: tuple[_TreeDirectory, ...]
    """Breadth-first, the root first, each once."""

    @property
    def directories(self) -> list[re_pb2.Directory]:
        """The Directory messages, the root first."""
        return [entry.directory for entry in self.entries]


class TreeReader:
    """The tree part of :class:`pipeline.reapi.cas.CasClient` (see there)."""

    def __init__(self, conn: CasConnection, downloader: Downloader) -> None:
        self.conn = conn
        self.downloader = downloader
        # Roots whose Directory messages are all in the local CAS (per CAS
        # folder and incarnation): a worker stages the same dependencies again
        # and again. Only a hint: a wiped or cleaned store loses blobs behind
        # it, and the stages derive what they lack again (forget_local).
        self._directories_known: set[tuple[str, tuple[int, int], Key]] = set()
        self._known_lock = threading.Lock()

    def read_tree(self, root: Digest) -> RemoteTree:
        """See :meth:`CasClient.read_tree`."""
        return RemoteTree(root, tuple(self._tree_directories(root)))

    def fetch_tree(
        self, local_cas: LocalCas, root: Digest, within: RemoteTree | None = None
    ) -> int:
        """See :meth:`CasClient.fetch_tree`."""
        if local_cas.contains(root) and _complete_locally(local_cas, root):
            return 0
        entries = self._tree_directories(root, within)
        files = [f.digest for e in entries for f in e.directory.files]
        stats = self.downloader.download_into(local_cas, files)
        stored = 0
        # Children before parents (reverse breadth-first order), root last.
        for entry in reversed(entries):
            if not local_cas.contains(entry.digest):
                local_cas.put_verified(entry.data, entry.digest)
                stored += 1
        return stats.blobs_fetched + stored

    def fetch_directories(
        self, local_cas: LocalCas, root: Digest, within: RemoteTree | None = None
    ) -> int:
        """See :meth:`CasClient.fetch_directories`."""
        incarnation = local_cas.incarnation()
        memo = (str(local_cas.root), incarnation or (0, 0), digest_key(root))
        with self._known_lock:
            known = incarnation is not None and memo in self._directories_known
        if known and local_cas.contains(root):
            return 0
        stored = 0
        if not _directories_locally(local_cas, root):
            # Children before parents (reverse breadth-first order), root last.
            for entry in reversed(self._tree_directories(root, within)):
                if not local_cas.contains(entry.digest):
                    local_cas.put_verified(entry.data, entry.digest)
                    stored += 1
        incarnation = local_cas.incarnation()
        if incarnation is not None and memo[1] == incarnation:
            with self._known_lock:
                if len(self._directories_known) > MAX_KNOWN_ROOTS:
                    self._directories_known.clear()
                self._directories_known.add(memo)
        return stored

    def forget_local(self) -> None:
        """Forget which roots the local CAS held whole (blobs were found gone)."""
        with self._known_lock:
            self._directories_known.clear()

    # --- private -----------------------------------------------------------

    def _tree_directories(
        self, root: Digest, within: RemoteTree | None = None
    ) -> list[_TreeDirectory]:
        """All directories under ``root``, breadth-first, verified and checked.

        ``within``: a tree already read from this server that holds ``root``:
        its folders are used instead of asking again (what it lacks is read
        as blobs).
        """
        known: dict[Key, _TreeDirectory] = {}
        if within is not None:
            known = {digest_key(entry.digest): entry for entry in within.entries}
        elif root.size_bytes != 0:  # the empty Directory needs no server
            answered: list[re_pb2.Directory] = []
            try:
                answered = self._get_tree_pages(root)
            except RemoteError as exc:
                if exc.code != "UNIMPLEMENTED":
                    raise self.conn.not_found(exc, root) from exc
            for directory in answered:
                digest, data = digest_of_message(directory)
                known.setdefault(digest_key(digest), _TreeDirectory(digest, directory, data))

        result: list[_TreeDirectory] = []
        seen: set[Key] = set()
        level = [root]
        while level:
            # What GetTree did not give us (or gave under a serialization we
            # cannot reproduce) is read as blobs, verified byte for byte.
            absent = [d for d in level if digest_key(d) not in known]
            if absent:
                blobs = self.downloader.read_blobs(absent)
                for digest in absent:
                    data = blobs[digest_key(digest)]
                    directory = parse(data, re_pb2.Directory, digest, self.conn.where)
                    known[digest_key(digest)] = _TreeDirectory(digest, directory, data)
            next_level: list[Digest] = []
            for digest in level:
                entry = known[digest_key(digest)]
                self._check_directory(entry)
                result.append(entry)
                for node in entry.directory.directories:
                    key = digest_key(node.digest)
                    if key not in seen:
                        seen.add(key)
                        next_level.append(node.digest)
            level = next_level
        return result

    def _get_tree_pages(self, root: Digest) -> list[re_pb2.Directory]:
        """Directories GetTree returns for ``root``, following page tokens.

        A broken stream resumes from the last page token received.
        """
        conn = self.conn
        directories: list[re_pb2.Directory] = []
        token = ""
        done = False
        tokens_seen: set[str] = set()

        def attempt() -> None:
            nonlocal token, done
            request = re_pb2.GetTreeRequest(
                instance_name=conn.remote.instance_name,
                root_digest=root,
                page_size=GET_TREE_PAGE_SIZE,
                page_token=token,
                digest_function=re_pb2.DigestFunction.SHA256,
            )
            uncommitted: list[re_pb2.Directory] = []
            for response in conn.cas.GetTree(request, timeout=conn.remote.request_timeout):
                TRAFFIC.down(response.ByteSize(), len(response.directories))
                uncommitted.extend(response.directories)
                if response.next_page_token:
                    if response.next_page_token in tokens_seen:
                        raise ProtocolError(
                            f"{conn.where} repeated GetTree page token {response.next_page_token!r}"
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
            conn.remote.call(attempt, what=f"GetTree of {digest_to_str(root)}")
        return directories

    def _check_directory(self, entry: _TreeDirectory) -> None:
        """Refuse a hostile or malformed Directory from the server, naming it."""
        where = self.conn.where
        try:
            check_directory(entry.directory)
        except UnsafePathError as exc:
            raise UnsafePathError(
                f"{where} sent directory {digest_to_str(entry.digest)}: {exc}"
            ) from exc
        except LocalCasError as exc:
            raise ProtocolError(
                f"{where} sent a malformed directory {digest_to_str(entry.digest)}: {exc}"
            ) from exc


def _directories_locally(local_cas: LocalCas, root: Digest) -> bool:
    """Whether every Directory of the tree under ``root`` is in the local CAS."""
    pending = [root]
    seen: set[Key] = set()
    try:
        while pending:
            digest = pending.pop()
            if not local_cas.contains(digest):
                return False
            directory = local_cas.get_message(digest, re_pb2.Directory)
            for node in directory.directories:
                key = digest_key(node.digest)
                if key not in seen:
                    seen.add(key)
                    pending.append(node.digest)
    except LocalCasError:
        return False
    return True


def _complete_locally(local_cas: LocalCas, root: Digest) -> bool:
    """Whether the whole tree under ``root`` is already in the local CAS."""
    try:
        return not local_cas.missing(tree_digests(local_cas, root))
    except LocalCasError:
        # A directory of the tree is missing or unreadable: fetch the tree.
        return False
