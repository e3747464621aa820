"""The CAS traffic tally and the inspect command that reports it."""

from __future__ import annotations

import threading

from pipeline.reapi.cas.traffic import Traffic, TrafficSnapshot
from tasks.stats import worker_stats


def test_the_tally_adds_from_many_threads_and_subtracts_snapshots() -> None:
    traffic = Traffic()
    before = traffic.snapshot()

    def work() -> None:
        for _ in range(1000):
            traffic.down(3)
            traffic.up(5, 2)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert traffic.snapshot() - before == TrafficSnapshot(12000, 20000, 4000, 8000)


def test_worker_stats_names_the_process_and_its_peak_rss() -> None:
    stats = worker_stats()
    assert stats["pid"] > 0 and stats["peak_rss_kib"] > 1000
    assert {"downloaded", "uploaded", "blobs_down", "blobs_up"} <= stats.keys()
