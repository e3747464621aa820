"""What the tasks of one worker process share: its stage context, its
scheduler, its name; and the two background loops a worker runs.

Built once per process, on first use (a worker that never runs a task never
connects), from what :func:`tasks.app.create_app` was given: the config and
the worker's name are passed in, never read from the environment here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from pipeline.broker import reconcile
from pipeline.cas import LocalCas
from pipeline.config import RemexConfig
from pipeline.scheduler import (
    STAGE_ORDER,
    Scheduler,
    StageStart,
    start_flush_interval,
)
from pipeline.scheduler import take_delay as _take_delay
from pipeline.stages import StageContext

log = logging.getLogger(__name__)

__all__ = [
    "BackgroundLoops",
    "RuntimeHolder",
    "StagingWindow",
    "StartBatch",
    "WorkerRuntime",
    "start_batch",
]

# An element holds its place in a StagingWindow at most this long: a holder
# whose next stage never comes (its chain failed, went to another worker, or
# waits for a thread) stops holding up the others then.
STAGING_LEASE = 1.0

# A worker's Redis commands wait this long for a restarting Redis: a stage
# that finished its work waits to record it rather than be run again.
WORKER_RECONNECT_SECONDS = 60.0
# A worker that stops waits this long for the cancels of orphaned operations
# its last flushes started (see StartBatch.flush).
ORPHAN_CANCEL_WAIT = 10.0


class StagingWindow:
    """How many elements this worker process stages at once: from the start
    of an element's ``stage_to_cas`` until its ``execute`` starts (its
    Execute call about to go out). Another element's ``stage_to_cas`` waits
    for a place, first come first served.

    Staging is CPU work under one GIL: eight elements staged at once all
    reach their Execute call late, together, where one or two at a time
    send the first early and the rest while the first actions run. Where
    the staging waits on round trips to a far server more than on the CPU,
    a wider window (or none) stages faster.

    A place is held at most ``lease`` seconds, so no wait is unbounded: the
    holder's next stage may never come to this worker (its chain failed or
    went elsewhere), or may wait for a thread while every other thread
    waits here.
    """

    def __init__(self, size: int, lease: float = STAGING_LEASE) -> None:
        """``size`` 0: no limit (:meth:`enter` never waits)."""
        self.size = size
        self.lease = lease
        self._cond = threading.Condition()
        self._held: dict[tuple[str, str], float] = {}  # key -> when its lease ends
        self._queue: list[object] = []  # the waiters' tickets, in arrival order
        self.peak = 0  # the most places held at once
        self.waits = 0  # how many elements found the window full
        self.waited = 0.0  # and the seconds they waited in all

    def enter(self, key: tuple[str, str]) -> float:
        """Take a place for ``key`` (``(build, element)``), waiting for one if
        the window is full; return the seconds waited. A key that holds a
        place already keeps it, with a new lease."""
        if self.size <= 0:
            return 0.0
        started = time.monotonic()
        ticket = object()
        waited = False
        with self._cond:
            self._queue.append(ticket)
            try:
                while True:
                    now = time.monotonic()
                    for held, until in list(self._held.items()):
                        if until <= now:
                            del self._held[held]
                    if key in self._held or (
                        len(self._held) < self.size and self._queue[0] is ticket
                    ):
                        self._held[key] = now + self.lease
                        self.peak = max(self.peak, len(self._held))
                        if waited:
                            self.waits += 1
                            self.waited += now - started
                        return now - started
                    waited = True
                    wake = min(self._held.values(), default=now + self.lease)
                    self._cond.wait(max(wake - now, 0.001))
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()

    def leave(self, key: tuple[str, str]) -> None:
        """Give ``key``'s place up (nothing if it holds none)."""
        if self.size <= 0:
            return
        with self._cond:
            if self._held.pop(key, None) is not None:
                self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        """Its size, the most places held at once, how many elements waited
        and for how long in all (ms): for ``remex_stats``."""
        with self._cond:
            return {
                "staging_size": self.size,
                "staging_peak": self.peak,
                "staging_waits": self.waits,
                "staging_waited_ms": int(self.waited * 1000),
            }

    def holding(self) -> int:
        """How many places are held now (leases not yet ended)."""
        now = time.monotonic()
        with self._cond:
            return sum(1 for until in self._held.values() if until > now)


