"""pipeline.scheduler (and pipeline.broker's sending and reconciling) against a
real Redis: the DAG state's atomic moves.

No workers here: the tests call the Scheduler as the tasks, the API and the
reconciler do, and read the state back; messages sent go to a queue nobody
consumes.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
import redis
from celery import Celery

from pipeline.broker import (
    DEFAULT_QUEUE,
    MAX_ATTEMPTS,
    RECONCILE_LOCK,
    STAGE_PRIORITY,
    drop_stale_unacked,
    make_celery,
    message_priority,
    queue_lists,
    reconcile,
    send_element,
    stage_payload,
)
from pipeline.config import RemexConfig
from pipeline.scheduler import (
    LOST_AFTER_HEARTBEATS,
    READY_GRACE,
    BuildStatus,
    Scheduler,
)
from pipeline.servers import RedisServer
from pipeline.spec import BuildSpec

# A Redis database of its own, emptied before each test.
DB = 7


@pytest.fixture
def scheduler(redis_server: RedisServer) -> Iterator[Scheduler]:
    yield from scheduler_on(redis_server, DB)


def scheduler_on(redis_server: RedisServer, db: int) -> Iterator[Scheduler]:
    """A scheduler on Redis database ``db``, emptied before and after; at the
    end, the counts the scripts keep are checked against the states."""
    client = redis.Redis(
        host=redis_server.host, port=redis_server.port, db=db, decode_responses=True
    )
    client.flushdb()
    made = Scheduler(client, heartbeat_timeout=5.0)
    yield made
    # Whatever the test did (retries, failures, cancels, lost workers, shared
    # artifacts), the counts and sets the scripts keep match the states.
    for key in client.scan_iter("remex:build:*:counts"):
        build = key.removeprefix("remex:build:").removesuffix(":counts")
        assert made.verify_counts(build) == [], build
    client.flushdb()
    client.close()


def spec(name: str, key: str | None = None, kind: str = "manual") -> BuildSpec:
    """A spec with what the scheduler reads (the stages need more)."""
    key = key or f"key-{name}"
    return {  # type: ignore[typeddict-item]
        "element": name,
        "cache_key": key,
        "kind": kind,
        "artifact_uri": f"urn:test:{name}/{key}",
    }


def create(
    scheduler: Scheduler,
    deps: Mapping[str, Sequence[str]],
    *,
    cached: Sequence[str] = (),
    keys: Mapping[str, str] | None = None,
) -> tuple[str, list[str]]:
    """A build of the elements of ``deps`` (element -> its build dependencies,
    dependencies first)."""
    keys = keys or {}
    specs = [spec(name, keys.get(name)) for name in deps]
    return scheduler.create_build(specs, deps, cached, {"targets": [list(deps)[-1]]})


def send(scheduler: Scheduler, build: str, element: str, task_id: str = "") -> int:
    """What broker.send_element records, minus Celery (claim, then queue or
    wait): the new attempt, or 0 (it waits on another build, or must not be
    sent)."""
    [recorded] = scheduler.record_sends([(build, element, [task_id or f"{element}-task"])])
    return recorded.attempt


def start(scheduler: Scheduler, build: str, element: str, worker: str = "w1/1/x") -> bool:
    attempt = int(scheduler.info(build, element)["attempt"])
    return scheduler.start_stage(
        build, element, attempt=attempt, stage="stage_to_cas", host="w1", worker=worker
    )


def states(scheduler: Scheduler, build: str) -> dict[str, str]:
    return {e.element: e.state for e in scheduler.status(build).elements}


DIAMOND = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}


# --- creating -----------------------------------------------------------------


def test_a_new_build_has_ready_waiting_and_cached_elements(scheduler: Scheduler) -> None:
    # Given a diamond whose root is cached
    build, ready = create(scheduler, DIAMOND, cached=["a"])
    # Then the elements that only needed it are ready, the top waits
    assert sorted(ready) == ["b", "c"]
    assert states(scheduler, build) == {"a": "cached", "b": "ready", "c": "ready", "d": "waiting"}
    status = scheduler.status(build)
    assert status.status == "running" and not status.done
    assert build in scheduler.active_builds()
    # And the ready ones know since when (the reconciler's grace period counts from it)
    assert scheduler.info(build, "b")["ready_at"] > 0


def test_a_build_of_cached_elements_succeeds_at_once(scheduler: Scheduler) -> None:
    build, ready = create(scheduler, DIAMOND, cached=list(DIAMOND))
    assert ready == []
    assert scheduler.status(build).status == "succeeded"
    assert build not in scheduler.active_builds()


def test_an_unknown_build_is_a_key_error(scheduler: Scheduler) -> None:
    with pytest.raises(KeyError):
        scheduler.status("nope")
    with pytest.raises(KeyError):
        scheduler.cancel("nope")


# --- counts kept as states move (issue 16) ----------------------------------------


def test_a_summary_has_the_counts_and_only_live_and_failed_elements(
    scheduler: Scheduler,
) -> None:
    # Given a build of 200 independent elements, 195 of them cached; of the
    # others two finish (one fails), one is queued again after a lost worker,
    # one runs and one is never sent
    deps: dict[str, list[str]] = {f"e{i:03d}": [] for i in range(200)}
    build, ready = create(scheduler, deps, cached=[f"e{i:03d}" for i in range(5, 200)])
    assert sorted(ready) == ["e000", "e001", "e002", "e003", "e004"]
    for element in ("e000", "e001", "e002", "e003"):
        send(scheduler, build, element)
        assert start(scheduler, build, element)
    scheduler.finish(build, "e000", "built", {})
    scheduler.finish(build, "e001", "failed", {"error": "exit 1"})
    assert send(scheduler, build, "e002") == 2  # a retry of a running element
    # When its summary is read
    summary = scheduler.status(build, every=False)
    # Then it counts every state and lists only the live and failed elements
    assert summary.summary and summary.total == 200
    assert summary.counts() == {"cached": 195, "built": 1, "failed": 1, "queued": 1,
                                "running": 1, "ready": 1}  # fmt: skip
    assert {e.element: e.state for e in summary.elements} == {
        "e001": "failed",
        "e002": "queued",
        "e003": "running",
        "e004": "ready",
    }
    assert next(e for e in summary.elements if e.element == "e001").info["error"] == "exit 1"
    # And it agrees with the whole status
    whole = scheduler.status(build)
    assert not whole.summary and whole.counts() == summary.counts()
    # And once the rest finish, the build's status follows from the counts alone
    for element in ("e002", "e003", "e004"):
        scheduler.finish(build, element, "built", {})
    done = scheduler.status(build, every=False)
    assert done.status == "failed" and done.counts()["built"] == 4
    assert [e.element for e in done.elements] == ["e001"]


def test_a_build_without_counts_is_read_and_finished_by_scanning(scheduler: Scheduler) -> None:
    # Given a build written before the counts existed (an older remex)
    build, _ = create(scheduler, {"a": [], "b": ["a"]})
    for name in ("counts", "live", "failed"):
        scheduler.redis.delete(f"remex:build:{build}:{name}")
    # Then its summary is the whole status, and the reconciler scans it
    summary = scheduler.status(build, every=False)
    assert not summary.summary and len(summary.elements) == 2
    assert scheduler.stalled(build, time.time() + READY_GRACE + 1) == [
        ("a", "ready but never sent")
    ]
    # And it still ends when its elements do
    scheduler.finish(build, "a", "built", {})
    scheduler.finish(build, "b", "built", {})
    assert scheduler.status(build).status == "succeeded"
    # (The moves did not start partial counts.)
    assert not scheduler.redis.exists(f"remex:build:{build}:counts")


# --- finishing ------------------------------------------------------------------


def test_finish_decrements_dependents_exactly_once_even_when_called_twice(
    scheduler: Scheduler,
) -> None:
    # Given a diamond a -> (b, c) -> d
    build, _ = create(scheduler, DIAMOND)
    # When a finishes twice (a redelivered last stage, say)
    first = scheduler.finish(build, "a", "built", {})
    second = scheduler.finish(build, "a", "built", {})
    # Then b and c became ready once
    assert sorted(first) == [(build, "b"), (build, "c")]
    assert second == []
    # And b finishing twice does not make d ready: it still waits for c
    assert scheduler.finish(build, "b", "built", {}) == []
    assert scheduler.finish(build, "b", "built", {}) == []
    assert scheduler.state(build, "d") == "waiting"
    assert int(scheduler.redis.hget(f"remex:build:{build}:pending", "d") or -1) == 1
    # Until c finishes
    assert scheduler.finish(build, "c", "built", {}) == [(build, "d")]
    assert scheduler.state(build, "d") == "ready"
    assert scheduler.finish(build, "d", "built", {"artifact": {"hash": "h", "size_bytes": 1}}) == []
    status = scheduler.status(build)
    assert status.status == "succeeded"
    assert status.elements[-1].info["artifact"] == {"hash": "h", "size_bytes": 1}


def test_a_failure_skips_transitive_dependents_only(scheduler: Scheduler) -> None:
    # Given a -> b -> c, a -> d, and x on its own
    deps = {"a": [], "x": [], "b": ["a"], "d": ["a"], "c": ["b"]}
    build, ready = create(scheduler, deps)
    assert sorted(ready) == ["a", "x"]
    scheduler.finish(build, "a", "built", {})
    # When b fails
    assert scheduler.finish(build, "b", "failed", {"error": "exit 1", "log_tail": "oops"}) == []
    # Then c is skipped (naming b), d and x are not touched
    current = states(scheduler, build)
    assert current == {"a": "built", "x": "ready", "b": "failed", "d": "ready", "c": "skipped"}
    assert "b.bst" not in scheduler.info(build, "c")["error"]
    assert "dependency b failed" in scheduler.info(build, "c")["error"]
    assert scheduler.info(build, "b")["log_tail"] == "oops"
    # And the build runs on until the independent elements are done, then fails
    assert scheduler.status(build).status == "running"
    scheduler.finish(build, "x", "built", {})
    scheduler.finish(build, "d", "built", {})
    assert scheduler.status(build).status == "failed"
    # And a late "built" for the failed element changes nothing
    assert scheduler.finish(build, "b", "built", {}) == []
    assert scheduler.state(build, "b") == "failed"


def test_finish_rejects_unknown_outcomes(scheduler: Scheduler) -> None:
    build, _ = create(scheduler, {"a": []})
    with pytest.raises(ValueError):
        scheduler.finish(build, "a", "cached", {})


# --- sending and starting -------------------------------------------------------


def test_each_send_is_a_new_attempt_and_older_attempts_are_stale(scheduler: Scheduler) -> None:
    build, _ = create(scheduler, {"a": []})
    assert send(scheduler, build, "a") == 1
    assert scheduler.state(build, "a") == "queued"
    # (The first task id the sender's; the other four stages' derived)
    task_ids = scheduler.info(build, "a")["task_ids"]
    assert task_ids[0] == "a-task" and len(set(task_ids)) == 5
    # A stage of attempt 1 starts: running, on w1, with a heartbeat
    assert scheduler.start_stage(build, "a", attempt=1, stage="upload", host="w1", worker="w1/1")
    info = scheduler.info(build, "a")
    assert scheduler.state(build, "a") == "running"
    assert (info["stage"], info["host"], info["hosts"], info["worker"]) == (
        "upload",
        "w1",
        ["w1"],
        "w1/1",
    )
    assert scheduler.redis.zscore(f"remex:build:{build}:heartbeat", "a") is not None
    # When it is sent again (the reconciler), attempt 1's tasks are stale
    assert send(scheduler, build, "a") == 2
    assert not scheduler.start_stage(build, "a", attempt=1, stage="execute", host="w1")
    assert scheduler.start_stage(build, "a", attempt=2, stage="stage_to_cas", host="w2")
    assert scheduler.info(build, "a")["hosts"] == ["w1", "w2"]
    # And once built, nothing starts or sends it again
    scheduler.finish(build, "a", "built", {})
    assert not scheduler.start_stage(build, "a", attempt=2, stage="push_artifact", host="w2")
    assert send(scheduler, build, "a") == 0
    assert scheduler.state(build, "a") == "built"


def test_an_element_waiting_for_dependencies_is_not_sent(scheduler: Scheduler) -> None:
    build, _ = create(scheduler, DIAMOND)
    assert send(scheduler, build, "d") == 0
    assert scheduler.state(build, "d") == "waiting"
    assert scheduler.info(build, "d")["attempt"] == 0


def test_heartbeat_of_a_finished_element_does_not_come_back(scheduler: Scheduler) -> None:
    build, _ = create(scheduler, {"a": []})
    send(scheduler, build, "a")
    assert start(scheduler, build, "a")
    scheduler.finish(build, "a", "built", {})
    scheduler.heartbeat(build, "a")  # a stage's heartbeat thread, late
    assert scheduler.redis.zscore(f"remex:build:{build}:heartbeat", "a") is None


def test_info_lists_survive_the_lua_scripts(scheduler: Scheduler) -> None:
    # cjson writes an empty table as {}: lists must still read as lists
    build, _ = create(scheduler, {"a": []})
    scheduler.note(build, "a", {"hosts": [], "note": {"x": 1}})
    send(scheduler, build, "a")
    info = scheduler.info(build, "a")
    assert info["hosts"] == [] and info["note"] == {"x": 1}
    assert start(scheduler, build, "a")
    assert scheduler.info(build, "a")["hosts"] == ["w1"]


# --- two builds, one artifact ------------------------------------------------------


def test_two_builds_of_one_artifact_build_it_once(scheduler: Scheduler) -> None:
    # Given two builds of the same element (same artifact URI), each with a dependent
    first, _ = create(scheduler, {"lib": [], "app1": ["lib"]})
    second, _ = create(scheduler, {"lib": [], "app2": ["lib"]})
    # When both send it, the first claims it and the second waits on it
    assert send(scheduler, first, "lib") == 1
    assert send(scheduler, second, "lib") == 0
    assert scheduler.state(second, "lib") == "queued"
    assert scheduler.info(second, "lib")["waiting_on"] == f"{first}\tlib"
    # And the waiting one's tasks could not start (it has none, and is not its own builder)
    assert not scheduler.start_stage(second, "lib", attempt=0, stage="stage_to_cas", host="w")
    # When the first build finishes it, both builds have it, and both dependents are ready
    ready = scheduler.finish(first, "lib", "built", {"artifact": {"hash": "h", "size_bytes": 1}})
    assert sorted(ready) == sorted([(first, "app1"), (second, "app2")])
    assert scheduler.state(second, "lib") == "built"
    assert scheduler.info(second, "lib")["built_by"] == f"{first}\tlib"
    assert "built_by" not in scheduler.info(first, "lib")
    # And the claim is gone: a third build would build (or find) it itself
    third, _ = create(scheduler, {"lib": []})
    assert send(scheduler, third, "lib") == 1


def test_a_failure_fails_the_waiting_builds_too(scheduler: Scheduler) -> None:
    first, _ = create(scheduler, {"lib": [], "app1": ["lib"]})
    second, _ = create(scheduler, {"lib": [], "app2": ["lib"]})
    send(scheduler, first, "lib")
    send(scheduler, second, "lib")
    scheduler.finish(first, "lib", "failed", {"error": "exit 2"})
    assert states(scheduler, second) == {"lib": "failed", "app2": "skipped"}
    assert scheduler.status(second).status == "failed"


def test_elements_with_one_cache_key_but_different_artifacts_both_build(
    scheduler: Scheduler,
) -> None:
    # Two elements whose descriptions are equal (two identical stacks, say)
    # share a cache key, yet each has its own artifact: neither may wait on
    # the other, or one artifact is never pushed.
    build, _ = create(scheduler, {"s1": [], "s2": []}, keys={"s1": "same", "s2": "same"})
    assert send(scheduler, build, "s1") == 1
    assert send(scheduler, build, "s2") == 1


def test_a_claim_of_a_stopped_owner_is_taken_over(scheduler: Scheduler) -> None:
    first, _ = create(scheduler, {"lib": []})
    second, _ = create(scheduler, {"lib": []})
    send(scheduler, first, "lib")
    scheduler.cancel(first)
    # The first build's element is cancelled: the second builds it itself
    assert send(scheduler, second, "lib") == 1


def test_cancel_releases_the_waiters_of_its_claims(scheduler: Scheduler) -> None:
    first, _ = create(scheduler, {"lib": []})
    second, _ = create(scheduler, {"lib": []})
    send(scheduler, first, "lib")
    send(scheduler, second, "lib")
    stopped, released = scheduler.cancel(first)
    assert [info["element"] for info in stopped] == ["lib"]
    assert stopped[0]["task_ids"][0] == "lib-task"
    assert released == [(second, "lib")]
    # The released waiter is sent again: it claims the artifact now
    assert send(scheduler, second, "lib") == 1
    assert "waiting_on" not in scheduler.info(second, "lib")


def test_a_cancelled_waiter_leaves_the_waiters(scheduler: Scheduler) -> None:
    first, _ = create(scheduler, {"lib": []})
    second, _ = create(scheduler, {"lib": [], "app": ["lib"]})
    send(scheduler, first, "lib")
    send(scheduler, second, "lib")
    scheduler.cancel(second)
    scheduler.finish(first, "lib", "built", {})
    assert states(scheduler, second) == {"lib": "cancelled", "app": "cancelled"}
    assert scheduler.status(second).status == "cancelled"


# --- build status -------------------------------------------------------------------


def test_build_status_moves_from_running_to_cancelled_and_stays(scheduler: Scheduler) -> None:
    build, _ = create(scheduler, DIAMOND)
    send(scheduler, build, "a")
    start(scheduler, build, "a")
    stopped, _ = scheduler.cancel(build)
    assert sorted(info["element"] for info in stopped) == ["a", "b", "c", "d"]
    assert set(states(scheduler, build).values()) == {"cancelled"}
    status = scheduler.status(build)
    assert status.status == "cancelled" and status.done
    assert build not in scheduler.active_builds()
    # A running stage finds out at its next start; its finish changes nothing
    assert not start(scheduler, build, "a")
    assert scheduler.finish(build, "a", "built", {}) == []
    assert scheduler.status(build).status == "cancelled"
    assert send(scheduler, build, "a") == 0
    # And its keys expire (a week)
    assert 0 < scheduler.redis.ttl(f"remex:build:{build}:state") <= 7 * 24 * 3600


def test_cancelling_a_finished_build_changes_nothing(scheduler: Scheduler) -> None:
    build, _ = create(scheduler, {"a": []})
    scheduler.finish(build, "a", "built", {})
    assert scheduler.cancel(build) == ([], [])
    assert scheduler.status(build).status == "succeeded"


def test_a_finished_build_expires(scheduler: Scheduler) -> None:
    build, _ = create(scheduler, {"a": []})
    assert scheduler.redis.ttl(f"remex:build:{build}:info") == -1
    scheduler.finish(build, "a", "failed", {})
    assert scheduler.status(build).status == "failed"
    assert scheduler.redis.ttl(f"remex:build:{build}:info") > 0


# --- the reconciler's view -------------------------------------------------------------


def test_stalled_finds_ready_elements_nobody_sent(scheduler: Scheduler) -> None:
    build, _ = create(scheduler, {"a": [], "b": ["a"]})
    now = time.time()
    # Within the grace period, the sender is still at it
    assert scheduler.stalled(build, now) == []
    # After it, the element is sent again
    assert scheduler.stalled(build, now + READY_GRACE + 1) == [("a", "ready but never sent")]
    # A queued element whose message waits in a queue is not stalled
    send(scheduler, build, "a")
    in_queue = lambda: {"a-task"}  # noqa: E731
    assert scheduler.stalled(build, now + READY_GRACE + 1, queued_task_ids=in_queue) == []


def test_stalled_finds_running_elements_whose_worker_is_gone(scheduler: Scheduler) -> None:
    build, _ = create(scheduler, {"a": [], "b": []})
    for element in ("a", "b"):
        send(scheduler, build, element)
    scheduler.worker_alive("alive/1/x")
    assert start(scheduler, build, "a", worker="dead/1/x")
    assert start(scheduler, build, "b", worker="alive/1/x")
    now = time.time()
    # While the heartbeats are fresh nothing is stalled
    assert scheduler.stalled(build, now) == []
    # After the timeout, the element of the dead worker is (the live one's
    # element waits in its queue, say)
    later = now + scheduler.heartbeat_timeout + 1
    stalled = dict(scheduler.stalled(build, later))
    assert list(stalled) == ["a"]
    assert "heartbeat expired" in stalled["a"] and "gone" in stalled["a"]
    # And after many timeouts without a heartbeat, the other one too
    much_later = now + (LOST_AFTER_HEARTBEATS + 2) * scheduler.heartbeat_timeout
    assert sorted(dict(scheduler.stalled(build, much_later))) == ["a", "b"]
    # A heartbeat brings it back
    scheduler.heartbeat(build, "a")
    assert "a" not in dict(scheduler.stalled(build, time.time()))


def test_a_message_taken_by_a_worker_that_dies_is_sent_again(scheduler: Scheduler) -> None:
    # Given two elements sent, their first messages taken (prefetched, not
    # started) by a live worker and by one whose connection epoch is over
    build, _ = create(scheduler, {"a": [], "b": []})
    for element in ("a", "b"):
        send(scheduler, build, element)
    scheduler.worker_alive("w1/1/x", "e2")
    assert scheduler.take(build, "a", attempt=1, stage="stage_to_cas", holder="w1/1/x#e2")
    assert scheduler.take(build, "b", attempt=1, stage="stage_to_cas", holder="w1/1/x#e1")
    assert scheduler.info(build, "a")["holder"] == "w1/1/x#e2"
    # Then the old epoch's hold is over at once, the live one's is not
    stalled = dict(scheduler.stalled(build))
    assert list(stalled) == ["b"] and "is gone" in stalled["b"]
    # And when the worker's liveness key is gone, the other is too
    scheduler.worker_gone("w1/1/x")
    assert sorted(dict(scheduler.stalled(build))) == ["a", "b"]


def test_a_message_in_no_queue_and_held_by_no_one_is_sent_again(scheduler: Scheduler) -> None:
    # Given an element whose first stage ran and handed the element on (the
    # next stage's message is being published)
    build, _ = create(scheduler, {"a": []})
    send(scheduler, build, "a")
    scheduler.worker_alive("w1/1/x", "e1")
    assert scheduler.start_stage(
        build, "a", attempt=1, stage="stage_to_cas", host="w1", worker="w1/1/x", holder="w1/1/x#e1"
    )
    assert scheduler.hand_on(build, "a", attempt=1, holder="w1/1/x#e1")
    info = scheduler.info(build, "a")
    assert "holder" not in info and info["handed_at"] > 0
    assert scheduler.redis.zscore(f"remex:build:{build}:heartbeat", "a") is None
    later = time.time() + scheduler.heartbeat_timeout + 1
    # Then while its message waits in a queue, or within the timeout, it is not stalled
    assert scheduler.stalled(build, time.time(), queued_task_ids=set) == []
    assert scheduler.stalled(build, later, queued_task_ids=lambda: {"a-task"}) == []
    # But after the timeout with the message in no queue (the publish was refused), it is
    assert scheduler.stalled(build, later, queued_task_ids=set) == [
        ("a", "its message is in no queue a live worker consumes, and no worker holds it")
    ]
    # And once a worker takes the next message, it is held again
    assert scheduler.take(build, "a", attempt=1, stage="upload", holder="w1/1/x#e1")
    assert scheduler.stalled(build, later, queued_task_ids=set) == []


def test_a_lost_claim_owner_is_sent_again_and_keeps_its_claim(scheduler: Scheduler) -> None:
    # Given build 1 building lib (its message taken by a worker that then
    # died), and build 2 waiting on it
    first, _ = create(scheduler, {"lib": []})
    second, _ = create(scheduler, {"lib": []})
    send(scheduler, first, "lib")
    assert scheduler.take(first, "lib", attempt=1, stage="stage_to_cas", holder="dead/1/x#e1")
    assert send(scheduler, second, "lib") == 0  # waits on the first
    # Then the owner is lost and is sent again, the waiter is not
    assert [e for e, _ in scheduler.stalled(first)] == ["lib"]
    assert scheduler.stalled(second) == []
    # And sending it again keeps build 1's claim (build 2 still waits on it)
    assert send(scheduler, first, "lib") == 2
    assert scheduler.info(second, "lib")["waiting_on"] == f"{first}\tlib"
    # And when it is built, both are
    scheduler.finish(first, "lib", "built", {})
    assert scheduler.state(second, "lib") == "built"


def test_stale_copies_are_not_taken_or_started(scheduler: Scheduler) -> None:
    build, _ = create(scheduler, {"a": []})
    send(scheduler, build, "a")
    assert scheduler.start_stage(build, "a", attempt=1, stage="execute", host="w1", holder="h#1")
    # A copy of an earlier stage of the same attempt (left in unacked) is stale
    assert not scheduler.take(build, "a", attempt=1, stage="upload", holder="h#1")
    assert not scheduler.start_stage(build, "a", attempt=1, stage="stage_to_cas", host="w1")
    # The same stage again (a re-queue) and a later one are current
    assert scheduler.take(build, "a", attempt=1, stage="execute", holder="h#1")
    assert scheduler.start_stage(build, "a", attempt=1, stage="fetch_outputs", host="w1")
    # After a re-send, everything of attempt 1 is stale
    send(scheduler, build, "a")
    assert not scheduler.take(build, "a", attempt=1, stage="push_artifact", holder="h#1")
    assert not scheduler.hand_on(build, "a", attempt=1, holder="h#1")
    assert scheduler.take(build, "a", attempt=2, stage="stage_to_cas", holder="h#1")
    assert scheduler.info(build, "a")["holder"] == "h#1"


def test_a_worker_liveness_key_expires(scheduler: Scheduler) -> None:
    short = Scheduler(scheduler.redis, heartbeat_timeout=0.2)
    short.worker_alive("w/1/x")
    assert scheduler.redis.exists("remex:worker:w/1/x")
    time.sleep(0.4)
    assert not scheduler.redis.exists("remex:worker:w/1/x")
    short.worker_alive("w/1/x")
    short.worker_gone("w/1/x")
    assert not scheduler.redis.exists("remex:worker:w/1/x")


def test_stalled_finds_waiters_of_a_stopped_build(scheduler: Scheduler) -> None:
    first, _ = create(scheduler, {"lib": []})
    second, _ = create(scheduler, {"lib": []})
    send(scheduler, first, "lib")
    send(scheduler, second, "lib")
    assert scheduler.stalled(second) == []
    # The first build's state vanishes without a cancel (expired, flushed ...)
    for key in scheduler.redis.keys(f"remex:build:{first}:*"):
        scheduler.redis.delete(key)
    stalled = scheduler.stalled(second)
    assert [element for element, _ in stalled] == ["lib"]
    assert first in stalled[0][1]


def test_stalled_ignores_finished_builds_elements(scheduler: Scheduler) -> None:
    build, _ = create(scheduler, {"a": []})
    send(scheduler, build, "a")
    start(scheduler, build, "a", worker="dead/1/x")
    scheduler.finish(build, "a", "built", {})
    late: dict[str, Any] = dict(scheduler.stalled(build, time.time() + 3600))
    assert late == {}


# --- sending through the broker, and the reconciler ---------------------------------------


@pytest.fixture
def celery_app(redis_server: RedisServer, scheduler: Scheduler) -> Iterator[Celery]:
    """A Celery app on the test's Redis database (no worker consumes its queue)."""
    app = make_celery(RemexConfig(broker_url=f"redis://{redis_server.address}/{DB}"))
    yield app
    app.close()


