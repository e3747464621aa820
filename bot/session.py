"""The bot session loop: lease bookkeeping against a Bots server.

The loop (one thread, :meth:`Bot.run`) owns the session. Each turn it sends
the whole state of the bot -- every lease it holds, ACTIVE while running
(a heartbeat), COMPLETED with status and result once finished -- and applies
the answer:

* a lease new to the bot starts running, in a thread of its own (up to
  ``capacity`` at once: the server assigns no more than that);
* a lease the bot sent ACTIVE that the answer lacks (or marks CANCELLED) was
  cancelled or taken away: its process is killed and the lease is dropped,
  without a report (BuildGrid 0.4.4 drops cancelled leases from the answer);
* COMPLETED leases the bot sent are acknowledged, and forgotten.

While the bot has room for work and is healthy, the server holds the call as
a long poll; a lease that finishes (or a stop request) cuts the call short so
its report goes out at once. When the server answers at once (the bot is at
capacity or stopping), the loop waits a heartbeat interval before the next
call, derived from the session's ``expire_time``.

Stopping (:meth:`Bot.stop`, on SIGTERM): the bot reports BOT_TERMINATING at
once, so the server assigns it nothing more; running leases get ``grace``
seconds to finish, then they are killed and given back (status UNAVAILABLE:
the server requeues them); a last update with no leases ends the session's
part in scheduling, so nothing waits for the bot's keepalive to expire.

A server that forgets the session (it expired while the bot could not reach
it) has already requeued its leases: the bot drops them and opens a new one.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf import any_pb2
from google.rpc import code_pb2

from bot.errors import LeaseCancelled
from bot.lease import LeaseReport, give_back_report, status
from pipeline.errors import RemoteError
from pipeline.reapi.bots import LONG_POLL_TIMEOUT, session_is_gone
from protos.google.devtools.remoteworkers.v1test2 import bots_pb2, worker_pb2

__all__ = ["Bot", "BotsApi", "LeaseWork"]

log = logging.getLogger(__name__)

MIN_HEARTBEAT = 0.5
MAX_HEARTBEAT = 5.0
CREATE_TIMEOUT = 3.5
"""Deadline of CreateBotSession. Short on purpose: BuildGrid 0.4.4 does not
long-poll a call with less than ~4 s left, so it answers at once and the bot
is registered quickly; the long polls are UpdateBotSession calls, which a lease
report or a stop can cut short."""
BUSY_POLL_TIMEOUT = 5.0
"""Long-poll deadline while the bot holds leases. BuildGrid does not wake a
long poll when a lease is cancelled, so this bounds how late a cancellation is
noticed (it still lets BuildGrid assign work: it needs >= ~4 s)."""
MAX_BACKOFF = 5.0

LeaseWork = Callable[[any_pb2.Any, threading.Event], LeaseReport]
"""Runs the action in a lease payload to its report; raises LeaseCancelled
when the event is set."""


class BotsApi(Protocol):
    """What the loop needs of a Bots client (:class:`pipeline.reapi.bots.BotsClient`)."""

    def create_bot_session(
        self, session: bots_pb2.BotSession, *, timeout: float = ...
    ) -> bots_pb2.BotSession: ...

    def update_bot_session(
        self,
        session: bots_pb2.BotSession,
        *,
        timeout: float = ...,
        interrupt: threading.Event | None = None,
    ) -> bots_pb2.BotSession | None: ...


@dataclass
class _Lease:
    id: str
    payload: any_pb2.Any
    cancel: threading.Event = field(default_factory=threading.Event)
    report: LeaseReport | None = None
    give_back: bool = False
    thread: threading.Thread | None = None
    started: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class _Sent:
    """Which leases one request reported, and how."""

    active: frozenset[str]
    completed: frozenset[str]


class Bot:
    """A bot: one session with a Bots server, running up to ``capacity`` leases at once.

    Args:
        api: the Bots client.
        work: runs one lease (see :data:`LeaseWork`).
        bot_id: this bot's id (a restarted bot with the same id replaces its
            old session at once, and the server requeues that session's leases).
        properties: platform properties of the bot's device (``OSFamily``, ``ISA`` ...).
        capacity: leases run at once.
        poll_timeout: the long-poll deadline of UpdateBotSession.
        grace: seconds running leases may take to finish after :meth:`stop`.
    """

    def __init__(
        self,
        api: BotsApi,
        work: LeaseWork,
        *,
        bot_id: str,
        properties: Sequence[tuple[str, str]] = (),
        capacity: int = 1,
        poll_timeout: float = LONG_POLL_TIMEOUT,
        grace: float = 0.0,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.api = api
        self.work = work
        self.bot_id = bot_id
        self.capacity = capacity
        self.poll_timeout = poll_timeout
        self.grace = grace
        self.worker = worker_pb2.Worker(
            devices=[
                worker_pb2.Device(
                    handle=bot_id,
                    properties=[worker_pb2.Device.Property(key=k, value=v) for k, v in properties],
                )
            ],
            configs=[worker_pb2.Worker.Config(key="capacity", value=str(capacity))],
        )
        self._session = bots_pb2.BotSession()
        self._leases: dict[str, _Lease] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        # A doorbell for the loop: set by lease threads, stop() and by the
        # Bots client when an answer arrives. ``_dirty`` (under the lock) says
        # whether there is news for the server, so the loop can tell the two apart.
        self._wake = threading.Event()
        self._dirty = False
        self._stop_at: float | None = None  # grace deadline once stopping
        self._heartbeat = MAX_HEARTBEAT
        self._rng = random.Random()
        #: Ids of leases started so far, in order (for tests and logs).
        self.started: list[str] = []

    # ----------------------------------------------------------------- public

    @property
    def stopping(self) -> bool:
        return self._stop_at is not None

    @property
    def session_name(self) -> str:
        return self._session.name

    def running(self) -> list[str]:
        """Ids of the leases held now (running or not yet reported)."""
        with self._lock:
            return list(self._leases)

    def stop(self, grace: float | None = None) -> None:
        """Stop taking work; give running leases ``grace`` seconds (default: the
        bot's), then give them back. Safe from any thread; a second call may
        shorten the grace."""
        grace = self.grace if grace is None else grace
        with self._lock:
            deadline = time.monotonic() + max(0.0, grace)
            if self._stop_at is None or deadline < self._stop_at:
                self._stop_at = deadline
            self._ring()

    def run(self) -> None:
        """Run until :meth:`stop`, then until every lease is reported or given back."""
        if not self._open_session():
            return
        failures = 0
        while True:
            self._give_back_after_grace()
            with self._lock:
                finished = self.stopping and not self._leases
            if finished:
                self._say_goodbye()
                break
            with self._lock:
                self._dirty = False
                self._wake.clear()
            request, sent = self._snapshot()
            began = time.monotonic()
            timeout = (
                min(self.poll_timeout, BUSY_POLL_TIMEOUT) if sent.active else self.poll_timeout
            )
            try:
                answer = self.api.update_bot_session(request, timeout=timeout, interrupt=self._wake)
            except RemoteError as exc:
                if session_is_gone(exc):
                    log.warning(
                        "the server forgot session %s (%s): opening a new one", request.name, exc
                    )
                    self._drop_all("the session is gone")
                    if not self._open_session():
                        break
                    continue
                failures += 1
                delay = min(MAX_BACKOFF, 0.2 * 2 ** min(failures, 8)) * self._rng.uniform(0.5, 1)
                log.warning("UpdateBotSession failed (%s); again in %.1f s", exc, delay)
                self._pause(delay)
                continue
            failures = 0
            if answer is None:
                continue  # cut short: a lease finished or the bot is stopping
            progress = self._apply(sent, answer)
            quick = time.monotonic() - began < MIN_HEARTBEAT
            if not progress and quick:
                self._pause(self._heartbeat)
        self._join_threads(timeout=10.0)

    # ----------------------------------------------------------------- private

    def _status(self) -> bots_pb2.BotStatus:
        return bots_pb2.BOT_TERMINATING if self.stopping else bots_pb2.OK

    def _pause(self, delay: float) -> None:
        """Wait up to ``delay`` seconds (less if the grace ends first), or until there is news."""
        with self._lock:
            if self._dirty:
                return
            self._wake.clear()
            if self._stop_at is not None:
                delay = max(0.0, min(delay, self._stop_at - time.monotonic()))
        self._wake.wait(delay)

    def _ring(self) -> None:
        """There is news for the server (the lock is held)."""
        self._dirty = True
        self._wake.set()

    def _open_session(self) -> bool:
        """Create the session (retrying); False if stopped before it could be made."""
        failures = 0
        while True:
            if self.stopping:
                return False
            request = bots_pb2.BotSession(
                bot_id=self.bot_id, status=bots_pb2.OK, worker=self.worker
            )
            try:
                answer = self.api.create_bot_session(request, timeout=CREATE_TIMEOUT)
            except RemoteError as exc:
                failures += 1
                delay = min(MAX_BACKOFF, 0.2 * 2 ** min(failures, 8))
                log.warning("CreateBotSession failed (%s); again in %.1f s", exc, delay)
                with self._lock:
                    self._dirty = False
                self._pause(delay)
                continue
            self._session = bots_pb2.BotSession(
                name=answer.name,
                bot_id=self.bot_id,
                worker=self.worker,
                version=answer.version,
            )
            log.info("bot %s: session %s (capacity %d)", self.bot_id, answer.name, self.capacity)
            self._apply(_Sent(frozenset(), frozenset()), answer)
            return True

    def _snapshot(self) -> tuple[bots_pb2.BotSession, _Sent]:
        request = bots_pb2.BotSession()
        request.CopyFrom(self._session)
        request.status = self._status()
        active, completed = [], []
        with self._lock:
            for lease in self._leases.values():
                proto = request.leases.add(id=lease.id)
                if lease.report is None:
                    proto.state = bots_pb2.ACTIVE
                    active.append(lease.id)
                else:
                    proto.state = bots_pb2.COMPLETED
                    proto.status.CopyFrom(lease.report.status)
                    if lease.report.result is not None:
                        proto.result.Pack(lease.report.result)
                    completed.append(lease.id)
        return request, _Sent(frozenset(active), frozenset(completed))

    def _apply(self, sent: _Sent, answer: bots_pb2.BotSession) -> bool:
        """Apply the server's answer; True if anything changed (work came or went)."""
        self._session.version = answer.version
        if answer.name:
            self._session.name = answer.name
        self._heartbeat = self._heartbeat_of(answer)
        answered = {lease.id: lease for lease in answer.leases}
        changed = bool(sent.completed)
        with self._lock:
            for lease_id in sent.completed:
                done = self._leases.pop(lease_id, None)
                if done is not None and done.report is not None:
                    log.info(
                        "lease %s reported: %s (%.1f s)",
                        lease_id,
                        done.report.code_name,
                        time.monotonic() - done.started,
                    )
            for lease_id in sent.active:
                lease = answered.get(lease_id)
                if lease is None or lease.state == bots_pb2.CANCELLED:
                    self._drop(lease_id, "cancelled by the server")
                    changed = True
            for lease in answer.leases:
                new = lease.state in (bots_pb2.ACTIVE, bots_pb2.PENDING)
                if new and lease.id not in self._leases:
                    self._start(lease)
                    changed = True
        return changed

    def _start(self, lease: bots_pb2.Lease) -> None:
        """Start running a new lease (the lock is held)."""
        entry = _Lease(lease.id, lease.payload)
        self._leases[lease.id] = entry
        self.started.append(lease.id)
        if self.stopping:
            # Assigned while the server did not yet know the bot is stopping.
            entry.report = give_back_report(f"bot {self.bot_id} is terminating")
            self._ring()
            return
        log.info("lease %s: started (%d running)", lease.id, len(self._leases))
        entry.thread = threading.Thread(
            target=self._run_lease, args=(entry,), name=f"lease-{lease.id[:8]}", daemon=True
        )
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(entry.thread)
        entry.thread.start()

    def _run_lease(self, entry: _Lease) -> None:
        try:
            report: LeaseReport | None = self.work(entry.payload, entry.cancel)
        except LeaseCancelled:
            report = None
        except Exception as exc:  # the work function is meant to catch everything
            log.exception("lease %s: unexpected failure", entry.id)
            report = LeaseReport(status(code_pb2.INTERNAL, f"remex bot {self.bot_id}: {exc!r}"))
        with self._lock:
            if report is None:
                if not entry.give_back:
                    return  # dropped (cancelled by the server): nothing to report
                report = give_back_report(f"bot {self.bot_id} is terminating")
            if self._leases.get(entry.id) is entry:
                entry.report = report
                self._ring()

    def _drop(self, lease_id: str, why: str) -> None:
        """Kill a lease's run and forget it, without a report (the lock is held)."""
        entry = self._leases.pop(lease_id, None)
        if entry is not None:
            log.info("lease %s: dropped (%s)", lease_id, why)
            entry.cancel.set()

    def _drop_all(self, why: str) -> None:
        with self._lock:
            for lease_id in list(self._leases):
                self._drop(lease_id, why)

    def _give_back_after_grace(self) -> None:
        with self._lock:
            if self._stop_at is None or time.monotonic() < self._stop_at:
                return
            for entry in self._leases.values():
                if entry.report is None and not entry.give_back:
                    log.info("lease %s: giving it back (bot stopping)", entry.id)
                    entry.give_back = True
                    entry.cancel.set()

    def _say_goodbye(self) -> None:
        """Tell the server the bot is terminating and holds nothing (best effort)."""
        request = bots_pb2.BotSession()
        request.CopyFrom(self._session)
        request.status = bots_pb2.BOT_TERMINATING
        try:
            self.api.update_bot_session(request, timeout=5.0)
            log.info("bot %s: session %s ended", self.bot_id, self._session.name)
        except RemoteError as exc:
            log.warning("could not end session %s: %s", self._session.name, exc)

    def _heartbeat_of(self, answer: bots_pb2.BotSession) -> float:
        if not answer.HasField("expire_time"):
            return MAX_HEARTBEAT
        left = answer.expire_time.ToNanoseconds() / 1e9 - time.time()
        return max(MIN_HEARTBEAT, min(MAX_HEARTBEAT, left / 3))

    def _join_threads(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
