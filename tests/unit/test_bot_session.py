"""The bot's lease bookkeeping, against an in-process fake Bots server.

The fake follows BuildGrid 0.4.4 where it matters: every answer lists the
leases the server wants the bot to hold (a lease it cancelled is simply
missing), a change bumps the session ``version``, and a call with nothing
to change is held as a long poll. The work function is fake too: no
processes, so these tests are about the protocol alone.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2

from bot.errors import LeaseCancelled
from bot.lease import LeaseReport, status
from bot.session import Bot
from pipeline.reapi.bots import BotsClient
from pipeline.reapi.channel import Endpoint
from pipeline.reapi.remote import Remote
from protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from protos.google.devtools.remoteworkers.v1test2 import bots_pb2
from protos.google.devtools.remoteworkers.v1test2 import bots_pb2_grpc as bots_grpc


class FakeBots(bots_grpc.BotsServicer):  # type: ignore[misc]
    """A scripted Bots server for one bot."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.queue: list[str] = []
        self.held: dict[str, any_pb2.Any] = {}  # lease id -> payload, as assigned
        self.reports: dict[str, bots_pb2.Lease] = {}
        self.requests: list[bots_pb2.BotSession] = []
        self.creates: list[bots_pb2.BotSession] = []
        self.version = 0
        self.capacity = 1
        self.name = ""
        self.forget_next_update = False
        self.long_poll_cap = 1.0  # seconds an idle call is held at most

    # --- for tests --------------------------------------------------------

    def add_job(self, tag: str = "") -> str:
        """Queue a job; its payload is an Action whose salt carries ``tag``."""
        lease_id = f"job-{tag or uuid.uuid4().hex[:8]}"
        with self.cond:
            self.queue.append(lease_id)
            self.cond.notify_all()
        return lease_id

    def cancel(self, lease_id: str) -> None:
        with self.cond:
            self.held.pop(lease_id, None)
            self.version += 1
            self.cond.notify_all()

    def statuses(self) -> list[int]:
        with self.cond:
            return [r.status for r in self.requests]

    # --- the service ------------------------------------------------------

    def CreateBotSession(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self.cond:
            self.creates.append(request.bot_session)
            self.capacity = next(
                (int(c.value) for c in request.bot_session.worker.configs if c.key == "capacity"),
                1,
            )
            # A new session replaces the old one: its leases are requeued.
            self.queue[:0] = list(self.held)
            self.held.clear()
            self.name = f"{request.parent}/{uuid.uuid4()}"
            self.version = 0
            return self._answer(request.bot_session)

    def UpdateBotSession(self, request: Any, context: grpc.ServicerContext) -> Any:
        session = request.bot_session
        with self.cond:
            self.requests.append(session)
            if self.forget_next_update or session.name != self.name:
                self.forget_next_update = False
                self.queue[:0] = list(self.held)
                self.held.clear()
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Bot does not exist")
            for lease in session.leases:
                if lease.state == bots_pb2.COMPLETED and lease.id in self.held:
                    self.reports[lease.id] = lease
                    del self.held[lease.id]
                    self.version += 1
            self._assign(session.status)
            seen = self.version
            if session.status == bots_pb2.OK and len(self.held) < self.capacity:
                deadline = time.monotonic() + min(
                    self.long_poll_cap, (context.time_remaining() or 1) * 0.8
                )

                def news() -> bool:
                    return self.version != seen or bool(self.queue)

                while not news() and context.is_active():
                    self.cond.wait(max(0.0, min(0.05, deadline - time.monotonic())))
                    if time.monotonic() >= deadline:
                        break
                self._assign(session.status)
            return self._answer(session)

    def _assign(self, bot_status: int) -> None:
        while bot_status == bots_pb2.OK and self.queue and len(self.held) < self.capacity:
            lease_id = self.queue.pop(0)
            payload = any_pb2.Any()
            payload.Pack(re_pb2.Action(salt=lease_id.encode()))
            self.held[lease_id] = payload
            self.version += 1

    def _answer(self, session: Any) -> bots_pb2.BotSession:
        answer = bots_pb2.BotSession(
            name=self.name, bot_id=session.bot_id, status=session.status, version=str(self.version)
        )
        for lease_id, payload in self.held.items():
            answer.leases.add(id=lease_id, state=bots_pb2.ACTIVE, payload=payload)
        answer.expire_time.FromSeconds(int(time.time()) + 3)
        return answer


class FakeWork:
    """The lease work: each lease blocks until the test releases it (or it is cancelled)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.release: dict[str, threading.Event] = {}
        self.cancel_events: dict[str, list[threading.Event]] = {}  # one per run
        self.outcomes: dict[str, LeaseReport | Exception] = {}
        self.running: set[str] = set()
        self.max_running = 0

    def __call__(self, payload: any_pb2.Any, cancel: threading.Event) -> LeaseReport:
        action = re_pb2.Action()
        assert payload.Unpack(action)
        lease_id = action.salt.decode()
        with self.lock:
            release = self.release.setdefault(lease_id, threading.Event())
            self.cancel_events.setdefault(lease_id, []).append(cancel)
            self.running.add(lease_id)
            self.max_running = max(self.max_running, len(self.running))
        try:
            while not release.wait(0.01):
                if cancel.is_set():
                    raise LeaseCancelled("cancelled")
            outcome = self.outcomes.get(lease_id)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome or LeaseReport(status(code_pb2.OK), re_pb2.ActionResult(exit_code=0))
        finally:
            with self.lock:
                self.running.discard(lease_id)

    def finish(self, lease_id: str, outcome: LeaseReport | Exception | None = None) -> None:
        with self.lock:
            if outcome is not None:
                self.outcomes[lease_id] = outcome
            self.release.setdefault(lease_id, threading.Event()).set()

    def is_running(self, lease_id: str) -> bool:
        with self.lock:
            return lease_id in self.running


def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


class Harness:
    def __init__(self, fake: FakeBots, bot: Bot, work: FakeWork) -> None:
        self.fake, self.bot, self.work = fake, bot, work
        self.thread = threading.Thread(target=bot.run, daemon=True)

    def start(self) -> Harness:
        self.thread.start()
        eventually(lambda: bool(self.bot.session_name))
        return self

    def join(self, timeout: float = 10.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the bot did not stop"


@pytest.fixture
def server() -> Iterator[tuple[FakeBots, str]]:
    fake = FakeBots()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    bots_grpc.add_BotsServicer_to_server(fake, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield fake, f"grpc://127.0.0.1:{port}"
    grpc_server.stop(grace=None)


@pytest.fixture
def make_bot(server: tuple[FakeBots, str]) -> Iterator[Callable[..., Harness]]:
    fake, url = server
    remotes: list[Remote] = []
    harnesses: list[Harness] = []

    def make(capacity: int = 1, grace: float = 0.0) -> Harness:
        remote = Remote(Endpoint(url))
        remotes.append(remote)
        work = FakeWork()
        bot = Bot(
            BotsClient(remote),
            work,
            bot_id="bot-1",
            properties=[("OSFamily", "linux")],
            capacity=capacity,
            poll_timeout=5.0,
            grace=grace,
        )
        harness = Harness(fake, bot, work)
        harnesses.append(harness)
        return harness

    yield make
    for harness in harnesses:
        harness.bot.stop(grace=0)
        harness.thread.join(10)
    for remote in remotes:
        remote.close()


def test_a_lease_runs_and_its_result_is_reported(make_bot: Callable[..., Harness]) -> None:
    # Given a bot with a session
    h = make_bot().start()
    create = h.fake.creates[0]
    assert create.bot_id == "bot-1" and create.status == bots_pb2.OK
    assert [(p.key, p.value) for p in create.worker.devices[0].properties] == [
        ("OSFamily", "linux")
    ]
    # When the server assigns a job and the run finishes with exit code 3
    lease_id = h.fake.add_job()
    eventually(lambda: h.work.is_running(lease_id))
    result = re_pb2.ActionResult(exit_code=3)
    h.work.finish(lease_id, LeaseReport(status(code_pb2.OK), result))
    # Then the lease is reported COMPLETED with status OK and the ActionResult
    eventually(lambda: lease_id in h.fake.reports)
    report = h.fake.reports[lease_id]
    assert report.state == bots_pb2.COMPLETED and report.status.code == code_pb2.OK
    got = re_pb2.ActionResult()
    assert report.result.Unpack(got) and got.exit_code == 3
    # And the bot holds nothing any more
    eventually(lambda: h.bot.running() == [])


def test_running_leases_are_heartbeated_as_active(make_bot: Callable[..., Harness]) -> None:
    # Given a bot running a lease
    h = make_bot().start()
    lease_id = h.fake.add_job()
    eventually(lambda: h.work.is_running(lease_id))
    # When time passes, then its updates keep reporting the lease ACTIVE
    eventually(
        lambda: (
            sum(
                1
                for r in h.fake.requests
                if any(
                    lease.id == lease_id and lease.state == bots_pb2.ACTIVE for lease in r.leases
                )
            )
            >= 2
        )
    )
    h.work.finish(lease_id)
    eventually(lambda: lease_id in h.fake.reports)


def test_a_bot_runs_up_to_its_capacity_at_once(make_bot: Callable[..., Harness]) -> None:
    # Given a bot of capacity 2 and three jobs
    h = make_bot(capacity=2).start()
    jobs = [h.fake.add_job(str(i)) for i in range(3)]
    # Then two run at once, and the third only when one of them is done
    eventually(lambda: h.work.is_running(jobs[0]) and h.work.is_running(jobs[1]))
    time.sleep(0.2)
    assert not h.work.is_running(jobs[2])
    h.work.finish(jobs[0])
    eventually(lambda: h.work.is_running(jobs[2]))
    for job in jobs[1:]:
        h.work.finish(job)
    eventually(lambda: set(jobs) <= set(h.fake.reports))
    assert h.work.max_running == 2
    assert h.fake.creates[0].worker.configs[0].key == "capacity"
    assert h.fake.creates[0].worker.configs[0].value == "2"


def test_a_finished_lease_cuts_the_long_poll_short(make_bot: Callable[..., Harness]) -> None:
    # Given a bot of capacity 2 running one lease, waiting in a 4 s long poll
    h = make_bot(capacity=2).start()
    h.fake.long_poll_cap = 4.0
    lease_id = h.fake.add_job()
    eventually(lambda: h.work.is_running(lease_id))
    time.sleep(0.3)
    # When the run finishes
    finished = time.monotonic()
    h.work.finish(lease_id)
    # Then the report reaches the server at once, not after the poll
    eventually(lambda: lease_id in h.fake.reports, timeout=5)
    assert time.monotonic() - finished < 1.5


def test_a_lease_the_server_cancels_is_killed_and_not_reported(
    make_bot: Callable[..., Harness],
) -> None:
    # Given a bot running a lease
    h = make_bot().start()
    lease_id = h.fake.add_job()
    eventually(lambda: h.work.is_running(lease_id))
    # When the server cancels it (drops it from the session)
    h.fake.cancel(lease_id)
    # Then the run is stopped, the bot forgets the lease and reports nothing
    eventually(lambda: not h.work.is_running(lease_id))
    assert h.work.cancel_events[lease_id][0].is_set()
    eventually(lambda: h.bot.running() == [])
    time.sleep(0.2)
    assert lease_id not in h.fake.reports
    # And it takes the next job
    other = h.fake.add_job()
    eventually(lambda: h.work.is_running(other))
    h.work.finish(other)


def test_stop_without_grace_gives_running_leases_back_then_terminates(
    make_bot: Callable[..., Harness],
) -> None:
    # Given a bot running a lease
    h = make_bot(grace=0).start()
    lease_id = h.fake.add_job()
    eventually(lambda: h.work.is_running(lease_id))
    # When it is stopped
    h.bot.stop()
    h.join()
    # Then the run was killed and the lease given back with a retryable status
    assert h.work.cancel_events[lease_id][0].is_set()
    report = h.fake.reports[lease_id]
    assert report.status.code == code_pb2.UNAVAILABLE and not report.HasField("result")
    # And its last word was BOT_TERMINATING with no leases
    last = h.fake.requests[-1]
    assert last.status == bots_pb2.BOT_TERMINATING and not last.leases
    assert bots_pb2.BOT_TERMINATING in h.fake.statuses()


def test_stop_with_grace_lets_running_leases_finish(make_bot: Callable[..., Harness]) -> None:
    # Given a bot with a grace of 10 s running a lease
    h = make_bot(grace=10).start()
    lease_id = h.fake.add_job()
    eventually(lambda: h.work.is_running(lease_id))
    # When it is stopped, it tells the server at once that it is terminating
    h.bot.stop()
    eventually(lambda: bots_pb2.BOT_TERMINATING in h.fake.statuses())
    other = h.fake.add_job()  # not assigned to a terminating bot
    # And when the run finishes within the grace, its result is reported
    h.work.finish(lease_id)
    h.join()
    assert h.fake.reports[lease_id].status.code == code_pb2.OK
    assert other not in h.fake.reports and not h.work.is_running(other)


def test_a_second_stop_shortens_the_grace(make_bot: Callable[..., Harness]) -> None:
    # Given a stopping bot with a long grace, its lease still running
    h = make_bot(grace=60).start()
    lease_id = h.fake.add_job()
    eventually(lambda: h.work.is_running(lease_id))
    h.bot.stop()
    eventually(lambda: bots_pb2.BOT_TERMINATING in h.fake.statuses())
    # When it is stopped again without grace (a second SIGTERM)
    h.bot.stop(grace=0)
    # Then the lease is given back at once
    h.join(timeout=5)
    assert h.fake.reports[lease_id].status.code == code_pb2.UNAVAILABLE


def test_a_failing_run_is_reported_with_a_retryable_status(
    make_bot: Callable[..., Harness],
) -> None:
    # Given a bot whose work function fails unexpectedly
    h = make_bot().start()
    lease_id = h.fake.add_job()
    eventually(lambda: h.work.is_running(lease_id))
    # When the run raises
    h.work.finish(lease_id, RuntimeError("runner crashed"))
    # Then the lease completes with INTERNAL (the server requeues it)
    eventually(lambda: lease_id in h.fake.reports)
    report = h.fake.reports[lease_id]
    assert report.status.code == code_pb2.INTERNAL
    assert "runner crashed" in report.status.message


def test_a_forgotten_session_is_replaced_and_its_leases_dropped(
    make_bot: Callable[..., Harness],
) -> None:
    # Given a bot running a lease
    h = make_bot().start()
    lease_id = h.fake.add_job()
    eventually(lambda: h.work.is_running(lease_id))
    first = h.bot.session_name
    # When the server no longer knows the session (it expired)
    with h.fake.cond:
        h.fake.forget_next_update = True
    # Then the bot kills the run, opens a new session and gets the job again
    eventually(lambda: len(h.fake.creates) == 2)
    assert h.work.cancel_events[lease_id][0].is_set()
    assert h.bot.session_name != first
    eventually(lambda: h.bot.started.count(lease_id) == 2)
    h.work.finish(lease_id)
    eventually(lambda: lease_id in h.fake.reports)


def test_stop_before_any_work_ends_the_session(make_bot: Callable[..., Harness]) -> None:
    # Given an idle bot in a long poll
    h = make_bot().start()
    time.sleep(0.2)
    # When it is stopped, then it returns promptly after saying goodbye
    stopped = time.monotonic()
    h.bot.stop()
    h.join(timeout=5)
    assert time.monotonic() - stopped < 2.0
    assert h.fake.requests[-1].status == bots_pb2.BOT_TERMINATING
