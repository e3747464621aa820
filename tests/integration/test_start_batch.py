"""Stage starts recorded in batches (tasks.runtime.StartBatch and
Scheduler.record_starts), their events as one stream entry, and the
reconciler's second look before it re-sends an element whose message is in
no queue; against a real Redis, no workers (issue 16)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from pipeline.scheduler import LOST_AFTER_HEARTBEATS, Scheduler, StageStart
from pipeline.servers import RedisServer
from tasks.runtime import StartBatch
from tests.integration.test_scheduler import create, send

DB = 8
HOLDER = "w1/1/x#e1"


@pytest.fixture
def scheduler(redis_server: RedisServer) -> Iterator[Scheduler]:
    client = redis.Redis(
        host=redis_server.host, port=redis_server.port, db=DB, decode_responses=True
    )
    client.flushdb()
    made = Scheduler(client, heartbeat_timeout=5.0)
    yield made
    for key in client.scan_iter("remex:build:*:counts"):
        build = key.removeprefix("remex:build:").removesuffix(":counts")
        assert made.verify_counts(build) == [], build
    client.flushdb()
    client.close()


def start(build: str, element: str, stage: str, attempt: int = 1) -> StageStart:
    return StageStart(build, element, attempt, stage, "w1", "w1/1/x", HOLDER, time.time())


def calls(scheduler: Scheduler) -> dict[str, int]:
    """Commands Redis ran so far, by name (the scripts' own included)."""
    stats = scheduler.redis.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def ran(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    diff = {k: n - before.get(k, 0) for k, n in after.items() if k != "info"}
    return {k: n for k, n in diff.items() if n}


def test_a_batch_records_the_latest_stage_of_each_element_in_one_script(
    scheduler: Scheduler,
) -> None:
    # Given two elements sent, and a process that starts three stages of one
    # and the first of the other before its flush
    build, _ = create(scheduler, {"a": [], "b": []})
    send(scheduler, build, "a")
    send(scheduler, build, "b")
    batch = StartBatch(scheduler, interval=3600.0)
    first = start(build, "a", "stage_to_cas")
    for stage_start in (first, start(build, "a", "upload"), start(build, "a", "execute")):
        assert batch.begin(stage_start)
    assert batch.begin(start(build, "b", "stage_to_cas"))
    # Then nothing is written until the flush (both still read queued)
    assert scheduler.state(build, "a") == "queued" and "stage" not in scheduler.info(build, "a")
    after_send = scheduler.read_events(build)[-1].id
    # When it flushes (the script loaded already)
    assert scheduler.record_starts([start(build, "none", "upload")]) == [(build, "none")]
    before = calls(scheduler)
    assert batch.flush() == 2
    # Then one script read and wrote both in a few commands
    assert ran(before, calls(scheduler)) == {
        "evalsha": 1,
        "hmget": 1,
        "hset": 2,
        "xadd": 1,
    }
    # And each element is running at its latest stage, held by the process
    a = scheduler.info(build, "a")
    assert scheduler.state(build, "a") == "running"
    assert (a["stage"], a["holder"], a["host"], a["hosts"]) == ("execute", HOLDER, "w1", ["w1"])
    assert a["started"] == pytest.approx(first.at) and a["stage_at"] >= a["started"]
    assert scheduler.info(build, "b")["stage"] == "stage_to_cas"
    # And the two stage events are one stream entry, read as two events
    events = scheduler.read_events(build, after_send)
    assert [(e.kind, e.data["element"], e.data["stage"]) for e in events] == [
        ("stage", "a", "execute"),
        ("stage", "b", "stage_to_cas"),
    ]
    assert events[0].id == events[1].id
    # And a flush with nothing noted costs nothing
    before = calls(scheduler)
    assert batch.flush() == 0
    assert ran(before, calls(scheduler)) == {}


def test_a_later_stage_of_a_chain_this_process_runs_reads_nothing(scheduler: Scheduler) -> None:
    # Given an element whose first stage this process started (one read)
    build, _ = create(scheduler, {"a": []})
    send(scheduler, build, "a")
    batch = StartBatch(scheduler, interval=3600.0)
    before = calls(scheduler)
    assert batch.begin(start(build, "a", "stage_to_cas"))
    assert ran(before, calls(scheduler)) == {"hget": 1}
    # When its next stages start here
    before = calls(scheduler)
    for stage in ("upload", "execute", "execute", "fetch_outputs"):
        assert batch.begin(start(build, "a", stage))
    # Then they read nothing
    assert ran(before, calls(scheduler)) == {}
    # And an element that finishes before the flush needs no record at all
    batch.forget(build, "a")
    assert batch.flush() == 0


def test_a_stale_start_is_refused_or_not_recorded(scheduler: Scheduler) -> None:
    # Given an element this process started, then sent again elsewhere (a
    # second attempt) before the flush
    build, _ = create(scheduler, {"a": []})
    send(scheduler, build, "a")
    batch = StartBatch(scheduler, interval=3600.0)
    assert batch.begin(start(build, "a", "stage_to_cas"))
    assert send(scheduler, build, "a") == 2
    # When the batch flushes, the stale start writes nothing
    assert batch.flush() == 1
    info = scheduler.info(build, "a")
    assert info["attempt"] == 2 and "stage" not in info and "holder" not in info
    assert scheduler.state(build, "a") == "queued"
    # And the next stage of the old attempt reads again, and is refused
    assert not batch.begin(start(build, "a", "upload"))
    # And a copy of an earlier stage of the current attempt is refused too
    assert batch.begin(start(build, "a", "execute", attempt=2))
    batch.flush()
    other = StartBatch(scheduler, interval=3600.0)
    assert not other.begin(start(build, "a", "upload", attempt=2))
    # And so is any start of a finished element
    scheduler.finish(build, "a", "built", {})
    assert not other.begin(start(build, "a", "push_artifact", attempt=2))


def test_a_take_is_noted_with_the_starts_and_counts_as_a_sign_of_life(
    scheduler: Scheduler,
) -> None:
    # Given an element running at upload on a live worker, silent for long
    build, _ = create(scheduler, {"a": []})
    send(scheduler, build, "a")
    scheduler.worker_alive("w1/1/x", "e1")
    batch = StartBatch(scheduler, interval=3600.0)
    assert batch.begin(start(build, "a", "upload"))
    batch.flush()
    long_ago = time.time() - 100 * scheduler.heartbeat_timeout
    scheduler.note(build, "a", {"stage_at": long_ago, "taken_at": long_ago})
    assert [e for e, _ in scheduler.stalled(build, time.time(), queued_task_ids=set)] == ["a"]
    # When the worker takes its next message (prefetched, not started)
    batch.take(build, "a", attempt=1, stage="execute", holder=HOLDER)
    assert batch.flush() == 1
    # Then the take is a sign of life: it is not lost
    assert scheduler.info(build, "a")["taken_at"] > time.time() - 5
    assert scheduler.stalled(build, time.time(), queued_task_ids=set) == []


def test_a_live_holders_message_taken_during_the_pass_is_not_sent_again(
    scheduler: Scheduler,
) -> None:
    # Given an element running on a live worker, whose next stage waited
    # behind a backlog in that worker's queue for many heartbeat timeouts
    build, _ = create(scheduler, {"a": []})
    send(scheduler, build, "a")
    scheduler.worker_alive("w1/1/x", "e1")
    assert scheduler.start_stage(
        build, "a", attempt=1, stage="upload", host="w1", worker="w1/1/x", holder=HOLDER
    )
    much_later = time.time() + (LOST_AFTER_HEARTBEATS + 2) * scheduler.heartbeat_timeout

    # When the reconciler finds the message in no queue just as the worker
    # takes it from its queue (its take is recorded a moment later)
    def just_taken() -> set[str]:
        scheduler.take(build, "a", attempt=1, stage="execute", holder=HOLDER)
        return set()

    # Then it is not sent again (it was, once per such element, before the
    # reconciler looked twice)
    assert scheduler.stalled(build, much_later, queued_task_ids=just_taken) == []
    # But an element whose info stays the same is
    [(element, reason)] = scheduler.stalled(build, much_later, queued_task_ids=set)
    assert element == "a" and "no heartbeat" in reason
