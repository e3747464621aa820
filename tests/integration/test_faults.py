"""No element is lost, and a Redis restart is a pause: faults between a send
and the start of a stage, with real ``remex worker`` processes.

A stack of the module's own with Redis on AOF in its folder (so a restarted
redis-server has its queues and the builds' state back), two workers whose
heartbeat timeout is 5 s and whose reconciler runs every second: the bound
within which a lost element is sent again is 5 + 1 s here (35 s by default).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.broker import (
    DEFAULT_QUEUE,
    UNACKED,
    make_celery,
    queue_lists,
    queued_task_ids,
    send_element,
    stage_payload,
)
from pipeline.config import RemexConfig
from pipeline.scheduler import Scheduler
from pipeline.servers import RemexStack, RemexWorker
from pipeline.testing.dag import DagProject
from tests.integration.test_pipeline import (
    assert_all_built,
    assert_artifacts,
    executing,
    finish,
    start_build,
    wait_for,
)

# The stack's bound for sending a lost element again: heartbeat timeout +
# reconcile interval (see pipeline/servers/stack.py), plus a margin for a
# loaded 2-core machine.
BOUND = 5.0 + 1.0
MARGIN = 6.0


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemexStack]:
    """redis-server with AOF, an execution and an artifact casd, workers w1 and w2."""
    with RemexStack(
        tmp_path_factory.mktemp("fault-stack"), workers=2, persistent_redis=True
    ) as stack:
        yield stack


def pushes(stack: RemexStack, build_id: str) -> dict[str, int]:
    """How often each element's push_artifact succeeded, from the workers' logs."""
    counts: dict[str, int] = {}
    pattern = re.compile(r"remex\.push_artifact\[[^\]]+\] succeeded.*'element': '([^']+)'")
    logs = {w.log_path: w.log_path.read_text(errors="replace") for w in stack.workers}
    for text in logs.values():  # (a replaced worker may reuse a name and its log)
        for line in text.splitlines():
            match = pattern.search(line)
            if match and build_id in line:
                counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


def signal_worker(worker: RemexWorker, signum: int) -> None:
    assert worker.pid is not None
    os.kill(worker.pid, signum)


def replace_worker(stack: RemexStack, worker: RemexWorker) -> None:
    """Drop a killed worker and start a fresh one (the module's later tests get two)."""
    stack.workers.remove(worker)
    names = {w.worker_name for w in stack.workers}
    stack.add_worker(next(f"w{i}" for i in range(3, 100) if f"w{i}" not in names))


# --- a worker dies holding a message it had not started ----------------------------------


def test_a_message_held_by_a_worker_killed_before_starting_it_is_sent_again(
    fault_stack: RemexStack, project_factory: Callable[..., DagProject], tmp_path: Path
) -> None:
    # Given a build submitted while both workers are stopped (SIGSTOP)
    project = project_factory(n=4, shape="wide", sleep=1)
    holder, other = fault_stack.workers[:2]
    for worker in (holder, other):
        signal_worker(worker, signal.SIGSTOP)
    time.sleep(1.5)  # (their pending BRPOPs time out: nobody waits on the queue)
    try:
        process, build_id = start_build(fault_stack, project)
        scheduler = fault_stack.scheduler()
        (first,) = wait_for(
            "the first element sent",
            lambda: [e.element for e in scheduler.status(build_id).elements if e.state == "queued"],
        )
        # (its message is in the queue; taken out, so that the next send is
        # the only message)
        wait_for("its message published", lambda: queued_task_ids(scheduler), timeout=20)
        for name in queue_lists(DEFAULT_QUEUE):
            scheduler.redis.delete(name)
        # When one worker takes the element's next send and stops before
        # reading it (its BRPOP was pending: Redis handed it the message, which
        # now sits unread in its socket, in no queue and not in ``unacked``)
        signal_worker(holder, signal.SIGCONT)
        time.sleep(0.3)
        signal_worker(holder, signal.SIGSTOP)
        app = make_celery(RemexConfig(broker_url=fault_stack.redis.url))
        assert send_element(app, scheduler, build_id, first) == "sent"
        app.close()
        wait_for("the message taken", lambda: not queued_task_ids(scheduler), timeout=5)
        # And that worker is SIGKILLed, and the other goes on (SIGCONT)
        holder.kill()
        killed_at = time.monotonic()
        signal_worker(other, signal.SIGCONT)

        # Then the element is sent again within the bound
        def resent() -> bool:
            return int(scheduler.info(build_id, first).get("attempt", 0)) >= 3

        wait_for("the lost element sent again", resent, timeout=BOUND + MARGIN + 10)
        resend_seconds = time.monotonic() - killed_at
        # And the build completes, every artifact right
        code, output = finish(process, fault_stack)
        done_seconds = time.monotonic() - killed_at
    finally:
        for worker in (holder, other):
            if worker.running:
                signal_worker(worker, signal.SIGCONT)
    replace_worker(fault_stack, holder)
    assert code == 0, json.dumps(output, indent=1)[-4000:] + fault_stack.logs()
    assert_all_built(output, project)
    reason = {e["element"]: e for e in output["elements"]}[first].get("resent_because", "")
    assert "in no queue" in reason, reason
    # And the counts the scheduler kept through the re-sends match the states
    assert scheduler.verify_counts(build_id) == []
    assert resend_seconds <= BOUND + MARGIN, resend_seconds
    print(
        f"lost {first}: sent again {resend_seconds:.1f} s after the kill, "
        f"build done {done_seconds:.1f} s after it"
    )
    assert_artifacts(fault_stack, project, tmp_path / "checkout")


# --- Redis is SIGKILLed mid-build and started again -------------------------------------------


class StallWatch:
    """Follows a build's elements; the longest an active element went without
    any change (state, stage, attempt, holder), counted from ``since``."""

    def __init__(self, scheduler: Scheduler, build_id: str) -> None:
        self.scheduler = scheduler
        self.build_id = build_id
        self.last: dict[str, tuple[Any, ...]] = {}
        self.changed: dict[str, float] = {}
        self.max_stall = 0.0
        self.worst = ""

    def poll(self, since: float) -> bool:
        """One look; True when the build is done."""
        status = self.scheduler.status(self.build_id)
        now = time.monotonic()
        for e in status.elements:
            key = (e.state, e.info.get("stage"), e.info.get("attempt"), e.info.get("holder"))
            if self.last.get(e.element) != key:
                self.last[e.element] = key
                self.changed[e.element] = now
            elif e.state in ("waiting",):
                self.changed[e.element] = now  # waiting on dependencies is not a stall
            elif e.state in ("ready", "queued", "running"):
                stall = now - max(self.changed[e.element], since)
                if stall > self.max_stall:
                    self.max_stall, self.worst = stall, f"{e.element} {key}"
        return status.done


def test_a_redis_restart_mid_build_is_a_pause(
    fault_stack: RemexStack, project_factory: Callable[..., DagProject], tmp_path: Path
) -> None:
    # Given a build of 2 s actions running on both workers
    project = project_factory(n=8, shape="dag", layers=2, sleep=2)
    process, build_id = start_build(fault_stack, project)
    scheduler = fault_stack.scheduler()
    wait_for("elements executing", lambda: len(executing(scheduler.status(build_id))) >= 2)
    # When redis-server is SIGKILLed, and started again on its port and AOF 3 s later,
    # with `remex status` run while it is down
    fault_stack.redis.kill()
    status_cli = fault_stack.cli_popen("status", build_id, "--json")
    time.sleep(3)
    fault_stack.redis.start()
    back = time.monotonic()
    # Then the build goes on: no element stalls longer than the bound after
    # Redis is back (plus a 2 s action, plus the workers' reconnect backoff)
    watch = StallWatch(scheduler, build_id)
    deadline = back + 120
    while not watch.poll(back) and time.monotonic() < deadline:
        time.sleep(0.25)
    done_seconds = time.monotonic() - back
    stdout, build_err = process.communicate(timeout=60)
    code, output = process.returncode, json.loads(stdout)
    assert code == 0, json.dumps(output, indent=1)[-4000:] + fault_stack.logs()
    assert_all_built(output, project)
    print(
        f"build done {done_seconds:.1f} s after Redis was back; "
        f"max stall {watch.max_stall:.1f} s ({watch.worst})"
    )
    assert watch.max_stall <= BOUND + 2 + MARGIN + 6, watch.worst

    # And the messages the lost connections left in kombu's ``unacked`` are
    # dropped by the reconciler (not handed out again 6 h later)
    def left_unacked() -> list[str]:
        entries = scheduler.redis.hvals(UNACKED)
        found = [stage_payload(raw) for raw in entries]
        return [p["element"] for f in found if f for p in [f[1]] if p["build"] == build_id]

    wait_for("stale unacknowledged messages dropped", lambda: not left_unacked(), timeout=10)
    # And nothing ran twice: each element's artifact was pushed once
    counts = pushes(fault_stack, build_id)
    built = [e["element"] for e in output["elements"] if e["state"] == "built"]
    assert counts == dict.fromkeys(built, 1), counts
    # And `remex status` (while down) and `remex build` printed no traceback
    status_out, status_err = status_cli.communicate(timeout=60)
    assert status_cli.returncode == 0, status_err
    assert json.loads(status_out)["build"] == build_id
    for stderr in (status_err, build_err):
        assert "Traceback" not in stderr, stderr
    assert_artifacts(fault_stack, project, tmp_path / "checkout")


# --- a stale copy of a message ---------------------------------------------------------------


def test_a_stale_copy_of_a_message_is_ignored(
    fault_stack: RemexStack, project_factory: Callable[..., DagProject]
) -> None:
    # Given a build submitted while the workers are stopped, its first
    # elements sent again (attempt 2) before any worker ran attempt 1
    project = project_factory(n=2, shape="wide", sleep=0)
    workers = list(fault_stack.workers)
    for worker in workers:
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGSTOP)
    try:
        process, build_id = start_build(fault_stack, project)
        scheduler = fault_stack.scheduler()
        queued = wait_for(
            "elements sent",
            lambda: [e for e in scheduler.status(build_id).elements if e.state == "queued"],
        )
        app = make_celery(RemexConfig(broker_url=fault_stack.redis.url))
        stale_ids = {e.element: set(e.info["task_ids"]) for e in queued}
        for e in queued:
            assert send_element(app, scheduler, build_id, e.element) == "sent"
        app.close()
    finally:
        # When the workers go on, with both copies of each message to take
        for worker in workers:
            assert worker.pid is not None
            os.kill(worker.pid, signal.SIGCONT)
    # Then the build completes, each of those elements built by attempt 2 only
    code, output = finish(process, fault_stack)
    assert code == 0, json.dumps(output, indent=1)[-4000:] + fault_stack.logs()
    infos = {e["element"]: e for e in output["elements"]}
    for element in stale_ids:
        assert infos[element]["attempt"] == 2, infos[element]
    counts = pushes(fault_stack, build_id)
    assert all(counts.get(e) == 1 for e in stale_ids), counts
    # And the stale copies were ignored, acknowledged and dropped: not left in unacked
    logs = "".join(w.log_path.read_text(errors="replace") for w in workers)
    assert "is stale; ignored" in logs
    time.sleep(1)
    left = {
        json.loads(raw)[0]["headers"]["id"]
        for raw in scheduler.redis.hvals("unacked")  # kombu's: [message, exchange, key]
    }
    assert not left & set().union(*stale_ids.values())