@dataclass
class WorkerRuntime:
    """What every task of this worker process shares (all thread-safe)."""

    config: RemexConfig
    name: str
    context: StageContext
    scheduler: Scheduler
    instance: str
    """This process, as its liveness key names it: ``NAME/PID/RANDOM``."""
    epoch: str = ""
    """This process's current broker connection (a new one on every reconnect):
    the value of its liveness key. What it took under an older epoch, and did
    not start, Celery has dropped."""
    starts: StartBatch | None = None
    """The stage starts this process records in batches (built with the runtime)."""
    staging: StagingWindow = field(init=False)
    """How many elements this process stages at once (``[worker] staging``)."""

    def __post_init__(self) -> None:
        self.staging = StagingWindow(self.config.worker_staging or 0)
        if self.starts is None:
            self.starts = StartBatch(
                self.scheduler,
                start_flush_interval(self.scheduler.heartbeat_timeout),
                cancel_operation=lambda name: self.context.executor.cancel(name),
            )

    @property
    def holder(self) -> str:
        """Who holds the messages this process takes now: ``instance#epoch``."""
        return f"{self.instance}#{self.epoch}"

    def new_epoch(self) -> None:
        """The consumer (re)connected: older holds end (see :meth:`Scheduler.holder_alive`)."""
        self.epoch = uuid.uuid4().hex[:8]
        log.info("connected to the broker: epoch %s", self.epoch)
        if self.starts is not None:
            self.starts.clear()
        try:
            self.scheduler.worker_alive(self.instance, self.epoch)
        except Exception as exc:  # the liveness loop writes it again
            log.warning("could not record the new broker connection: %s", exc)

    @classmethod
    def connect(cls, config: RemexConfig, name: str) -> WorkerRuntime:
        """Open this host's local CAS, the REAPI clients and the scheduler.

        Raises:
            ConfigError: no broker or execution server is configured.
        """
        execution = config.require_execution()
        # Workers keep their CAS within cas.quota (their stages pin what they use).
        cas = LocalCas(config.cas_dir, quota_bytes=config.cas_quota_bytes, enforce_quota=True)
        context = StageContext.connect(
            cas,
            execution,
            config.artifact_endpoint,
            storage=config.storage,
            action_cache=config.action_cache,
            correlated_id=name,
            download=config.cas_download,
        )
        scheduler = Scheduler.from_url(
            config.require_broker(),
            heartbeat_timeout=config.heartbeat_timeout,
            reconnect_seconds=WORKER_RECONNECT_SECONDS,
        )
        instance = f"{name}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        return cls(config, name, context, scheduler, instance, epoch=uuid.uuid4().hex[:8])

    @property
    def heartbeat_interval(self) -> float:
        """How often a stage refreshes its element's heartbeat (a third of the timeout)."""
        return min(5.0, self.scheduler.heartbeat_timeout / 3)


