"""Keeping a local CAS within its quota: pins and size accounting.

Several processes on one host may share a store (each ``remex worker`` is a
process with a pool of threads). What they share lives in the store's folder:

``pins/PID-TOKEN-N``
    one file per running stage (a :class:`Pin`): the time it started, then
    the trees (``T HASH SIZE``) and blobs (``B HASH SIZE``) it uses. A
    cleanup keeps every object of a pinned tree and every pinned blob. It
    also keeps what the running stages read or wrote: for its own process's
    stages, the objects each one touched (tracked in memory, see
    :meth:`pipeline.cas.LocalCas.pin`); for another process's, every object
    used since its oldest live pin started (the store refreshes an object's
    mtime when a stage reads it). Pins of dead processes are ignored and
    removed.
``usage``
    the store's size as the writers count it (an ASCII number, updated under
    ``flock``): each new object adds its size, a cleanup sets it to what it
    found. It is an estimate that a cleanup corrects, cheap enough to update
    on every write, so that no write needs a scan of the store.
``cleanup.lock``
    held (``flock``) by the one process cleaning the store; a writer of
    another process that finds the store past its quota waits for it, then
    finds the store cleaned.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.digest import Digest

__all__ = [
    "CLEANUP_TARGET",
    "Pin",
    "PinRecord",
    "UsageCounter",
    "blob_line",
    "cleanup_lock",
    "live_pins",
    "pid_alive",
    "pin_header",
    "process_start",
    "tree_line",
]

CLEANUP_TARGET = 0.8
"""A cleanup brings the store down to this fraction of its quota, so that the
next one (a scan of the store) is some writes away."""

# An object written just after a pin started may carry an mtime a clock tick
# earlier than the pin's start (file times use the kernel's coarse clock).
_CLOCK_SLACK_S = 1.0


class Pin:
    """What one running stage uses; made by :meth:`pipeline.cas.LocalCas.pin`.

    Thread-safe. Add each tree or blob the stage will read before it reads
    it; whatever the stage writes or reads while the pin lives is kept
    anyway (by its mtime).
    """

    def __init__(self, path: Path, started: float, entries: Iterable[str] = ()) -> None:
        self.path = path
        self.name = path.name
        """The pin file's name (what :meth:`pipeline.cas.LocalCas.pin` keys it by)."""
        self.started = started
        self._lock = threading.Lock()
        # Lines the pin file already holds (written with its header).
        self._entries: set[str] = set(entries)
        self._touched: set[str] = set()

    def touched(self) -> set[str]:
        """The hashes of the objects this stage read or wrote (a copy)."""
        with self._lock:
            return set(self._touched)

    def note_use(self, hash_: str) -> None:
        """Record that the stage read or wrote this object."""
        with self._lock:
            self._touched.add(hash_)

    def add_tree(self, digest: Digest) -> None:
        """Keep the tree rooted at this Directory (every object below it)."""
        self._add(tree_line(digest))

    def add_blob(self, digest: Digest) -> None:
        """Keep this one blob."""
        self._add(blob_line(digest))

    def _add(self, line: str) -> None:
        with self._lock:
            if line in self._entries:
                return
            self._entries.add(line)
            # A store wiped under a running stage has lost the data as well.
            with contextlib.suppress(FileNotFoundError), open(self.path, "a") as file:
                file.write(line + "\n")


def tree_line(digest: Digest) -> str:
    """A pin file's line for a tree (see :meth:`Pin.add_tree`)."""
    return f"T {digest.hash} {digest.size_bytes}"


def blob_line(digest: Digest) -> str:
    """A pin file's line for a blob (see :meth:`Pin.add_blob`)."""
    return f"B {digest.hash} {digest.size_bytes}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # somebody else's: alive
    return True


