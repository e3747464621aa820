"""Stage starts recorded in batches (tasks.runtime.StartBatch and
Scheduler.record_starts), their events as one stream entry, and the
reconciler's second look before it re-sends an element whose message is in
no queue; against a real Redis, no workers (issue 16)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest

from pipeline.scheduler import LOST_AFTER_HEARTBEATS, Scheduler, StageStart
from pipeline.servers import RedisServer
from tasks.runtime import StartBatch
from tests.integration.test_scheduler import create, scheduler_on, send

DB = 8
HOLDER = "w1/1/x#e1"


@pytest.fixture
def scheduler(redis_server: RedisServer) -> Iterator[Scheduler]:
    yield from scheduler_on(redis_server, DB)


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
    assert scheduler.record_starts([start(build, "none", "upload")]).stale == [(build, "none")]
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


# --- sends recorded in the finish's move, and many at a time ----------------------------------


def test_a_finish_sends_the_dependents_it_makes_ready_in_the_same_move(
    scheduler: Scheduler,
) -> None:
    # Given a diamond whose root was sent
    build, _ = create(scheduler, {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]})
    send(scheduler, build, "a")
    before_finish = scheduler.read_events(build)[-1].id
    # When the root is built, with its dependents sent in the same move
    finished = scheduler.finish_element(build, "a", "built", {"timings": {}}, send=True)
    # Then b and c are queued (not ready), each with a first attempt and
    # five task ids derived from it, and returned with their specs to publish
    assert finished.ready == []
    sent = {r.element: r for r in finished.sent}
    assert sorted(sent) == ["b", "c"]
    for element, recorded in sent.items():
        assert (recorded.attempt, recorded.owner) == (1, "")
        assert recorded.spec is not None and recorded.spec["element"] == element
        assert len(recorded.task_ids) == 5 and len(set(recorded.task_ids)) == 5
        assert all(len(t) == 36 and t.count("-") == 4 for t in recorded.task_ids)
        info = scheduler.info(build, element)
        assert scheduler.state(build, element) == "queued"
        assert info["task_ids"] == recorded.task_ids and info["queued_at"] > 0
    # And the finish and the sends are one stream entry, in that order
    events = scheduler.read_events(build, before_finish)
    assert [(e.kind, e.data["element"]) for e in events] == [
        ("built", "a"),
        ("queued", "b"),
        ("queued", "c"),
    ]
    assert len({e.id for e in events}) == 1
    # And the ids differ from one build or attempt to the next
    finished_again = scheduler.finish_element(build, "a", "built", {}, send=True)
    assert finished_again.sent == []
    # And sending b again (the reconciler) is a second attempt, with the ids given
    [again] = scheduler.record_sends([(build, "b", ["t1", "t2", "t3", "t4", "t5"])])
    assert (again.attempt, again.task_ids) == (2, ["t1", "t2", "t3", "t4", "t5"])
    assert not set(again.task_ids) & set(sent["b"].task_ids)


def test_many_sends_are_one_script_with_one_read_and_write_per_build(
    scheduler: Scheduler,
) -> None:
    # Given a wide build of 20 ready elements, and one element waiting
    deps: dict[str, list[str]] = {f"e{i:02}": [] for i in range(20)}
    deps["top"] = list(deps)
    build, ready = create(scheduler, deps)
    assert len(ready) == 20
    items = [(build, e, [f"{e}-{i}" for i in range(5)]) for e in [*ready, "top"]]
    scheduler.record_sends(items[:1])  # (the script loaded)
    # When they are all sent at once
    before = calls(scheduler)
    recorded = scheduler.record_sends(items[1:])
    commands = ran(before, calls(scheduler))
    # Then the ready ones are queued, the waiting one is not sent
    assert [r.attempt for r in recorded] == [1] * 19 + [0]
    assert scheduler.state(build, "top") == "waiting"
    # In one script: one claim each, one read and one write per build
    assert commands.pop("set") == 19
    # (and one of the states of those with no trace of a send: is top live?)
    assert commands == {"evalsha": 1, "hmget": 3, "hset": 2, "xadd": 1}


def test_a_stages_notes_go_with_the_batch_and_name_the_operation_once(
    scheduler: Scheduler,
) -> None:
    # Given an element whose execute stage started and named its operation
    build, _ = create(scheduler, {"a": []})
    send(scheduler, build, "a")
    batch = StartBatch(scheduler, interval=3600.0)
    assert batch.begin(start(build, "a", "execute"))
    batch.note(build, "a", attempt=1, stage="execute", changes={"operation": "op-1"})
    before = scheduler.read_events(build)[-1].id
    batch.flush()
    # Then the info names it, and one event says so
    assert scheduler.info(build, "a")["operation"] == "op-1"
    kinds = [(e.kind, e.data.get("operation")) for e in scheduler.read_events(build, before)]
    assert kinds == [("stage", None), ("operation", "op-1")]
    # And a later note alone (the operation still runs) is recorded too
    batch.note(build, "a", attempt=1, stage="execute", changes={"remote_stage": "EXECUTING"})
    assert batch.flush() == 1
    assert scheduler.info(build, "a")["remote_stage"] == "EXECUTING"
    # And a note not flushed yet goes with the finish
    batch.note(build, "a", attempt=1, stage="execute", changes={"operation": "op-2"})
    assert batch.forget(build, "a") == {"operation": "op-2"}


def test_an_operation_named_after_its_element_was_cancelled_is_cancelled_by_the_flush(
    scheduler: Scheduler,
) -> None:
    # Given two elements whose execute stages started in this process: one
    # named its operation in a flush before the build was cancelled, the
    # other names it only after (the canceller could not see that one)
    build, _ = create(scheduler, {"a": [], "b": []})
    send(scheduler, build, "a")
    send(scheduler, build, "b")
    cancelled: list[str] = []
    batch = StartBatch(scheduler, interval=3600.0, cancel_operation=cancelled.append)
    assert batch.begin(start(build, "a", "execute"))
    assert batch.begin(start(build, "b", "execute"))
    batch.note(build, "a", attempt=1, stage="execute", changes={"operation": "op-a"})
    batch.flush()
    stopped, _ = scheduler.cancel(build)
    assert sorted(info.get("operation") or "-" for info in stopped) == ["-", "op-a"]
    batch.note(build, "b", attempt=1, stage="execute", changes={"operation": "op-b"})
    # When the batch flushes
    batch.flush()
    # Then it cancels the operation nobody else knew of, and only that one
    assert batch.join_cancels(5.0)
    assert cancelled == ["op-b"]
    assert scheduler.state(build, "b") == "cancelled"
    assert "operation" not in scheduler.info(build, "b")
    # And an operation of an element that finished (not cancelled) is left alone
    build2, _ = create(scheduler, {"c": []})
    send(scheduler, build2, "c")
    assert batch.begin(start(build2, "c", "execute"))
    batch.flush()
    scheduler.finish(build2, "c", "built", {})
    batch.note(build2, "c", attempt=1, stage="execute", changes={"operation": "op-c"})
    batch.flush()
    assert batch.join_cancels(5.0)
    assert cancelled == ["op-b"]


def test_a_slow_cancel_does_not_hold_up_the_flush(scheduler: Scheduler) -> None:
    # Given an element cancelled before its operation's name was flushed,
    # and a server whose CancelOperation hangs (its client retrying)
    build, _ = create(scheduler, {"a": []})
    send(scheduler, build, "a")
    release = threading.Event()
    cancelled: list[str] = []

    def slow_cancel(name: str) -> None:
        release.wait(30)
        cancelled.append(name)

    batch = StartBatch(scheduler, interval=3600.0, cancel_operation=slow_cancel)
    assert batch.begin(start(build, "a", "execute"))
    batch.flush()
    scheduler.cancel(build)
    batch.note(build, "a", attempt=1, stage="execute", changes={"operation": "op-a"})
    # When the batch flushes, it returns without waiting for the cancel
    began = time.monotonic()
    batch.flush()
    assert time.monotonic() - began < 5
    assert cancelled == []
    assert not batch.join_cancels(0.1)
    # And the cancel still goes out once the server answers
    release.set()
    assert batch.join_cancels(5.0)
    assert cancelled == ["op-a"]


def test_a_build_of_an_older_remex_keeps_its_dependents_apart_and_still_finishes(
    scheduler: Scheduler,
) -> None:
    # Given a build whose dependents are in B:dependents, not in the infos
    build, _ = create(scheduler, {"a": [], "b": ["a"], "c": ["b"]})
    key = f"remex:build:{build}"
    for element in ("a", "b", "c"):
        info = json.loads(scheduler.redis.hget(f"{key}:info", element) or "{}")
        deps = info.pop("dependents")
        scheduler.redis.hset(f"{key}:info", element, json.dumps(info))
        scheduler.redis.hset(f"{key}:dependents", element, json.dumps(deps))
    # Then finishing a makes b ready, and a failure of b skips c
    send(scheduler, build, "a")
    assert scheduler.finish(build, "a", "built", {}) == [(build, "b")]
    send(scheduler, build, "b")
    scheduler.finish(build, "b", "failed", {"error": "boom"})
    assert scheduler.state(build, "c") == "skipped"
    assert scheduler.status(build).status == "failed"
    # (And the dependents kept in an info are never shown.)
    assert "dependents" not in scheduler.info(build, "a")


def test_a_finish_that_sends_in_two_builds_builds_a_shared_dependent_once(
    scheduler: Scheduler,
) -> None:
    # Given two builds of lib -> app, the second's lib waiting on the first's
    first, _ = create(scheduler, {"lib": [], "app": ["lib"]})
    second, _ = create(scheduler, {"lib": [], "app": ["lib"]})
    send(scheduler, first, "lib")
    assert send(scheduler, second, "lib") == 0
    # When the first's lib is built, sending both builds' app in one move
    finished = scheduler.finish_element(first, "lib", "built", {}, send=True)
    # Then one app is sent and the other waits on it
    by_build = {r.build: r for r in finished.sent}
    assert sorted(by_build) == sorted([first, second])
    builders = [r for r in finished.sent if r.attempt]
    [waiter] = [r for r in finished.sent if r.owner]
    assert len(builders) == 1 and waiter.owner == f"{builders[0].build}\tapp"
    assert scheduler.info(waiter.build, "app")["waiting_on"] == waiter.owner


def test_a_finish_whose_dependent_was_cancelled_still_ends_the_build(
    scheduler: Scheduler,
) -> None:
    # Given a build with on-error quit: a fails while b1 runs, so b2 (after b1) is cancelled
    specs_deps = {"a": [], "b1": [], "b2": ["b1"]}
    build, _ = create(scheduler, specs_deps)
    scheduler.redis.hset(f"remex:build:{build}:meta", "on_error", json.dumps("quit"))
    send(scheduler, build, "a")
    send(scheduler, build, "b1")
    assert scheduler.start_stage(build, "b1", attempt=1, stage="upload", host="w1")
    scheduler.finish_element(build, "a", "failed", {"error": "boom"}, send=True)
    assert scheduler.state(build, "b2") == "cancelled"
    # When b1 finishes (it was running), sending nothing
    finished = scheduler.finish_element(build, "b1", "built", {}, send=True)
    assert [r.attempt for r in finished.sent] == [0]
    # Then the build ends
    assert scheduler.status(build).status == "failed"


def test_an_operation_not_recorded_before_the_finish_is_an_event_of_the_finish(
    scheduler: Scheduler,
) -> None:
    # Given an element whose whole chain ran within one flush: its execute
    # named an operation, and nothing was recorded yet
    build, _ = create(scheduler, {"a": []})
    send(scheduler, build, "a")
    batch = StartBatch(scheduler, interval=3600.0)
    assert batch.begin(start(build, "a", "execute"))
    batch.note(build, "a", attempt=1, stage="execute", changes={"operation": "op-9"})
    before = scheduler.read_events(build)[-1].id
    # When it finishes, with what the batch held
    scheduler.finish(build, "a", "built", batch.forget(build, "a"))
    # Then the operation is an event, before the element's built
    kinds = [(e.kind, e.data.get("operation")) for e in scheduler.read_events(build, before)]
    assert kinds[:2] == [("operation", "op-9"), ("built", "op-9")]
    assert scheduler.info(build, "a")["operation"] == "op-9"


def test_a_finish_counts_down_many_dependents_in_one_read_and_one_write(
    scheduler: Scheduler,
) -> None:
    # Given a root with 1,500 dependents (more than one chunk), one of which
    # also waits on a second root
    names = [f"d{i:04d}" for i in range(1500)]
    graph: dict[str, list[str]] = {"r": [], "s": [], **{n: ["r"] for n in names}}
    graph["d0000"] = ["r", "s"]
    build, _ = create(scheduler, graph)
    send(scheduler, build, "r")
    before = calls(scheduler)
    # When the root is built
    finished = scheduler.finish_element(build, "r", "built", {}, send=True)
    # Then every dependent with nothing else to wait for is sent in the move
    # (the first 200) or made ready for the caller to send, the other waits
    sent = [r.element for r in finished.sent]
    assert len(sent) == 200 and all(r.attempt == 1 for r in finished.sent)
    assert sorted(sent + [e for _, e in finished.ready]) == names[1:]
    assert all(scheduler.state(build, e) == "ready" for _, e in finished.ready)
    assert scheduler.state(build, "d0000") == "waiting"
    # And the counts were read and written a chunk of 1,000 at a time, not
    # one HINCRBY per dependent
    commands = ran(before, calls(scheduler))
    assert commands.get("hincrby", 0) <= 1  # (the finished states' count)
    pending = f"remex:build:{build}:pending"
    assert scheduler.redis.hget(pending, "d0000") == "1"
    assert scheduler.redis.hget(pending, "d1499") == "0"
    # And a dependent with one dependency left is counted down by itself
    finished = scheduler.finish_element(build, "s", "built", {}, send=True)
    assert [r.element for r in finished.sent] == ["d0000"]


def test_a_finish_that_makes_a_wide_layer_ready_sends_part_and_leaves_the_rest_ready(
    scheduler: Scheduler,
) -> None:
    # Given a root with 5,000 dependents (their writes in one command would
    # pass the scripts' limit on one command's arguments)
    names = [f"d{i:04d}" for i in range(5000)]
    build, _ = create(scheduler, {"r": [], **{n: ["r"] for n in names}})
    send(scheduler, build, "r")
    # When the root is built, sending what it makes ready in the same move
    before = calls(scheduler)
    finished = scheduler.finish_element(build, "r", "built", {}, send=True)
    commands = ran(before, calls(scheduler))
    # Then the move went through: some sent, the others ready, none left waiting
    assert len(finished.sent) == 200
    assert len(finished.ready) == 4800
    states = scheduler.redis.hgetall(f"remex:build:{build}:state")
    assert sorted(states.values()) == sorted(["built"] + ["queued"] * 200 + ["ready"] * 4800)
    # And all 5,000 are live (what the reconciler and status read)
    assert scheduler.redis.scard(f"remex:build:{build}:live") == 5000
    # And the 4,800 made ready cost a few commands per thousand (a read of
    # their infos, a write of infos, states and the live set), not four
    # each; the 200 sent one claim each
    assert commands.pop("set") == 200
    assert sum(commands.values()) < 60, commands
    # And the caller sends them in one call, however long the list (each
    # script's commands take a bounded number of arguments)
    recorded = scheduler.record_sends([(b, e, []) for b, e in finished.ready], chunk=5000)
    assert all(r.attempt == 1 for r in recorded) and len(recorded) == 4800
    assert scheduler.redis.hvals(f"remex:build:{build}:state").count("queued") == 5000


def test_a_finish_without_sends_makes_a_wide_layer_ready_in_chunks(scheduler: Scheduler) -> None:
    # Given a root with 10,000 dependents (a fetch node's finish sends none)
    names = [f"d{i:05d}" for i in range(10_000)]
    build, _ = create(scheduler, {"r": [], **{n: ["r"] for n in names}})
    send(scheduler, build, "r")
    # When the root is built
    before = calls(scheduler)
    ready = scheduler.finish(build, "r", "built", {})
    commands = ran(before, calls(scheduler))
    # Then every dependent is ready and live, in a few commands per thousand
    assert sorted(e for _, e in ready) == names
    assert scheduler.redis.scard(f"remex:build:{build}:live") == 10_000
    assert scheduler.info(build, "d09999")["ready_at"] > 0
    assert sum(commands.values()) < 80, commands