class RuntimeHolder:
    """Builds the runtime on first use, once, whichever thread asks first."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._runtime: Any = None
        self._lock = threading.Lock()

    def get(self) -> WorkerRuntime:
        """The runtime, built now if it was not yet."""
        with self._lock:
            if self._runtime is None:
                self._runtime = self._factory()
            runtime: WorkerRuntime = self._runtime
            return runtime

    @property
    def built(self) -> WorkerRuntime | None:
        """The runtime if it was built, else None (never builds it)."""
        runtime: WorkerRuntime | None = self._runtime
        return runtime


class BackgroundLoops:
    """A worker's liveness key (its elements are not re-sent while it lives)
    and the reconciler (re-sends stalled elements), each on its own thread."""

    def __init__(self, app: Any, holder: RuntimeHolder) -> None:
        self._app = app
        self._holder = holder
        self._stop = threading.Event()

    def start(self) -> None:
        """Start both loops (when the worker is ready)."""
        self._stop.clear()
        rt = self._holder.get()
        for what, interval, fn in (
            ("liveness", rt.config.heartbeat_timeout / 3, self._keep_alive),
            ("reconciler", rt.config.reconcile_interval, self._reconcile),
        ):
            threading.Thread(
                target=_every,
                args=(interval, self._stop, what, fn),
                name=f"remex-{what}",
                daemon=True,
            ).start()

    def stop(self) -> None:
        """Stop the loops and drop the liveness key (its elements may be re-sent at once)."""
        self._stop.set()
        rt = self._holder.built
        if rt is not None:
            starts = start_batch(rt)
            if starts is not None:
                # (What the last stages noted, before the worker goes.)
                with contextlib.suppress(Exception):
                    starts.flush()
                # (And the cancels of operations that run on for nothing.)
                starts.join_cancels(ORPHAN_CANCEL_WAIT)
            with contextlib.suppress(Exception):
                rt.scheduler.worker_gone(rt.instance)

    def _keep_alive(self) -> None:
        rt = self._holder.get()
        rt.scheduler.worker_alive(rt.instance, rt.epoch)

    def _reconcile(self) -> None:
        rt = self._holder.get()
        reconcile(
            self._app,
            rt.scheduler,
            lock_seconds=rt.config.reconcile_interval,
            # An element given up on in a build whose on-error is terminate.
            cancel_operation=lambda name: rt.context.executor.cancel(name),
        )


def _every(interval: float, stop: threading.Event, what: str, fn: Callable[[], object]) -> None:
    while True:
        try:
            fn()
        except redis.exceptions.ConnectionError as exc:  # Redis restarting: a pause
            log.warning("%s: Redis unreachable, trying again: %s", what, exc)
        except Exception:  # a bug must not kill the loop either
            log.exception("%s failed", what)
        if stop.wait(interval):
            return


@dataclass
class _Take:
    due: float
    build: str
    element: str
    attempt: int
    stage: str


class PendingTakes:
    """The stage messages this worker received and has not started yet, whose
    holder it records only if they wait longer than ``delay`` seconds.

    Most messages start the moment they arrive, and the stage's start records
    its holder itself (:meth:`pipeline.scheduler.Scheduler.begin_stage`), so a
    take recorded on arrival is one script and four Redis commands per stage
    for nothing (issue 16). Only a message that waits (prefetched behind a
    busy slot, a retry's countdown) needs one, and the reconciler takes an
    element with no holder as lost only after a heartbeat timeout, much more
    than ``delay``. A message whose take is due is recorded by one thread;
    a start waits for a take under way, so that no take of a stage lands
    after its start."""

    def __init__(self, holder: RuntimeHolder, delay: float) -> None:
        self._holder = holder
        self.delay = delay
        self._pending: dict[str, _Take] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def received(self, task_id: str, build: str, element: str, attempt: int, stage: str) -> None:
        """A stage message arrived: record its holder in ``delay`` seconds unless it starts."""
        with self._lock:
            self._pending[task_id] = _Take(
                time.monotonic() + self.delay, build, element, attempt, stage
            )
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="remex-takes", daemon=True)
                self._thread.start()

    def started(self, task_id: str) -> None:
        """The message's stage begins (it records its holder itself)."""
        with self._lock:
            self._pending.pop(task_id, None)

    def flush(self, now: float | None = None) -> int:
        """Record the holder of every message due by ``now``; return how many."""
        now = time.monotonic() if now is None else now
        done = 0
        with self._lock:
            due = [(tid, t) for tid, t in self._pending.items() if t.due <= now]
            for task_id, take in due:
                del self._pending[task_id]
                try:
                    rt = self._holder.get()
                    if (starts := start_batch(rt)) is not None:
                        # With the next batch of starts (issue 16).
                        starts.take(
                            take.build,
                            take.element,
                            attempt=take.attempt,
                            stage=take.stage,
                            holder=rt.holder,
                        )
                    elif not rt.scheduler.take(
                        take.build,
                        take.element,
                        attempt=take.attempt,
                        stage=take.stage,
                        holder=rt.holder,
                    ):
                        log.info(
                            "%s of %s (build %s) is stale", take.stage, take.element, take.build
                        )
                    done += 1
                except Exception as exc:  # the reconciler copes without it
                    log.warning("could not record a received task: %s", exc)
        return done

    def _run(self) -> None:
        while True:
            time.sleep(self.delay / 2)
            self.flush()


def take_delay(config: RemexConfig) -> float:
    """How long a received stage message may wait before its holder is
    recorded: a tenth of the heartbeat timeout, at most one second (the
    reconciler waits a whole timeout before it takes a message as lost)."""
    return _take_delay(config.heartbeat_timeout)


def start_batch(rt: Any) -> StartBatch | None:
    """The runtime's batch of stage starts (None: a runtime without one, as
    test doubles are: the stages then record each start at once)."""
    starts = getattr(rt, "starts", None)
    return starts if isinstance(starts, StartBatch) else None


class StartBatch:
    """The stage starts of one worker process, recorded in batches (issue 16).

    A stage that starts checks that its message is current (one read of the
    element's info, or none when this process started an earlier stage of
    the same attempt a moment ago: it holds the element, so nothing else
    moved it), then :meth:`begin` notes the start here, and a thread records
    what is noted every ``interval`` seconds in one script
    (:meth:`pipeline.scheduler.Scheduler.record_starts`). Only the latest
    stage of each element is recorded; an element that finished before the
    flush needs no record at all (:meth:`forget`). The script checks each
    start again, atomically: a start never lands after its element's finish.

    Until the flush the element reads ``queued`` (status, the reconciler): the
    reconciler takes a message in no queue for lost only when its element's
    info stays the same a while later (``pipeline.scheduler.confirm_delay``),
    longer than ``interval``.
    """

    MEMO_SIZE = 10_000

    def __init__(
        self,
        scheduler: Scheduler,
        interval: float,
        *,
        cancel_operation: Callable[[str], object] | None = None,
    ) -> None:
        self._scheduler = scheduler
        self.interval = interval
        # Cancels a remote operation this process started for an element
        # cancelled before the operation's name was recorded (see flush).
        self._cancel_operation = cancel_operation
        # How long this process trusts what it knows about an element it
        # holds: within it, a later stage needs no read (a message that
        # waited longer, behind a backlog, is checked). While it holds the
        # element, only the reconciler moves it, and only once this process
        # seems gone (a new broker connection clears what it knows: see
        # clear) or silent for LOST_AFTER_HEARTBEATS timeouts; a flush that
        # finds a start stale clears it too.
        self.memo_seconds = max(interval * 4, scheduler.heartbeat_timeout * 5)
        self._pending: dict[tuple[str, str], StageStart] = {}
        # (build, element) -> (attempt, stage rank, when): what this process started.
        self._memo: OrderedDict[tuple[str, str], tuple[int, int, float]] = OrderedDict()
        self._lock = threading.Lock()
        # Threads cancelling orphaned operations (see flush).
        self._cancels: list[threading.Thread] = []
        self._thread: threading.Thread | None = None

    def begin(self, start: StageStart) -> bool:
        """A stage starts: False when its message is stale (an older attempt,
        an earlier stage, a finished element); else its start is noted for
        the next flush."""
        key = (start.build, start.element)
        rank = STAGE_ORDER.get(start.stage, 0)
        now = time.monotonic()
        with self._lock:
            memo = self._memo.get(key)
        known = (
            memo is not None
            and memo[0] == start.attempt
            and rank >= memo[1]
            and now - memo[2] < self.memo_seconds
        )
        if not known and not self._scheduler.is_current(
            start.build, start.element, attempt=start.attempt, stage=start.stage
        ):
            return False
        with self._lock:
            earlier = self._pending.get(key)
            if earlier is not None and earlier.attempt == start.attempt:
                start.notes = {**earlier.notes, **start.notes}
                if not (earlier.take or earlier.note):
                    start.first = earlier.first or earlier.at
            self._pending[key] = start
            self._memo[key] = (start.attempt, rank, now)
            self._memo.move_to_end(key)
            while len(self._memo) > self.MEMO_SIZE:
                self._memo.popitem(last=False)
            self._ensure_thread()
        return True

    def _ensure_thread(self) -> None:
        # (Called with the lock held.)
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="remex-starts", daemon=True)
            self._thread.start()

    def take(self, build: str, element: str, *, attempt: int, stage: str, holder: str) -> None:
        """A message received here has waited a while without starting:
        record its holder with the next flush (unless a start of the element
        is noted, which records it)."""
        key = (build, element)
        with self._lock:
            noted = self._pending.get(key)
            if noted is not None and noted.attempt == attempt and not (noted.take or noted.note):
                return
            notes = noted.notes if noted is not None and noted.attempt == attempt else {}
            self._pending[key] = StageStart(
                build, element, attempt, stage, "", "", holder, time.time(), take=True, notes=notes
            )
            self._ensure_thread()

    def note(
        self, build: str, element: str, *, attempt: int, stage: str, changes: dict[str, Any]
    ) -> None:
        """Merge ``changes`` into the element's info with the next flush (as
        :meth:`pipeline.scheduler.Scheduler.note` does at once): a remote
        operation's name, what a stage that runs long says."""
        key = (build, element)
        with self._lock:
            noted = self._pending.get(key)
            if noted is not None and noted.attempt == attempt:
                noted.notes = {**noted.notes, **changes}
            else:
                self._pending[key] = StageStart(
                    build,
                    element,
                    attempt,
                    stage,
                    "",
                    "",
                    "",
                    time.time(),
                    note=True,
                    notes=dict(changes),
                )
            self._ensure_thread()

    def clear(self) -> None:
        """Forget what this process knows of the elements it holds (its
        broker connection is new: the reconciler may re-send them)."""
        with self._lock:
            self._memo.clear()

    def expect(self, build: str, element: str, attempt: int) -> None:
        """This process just recorded a send of the element (``attempt``):
        if its first stage starts here, that needs no read either."""
        with self._lock:
            self._memo[(build, element)] = (attempt, 0, time.monotonic())
            self._memo.move_to_end((build, element))
            while len(self._memo) > self.MEMO_SIZE:
                self._memo.popitem(last=False)

    def forget(self, build: str, element: str) -> dict[str, Any]:
        """The element finishes (or fails) here: its start needs no record of
        its own. Returns what that record would have said (``started``,
        ``host``, ``worker``, ``holder``, ``stage``, ``stage_at``; nothing
        when none was noted), for the finish to record instead."""
        with self._lock:
            noted = self._pending.pop((build, element), None)
            self._memo.pop((build, element), None)
        if noted is None:
            return {}
        if noted.take or noted.note:
            return dict(noted.notes)
        return {
            **noted.notes,
            "started": noted.first or noted.at,
            "host": noted.host,
            "worker": noted.worker,
            "holder": noted.holder,
            "stage": noted.stage,
            "stage_at": noted.at,
        }

    def flush(self) -> int:
        """Record the starts noted so far; return how many were sent. Those
        a refused write kept are noted again (unless a newer start replaced
        them meanwhile)."""
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return 0
        try:
            recorded = self._scheduler.record_starts(list(batch.values()))
        except Exception:
            with self._lock:
                for key, start in batch.items():
                    self._pending.setdefault(key, start)
            raise
        with self._lock:
            # A later stage of these must read again (and is dropped then).
            for key in recorded.stale:
                self._memo.pop(key, None)
        # An element cancelled (remex cancel, on-error terminate) between its
        # operation's start and this flush: the canceller cancelled the
        # operations it could see in Redis, not this one, which would run on
        # for nothing. Cancelled here, off this thread: a cancel is an RPC the
        # client retries (seconds when the server is slow or down), and a
        # flush runs in the flush thread or in a stage's hand-on, whose
        # starts must not wait for it.
        if recorded.orphans:
            thread = threading.Thread(
                target=self._cancel_orphans,
                args=(list(recorded.orphans),),
                name="remex-orphan-cancel",
                daemon=True,
            )
            with self._lock:
                # (Started before it is listed: join_cancels joins only started threads.)
                thread.start()
                self._cancels = [t for t in self._cancels if t.is_alive()]
                self._cancels.append(thread)
        return len(batch)

    def _cancel_orphans(self, names: list[str]) -> None:
        for name in names:
            if self._cancel_operation is None:
                log.warning("operation %s of a cancelled element runs on", name)
                continue
            try:
                self._cancel_operation(name)
                log.info("cancelled operation %s: its element was cancelled", name)
            except Exception as exc:  # the server may have finished it already
                log.warning("could not cancel operation %s: %s", name, exc)

    def join_cancels(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the cancels flushes started
        (a worker that stops gives them this long); True if all ended."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._cancels)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            try:
                self.flush()
            except redis.exceptions.ConnectionError as exc:  # Redis restarting: a pause
                log.warning("could not record stage starts, trying again: %s", exc)
            except Exception:  # a bug must not end the loop
                log.exception("could not record stage starts")