def process_start(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, from /proc), or
    "" when unknown: with the pid, it names one process even when pids are
    reused (a restarted container's worker often has the same small pid)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            # Field 22; the command name (field 2) may hold spaces: skip past it.
            return file.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


# This process's (pid, process_start): every stage's pin names it.
_own_start: tuple[int, str] | None = None


def pin_header(started: float) -> str:
    """The first line of a pin file: when the stage started, and which process."""
    global _own_start
    pid = os.getpid()
    own = _own_start
    if own is None or own[0] != pid:  # first pin, or a forked child
        own = _own_start = (pid, process_start(pid))
    return f"started {started!r} {own[1]}\n"


@dataclass(frozen=True)
class PinRecord:
    """A live pin as its file tells it."""

    name: str
    pid: int
    keep_since: float
    """Objects used since this time may be this pin's (with clock slack)."""
    trees: tuple[Digest, ...]
    blobs: tuple[Digest, ...]


def live_pins(folder: str) -> list[PinRecord]:
    """The pins of live processes; removes the pins of dead ones."""
    records: list[PinRecord] = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    for entry in entries:
        try:
            pid = int(entry.name.split("-", 1)[0])
        except ValueError:
            continue
        if not pid_alive(pid):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
            continue
        try:
            with open(entry.path) as file:
                lines = file.read().splitlines()
        except FileNotFoundError:
            continue  # the stage just ended
        if not lines:
            continue
        header = lines[0].split()
        if len(header) > 2 and header[2] != process_start(pid):
            # Its pid now runs another process: the pin's process is dead.
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
            continue
        try:
            started = float(header[1])
        except (IndexError, ValueError):
            started = 0.0  # unreadable: keep everything it may use
        trees: list[Digest] = []
        blobs: list[Digest] = []
        for line in lines[1:]:
            parts = line.split()
            if len(parts) != 3 or not parts[2].isdigit():
                continue
            digest = Digest(hash=parts[1], size_bytes=int(parts[2]))
            (trees if parts[0] == "T" else blobs).append(digest)
        records.append(
            PinRecord(entry.name, pid, started - _CLOCK_SLACK_S, tuple(trees), tuple(blobs))
        )
    return records


class UsageCounter:
    """The shared ``usage`` file: the store's size as its writers count it."""

    def __init__(self, path: str, scan: Callable[[], int]) -> None:
        self._path = path
        self._scan = scan
        self._fd = -1
        self._pid = 0
        self._lock = threading.Lock()

    def add(self, size: int) -> int:
        """Count a new object of ``size`` bytes; return the new total."""
        # A count started now by a scan already includes the new object.
        return self._update(lambda total: total + size, after_scan=lambda total: total)

    def correct(self, total: int, written_meanwhile: int) -> int:
        """Set the total found by a cleanup's scan, plus what was written since."""
        return self._update(lambda _: total + max(0, written_meanwhile))

    def read(self) -> int:
        """The current total."""
        return self._update(lambda total: total)

    def _update(
        self, change: Callable[[int], int], after_scan: Callable[[int], int] | None = None
    ) -> int:
        with self._lock:
            fd = self._open()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                raw = os.pread(fd, 32, 0)
                try:
                    total = int(raw)
                except ValueError:
                    # New or damaged (a crash mid-write): count what is there.
                    total = self._scan()
                    change = after_scan or change
                new = change(total)
                if new != total or not raw:
                    data = str(new).encode()
                    os.pwrite(fd, data, 0)
                    os.ftruncate(fd, len(data))
                return new
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _open(self) -> int:
        # A descriptor kept open (one flock call per write, not an open); a
        # forked child opens its own, and so does a process whose store was
        # wiped under it.
        if self._fd >= 0 and self._pid == os.getpid() and os.path.exists(self._path):
            return self._fd
        if self._fd >= 0 and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._pid = os.getpid()
        return self._fd


@contextlib.contextmanager
def cleanup_lock(path: str) -> Iterator[None]:
    """Hold the store's cleanup lock (``flock``; waits for another process
    cleaning the same store)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