def queued_messages(scheduler: Scheduler) -> list[dict[str, Any]]:
    """The messages waiting in the default queue, oldest first per priority.

    kombu's Redis transport keeps one list per priority: the queue's name for
    priority 0, ``name + "\\x06\\x16" + str(priority)`` for the others.
    """
    messages: list[dict[str, Any]] = []
    for name in queue_lists(DEFAULT_QUEUE):
        raw = scheduler.redis.lrange(name, 0, -1)
        messages += [json.loads(message) for message in reversed(raw)]
    return messages


def test_send_element_sends_a_five_stage_chain_with_known_task_ids(
    scheduler: Scheduler, celery_app: Celery
) -> None:
    build, _ = create(scheduler, {"a": [], "b": ["a"]})
    assert send_element(celery_app, scheduler, build, "a") == "sent"
    # The first task is in the queue, named for Flower, with the id recorded
    (message,) = queued_messages(scheduler)
    headers = message["headers"]
    info = scheduler.info(build, "a")
    assert headers["task"] == "remex.stage_to_cas"
    assert headers["id"] == info["task_ids"][0]
    assert "a [build " in headers["argsrepr"]
    assert headers["kwargsrepr"] == "{}"
    # The later stages carry the same reprs, so that no worker makes them
    # (walking the payload) when it publishes the chain's next message.
    _, _, embed = json.loads(base64.b64decode(message["body"]))
    chain = embed["chain"]
    assert [sig["task"] for sig in reversed(chain)] == [
        "remex.upload",
        "remex.execute",
        "remex.fetch_outputs",
        "remex.push_artifact",
    ]
    for sig in chain:
        assert sig["options"]["argsrepr"] == headers["argsrepr"]
        assert sig["options"]["kwargsrepr"] == "{}"
    assert len(info["task_ids"]) == 5 and all(info["task_ids"])
    assert info["attempt"] == 1
    # A waiting element is not sent; a finished one neither
    assert send_element(celery_app, scheduler, build, "b") == "not sent"
    scheduler.finish(build, "a", "built", {})
    assert send_element(celery_app, scheduler, build, "a") == "not sent"
    assert len(queued_messages(scheduler)) == 1


