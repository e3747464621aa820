"""The scheduler's event stream, on-error modes and build listing against a
real Redis, with no workers: the tests make the moves the tasks make."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
import redis

from pipeline.scheduler import BUILD_TTL_SECONDS, Scheduler
from pipeline.servers import RedisServer
from tests.integration.test_scheduler import DIAMOND, send, spec, states

DB = 8


@pytest.fixture
def scheduler(redis_server: RedisServer) -> Iterator[Scheduler]:
    client = redis.Redis(
        host=redis_server.host, port=redis_server.port, db=DB, decode_responses=True
    )
    client.flushdb()
    yield Scheduler(client, heartbeat_timeout=5.0)
    client.flushdb()
    client.close()


def create(
    scheduler: Scheduler,
    deps: Mapping[str, Sequence[str]],
    *,
    cached: Sequence[str] = (),
    on_error: str = "continue",
) -> str:
    specs = [spec(name) for name in deps]
    meta = {"targets": [list(deps)[-1]], "project": "p", "on_error": on_error, "priority": 5}
    build, _ = scheduler.create_build(specs, deps, cached, meta)
    return build


def run(scheduler: Scheduler, build: str, element: str, stages: Sequence[str]) -> None:
    """Send the element and start each of ``stages`` as a worker would."""
    assert send(scheduler, build, element)
    attempt = int(scheduler.info(build, element)["attempt"])
    for stage in stages:
        assert scheduler.start_stage(
            build, element, attempt=attempt, stage=stage, host="h1", worker="w1/1/x"
        )


def kinds(scheduler: Scheduler, build: str) -> list[tuple[str, Any]]:
    return [(e.kind, e.data.get("element")) for e in scheduler.read_events(build)]


def test_every_state_change_is_an_event_in_order(scheduler: Scheduler) -> None:
    # Given a diamond whose root is cached
    build = create(scheduler, DIAMOND, cached=["a"])
    # When b is built through two stages (execute resumed twice), c fails, d is skipped
    run(scheduler, build, "b", ["stage_to_cas", "execute", "execute"])
    scheduler.note(build, "b", {"operation": "op-1"})
    scheduler.note(build, "b", {"operation": "op-1", "remote_stage": "EXECUTING"})
    scheduler.finish(build, "b", "built", {"timings": {"execute": 1.5}})
    run(scheduler, build, "c", ["stage_to_cas"])
    scheduler.finish(build, "c", "failed", {"error": "exit 1", "failed_stage": "execute"})
    scheduler.note(build, "c", {"operation": "op-late"})  # after the end: no event
    # Then the stream holds each change once, in the order they happened
    assert kinds(scheduler, build) == [
        ("submitted", None),
        ("cached", "a"),
        ("queued", "b"),
        ("stage", "b"),
        ("stage", "b"),
        ("operation", "b"),
        ("built", "b"),
        ("queued", "c"),
        ("stage", "c"),
        ("failed", "c"),
        ("skipped", "d"),
        ("finished", None),
    ]
    events = scheduler.read_events(build)
    # And they carry the host, worker, stage, operation, timings and error
    stage = events[4].data
    assert (stage["stage"], stage["host"], stage["worker"]) == ("execute", "h1", "w1/1/x")
    built = events[6].data
    assert built["operation"] == "op-1" and built["timings"] == {"execute": 1.5}
    assert built["started"] <= built["finished"]
    assert events[9].data["error"] == "exit 1" and events[9].data["failed_stage"] == "execute"
    assert "c failed" in events[10].data["error"]
    assert events[-1].final and events[-1].data["status"] == "failed"
    # And reading after an id gives exactly what follows it
    after = scheduler.read_events(build, events[5].id)
    assert [e.id for e in after] == [e.id for e in events[6:]]
    # And the stream expires with the build
    assert 0 < scheduler.redis.ttl(scheduler.keys.events(build)) <= BUILD_TTL_SECONDS


def test_a_blocking_read_returns_when_an_event_comes(scheduler: Scheduler) -> None:
    build = create(scheduler, {"a": []})
    last = scheduler.read_events(build)[-1].id
    started = time.monotonic()
    assert scheduler.read_events(build, last, block=0.2) == []
    assert time.monotonic() - started >= 0.15
    send(scheduler, build, "a")
    [queued] = scheduler.read_events(build, last, block=5)
    assert queued.kind == "queued" and queued.data["attempt"] == 1


def test_waiting_on_another_build_and_cancelling_are_events(scheduler: Scheduler) -> None:
    first = create(scheduler, {"lib": []})
    second = create(scheduler, {"lib": []})
    run(scheduler, first, "lib", ["stage_to_cas"])
    assert send(scheduler, second, "lib") == 0  # it waits on the first build's lib
    scheduler.cancel(second)
    assert kinds(scheduler, second) == [
        ("submitted", None),
        ("waiting", "lib"),
        ("cancelled", "lib"),
        ("finished", None),
    ]
    assert scheduler.read_events(second)[1].data["waiting_on"] == f"{first}\tlib"


WIDE = {"a": [], "b": [], "c": [], "a2": ["a"], "b2": ["b"], "c2": ["c"]}


def test_on_error_continue_builds_the_other_branches(scheduler: Scheduler) -> None:
    build = create(scheduler, WIDE)
    for e in ("a", "b", "c"):
        run(scheduler, build, e, ["stage_to_cas"])
    finished = scheduler.finish_element(build, "a", "failed", {"error": "boom"})
    assert finished.stopped == [] and finished.released == []
    assert states(scheduler, build) == {
        "a": "failed",
        "b": "running",
        "c": "running",
        "a2": "skipped",
        "b2": "waiting",
        "c2": "waiting",
    }
    assert scheduler.finish(build, "b", "built", {}) == [(build, "b2")]


def test_on_error_quit_starts_nothing_new_and_lets_running_ones_finish(
    scheduler: Scheduler,
) -> None:
    # Given three branches: a and b running, c queued, the second level waiting
    build = create(scheduler, WIDE, on_error="quit")
    run(scheduler, build, "a", ["stage_to_cas"])
    run(scheduler, build, "b", ["stage_to_cas"])
    send(scheduler, build, "c")
    # When a fails
    finished = scheduler.finish_element(build, "a", "failed", {"error": "boom"})
    # Then what had not started is cancelled (the queued one's task is to revoke), b runs on
    assert [(s["element"], s["was"]) for s in finished.stopped] == [("c", "queued")]
    assert states(scheduler, build) == {
        "a": "failed",
        "b": "running",
        "c": "cancelled",
        "a2": "skipped",
        "b2": "cancelled",
        "c2": "cancelled",
    }
    assert "a failed and on-error is quit" in scheduler.info(build, "c")["error"]
    assert scheduler.status(build).status == "running"
    # And when b finishes, nothing new becomes ready and the build fails
    assert scheduler.finish(build, "b", "built", {}) == []
    assert scheduler.status(build).status == "failed"
    assert kinds(scheduler, build)[-1] == ("finished", None)


def test_on_error_terminate_cancels_the_running_ones_too(scheduler: Scheduler) -> None:
    build = create(scheduler, WIDE, on_error="terminate")
    for e in ("a", "b", "c"):
        run(scheduler, build, e, ["stage_to_cas"])
    scheduler.note(build, "b", {"operation": "op-b"})
    finished = scheduler.finish_element(build, "a", "failed", {"error": "boom"})
    stopped = {s["element"]: s for s in finished.stopped}
    assert sorted(stopped) == ["b", "c"]
    assert stopped["b"]["was"] == "running" and stopped["b"]["operation"] == "op-b"
    assert stopped["b"]["build"] == build
    assert scheduler.status(build).status == "failed"
    # A stage of a terminated element that starts later is stale
    attempt = int(scheduler.info(build, "b")["attempt"])
    assert not scheduler.start_stage(build, "b", attempt=attempt, stage="upload", host="h1")


def test_the_listing_counts_as_elements_finish(scheduler: Scheduler) -> None:
    # Given a finished build and a running one
    done = create(scheduler, DIAMOND, cached=["a"])
    for e in ("b", "c"):
        run(scheduler, done, e, ["stage_to_cas"])
        scheduler.finish(done, e, "built", {})
    run(scheduler, done, "d", ["stage_to_cas"])
    scheduler.finish(done, "d", "failed", {"error": "x"})
    running = create(scheduler, WIDE, on_error="quit")
    # Then both are listed, newest first, with their counts and settings
    listed = scheduler.builds()
    assert [b.build_id for b in listed] == [running, done]
    assert listed[1].status == "failed"
    assert listed[1].counts == {"cached": 1, "built": 2, "failed": 1, "total": 4, "active": 0}
    assert listed[0].counts == {"total": 6, "active": 6}
    data = listed[0].as_json()
    assert (data["project"], data["targets"], data["on_error"], data["priority"]) == (
        "p",
        ["c2"],
        "quit",
        5,
    )
    assert data["finished"] is None and data["duration"] >= 0
    assert [b.build_id for b in scheduler.builds("failed")] == [done]
    assert [b.build_id for b in scheduler.builds("running")] == [running]
    with pytest.raises(ValueError, match="unknown build state"):
        scheduler.builds("done")
    # And a build whose state expired leaves the listing (and its index)
    for key in scheduler.redis.keys(f"remex:build:{done}:*"):
        scheduler.redis.delete(key)
    assert [b.build_id for b in scheduler.builds()] == [running]
    assert scheduler.redis.zscore(scheduler.keys.builds, done) is None
