"""``remex_stats``: a Celery inspect command reporting this worker's resource use.

``app.control.inspect().remex_stats()`` (or ``broadcast("remex_stats",
reply=True)``) answers, per worker: its PID, its peak resident set size, its CPU time,
the bytes it moved to and from remote CAS servers
(:data:`pipeline.reapi.cas.traffic.TRAFFIC`) and how its staging window
was used. ``bench/vs_bst.py`` reads it
before and after each build.
"""

from __future__ import annotations

import os
import resource
from typing import Any

from celery.worker.control import inspect_command

from pipeline.reapi.cas.traffic import TRAFFIC

__all__ = ["worker_stats"]


def worker_stats() -> dict[str, int]:
    """This process's PID, peak RSS (KiB), CPU time (ms) and CAS traffic totals."""
    snap = TRAFFIC.snapshot()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "pid": os.getpid(),
        # Linux reports ru_maxrss in KiB.
        "peak_rss_kib": usage.ru_maxrss,
        # CPU time (user + system): unlike wall time, other processes on the
        # machine hardly change it.
        "cpu_ms": int((usage.ru_utime + usage.ru_stime) * 1000),
        "downloaded": snap.downloaded,
        "uploaded": snap.uploaded,
        "blobs_down": snap.blobs_down,
        "blobs_up": snap.blobs_up,
    }


@inspect_command()  # type: ignore[misc]
def remex_stats(state: Any, **_: Any) -> dict[str, int]:
    """Celery inspect command: :func:`worker_stats` of the answering worker,
    and its staging window's counters (see
    :meth:`tasks.runtime.StagingWindow.stats`) once it has run a task."""
    stats = worker_stats()
    holder = getattr(state.consumer.app, "remex_runtime", None)
    runtime = holder.built if holder is not None else None
    if runtime is not None:
        stats.update(runtime.staging.stats())
    return stats
