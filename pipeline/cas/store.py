"""The local on-disk content-addressable store.

A cache in front of the remote CAS (the source of truth): anything missing here
can be fetched again, so the store favours speed and crash safety over
durability (no fsync unless asked).

Layout, like buildbox-casd's::

    root/objects/ab/cdef...   the blob whose SHA-256 is "abcdef..."
    root/tmp/                 files being written, on the same filesystem

Every object is written to a fresh file in ``tmp/`` and renamed into place
(``os.replace``), so readers never see a partial object and several processes
on one host may put the same blob at once: the last rename wins and all the
contenders wrote the same bytes.

Sizes: an object is named by its hash alone and its size is its file size. A
digest whose ``size_bytes`` differs from the stored file's size is treated as
missing (``contains`` is False, ``get`` raises LocalBlobMissingError): either
the caller holds a wrong digest, which the remote will refuse as well, or the
object was damaged on disk, and a later put of the right content repairs it.

LRU: an object's mtime is its last access time (atime is unreliable under
``relatime``/``noatime``). Reads refresh it only when it is older than
``touch_after_s`` seconds, so a hot object costs no extra syscall per read.

Memory: small blobs (Directory, Command, Action messages, up to 64 KiB) that
a :class:`LocalCas` object wrote or read verified are kept in memory (LRU,
32 MiB); reading one again costs a ``stat`` (it must still be stored, as
before) instead of an open, a read and a hash.

Quota: with ``enforce_quota``, every new object is counted (see
:mod:`pipeline.cas.quota`) and a store past its quota is cleaned at once
(LRU, down to :data:`~pipeline.cas.quota.CLEANUP_TARGET` of the quota),
never removing what a running stage uses: a stage holds a :meth:`LocalCas.pin`
while it runs; while a pin lives, reads also refresh the mtime of any object
older than the newest pin, so "used since the oldest live pin started" is
visible to every process sharing the store.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import contextvars
import errno
import itertools
import logging
import os
import re
import secrets
import stat
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from google.protobuf.message import DecodeError, Message

from pipeline.cas.quota import (
    CLEANUP_TARGET,
    Pin,
    UsageCounter,
    blob_line,
    cleanup_lock,
    live_pins,
    pin_header,
    tree_line,
)
from pipeline.digest import EMPTY_DIGEST, Digest, digest_of, digest_to_str, new_hasher
from pipeline.errors import DigestMismatchError, LocalBlobMissingError, LocalCasError
from protos.build.bazel.remote.execution.v2.remote_execution_pb2 import Directory

__all__ = ["BlobWriter", "CasStats", "CleanupStats", "LocalCas", "Pin"]

M = TypeVar("M", bound=Message)

log = logging.getLogger(__name__)

# The pin of the stage running in this thread (or task: thread pools that
# copy the context, as pipeline.reapi's do, carry it to their jobs).
_current_pin: contextvars.ContextVar[Pin | None] = contextvars.ContextVar(
    "remex_cas_pin", default=None
)

_HASH_RE = re.compile(r"[0-9a-f]{64}")

# Chunk size for streaming copies: big enough that per-chunk Python overhead
# vanishes, small enough to stay in L2/L3 while it is hashed and written.
_CHUNK = 1 << 20

# Files up to this size are read whole and put in one go: cheaper than the
# streaming machinery, and we learn the hash before writing anything, so a
# blob already in the store is not written again.
_SMALL_FILE = 1 << 20

# The memo of small blobs (see LocalCas._remember): Directory, Command and
# Action messages are well under this; the memo holds at most _MEMO_BYTES.
_MEMO_BLOB = 64 << 10
_MEMO_BYTES = 32 << 20

# Empty pin files a store keeps open for its next pins (one per stage running at once).
_IDLE_PIN_FILES = 64

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


@dataclass(frozen=True)
class CasStats:
    """What the store holds.

    ``bytes`` counts object sizes (file sizes), not disk blocks.
    """

    objects: int
    bytes: int


@dataclass(frozen=True)
class CleanupStats:
    """What :meth:`LocalCas.cleanup` did and what is left."""

    removed_objects: int
    removed_bytes: int
    remaining_objects: int
    remaining_bytes: int
    removed_temp_files: int = 0


class LocalCas:
    """A content-addressable store of SHA-256 blobs in a folder.

    Safe for several threads and several processes on one host at once.

    Args:
        root: the store's folder; created if missing.
        quota_bytes: default size limit for :meth:`cleanup`; None means no default.
        fsync: fsync each object before it is renamed into place. Off by default:
            the store is a cache and a torn object after a power cut is caught by
            the size check or by the hash verification of readers that verify.
        touch_after_s: a read refreshes an object's access time only when it is
            older than this many seconds.
        enforce_quota: clean the store (LRU) as soon as a write takes it past
            ``quota_bytes`` (what workers do; see the module docstring).
    """

    def __init__(
        self,
        root: Path,
        quota_bytes: int | None = None,
        *,
        fsync: bool = False,
        touch_after_s: float = 60.0,
        enforce_quota: bool = False,
    ) -> None:
        self.root = Path(root)
        self.quota_bytes = quota_bytes
        self.fsync = fsync
        self.touch_after_s = touch_after_s
        self.enforce_quota = enforce_quota and quota_bytes is not None
        self._objects = os.path.join(self.root, "objects")
        self._tmp = os.path.join(self.root, "tmp")
        self._pins_dir = os.path.join(self.root, "pins")
        os.makedirs(self._objects, exist_ok=True)
        os.makedirs(self._tmp, exist_ok=True)
        # Start times of this process's live pins (see _touch_if_old).
        self._pins: dict[str, Pin] = {}
        self._pins_lock = threading.Lock()
        # Empty pin files (name, descriptor) kept for the next pins of this
        # process (see _take_pin_file); closed when this object goes.
        self._idle_pins: list[tuple[str, int]] = []
        self._idle_pid = os.getpid()
        weakref.finalize(self, _close_all, self._idle_pins)
        self._newest_pin = 0.0  # start of the newest live pin (0: none)
        self._cleaning = threading.Lock()
        self._in_flight = 0  # bytes counted, not yet written, by this process
        # When running stages hold more than the quota, a cleanup cannot get
        # under it: the next one waits until the count passes this (or a
        # stage ends) rather than scan the store on every write.
        self._retry_above = 0
        self._flight_lock = threading.Lock()
        self._usage = UsageCounter(os.path.join(self.root, "usage"), self.size_bytes)
        self.cleanups = 0
        """How many quota cleanups this object ran (for tests and benchmarks)."""
        self._token = secrets.token_hex(4)
        self._counter = itertools.count()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_pid = 0
        self._executor_lock = threading.Lock()
        # Small blobs this object wrote or read verified, by hash (LRU): a
        # stage reads the same Directory messages many times (merging,
        # overlap analysis, the upload's tree walk), and a read served from
        # here costs one stat (the blob must still be stored) instead of an
        # open, a read and a hash. Content-addressed, so never stale.
        self._memo: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._memo_bytes = 0
        self._memo_lock = threading.Lock()
        # The empty blob is always present, so that path() and open() work for it.
        if not self.contains(EMPTY_DIGEST):
            self.put(b"")

    def __repr__(self) -> str:
        return f"LocalCas({str(self.root)!r})"

    # --- reading ---------------------------------------------------------

    def contains(self, digest: Digest) -> bool:
        """Whether the blob is stored (with the digest's size).

        A hit refreshes the object's access time (see the module docstring).

        Raises:
            ValueError: the digest's hash is not 64 lowercase hex digits.
        """
        path = self._object_path(digest)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        if st.st_size != digest.size_bytes:
            return False
        self._note_use(digest.hash)
        # False when a cleanup took it between the stat and the touch.
        return self._touch_if_old(path, st.st_mtime)

    def incarnation(self) -> tuple[int, int] | None:
        """What tells this store's folder from one made again at the same path
        (the ``objects`` folder's device and inode), or None when it is gone.

        A wiped store (``rm -rf``, a lost tmpfs) comes back with a new
        incarnation when the next blob is written: memories of what the store
        held, kept outside it, are keyed by it (one ``stat``).
        """
        try:
            st = os.stat(self._objects)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def missing(self, digests: Iterable[Digest]) -> list[Digest]:
        """The digests not stored, in input order, each once."""
        seen: set[tuple[str, int]] = set()
        result: list[Digest] = []
        for digest in digests:
            key = (digest.hash, digest.size_bytes)
            if key in seen:
                continue
            seen.add(key)
            if not self.contains(digest):
                result.append(digest)
        return result

    def path(self, digest: Digest) -> Path:
        """The file holding the blob; read it, never write it.

        The file may be removed by a concurrent cleanup at any time; prefer
        :meth:`open` or :meth:`get`, which hold it open.

        Raises:
            LocalBlobMissingError: the blob is not stored.
        """
        if not self.contains(digest):
            raise self._missing_error(digest)
        return Path(self._object_path(digest))

    def open(self, digest: Digest) -> BinaryIO:
        """Open the blob for reading. The caller closes it.

        Raises:
            LocalBlobMissingError: the blob is not stored.
        """
        fd = self._open_object(digest)
        return os.fdopen(fd, "rb")

    def get(self, digest: Digest, *, verify: bool = False) -> bytes:
        """The blob's bytes.

        Args:
            digest: the blob to read.
            verify: check the bytes' hash. A blob found damaged is removed from
                the store and reported as missing, so that the caller fetches
                it again from the remote.

        Raises:
            LocalBlobMissingError: the blob is not stored (or was damaged).
        """
        known = self._recall(digest)
        if known is not None:
            # Same answer as reading the file: present (stat, size) or missing.
            if not self.contains(digest):
                raise self._missing_error(digest)
            return known
        fd = self._open_object(digest)
        try:
            data = _read_exactly(fd, digest.size_bytes)
        finally:
            os.close(fd)
        if data is None:
            # The file changed size under us: it was replaced or damaged.
            raise self._missing_error(digest)
        if verify:
            if digest_of(data).hash != digest.hash:
                self.discard_damaged(digest)
                raise LocalBlobMissingError(
                    f"blob {digest_to_str(digest)} was damaged in the local CAS at {self.root}; "
                    "removed it"
                )
            self._remember(digest.hash, data)
        return data

    def get_message(self, digest: Digest, cls: type[M]) -> M:
        """Read and parse a protobuf message, verifying its hash.

        Raises:
            LocalBlobMissingError: the blob is not stored (or was damaged).
            LocalCasError: the blob is not a valid ``cls`` message.
        """
        data = self.get(digest, verify=True)
        message = cls()
        try:
            message.ParseFromString(data)
        except DecodeError as exc:
            raise LocalCasError(
                f"blob {digest_to_str(digest)} is not a valid {cls.__name__} message"
            ) from exc
        return message

    # --- writing ---------------------------------------------------------

    def put(self, data: bytes) -> Digest:
        """Store ``data``; return its digest. Storing an existing blob is cheap."""
        digest = digest_of(data)
        if not self.contains(digest):
            self._write_object(digest.hash, data)
        self._remember(digest.hash, data)
        return digest

    def put_verified(self, data: bytes, expected: Digest) -> Digest:
        """Store ``data`` only if it hashes to ``expected``.

        Raises:
            DigestMismatchError: the data's digest differs; nothing is stored.
        """
        digest = digest_of(data)
        if digest.hash != expected.hash or digest.size_bytes != expected.size_bytes:
            raise DigestMismatchError(
                f"data is {digest_to_str(digest)}, expected {digest_to_str(expected)}"
            )
        if not self.contains(digest):
            self._write_object(digest.hash, data)
        self._remember(digest.hash, data)
        return digest

    def put_message(self, message: Message) -> Digest:
        """Store a protobuf message, serialized deterministically; return its digest."""
        return self.put(message.SerializeToString(deterministic=True))

    def put_file(self, path: Path) -> Digest:
        """Store a file's content, streaming; the file is never read whole.

        Symlinks are not followed: pass the path of a regular file.

        Raises:
            LocalCasError: the file is not a regular file, cannot be read, or the
                store cannot be written.
        """
        try:
            # O_NONBLOCK: opening a fifo must not hang (it is refused below).
            src = os.open(path, os.O_RDONLY | _O_CLOEXEC | _O_NOFOLLOW | _O_NONBLOCK)
        except OSError as exc:
            raise LocalCasError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode):
                raise LocalCasError(f"not a regular file: {path}")
            return self.put_fd(src, st.st_size)
        except OSError as exc:
            raise LocalCasError(
                f"cannot store {path}: {exc}", transient=_is_transient(exc)
            ) from exc
        finally:
            os.close(src)

    def put_fd(self, fd: int, size_hint: int) -> Digest:
        """Store what an open descriptor holds from its offset to its end.

        Args:
            fd: a descriptor open for reading; not closed.
            size_hint: the expected size (from fstat); small content is read whole.

        Raises:
            OSError: reading ``fd`` failed.
            LocalCasError: the store cannot be written.
        """
        if size_hint <= _SMALL_FILE:
            return self.put(_read_all(fd, size_hint))
        with self._room_for(size_hint):
            return self._put_stream(fd)

    def copy_to(self, digest: Digest, fd: int) -> None:
        """Write the blob to an open descriptor, verifying its hash on the way.

        A blob found damaged is removed from the store; the caller should then
        discard what was written to ``fd``.

        Raises:
            LocalBlobMissingError: the blob is not stored (or was damaged).
            OSError: writing to ``fd`` failed.
        """
        src = self._open_object(digest)
        try:
            if digest.size_bytes <= _SMALL_FILE:
                data = _read_exactly(src, digest.size_bytes)
                if data is None:
                    raise self._missing_error(digest)
                hexdigest, size = digest_of(data).hash, len(data)
                if hexdigest == digest.hash:
                    _write_all(fd, memoryview(data))
            else:
                hexdigest, size = self._copy_hashing(src, fd)
        finally:
            os.close(src)
        if hexdigest != digest.hash or size != digest.size_bytes:
            self.discard_damaged(digest)
            raise LocalBlobMissingError(
                f"blob {digest_to_str(digest)} was damaged in the local CAS at {self.root}; "
                "removed it"
            )

    @contextlib.contextmanager
    def blob_writer(self, expected: Digest | None = None) -> Iterator[BlobWriter]:
        """Stream a blob into the store (for downloads).

        ``with cas.blob_writer(expected) as w: w.write(chunk)``. On a normal exit
        the content is verified against ``expected`` (size and hash) and
        committed atomically; ``w.digest`` then holds its digest. On an
        exception, or a mismatch, nothing is left behind.

        Raises:
            DigestMismatchError: the content does not match ``expected`` (also
                raised by ``write`` as soon as more than ``expected.size_bytes``
                bytes arrive).
        """
        writer = BlobWriter(self, expected)
        try:
            yield writer
            writer._finish()
        finally:
            writer._discard()

    # --- quota -------------------------------------------------------------

    @contextlib.contextmanager
    def pin(self, *, trees: Iterable[Digest] = (), blobs: Iterable[Digest] = ()) -> Iterator[Pin]:
        """Keep what a running stage uses from quota cleanups (of any process).

        ``with cas.pin() as pin: pin.add_tree(root); ...``: while the pin
        lives, cleanups keep the trees and blobs added to it and every object
        the stage reads or writes meanwhile: exactly those (tracked in
        memory) for this process's cleanups; for other processes', every
        object used since it started (reads refresh the object's mtime).
        The pin follows the context (thread, or pool jobs run in a copy of
        it); a use from a thread outside any pin counts for every live pin.
        ``trees`` and ``blobs`` are added at once (written with the pin
        file, not appended one by one).
        """
        started = time.time()
        lines = [*(tree_line(d) for d in trees), *(blob_line(d) for d in blobs)]
        text = pin_header(started) + "".join(f"{line}\n" for line in lines)
        name, fd = self._take_pin_file()
        path = f"{self._pins_dir}/{name}"
        try:
            _pwrite_all(fd, text.encode())
        except BaseException:
            self._release_pin_file(name, fd)
            raise
        pin = Pin(Path(path), started, lines)
        with self._pins_lock:
            self._pins[name] = pin
            self._newest_pin = max(p.started for p in self._pins.values())
        token = _current_pin.set(pin)
        try:
            yield pin
        finally:
            _current_pin.reset(token)
            with self._pins_lock:
                del self._pins[name]
                self._newest_pin = max((p.started for p in self._pins.values()), default=0.0)
            self._release_pin_file(name, fd)
            # What this stage kept from the last cleanup may go now.
            self._retry_above = 0
            self._count_written(0)

    def _take_pin_file(self) -> tuple[str, int]:
        """An empty pin file of this process, open for writing: a kept one,
        or a new one. Creating a file costs far more than rewriting one (up to
        a millisecond of kernel time on a busy ext4), and a stage runs five
        times per element."""
        with self._pins_lock:
            if self._idle_pid != os.getpid():
                # A forked child: the kept files are named by its parent's pid.
                _close_all(self._idle_pins)
                self._idle_pid = os.getpid()
            while self._idle_pins:
                name, fd = self._idle_pins.pop()
                try:
                    if os.fstat(fd).st_nlink:
                        return name, fd
                except OSError:
                    pass
                os.close(fd)  # removed meanwhile (a wiped store): make another
        name = f"{os.getpid()}-{self._token}-{next(self._counter)}"
        path = f"{self._pins_dir}/{name}"
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | _O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:
            os.makedirs(self._pins_dir, exist_ok=True)
            fd = os.open(path, flags, 0o644)
        return name, fd

    def _release_pin_file(self, name: str, fd: int) -> None:
        """Empty a pin file (an empty one pins nothing: see
        :func:`~pipeline.cas.quota.live_pins`) and keep it for the next pin."""
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        else:
            with self._pins_lock:
                if self._idle_pid == os.getpid() and len(self._idle_pins) < _IDLE_PIN_FILES:
                    self._idle_pins.append((name, fd))
                    return
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(f"{self._pins_dir}/{name}")

    def usage_bytes(self) -> int:
        """The store's size as counted by its writers (no scan; see
        :mod:`pipeline.cas.quota`)."""
        return self._usage.read()

    def enforce(self) -> CleanupStats | None:
        """Clean the store down to :data:`CLEANUP_TARGET` of its quota, minus
        the writes of this process in flight; None when it was within its
        quota once this process's turn to clean came (another thread or
        process cleaned it meanwhile).
        """
        if self.quota_bytes is None:
            return None
        # One cleaner at a time, the others wait for its result: a writer
        # that went on writing while another cleans would pass the quota.
        with self._cleaning, cleanup_lock(os.path.join(self.root, "cleanup.lock")):
            before = self._usage.read()
            if before <= self.quota_bytes:
                return None
            with self._flight_lock:
                pending = self._in_flight
            target = max(0, int(self.quota_bytes * CLEANUP_TARGET) - pending)
            stats = self.cleanup(target)
            meanwhile = self._usage.read() - before
            # What is in flight was counted but is not on disk yet.
            counted = self._usage.correct(stats.remaining_bytes + pending, meanwhile)
            self.cleanups += 1
            stuck = counted > self.quota_bytes
            slack = int(self.quota_bytes * (1 - CLEANUP_TARGET))
            self._retry_above = counted + slack if stuck else 0
            return stats

    @contextlib.contextmanager
    def _room_for(self, size: int) -> Iterator[None]:
        """Count a write of ``size`` bytes before it lands (cleaning first if
        it would pass the quota); it is in flight until the block ends."""
        self._reserve(size)
        try:
            yield
        finally:
            self._unreserve(size)

    def _reserve(self, size: int) -> None:
        if not self.enforce_quota:
            return
        with self._flight_lock:
            self._in_flight += size
        self._count_written(size)

    def _unreserve(self, size: int) -> None:
        if not self.enforce_quota:
            return
        with self._flight_lock:
            self._in_flight -= size

    def _count_written(self, size: int) -> None:
        """Count an object about to be written; clean the store first when it
        would pass its quota (so that it never holds more than the quota plus
        the writes in flight)."""
        if not self.enforce_quota or self.quota_bytes is None:
            return
        try:  # size 0: only check
            if self._usage.add(size) > max(self.quota_bytes, self._retry_above):
                self.enforce()
        except (OSError, LocalCasError) as exc:
            # The write itself succeeded: a failed cleanup must not fail it.
            log.warning("cleaning the local CAS at %s failed: %s", self.root, exc)

    # --- housekeeping ----------------------------------------------------

    def stats(self) -> CasStats:
        """Count the objects and their bytes (a scan of the store)."""
        objects = 0
        total = 0
        for _, size, _, _ in self._scan_objects():
            objects += 1
            total += size
        return CasStats(objects=objects, bytes=total)

    def size_bytes(self) -> int:
        """The total size of all objects (a scan of the store)."""
        return self.stats().bytes

    def cleanup(
        self,
        quota_bytes: int | None = None,
        *,
        protect: Iterable[Digest] = (),
        temp_max_age_s: float = 3600.0,
    ) -> CleanupStats:
        """Remove least-recently-used objects until the store fits the quota.

        Also removes temporary files older than ``temp_max_age_s`` (left by
        crashed writers). Safe to run while other processes put and read: an
        object touched after the scan is kept, and a reader that loses a blob
        gets LocalBlobMissingError. What live pins (:meth:`pin`, of any
        process) keep is kept. Pass the digests of a build in progress as
        ``protect`` to keep them regardless of age.

        Args:
            quota_bytes: the target total size; defaults to the store's quota.
            protect: digests never removed.
            temp_max_age_s: age beyond which a temporary file counts as abandoned.

        Returns:
            What was removed and what remains.

        Raises:
            ValueError: no quota given here nor to the constructor.
        """
        quota = self.quota_bytes if quota_bytes is None else quota_bytes
        if quota is None:
            raise ValueError("cleanup needs a quota: none given and the store has none")
        protected = {d.hash for d in protect}
        protected.add(EMPTY_DIGEST.hash)
        keep_since = float("inf")
        with self._pins_lock:
            own = dict(self._pins)
        for record in live_pins(self._pins_dir):
            protected.update(d.hash for d in record.blobs)
            for tree in record.trees:
                self._add_tree_hashes(tree, protected)
            pin = own.get(record.name) if record.pid == os.getpid() else None
            if pin is not None:
                protected.update(pin.touched())  # exactly what it used
            else:
                # Another process's stage: what it used is known by time only.
                keep_since = min(keep_since, record.keep_since)
        removed_temp = self._remove_stale_temp_files(time.time() - temp_max_age_s)

        entries = list(self._scan_objects())
        total = sum(size for _, size, _, _ in entries)
        count = len(entries)
        removed_objects = removed_bytes = 0
        entries.sort(key=lambda e: e[0])
        for mtime, size, path, hash_ in entries:
            if total <= quota:
                break
            if hash_ in protected or mtime >= keep_since:
                continue
            try:
                if not self._remove_unless_used(path, mtime):
                    continue  # used since the scan: it is no longer the least recent
                removed_objects += 1
                removed_bytes += size
            except FileNotFoundError:
                pass  # another cleanup got there first
            total -= size
            count -= 1
        return CleanupStats(
            removed_objects=removed_objects,
            removed_bytes=removed_bytes,
            remaining_objects=count,
            remaining_bytes=total,
            removed_temp_files=removed_temp,
        )

    def _remove_unless_used(self, path: str, mtime: float) -> bool:
        """Remove an object unless its mtime moved past ``mtime`` (a reader
        touched it); True if removed.

        Moved aside first, then checked again: a reader's touch lands either
        before the move (seen here: the object goes back) or after it (the
        reader's touch fails and it takes the object as missing), so no
        reader is told an object is there that this removes.
        """
        if os.stat(path).st_mtime > mtime:
            return False
        aside = f"{self._tmp}/removing-{os.getpid()}-{self._token}-{next(self._counter)}"
        os.rename(path, aside)
        if os.stat(aside).st_mtime > mtime:
            os.rename(aside, path)
            return False
        os.unlink(aside)
        return True

    def _add_tree_hashes(self, root: Digest, into: set[str]) -> None:
        """Add the hashes of every stored object of a tree (missing parts skipped)."""
        pending = [root]
        while pending:
            digest = pending.pop()
            if digest.hash in into:
                continue
            into.add(digest.hash)
            try:
                directory = self.get_message(digest, Directory)
            except (LocalCasError, ValueError):
                continue  # not stored (or not a Directory): nothing below it to keep
            into.update(f.digest.hash for f in directory.files)
            pending.extend(d.digest for d in directory.directories)

    def discard_damaged(self, digest: Digest) -> None:
        """Remove an object found not to match its hash (never raises)."""
        self._forget(digest.hash)
        with contextlib.suppress(OSError, ValueError):
            os.unlink(self._object_path(digest))

    # --- private ---------------------------------------------------------

    def _remember(self, hash_: str, data: bytes) -> None:
        """Keep a small blob whose hash is known to be ``hash_`` in the memo."""
        size = len(data)
        if size > _MEMO_BLOB:
            return
        with self._memo_lock:
            if hash_ in self._memo:
                self._memo.move_to_end(hash_)
                return
            self._memo[hash_] = bytes(data)
            self._memo_bytes += size
            while self._memo_bytes > _MEMO_BYTES:
                _, old = self._memo.popitem(last=False)
                self._memo_bytes -= len(old)

    def _recall(self, digest: Digest) -> bytes | None:
        """The memo's bytes of ``digest`` (hash and size), or None."""
        if digest.size_bytes > _MEMO_BLOB:
            return None
        with self._memo_lock:
            data = self._memo.get(digest.hash)
            if data is None or len(data) != digest.size_bytes:
                return None
            self._memo.move_to_end(digest.hash)
            return data

    def _forget(self, hash_: str) -> None:
        with self._memo_lock:
            data = self._memo.pop(hash_, None)
            if data is not None:
                self._memo_bytes -= len(data)

    def _object_path(self, digest: Digest) -> str:
        hash_ = digest.hash
        # The hash becomes a path: a hostile one ("../../x") must not get that far.
        if not _HASH_RE.fullmatch(hash_) or digest.size_bytes < 0:
            raise ValueError(f"not a SHA-256 digest: {hash_!r}/{digest.size_bytes}")
        return f"{self._objects}/{hash_[:2]}/{hash_[2:]}"

    def _missing_error(self, digest: Digest) -> LocalBlobMissingError:
        return LocalBlobMissingError(
            f"blob {digest_to_str(digest)} is not in the local CAS at {self.root}"
        )

    def _note_use(self, hash_: str) -> None:
        """Tell the running stage's pin that it uses this object; from a
        thread that runs no stage of this store, tell every live pin."""
        if not self._pins:
            return
        pin = _current_pin.get()
        if pin is not None and self._pins.get(pin.name) is pin:
            pin.note_use(hash_)
            return
        with self._pins_lock:
            pins = list(self._pins.values())
        for other in pins:
            other.note_use(hash_)

    def _touch_if_old(self, path: str, mtime: float) -> bool:
        """Refresh an object's mtime when it is old, or older than the newest
        live pin of this process (so that cleanups see a running stage use
        it); False when the object is gone."""
        now = time.time()
        if now - mtime > self.touch_after_s or mtime < self._newest_pin:
            try:
                os.utime(path, (now, now))
            except FileNotFoundError:
                return False  # a concurrent cleanup removed it
            except OSError:
                pass
        return True

    def _open_object(self, digest: Digest) -> int:
        path = self._object_path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
        except FileNotFoundError:
            raise self._missing_error(digest) from None
        try:
            st = os.fstat(fd)
            if st.st_size != digest.size_bytes:
                raise self._missing_error(digest)
        except BaseException:
            os.close(fd)
            raise
        self._note_use(digest.hash)
        # The descriptor holds the content even if a cleanup removes it now.
        self._touch_if_old(path, st.st_mtime)
        return fd

    def _new_temp(self) -> tuple[str, int]:
        """Create a fresh temporary file; return its path and a write descriptor."""
        while True:
            name = f"{self._tmp}/{os.getpid()}-{self._token}-{next(self._counter)}"
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o444)
            except FileExistsError:
                continue  # left by a crashed process that had our pid: pick another name
            except FileNotFoundError:
                os.makedirs(self._tmp, exist_ok=True)
                continue
            return name, fd

    def _commit(self, temp: str, hash_: str) -> None:
        """Rename a complete temporary file into place as object ``hash_``."""
        self._note_use(hash_)  # before it is visible: a cleanup cannot miss it
        dest = f"{self._objects}/{hash_[:2]}/{hash_[2:]}"
        try:
            os.replace(temp, dest)
        except FileNotFoundError:
            # The fan-out folder does not exist yet (it is created lazily and
            # never removed, so a concurrent cleanup cannot pull it away).
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            try:
                os.replace(temp, dest)
            except FileNotFoundError as exc:
                raise LocalCasError(
                    f"temporary file {temp} vanished before commit (removed as stale?)",
                    transient=True,
                ) from exc

    def _write_object(self, hash_: str, data: bytes) -> None:
        with self._room_for(len(data)):
            self._write_new_object(hash_, data)

    def _write_new_object(self, hash_: str, data: bytes) -> None:
        temp, fd = self._new_temp()
        try:
            try:
                _write_all(fd, memoryview(data))
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            self._commit(temp, hash_)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            if isinstance(exc, OSError):
                raise LocalCasError(
                    f"cannot write to the local CAS at {self.root}: {exc}",
                    transient=_is_transient(exc),
                ) from exc
            raise

    def _hasher_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        # Threads do not survive fork (Celery's prefork pool forks): a child
        # process makes its own executor instead of waiting on dead threads.
        pid = os.getpid()
        with self._executor_lock:
            if self._executor is None or self._executor_pid != pid:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="cas-hash"
                )
                self._executor_pid = pid
            return self._executor

    def _put_stream(self, src: int) -> Digest:
        temp, fd = self._new_temp()
        try:
            try:
                hexdigest, size = self._copy_hashing(src, fd)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            self._commit(temp, hexdigest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return Digest(hash=hexdigest, size_bytes=size)

    def _copy_hashing(self, src: int, dst: int) -> tuple[str, int]:
        """Copy ``src`` to ``dst`` from their current offsets; return (sha256 hex, size)."""
        # Hash and write each chunk at once, on two cores: hashlib releases the
        # GIL, so a helper thread hashes chunk N while this thread writes it and
        # reads chunk N+1 into the other buffer. The bytes written are exactly
        # the bytes hashed, even if the source changes meanwhile. (Measured:
        # ~95% of hashlib's speed, against ~60% hashing and writing in turn.)
        executor = self._hasher_executor()
        hasher = new_hasher()
        buffers = (bytearray(_CHUNK), bytearray(_CHUNK))
        pending: concurrent.futures.Future[None] | None = None
        size = 0
        index = 0
        try:
            while True:
                buffer = buffers[index]
                index ^= 1
                n = os.readv(src, [buffer])
                if pending is not None:
                    pending.result()
                    pending = None
                if n == 0:
                    break
                view = memoryview(buffer)[:n]
                pending = executor.submit(hasher.update, view)
                _write_all(dst, view)
                size += n
        finally:
            # Never return (and reuse or free a buffer) while a hash still reads it.
            if pending is not None:
                concurrent.futures.wait([pending])
        return hasher.hexdigest(), size

    def _scan_objects(self) -> Iterator[tuple[float, int, str, str]]:
        """(mtime, size, path, hash) of every object; tolerates concurrent removal."""
        try:
            fanouts = list(os.scandir(self._objects))
        except FileNotFoundError:
            return
        for fanout in fanouts:
            if len(fanout.name) != 2 or not fanout.is_dir(follow_symlinks=False):
                continue
            try:
                entries = list(os.scandir(fanout.path))
            except FileNotFoundError:
                continue
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield st.st_mtime, st.st_size, entry.path, fanout.name + entry.name

    def _remove_stale_temp_files(self, older_than: float) -> int:
        removed = 0
        try:
            entries = list(os.scandir(self._tmp))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_mtime < older_than:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                pass
        return removed


class BlobWriter:
    """Receives one streamed blob; made by :meth:`LocalCas.blob_writer`.

    ``digest`` is set once the blob is committed.
    """

    def __init__(self, cas: LocalCas, expected: Digest | None) -> None:
        if expected is not None:
            cas._object_path(expected)  # validates the digest early
        self._cas = cas
        self._expected = expected
        self._hasher = new_hasher()
        self._size = 0
        self._reserved = expected.size_bytes if expected is not None else 0
        cas._reserve(self._reserved)
        try:
            self._temp, self._fd = cas._new_temp()
        except BaseException:
            cas._unreserve(self._reserved)
            raise
        self._done = False
        self.digest: Digest | None = None

    @property
    def bytes_written(self) -> int:
        """How many bytes were written so far."""
        return self._size

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append a chunk.

        Raises:
            DigestMismatchError: the blob grew beyond the expected size.
            LocalCasError: the chunk could not be written.
        """
        if self._done:
            raise LocalCasError("write to a finished blob writer")
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        size = self._size + view.nbytes
        if self._expected is not None and size > self._expected.size_bytes:
            raise DigestMismatchError(
                f"blob {digest_to_str(self._expected)} is longer than its digest says "
                f"({size} bytes so far)"
            )
        self._hasher.update(view)
        try:
            _write_all(self._fd, view)
        except OSError as exc:
            raise LocalCasError(
                f"cannot write to the local CAS: {exc}", transient=_is_transient(exc)
            ) from exc
        self._size = size

    def _finish(self) -> None:
        digest = Digest(hash=self._hasher.hexdigest(), size_bytes=self._size)
        expected = self._expected
        if expected is not None and (
            digest.hash != expected.hash or digest.size_bytes != expected.size_bytes
        ):
            raise DigestMismatchError(
                f"received blob is {digest_to_str(digest)}, expected {digest_to_str(expected)}"
            )
        try:
            if self._cas.fsync:
                os.fsync(self._fd)
            os.close(self._fd)
            self._done = True
            if self._expected is None:
                self._cas._count_written(digest.size_bytes)
            self._cas._commit(self._temp, digest.hash)
        except OSError as exc:
            raise LocalCasError(
                f"cannot commit blob {digest_to_str(digest)}: {exc}", transient=_is_transient(exc)
            ) from exc
        self.digest = digest

    def _discard(self) -> None:
        """Close and remove the temporary file unless it was committed."""
        self._cas._unreserve(self._reserved)
        self._reserved = 0
        if self.digest is not None:
            return
        if not self._done:
            self._done = True
            with contextlib.suppress(OSError):
                os.close(self._fd)
        with contextlib.suppress(OSError):
            os.unlink(self._temp)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _pwrite_all(fd: int, data: bytes) -> None:
    """Write ``data`` at the start of the file."""
    view = memoryview(data)
    offset = 0
    while offset < len(view):
        offset += os.pwrite(fd, view[offset:], offset)


def _close_all(files: list[tuple[str, int]]) -> None:
    """Close the descriptors of kept pin files (and forget them)."""
    for _, fd in files:
        with contextlib.suppress(OSError):
            os.close(fd)
    files.clear()


def _read_all(fd: int, size_hint: int) -> bytes:
    """Read a descriptor to its end (the file may have grown or shrunk since fstat)."""
    chunks = [os.read(fd, size_hint + 1)]
    while chunk := os.read(fd, _CHUNK):
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _read_exactly(fd: int, size: int) -> bytes | None:
    """Read ``size`` bytes; None when the file turns out shorter or longer."""
    chunks = []
    remaining = size
    while remaining > 0:
        chunk = os.read(fd, min(remaining, 16 * _CHUNK))
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    if os.read(fd, 1):
        return None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _is_transient(exc: OSError) -> bool:
    """Whether an OSError may go away by itself (a full disk may be cleaned up)."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.EINTR)