def test_a_build_priority_orders_its_messages_ahead_of_the_stage_priority(
    scheduler: Scheduler, celery_app: Celery
) -> None:
    # Given a priority-9 build whose elements were sent first, then a
    # priority-0 build's, and the default-priority (5) build's
    def build_of(priority: int | None, names: Sequence[str]) -> str:
        specs = [spec(name) for name in names]
        for one in specs:
            if priority is not None:
                one["priority"] = priority
        build, ready = scheduler.create_build(specs, {name: [] for name in names}, [], {})
        for name in ready:
            assert send_element(celery_app, scheduler, build, name) == "sent"
        return build

    build_of(9, ["low1", "low2"])
    build_of(None, ["mid"])
    build_of(0, ["high1", "high2"])
    # kombu keeps them in one list per combined priority
    priorities = {m["properties"]["priority"] for m in queued_messages(scheduler)}
    assert set(priorities) == {message_priority(p, "stage_to_cas") for p in (0, 5, 9)}
    assert message_priority(0, "stage_to_cas") == STAGE_PRIORITY["stage_to_cas"]
    assert message_priority(5, "push_artifact") > message_priority(0, "stage_to_cas")
    assert message_priority(5, "push_artifact") < message_priority(5, "upload")
    # When a consumer takes them as a worker does (kombu's Redis channel)
    taken = []
    with celery_app.connection_for_read() as connection:
        channel = connection.default_channel
        while (message := channel.basic_get(DEFAULT_QUEUE, no_ack=True)) is not None:
            taken.append(message.headers["argsrepr"].split(" ")[0])
    # Then the high build's come first, the low build's last, each in sent order
    assert taken == ["high1", "high2", "mid", "low1", "low2"]


