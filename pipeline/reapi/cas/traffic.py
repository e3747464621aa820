"""Bytes this process moved to and from remote CAS servers.

A process-wide tally of blob payloads (BatchReadBlobs / ByteStream Read /
GetTree Directory messages down; BatchUpdateBlobs / ByteStream Write up),
kept so that benchmarks and operators can see what "build without the
bytes" saves: a worker reports it over a Celery control command.
Small RPCs (ActionCache, Execute, Remote Asset, FindMissingBlobs) are not
counted: their payloads are digests, not content.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

__all__ = ["TRAFFIC", "Traffic", "TrafficSnapshot"]


@dataclass(frozen=True)
class TrafficSnapshot:
    """Totals at one moment (bytes, and how many blobs or Directory messages)."""

    downloaded: int = 0
    uploaded: int = 0
    blobs_down: int = 0
    blobs_up: int = 0

    def __sub__(self, other: TrafficSnapshot) -> TrafficSnapshot:
        return TrafficSnapshot(
            self.downloaded - other.downloaded,
            self.uploaded - other.uploaded,
            self.blobs_down - other.blobs_down,
            self.blobs_up - other.blobs_up,
        )


class Traffic:
    """A thread-safe tally (many tasks of a thread-pool worker add to it at once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down = self._up = self._n_down = self._n_up = 0

    def down(self, size: int, count: int = 1) -> None:
        """Count ``size`` bytes received in ``count`` blobs."""
        with self._lock:
            self._down += size
            self._n_down += count

    def up(self, size: int, count: int = 1) -> None:
        """Count ``size`` bytes sent in ``count`` blobs."""
        with self._lock:
            self._up += size
            self._n_up += count

    def snapshot(self) -> TrafficSnapshot:
        """The totals so far."""
        with self._lock:
            return TrafficSnapshot(self._down, self._up, self._n_down, self._n_up)


#: This process's tally.
TRAFFIC = Traffic()
