"""A worker's stage heartbeats (one thread for all its stages); its line per task received."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from celery.app.trace import LOG_SUCCESS

from tasks.app import RECEIVED_LOGGER, SUCCESS_LOGGER, quiet_task_lines
from tasks.stages import Heartbeats


@dataclass
class Recorder:
    """A scheduler that records heartbeats (and may take its time over one)."""

    delay: float = 0.0
    beats: list[tuple[str, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def heartbeat(self, build: str, element: str) -> None:
        time.sleep(self.delay)
        with self.lock:
            self.beats.append((element, time.monotonic()))

    def of(self, element: str) -> list[float]:
        with self.lock:
            return [t for e, t in self.beats if e == element]


@dataclass
class Runtime:
    scheduler: Any
    heartbeat_interval: float


def payload(element: str) -> dict[str, Any]:
    return {"build": "b1", "element": element, "attempt": 1, "state": {}}


def beat_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "remex-heartbeat"]


def test_stages_running_at_once_are_beaten_by_one_thread() -> None:
    beats = Heartbeats()
    sched = Recorder()
    rt = Runtime(sched, heartbeat_interval=0.05)
    before = len(beat_threads())
    # Given two stages running at once, the second starting later
    with beats.kept(rt, payload("a.bst")):
        time.sleep(0.03)
        with beats.kept(rt, payload("b.bst")):
            time.sleep(0.3)
            # Then one thread more beats both
            assert len(beat_threads()) == before + 1
        a, b = sched.of("a.bst"), sched.of("b.bst")
    # And each element was beaten about every interval, the first one interval after its start
    assert len(a) >= 4 and len(b) >= 3
    # And none after its stage ended
    time.sleep(0.15)
    assert sched.of("a.bst") == a and sched.of("b.bst") == b


def test_a_stage_that_ends_quickly_writes_no_heartbeat() -> None:
    beats = Heartbeats()
    sched = Recorder()
    rt = Runtime(sched, heartbeat_interval=0.2)
    for _ in range(20):
        with beats.kept(rt, payload("a.bst")):
            pass
    time.sleep(0.3)
    assert sched.beats == []


def test_a_stage_ends_after_its_beat_under_way() -> None:
    beats = Heartbeats()
    # A beat that takes 0.1 s (Redis slow), due 0.2 s after the start
    sched = Recorder(delay=0.1)
    rt = Runtime(sched, heartbeat_interval=0.2)
    with beats.kept(rt, payload("a.bst")):
        time.sleep(0.25)  # the beat is under way now
    # Then the stage's end waited for it: it landed before the stage moved on
    assert len(sched.of("a.bst")) == 1


def test_a_stage_waits_for_a_stuck_beat_at_most_an_interval() -> None:
    beats = Heartbeats()
    sched = Recorder(delay=1.0)
    rt = Runtime(sched, heartbeat_interval=0.05)
    start = time.monotonic()
    with beats.kept(rt, payload("a.bst")):
        time.sleep(0.08)
    assert time.monotonic() - start < 0.5


def success_line(name: str) -> logging.LogRecord:
    """Celery's "succeeded" record of a task named ``name`` (as celery.app.trace logs it)."""
    context = {
        "id": "t1",
        "name": name,
        "return_value": "{}",
        "runtime": 0.1,
        "args": "",
        "kwargs": "",
    }
    record = logging.getLogger(SUCCESS_LOGGER).makeRecord(
        SUCCESS_LOGGER,
        logging.INFO,
        __file__,
        1,
        LOG_SUCCESS,
        (context,),
        None,
        extra={"data": context},
    )
    return record


def test_celerys_task_lines_are_dropped_unless_the_worker_logs_at_debug() -> None:
    success = logging.getLogger(SUCCESS_LOGGER)
    try:
        quiet_task_lines(loglevel=logging.INFO)
        # No "received" line
        assert not logging.getLogger(RECEIVED_LOGGER).isEnabledFor(logging.INFO)
        # A "succeeded" line only for a node's last task
        assert success.filter(success_line("remex.push_artifact"))
        assert success.filter(success_line("remex.fetch_source"))
        assert not success.filter(success_line("remex.upload"))
        # Failures and other lines pass
        other = success.makeRecord(SUCCESS_LOGGER, logging.ERROR, __file__, 1, "boom", (), None)
        assert success.filter(other)
        # At DEBUG, every line
        quiet_task_lines(loglevel="DEBUG")
        assert logging.getLogger(RECEIVED_LOGGER).level == logging.NOTSET
        assert success.filter(success_line("remex.upload"))
    finally:
        quiet_task_lines(loglevel="DEBUG")