def test_send_element_waits_on_another_build(scheduler: Scheduler, celery_app: Celery) -> None:
    first, _ = create(scheduler, {"lib": []})
    second, _ = create(scheduler, {"lib": []})
    assert send_element(celery_app, scheduler, first, "lib") == "sent"
    assert send_element(celery_app, scheduler, second, "lib") == "waiting"
    assert len(queued_messages(scheduler)) == 1


def test_reconcile_resends_stalled_elements_then_gives_up(
    scheduler: Scheduler, celery_app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an element that runs on a worker that is gone, with a dependent
    build, _ = create(scheduler, {"a": [], "b": ["a"]})
    send_element(celery_app, scheduler, build, "a")
    assert start(scheduler, build, "a", worker="dead/1/x")
    later = time.time() + scheduler.heartbeat_timeout + 1
    monkeypatch.setattr(time, "time", lambda: later)
    # When the reconciler passes, it is sent again (a new attempt) with the reason
    assert reconcile(celery_app, scheduler, lock_seconds=0.001) == 1
    info = scheduler.info(build, "a")
    assert info["attempt"] == 2 and "gone" in info["resent_because"]
    assert len(queued_messages(scheduler)) == 2
    scheduler.redis.delete(RECONCILE_LOCK)
    # When it keeps dying, the element fails after MAX_ATTEMPTS sends, its dependent is skipped
    for _ in range(MAX_ATTEMPTS):
        start(scheduler, build, "a", worker="dead/1/x")
        later += 2 * scheduler.heartbeat_timeout
        reconcile(celery_app, scheduler, lock_seconds=0.001)
        scheduler.redis.delete(RECONCILE_LOCK)
    assert states(scheduler, build) == {"a": "failed", "b": "skipped"}
    assert f"sent {MAX_ATTEMPTS} times" in scheduler.info(build, "a")["error"]
    assert scheduler.status(build).status == "failed"


def test_reconcile_drops_stale_unacknowledged_messages(
    scheduler: Scheduler, celery_app: Celery
) -> None:
    # Given two messages of element a left in kombu's unacked hash by a worker
    # that lost its connection: one of attempt 1, one of the current attempt 2
    build, _ = create(scheduler, {"a": []})
    send_element(celery_app, scheduler, build, "a")
    old = queued_messages(scheduler)[0]
    send_element(celery_app, scheduler, build, "a")
    current = queued_messages(scheduler)[1]
    for tag, message in (("1", old), ("2", current)):
        scheduler.redis.hset("unacked", tag, json.dumps([message, "", DEFAULT_QUEUE]))
        scheduler.redis.zadd("unacked_index", {tag: time.time()})
    found = stage_payload(str(scheduler.redis.hget("unacked", "1")))
    assert found is not None and found[1]["attempt"] == 1
    # When the reconciler passes, the stale one is dropped, the current one kept
    reconcile(celery_app, scheduler, lock_seconds=0.001)
    assert sorted(scheduler.redis.hkeys("unacked")) == ["2"]
    assert scheduler.redis.zrange("unacked_index", 0, -1) == ["2"]
    # And once the element is built, the other one too
    scheduler.finish(build, "a", "built", {})
    scheduler.redis.delete(RECONCILE_LOCK)
    assert drop_stale_unacked(scheduler) == 1
    assert scheduler.redis.hlen("unacked") == 0


def strand(scheduler: Scheduler, build: str, names: Sequence[str]) -> None:
    """Put ready elements back to waiting, their counts left at 0: what a
    finish that failed half-way leaves (Redis keeps a script's writes made
    before an error: its dependents counted down, none made ready)."""
    info_key = scheduler.keys.build(build, "info")
    for name in names:
        info = json.loads(scheduler.redis.hget(info_key, name) or "{}")
        info.pop("ready_at", None)
        scheduler.redis.hset(info_key, name, json.dumps(info))
        scheduler.redis.hset(scheduler.keys.build(build, "state"), name, "waiting")
        scheduler.redis.srem(scheduler.keys.build(build, "live"), name)


def test_reconcile_sends_elements_left_waiting_with_no_dependency_left(
    scheduler: Scheduler, celery_app: Celery
) -> None:
    # Given a diamond whose root was built by a finish that failed half-way:
    # b and c counted down to 0 but still waiting, nothing live
    build, _ = create(scheduler, DIAMOND)
    send(scheduler, build, "a")
    assert sorted(e for _, e in scheduler.finish(build, "a", "built", {})) == ["b", "c"]
    strand(scheduler, build, ["b", "c"])
    assert scheduler.redis.hget(scheduler.keys.build(build, "pending"), "b") == "0"
    # (The watch of the live elements finds nothing to send)
    assert scheduler.stalled(build, time.time() + 3600, queued_task_ids=set) == []
    # When the reconciler passes
    assert reconcile(celery_app, scheduler, lock_seconds=0.001) == 2
    # Then both are sent, and d still waits for them
    assert states(scheduler, build) == {"a": "built", "b": "queued", "c": "queued", "d": "waiting"}
    assert len(queued_messages(scheduler)) == 2
    # And the next pass sends nothing more (they are live now)
    scheduler.redis.delete(RECONCILE_LOCK)
    assert reconcile(celery_app, scheduler, lock_seconds=0.001) == 0
    # And the build goes on to its end
    for element in ("b", "c", "d"):
        if element == "d":
            send(scheduler, build, "d")
        scheduler.finish(build, element, "built", {})
    assert scheduler.status(build).status == "succeeded"


def test_reconcile_sends_elements_whose_count_down_was_lost(
    scheduler: Scheduler, celery_app: Celery
) -> None:
    # Given a diamond whose root was built by a finish that failed before it
    # counted its dependents down: b and c wait with a count of 1, nothing live
    build, _ = create(scheduler, DIAMOND)
    send(scheduler, build, "a")
    scheduler.finish(build, "a", "built", {})
    strand(scheduler, build, ["b", "c"])
    pending = scheduler.keys.build(build, "pending")
    scheduler.redis.hset(pending, mapping={"b": 1, "c": 1})
    # When the reconciler passes
    assert reconcile(celery_app, scheduler, lock_seconds=0.001) == 2
    # Then both are sent (their counts put right), and d still waits for them
    assert states(scheduler, build) == {"a": "built", "b": "queued", "c": "queued", "d": "waiting"}
    assert scheduler.redis.hmget(pending, ["b", "c", "d"]) == ["0", "0", "2"]
    # And the build goes on to its end
    for element in ("b", "c", "d"):
        if element == "d":
            send(scheduler, build, "d")
        scheduler.finish(build, element, "built", {})
    assert scheduler.status(build).status == "succeeded"


def test_elements_left_waiting_behind_a_failure_are_skipped(scheduler: Scheduler) -> None:
    # Given a diamond whose root failed in a finish that broke before it
    # skipped the dependents: a failed, b, c and d still waiting, nothing live
    build, _ = create(scheduler, DIAMOND)
    send(scheduler, build, "a")
    scheduler.redis.hset(scheduler.keys.build(build, "state"), "a", "failed")
    scheduler.redis.hincrby(scheduler.keys.build(build, "counts"), "failed", 1)
    scheduler.redis.sadd(scheduler.keys.build(build, "failed"), "a")
    scheduler.redis.srem(scheduler.keys.build(build, "live"), "a")
    # When the reconciler looks at it
    assert scheduler.wake_stuck(build) == []
    # Then every element behind the failure is skipped, saying why, and the build ends
    status = scheduler.status(build)
    assert {e.element: e.state for e in status.elements} == {
        "a": "failed",
        "b": "skipped",
        "c": "skipped",
        "d": "skipped",
    }
    errors = {e.element: e.info.get("error") for e in status.elements}
    assert errors["b"] == "dependency a failed"
    assert errors["d"] in ("dependency b was skipped", "dependency c was skipped")
    assert status.status == "failed"
    assert build not in scheduler.active_builds()


def test_a_build_with_nothing_left_to_do_but_still_running_is_ended(
    scheduler: Scheduler,
) -> None:
    # Given a build whose last finish failed before it could end the build
    build, _ = create(scheduler, {"a": []})
    send(scheduler, build, "a")
    scheduler.finish(build, "a", "built", {})
    scheduler.redis.hset(scheduler.keys.build(build, "meta"), "status", "running")
    scheduler.redis.sadd(scheduler.keys.active, build)
    # When the reconciler looks at it, it ends it
    assert scheduler.wake_stuck(build) == []
    assert scheduler.status(build).status == "succeeded"
    assert build not in scheduler.active_builds()


def ran(scheduler: Scheduler) -> dict[str, int]:
    """The commands Redis ran since its counts were reset, by name."""
    stats = scheduler.redis.info("commandstats")
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
    calls.pop("config|resetstat", None)
    return calls


def test_the_check_for_stuck_elements_costs_the_same_however_many_finished(
    scheduler: Scheduler,
) -> None:
    # Given a build of 3,000 elements, all but one built, the last one live
    names = [f"e{i:04d}" for i in range(3000)]
    build, _ = create(scheduler, {n: [] for n in names})
    scheduler.record_sends([(build, n, [f"{n}-task"]) for n in names])
    for name in names[:-1]:
        scheduler.finish(build, name, "built", {})
    scheduler.redis.config_resetstat()
    # When the reconciler checks it for stuck elements
    assert scheduler.wake_stuck(build) == []
    # Then it read the live set's size, the counts and the meta: nothing per element
    assert ran(scheduler) == {"scard": 1, "hmget": 2}
    # And a reconciler pass, which reads the live set anyway, checks no more
    # than it did before (only a build with nothing live is checked)
    scheduler.redis.config_resetstat()
    assert scheduler.reconcile_build(build) == ([], [])
    assert "scard" not in ran(scheduler)


def test_only_one_reconciler_passes_at_a_time(scheduler: Scheduler, celery_app: Celery) -> None:
    build, _ = create(scheduler, {"a": []})
    scheduler.redis.hset(f"remex:build:{build}:info", "a", json.dumps({"attempt": 0}))
    # (ready since forever: stalled)
    assert reconcile(celery_app, scheduler, lock_seconds=60) == 1
    assert reconcile(celery_app, scheduler, lock_seconds=60) == 0


def test_a_stage_start_counts_its_delivery_in_the_same_move(scheduler: Scheduler) -> None:
    # Given a queued element
    build, _ = create(scheduler, {"a": []})
    attempt = send(scheduler, build, "a")

    def begin(stage: str, task_id: str, retries: int = 0) -> int:
        return scheduler.begin_stage(
            build, "a", attempt=attempt, stage=stage, host="w1", task_id=task_id, retries=retries
        )

    # When its first stage's message is delivered twice (its worker died)
    # Then the second start says so
    assert begin("stage_to_cas", "t1") == 1
    assert begin("stage_to_cas", "t1") == 2
    # And the next message (the next stage, a retry) counts from one
    assert begin("upload", "t2") == 1
    assert begin("upload", "t2", retries=1) == 1
    assert begin("upload", "t2", retries=1) == 2
    # And no key of its own is left behind
    assert not list(scheduler.redis.scan_iter("remex:delivery:*"))
    # And a stale copy (an earlier stage) counts nothing
    assert begin("stage_to_cas", "t1") == 0
    # And a new attempt starts afresh
    attempt = send(scheduler, build, "a", "t3")
    assert attempt == 2
    assert begin("stage_to_cas", "t1") == 1


def test_wait_can_follow_with_summaries_and_ends_with_the_whole_status(
    scheduler: Scheduler, redis_server: RedisServer
) -> None:
    from pipeline import api

    # Given a running build of three independent elements, finished one by one
    # (after the follower's first look, however slow the machine)
    build, _ = create(scheduler, {"a": [], "b": [], "c": []})
    seen: list[BuildStatus] = []
    looked = threading.Event()

    def on_update(status: BuildStatus) -> None:
        seen.append(status)
        looked.set()

    def finish_all() -> None:
        assert looked.wait(60)
        for element in ("a", "b", "c"):
            time.sleep(0.2)
            scheduler.finish(build, element, "built", {})

    finisher = threading.Thread(target=finish_all)
    finisher.start()
    # When it is followed with summaries
    config = RemexConfig(broker_url=f"redis://{redis_server.address}/{DB}")
    final = api.wait(build, config=config, poll=0.05, on_update=on_update, summaries=True)
    finisher.join()
    # Then each update while it ran was a summary listing only the live elements
    running = [s for s in seen if not s.done]
    assert running and all(s.summary for s in running)
    assert all({e.state for e in s.elements} <= {"ready"} for s in running)
    # And the final status is whole
    assert final.status == "succeeded" and not final.summary
    assert [e.element for e in final.elements] == ["a", "b", "c"]


# --- fewer commands per element (issue 16) -----------------------------------------


def test_a_stage_start_stands_for_a_heartbeat_until_the_stage_beats(
    scheduler: Scheduler,
) -> None:
    # Given an element whose first stage started on a worker (holder recorded)
    build, _ = create(scheduler, {"a": []})
    send(scheduler, build, "a")
    scheduler.worker_alive("w1/1/x", "e1")
    assert scheduler.start_stage(
        build, "a", attempt=1, stage="stage_to_cas", host="w1", worker="w1/1/x", holder="w1/1/x#e1"
    )
    heartbeats = f"remex:build:{build}:heartbeat"
    # Then the start wrote no heartbeat
    assert scheduler.redis.zscore(heartbeats, "a") is None
    # And when the worker's connection epoch changes (its hold is over), the
    # stage that started lately is still not lost: its start is its sign of life
    scheduler.worker_alive("w1/1/x", "e2")
    now = time.time()
    assert scheduler.stalled(build, now) == []
    later = now + scheduler.heartbeat_timeout + 1
    assert [e for e, _ in scheduler.stalled(build, later)] == ["a"]
    # When the stage runs long enough to beat, its heartbeat counts from the beat
    assert scheduler.heartbeat(build, "a")
    assert scheduler.redis.zscore(heartbeats, "a") is not None
    assert scheduler.info(build, "a")["beat"] == 1
    assert scheduler.stalled(build, time.time() + 1) == []
    # And the move that ends it removes the heartbeat
    scheduler.finish(build, "a", "built", {})
    assert scheduler.redis.zscore(heartbeats, "a") is None
    assert "beat" not in scheduler.info(build, "a")
    # And a late beat of the finished element writes nothing
    assert not scheduler.heartbeat(build, "a")
    assert scheduler.redis.zscore(heartbeats, "a") is None


def test_a_live_holder_silent_for_long_is_lost_only_if_its_message_is_in_no_queue(
    scheduler: Scheduler,
) -> None:
    # Given an element whose stage ended long ago on a live worker, which
    # still holds it (its next message waits in that worker's own queue)
    build, _ = create(scheduler, {"a": []})
    send(scheduler, build, "a")
    scheduler.worker_alive("w1/1/x", "e1")
    assert scheduler.start_stage(
        build, "a", attempt=1, stage="upload", host="w1", worker="w1/1/x", holder="w1/1/x#e1"
    )
    much_later = time.time() + (LOST_AFTER_HEARTBEATS + 2) * scheduler.heartbeat_timeout
    # Then while its message waits in a queue a live worker consumes, it is not lost
    assert scheduler.stalled(build, much_later, queued_task_ids=lambda: {"a-task"}) == []
    # But with its message in no queue, it is
    [(element, reason)] = scheduler.stalled(build, much_later, queued_task_ids=set)
    assert element == "a" and "no heartbeat" in reason


def test_a_send_claims_and_queues_or_waits_in_one_move(scheduler: Scheduler) -> None:
    # Given two builds of the same element (the same artifact)
    first, _ = create(scheduler, {"lib": []})
    second, _ = create(scheduler, {"lib": []})

    def record(build: str, task_id: str) -> tuple[int, str]:
        [recorded] = scheduler.record_sends([(build, "lib", [task_id])])
        return recorded.attempt, recorded.owner

    # When the first sends it, it claims the artifact and is queued
    assert record(first, "t1") == (1, "")
    assert scheduler.state(first, "lib") == "queued"
    assert scheduler.info(first, "lib")["task_ids"][0] == "t1"
    # And the second waits on the first
    assert record(second, "t2") == (0, f"{first}\tlib")
    assert scheduler.state(second, "lib") == "queued"
    assert scheduler.info(second, "lib")["waiting_on"] == f"{first}\tlib"
    # And sending the first again is a new attempt of the same claim
    assert record(first, "t3") == (2, "")
    # And once it is built (with its artifact index entry), both builds are
    scheduler.finish(first, "lib", "built", {}, index_entry="k1 p/lib")
    assert scheduler.state(second, "lib") == "built"
    assert record(first, "t4") == (0, "")
    # And the index has the entry, expiring once the builds ended
    assert scheduler.redis.zscore("remex:artifacts:bykey", "k1 p/lib") == 0
    assert scheduler.redis.ttl("remex:artifacts:bytime") > 0


def test_a_reconciler_pass_reads_each_holders_liveness_once(scheduler: Scheduler) -> None:
    # Given 30 elements taken by one worker that is gone and 30 by a live one
    names = [f"e{i:02d}" for i in range(60)]
    build, _ = create(scheduler, {n: [] for n in names})
    scheduler.worker_alive("live/1/x", "e1")
    for i, name in enumerate(names):
        send(scheduler, build, name)
        holder = "dead/1/x#e1" if i < 30 else "live/1/x#e1"
        assert scheduler.take(build, name, attempt=1, stage="stage_to_cas", holder=holder)
    scheduler.redis.config_resetstat()
    # When a pass looks for lost elements
    stalled = dict(scheduler.stalled(build))
    # Then the dead worker's 30 are found, and each holder's key was read once
    assert sorted(stalled) == names[:30]
    gets = scheduler.redis.info("commandstats").get("cmdstat_get", {}).get("calls", 0)
    assert gets == 2


def test_ready_elements_being_sent_are_not_taken_for_lost(scheduler: Scheduler) -> None:
    # Given a wide layer of 60 elements ready for longer than the grace
    build, _ = create(scheduler, {f"e{i:02d}": [] for i in range(60)})
    later = time.time() + READY_GRACE + 1
    # While a sender says it is sending them, none is stalled
    scheduler.sending(build)
    assert scheduler.stalled(build, later) == []
    # When it stops saying so (it died: the mark expires), all of them are
    scheduler.redis.delete(scheduler.keys.build(build, "sending"))
    assert len(scheduler.stalled(build, later)) == 60


def test_a_reconciler_pass_holds_its_lock_to_its_end_then_for_the_interval(
    scheduler: Scheduler,
) -> None:
    app = Celery("t", broker="memory://")
    seen: list[int] = []
    original = scheduler.reconcile_build

    def slow_pass(*args: Any, **kwargs: Any) -> tuple[list[tuple[str, str]], list[str]]:
        # During the pass, another worker's pass is refused
        seen.append(reconcile(app, scheduler, lock_seconds=0.2))
        return original(*args, **kwargs)

    create(scheduler, {"a": []})
    scheduler.reconcile_build = slow_pass  # type: ignore[method-assign]
    reconcile(app, scheduler, lock_seconds=0.2)
    assert seen == [0]
    # After the pass, the lock lasts the interval, not the pass's bound
    ttl = scheduler.redis.pttl(scheduler.keys.reconciler)
    assert 0 < ttl <= 200
