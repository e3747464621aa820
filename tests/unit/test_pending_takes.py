"""PendingTakes: a received stage message's holder is recorded only if it
waits (issue 16: no take script for a message that starts at once)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tasks.runtime import PendingTakes, RuntimeHolder


@dataclass
class FakeScheduler:
    taken: list[tuple[str, str, int, str, str]] = field(default_factory=list)

    def take(self, build: str, element: str, *, attempt: int, stage: str, holder: str) -> bool:
        self.taken.append((build, element, attempt, stage, holder))
        return True


@dataclass
class FakeRuntime:
    scheduler: FakeScheduler = field(default_factory=FakeScheduler)
    holder: str = "w1/1/x#e1"


def make(delay: float = 60.0) -> tuple[PendingTakes, FakeRuntime]:
    runtime = FakeRuntime()
    holder = RuntimeHolder(lambda: runtime)
    return PendingTakes(holder, delay), runtime


def test_a_message_that_starts_at_once_records_no_take() -> None:
    takes, runtime = make()
    takes.received("t1", "b1", "a.bst", 1, "upload")
    takes.started("t1")
    assert takes.flush(now=float("inf")) == 0
    assert runtime.scheduler.taken == []


def test_a_message_that_waits_has_its_holder_recorded_once() -> None:
    takes, runtime = make()
    takes.received("t1", "b1", "a.bst", 1, "upload")
    takes.received("t2", "b1", "b.bst", 2, "execute")
    # Not due yet: nothing recorded
    assert takes.flush() == 0
    # Due: both recorded, each once
    assert takes.flush(now=float("inf")) == 2
    assert takes.flush(now=float("inf")) == 0
    assert sorted(runtime.scheduler.taken) == [
        ("b1", "a.bst", 1, "upload", "w1/1/x#e1"),
        ("b1", "b.bst", 2, "execute", "w1/1/x#e1"),
    ]
    # A start afterwards changes nothing
    takes.started("t1")


def test_the_thread_records_a_waiting_message_after_the_delay() -> None:
    takes, runtime = make(delay=0.05)
    takes.received("t1", "b1", "a.bst", 1, "upload")
    deadline = time.monotonic() + 5
    while not runtime.scheduler.taken and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runtime.scheduler.taken == [("b1", "a.bst", 1, "upload", "w1/1/x#e1")]


def test_a_failing_take_is_only_logged(caplog: Any) -> None:
    takes, runtime = make()

    def broken(*_: object, **__: object) -> bool:
        raise ConnectionError("redis is away")

    runtime.scheduler.take = broken  # type: ignore[method-assign]
    takes.received("t1", "b1", "a.bst", 1, "upload")
    assert takes.flush(now=float("inf")) == 0
    assert "could not record a received task" in caplog.text
