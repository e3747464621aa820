"""The five stage tasks: each decodes its payload, calls one function of
:mod:`pipeline.stages`, and lets :mod:`pipeline.stages.policy` decide what a
failure means (retry here, re-upload, fail the element, give up).

A payload is ``{"build", "element", "attempt", "state"}``; each task returns
the same with the new state, which Celery's chain hands to the next task.
The tasks are registered on an app by :func:`register_stage_tasks` (called by
:func:`tasks.app.create_app`); this module never imports the app.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

from celery import Celery, Task
from celery.exceptions import Ignore, Reject, Retry

from pipeline.artifact_index import ArtifactRef, index_entry
from pipeline.broker import (
    PUBLISH_ERRORS,
    fail_element,
    host_queue,
    no_declare,
    publish_sends,
    send_ready,
    task_reprs,
)
from pipeline.errors import RemexError
from pipeline.scheduler import StageStart
from pipeline.spec import BuildSpec
from pipeline.stages import (
    BuildFailedError,
    StageContext,
    State,
    execute,
    fetch_outputs,
    is_pending,
    push_artifact,
    stage_to_cas,
    upload,
)
from pipeline.stages.pins import pinned_stage
from pipeline.stages.policy import DEFAULT_POLICY, Decision, FailurePolicy
from pipeline.stages.state import without_operation
from tasks.runtime import WorkerRuntime, start_batch

log = logging.getLogger(__name__)

__all__ = [
    "EXECUTE_WAIT",
    "HEARTBEATS",
    "ElementFailed",
    "Heartbeats",
    "StageTask",
    "register_stage_tasks",
]

# The execute task follows an operation this long, then re-queues itself.
EXECUTE_WAIT = 10.0

Payload = dict[str, Any]
StageFn = Callable[[StageContext, BuildSpec, State], State]
StillRunning = Callable[[WorkerRuntime, Payload, State], None]


class ElementFailed(RemexError):
    """The element failed for good (recorded in the scheduler); ends its chain.

    Raised so that Celery records the task as FAILURE with the reason (and
    Flower shows it); listed in the tasks' ``throws``, so it is logged
    without a traceback.
    """


class _SpecCache:
    """The build specs this worker read, by scheduler, build and element: a
    spec never changes once the build is submitted, and each element's five
    stages would otherwise read it from Redis five times."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._lock = threading.Lock()
        # Each entry keeps its scheduler alive, so an id() is never reused for another.
        self._specs: collections.OrderedDict[tuple[int, str, str], tuple[object, BuildSpec]] = (
            collections.OrderedDict()
        )

    def get(self, rt: WorkerRuntime, build: str, element: str) -> BuildSpec:
        key = (id(rt.scheduler), build, element)
        with self._lock:
            entry = self._specs.get(key)
            if entry is not None and entry[0] is rt.scheduler:
                self._specs.move_to_end(key)
                return entry[1]
        spec = rt.scheduler.spec(build, element)
        with self._lock:
            self._specs[key] = (rt.scheduler, spec)
            while len(self._specs) > self._size:
                self._specs.popitem(last=False)
        return spec


_SPECS = _SpecCache()

# The stages an element goes through holding its place in the worker's
# StagingWindow: taken when stage_to_cas starts, given up when any later
# stage starts (execute, as a rule) or a stage fails.
_STAGING = ("stage_to_cas", "upload")


class StageTask(Task):  # type: ignore[misc]
    """Common behaviour of the stage tasks: one path from payload to result,
    with every failure decided by :attr:`policy`."""

    abstract = True
    throws = (ElementFailed,)
    acks_late = True
    reject_on_worker_lost = True
    # The chain hands each result to the next task in its message, and Flower
    # reads results from the task events: storing them in the result backend
    # too would cost two Redis writes of the whole state per stage.
    ignore_result = True
    # The repr of a stage's result (its payload: build, element, attempt,
    # then the state) goes into the "succeeded" event and log line; Celery
    # makes it up to this many characters, which cost a worker 4 % of its
    # GIL time at 1024 (issue 17). The start names the element.
    resultrepr_maxsize = 256
    # Retries are counted in the state (``transient_failures``), not by
    # Celery: ``execute`` also re-queues itself while an operation runs.
    max_retries = None
    stage = ""
    policy: FailurePolicy = DEFAULT_POLICY

    def runtime(self) -> WorkerRuntime:
        """This worker's shared runtime (see :func:`tasks.app.create_app`)."""
        runtime: WorkerRuntime = self.app.remex_runtime.get()
        return runtime

    def begin(self, payload: Payload) -> tuple[WorkerRuntime, BuildSpec]:
        """Check the delivery is current; mark the element running at this stage."""
        rt = self.runtime()
        build, element = payload["build"], payload["element"]
        takes = getattr(self.app, "remex_takes", None)
        if takes is not None:
            takes.started(self.request.id or "")
        redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
        starts = start_batch(rt)
        if starts is not None and not redelivered:
            # Checked now (one read, or none for a later stage of a chain this
            # process runs), recorded within a fraction of a second in a batch
            # (issue 16). Only a message Redis delivered again is counted,
            # at once (max_deliveries).
            start = StageStart(
                build,
                element,
                int(payload["attempt"]),
                self.stage,
                rt.name,
                rt.instance,
                rt.holder,
                time.time(),
            )
            if not starts.begin(start):
                log.info("%s of %s (build %s) is stale; ignored", self.stage, element, build)
                raise Ignore()
            return rt, _SPECS.get(rt, build, element)
        deliveries = rt.scheduler.begin_stage(
            build,
            element,
            attempt=payload["attempt"],
            stage=self.stage,
            host=rt.name,
            worker=rt.instance,
            holder=rt.holder,
            task_id=self.request.id or "",
            retries=int(self.request.retries or 0),
        )
        if not deliveries:
            log.info("%s of %s (build %s) is stale; ignored", self.stage, element, build)
            raise Ignore()
        if deliveries > self.policy.max_deliveries:
            self.fail_element(
                rt,
                payload,
                f"{self.stage} was delivered {deliveries} times: the workers running it keep dying",
            )
        return rt, _SPECS.get(rt, build, element)

    def run_stage(
        self,
        payload: Payload,
        fn: StageFn,
        *,
        still_running: StillRunning | None = None,
        last: bool = False,
    ) -> Payload:
        """Run ``fn`` on the payload's state; on failure, do what the policy says.

        Args:
            payload: the task's argument.
            fn: the stage function.
            still_running: called when ``fn`` returned with its remote
                operation still running (see :func:`pipeline.stages.is_pending`);
                the task then re-queues itself to follow it later.
            last: the chain's last stage (the caller finishes the element).

        A stage that ends keeps holding the element: its chain's next message
        goes to this worker's own queue (see :meth:`retry_queue`), and the
        stage that takes it holds it next. Only a refused publish hands it on
        (:meth:`on_failure`).
        """
        rt, spec = self.begin(payload)
        holder = rt.holder
        state = cast(State, dict(payload["state"]))
        place = (payload["build"], payload["element"])
        if self.stage == "stage_to_cas":
            rt.staging.enter(place)
        elif self.stage not in _STAGING:
            rt.staging.leave(place)  # (its Execute call goes out now, if any)
        with heartbeat(rt, payload), pinned_stage(rt.context.local_cas, state):
            try:
                if state.get("reupload"):
                    # The policy sent the element back through upload.
                    state = upload(rt.context, spec, state)
                    state.pop("reupload", None)
                state = fn(rt.context, spec, state)
            except Exception as exc:
                rt.staging.leave(place)  # retried later, or failed
                raise self.handle_failure(rt, payload, state, exc, holder=holder) from exc
        state.pop("transient_failures", None)
        if still_running is not None and is_pending(state):
            still_running(rt, payload, state)
            raise self.requeue(rt, payload, state, 0.0, holder=holder)
        del last  # (the chain's next stage, if any, is published by Celery)
        return {**payload, "state": state}

    def hand_on(self, rt: WorkerRuntime, payload: Payload, holder: str) -> None:
        """This worker holds the element no more: its next message goes to a
        queue other workers consume, or its publish was refused (then the
        reconciler finds it in no queue and sends the element again)."""
        if (starts := start_batch(rt)) is not None:
            # (Its start, if not recorded yet, must not land after the hand-on.)
            starts.flush()
        rt.scheduler.hand_on(
            payload["build"], payload["element"], attempt=payload["attempt"], holder=holder
        )

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        """Celery could not publish the chain's next stage (Redis refused it,
        after retrying): hand the element on, so that the reconciler sends it
        again. (The stages' own errors never get here: they become a re-queue
        or :class:`ElementFailed`.)"""
        if not isinstance(exc, PUBLISH_ERRORS):
            return
        payload = args[0] if args else None
        if not isinstance(payload, dict) or "attempt" not in payload:
            return
        try:
            rt = self.runtime()
            self.hand_on(rt, payload, rt.holder)
        except Exception as error:  # the reconciler finds it after LOST_AFTER_HEARTBEATS
            log.warning("could not hand %s on: %s", payload.get("element"), error)

    def handle_failure(
        self, rt: WorkerRuntime, payload: Payload, state: State, exc: Exception, holder: str = ""
    ) -> Retry:
        """Act on the policy's verdict: fail the element (raises
        :class:`ElementFailed`) or return the re-queue to raise."""
        failures = int(state.get("transient_failures", 0)) + 1
        verdict = self.policy.decide(
            self.stage, exc, failures=failures, reuploads=int(state.get("reuploads", 0))
        )
        if verdict.fails_element:
            if isinstance(exc, BuildFailedError):
                self.fail_element(
                    rt, payload, exc.reason, log_tail=exc_log_tail(exc), exit_code=exc.exit_code
                )
            self.fail_element(rt, payload, verdict.reason)
        if not isinstance(exc, RemexError):
            # Not one of remex's errors: a bug or the host's trouble (disk
            # full ...). Retried like a transient error, then the element
            # fails with it, rather than stalling the build.
            log.exception("%s of %s: unexpected error", self.stage, payload["element"])
        new = state.copy()
        if verdict.decision is Decision.REUPLOAD:
            log.warning("%s of %s: %s; uploading again", self.stage, payload["element"], exc)
            new = without_operation(new)
            new["reuploads"] = int(state.get("reuploads", 0)) + 1
            new["reupload"] = True
        else:
            log.warning(
                "%s of %s: transient error, retrying in %.1f s: %s",
                self.stage,
                payload["element"],
                verdict.delay,
                exc,
            )
            new["transient_failures"] = failures
        return self.requeue(rt, payload, new, verdict.delay, exc, holder=holder or rt.holder)

    def requeue(
        self,
        rt: WorkerRuntime,
        payload: Payload,
        state: State,
        countdown: float,
        exc: Exception | None = None,
        *,
        holder: str = "",
    ) -> Retry:
        """Send this task again with ``state``, after ``countdown`` seconds,
        to :meth:`retry_queue`. This worker keeps holding the element when
        that is its own queue; else, or when the publish is refused, it hands
        the element on."""
        queue = self.retry_queue(rt)
        own = queue == host_queue(rt.name)
        if holder and not own:
            self.hand_on(rt, payload, holder)
        try:
            return self.retry(
                args=[{**payload, "state": state}],
                kwargs={},
                countdown=countdown,
                queue=queue,
                exc=exc,
                max_retries=None,
                **task_reprs(payload["build"], payload["element"], payload["attempt"]),
                **no_declare(self.app),
            )
        except Reject:
            # Celery could not publish the re-queue.
            if holder and own:
                with contextlib.suppress(Exception):
                    self.hand_on(rt, payload, holder)
            raise

    def retry_queue(self, rt: WorkerRuntime) -> str:
        """Where a retry goes: this worker's own queue. Once a chain runs on a
        worker its next message stays with it, so the element is only taken
        as lost when this worker is (see :mod:`pipeline.scheduler`)."""
        return host_queue(rt.name)

    def fail_element(self, rt: WorkerRuntime, payload: Payload, reason: str, **extra: Any) -> None:
        """Mark the element failed (and its dependents skipped); stop the chain."""
        if (starts := start_batch(rt)) is not None:
            # (Its start, if not recorded yet, goes with the failure.)
            extra = {**starts.forget(payload["build"], payload["element"]), **extra}
        fail_element(
            self.app,
            rt.scheduler,
            payload["build"],
            payload["element"],
            {"error": reason, "failed_stage": self.stage, **extra},
            # (on-error terminate: the build's running operations)
            cancel_operation=lambda name: rt.context.executor.cancel(name),
        )
        raise ElementFailed(f"{payload['element']}: {reason}")

    def progress(self, payload: Payload, **fields: Any) -> None:
        """A ``task-progress`` event (Flower's event stream shows it live)."""
        fields = {
            "build": payload["build"],
            "element": payload["element"],
            "stage": self.stage,
            **fields,
        }
        with contextlib.suppress(Exception):  # monitoring must never fail a build
            # The worker's batched task events (tasks.app.BatchedTaskEvents),
            # else a message of its own.
            dispatcher = getattr(self.app, "remex_events", None)
            if dispatcher is not None and dispatcher.enabled:
                dispatcher.send("task-progress", uuid=self.request.id, **fields)
            else:
                self.send_event("task-progress", **fields)


def exc_log_tail(exc: BuildFailedError) -> str:
    """The last lines the failed command printed (stdout, then stderr)."""
    parts = [
        tail.rstrip("\n") for tail in (exc.stdout_tail, exc.stderr_tail) if tail and tail.strip()
    ]
    return "\n".join(parts)


@dataclass
class _Beat:
    scheduler: Any
    build: str
    element: str
    interval: float
    due: float


class Heartbeats:
    """The heartbeats of the stages this worker process runs, all kept by
    one thread: a thread started and joined for each stage cost more than
    the rest of the task layer's bookkeeping (issue 17), and most stages end
    before their first beat.

    A stage's element is beaten every heartbeat interval from one interval
    after its start (until then the start stands for a heartbeat). A stage
    that ends while its own beat is under way waits for that beat (at most
    an interval: a beat may wait on a restarting Redis), so no beat lands
    after the stage's next move (its first beat marks the element's info,
    which that move reads to remove it)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._beats: dict[int, _Beat] = {}
        self._beating: set[int] = set()
        self._tokens = itertools.count()
        self._wake_at = math.inf
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def kept(self, rt: WorkerRuntime, payload: Payload) -> Iterator[None]:
        """Keep the payload's element's heartbeat fresh while the block runs."""
        interval = rt.heartbeat_interval
        beat = _Beat(
            rt.scheduler,
            payload["build"],
            payload["element"],
            interval,
            time.monotonic() + interval,
        )
        with self._cond:
            token = next(self._tokens)
            self._beats[token] = beat
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="remex-heartbeat", daemon=True
                )
                self._thread.start()
            elif beat.due < self._wake_at:
                self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                del self._beats[token]
                deadline = time.monotonic() + interval
                while token in self._beating:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                due = [(token, b) for token, b in self._beats.items() if b.due <= now]
                if not due:
                    self._wake_at = min((b.due for b in self._beats.values()), default=math.inf)
                    self._cond.wait(None if self._wake_at == math.inf else self._wake_at - now)
                    continue
                self._wake_at = now
                for token, b in due:
                    b.due = now + b.interval
                    self._beating.add(token)
                self._cond.release()
                try:
                    for _, b in due:
                        with contextlib.suppress(Exception):  # the next beat tries again
                            b.scheduler.heartbeat(b.build, b.element)
                finally:
                    self._cond.acquire()
                    self._beating.difference_update(token for token, _ in due)
                    self._cond.notify_all()


HEARTBEATS = Heartbeats()
"""This worker process's heartbeats (one thread for all its stages)."""


def heartbeat(rt: WorkerRuntime, payload: Payload) -> contextlib.AbstractContextManager[None]:
    """Keep the element's heartbeat fresh while a stage runs (see :class:`Heartbeats`)."""
    return HEARTBEATS.kept(rt, payload)


# --- the tasks ---------------------------------------------------------------------


def stage_to_cas_task(self: StageTask, payload: Payload) -> Payload:
    """Stage 1: input root and Action in the local CAS; ActionCache lookup."""
    result = self.run_stage(payload, stage_to_cas)
    # Data locality: the rest of the chain prefers this worker, which now
    # holds the input root in its local CAS.
    queue = host_queue(self.runtime().name)
    for signature in self.request.chain or ():
        signature.setdefault("options", {})["queue"] = queue
    return result


def upload_task(self: StageTask, payload: Payload) -> Payload:
    """Stage 2: upload what the execution CAS lacks."""
    result = self.run_stage(payload, upload)
    uploaded = result["state"].get("uploaded") or {}
    self.progress(payload, blobs_done=uploaded.get("blobs", 0), bytes_done=uploaded.get("bytes", 0))
    return result


def execute_task(self: StageTask, payload: Payload) -> Payload:
    """Stage 3: execute remotely; re-queue itself while the operation runs.

    Every re-queue goes to this worker's own queue, with the state (operation
    name, re-upload flag, failures in a row) in its arguments.
    """
    rt = self.runtime()

    def run(ctx: StageContext, spec: BuildSpec, state: State) -> State:
        return execute(
            ctx,
            spec,
            state,
            max_wait=EXECUTE_WAIT,
            # Recorded as soon as the server names it: status shows it and
            # cancel can cancel it while this task still follows it.
            on_operation=lambda name: note(rt, payload, {"operation": name}),
        )

    def still_running(rt: WorkerRuntime, payload: Payload, state: State) -> None:
        self.progress(
            payload,
            operation=state.get("operation"),
            remote_stage=state.get("remote_stage"),
            waited_seconds=round(float(state.get("timings", {}).get("execute", 0.0)), 1),
        )
        note(
            rt,
            payload,
            {"operation": state.get("operation"), "remote_stage": state.get("remote_stage")},
        )

    return self.run_stage(payload, run, still_running=still_running)


def note(rt: WorkerRuntime, payload: Payload, changes: dict[str, Any]) -> None:
    """Merge ``changes`` into the element's info: with this process's next
    batch of starts (a fraction of a second later, issue 16), else at once."""
    if (starts := start_batch(rt)) is None:
        rt.scheduler.note(payload["build"], payload["element"], changes)
        return
    starts.note(
        payload["build"],
        payload["element"],
        attempt=int(payload["attempt"]),
        stage="execute",
        changes=changes,
    )


def fetch_outputs_task(self: StageTask, payload: Payload) -> Payload:
    """Stage 4: download outputs and logs, verified; a non-zero exit fails the element."""
    return self.run_stage(payload, fetch_outputs)


def push_artifact_task(self: StageTask, payload: Payload) -> Payload:
    """Stage 5: push the artifact; mark the element built; send what became ready."""
    check = not first_push(self, payload)

    def push(ctx: StageContext, spec: BuildSpec, state: State) -> State:
        return push_artifact(ctx, spec, state, check_existing=check)

    result = self.run_stage(payload, push, last=True)
    rt = self.runtime()
    state = result["state"]
    info = {
        "artifact": state.get("artifact"),
        "exit_code": state.get("exit_code"),
        "action_cached": bool(state.get("cached") or state.get("remote_cache_hit")),
        "timings": state.get("timings"),
    }
    spec = _SPECS.get(rt, payload["build"], payload["element"])
    if (starts := start_batch(rt)) is not None:
        # Finished here: its start, if not recorded yet, goes with the finish.
        info = {**starts.forget(payload["build"], payload["element"]), **info}
    # The artifact index entry goes with the move (one script, issue 16).
    # The dependents it makes ready are sent in the same move (issue 16),
    # then published here.
    finished = rt.scheduler.finish_element(
        payload["build"],
        payload["element"],
        "built",
        info,
        artifact_uri=spec["artifact_uri"],
        index_entry=artifact_index_entry(spec),
        send=True,
    )
    send_ready(self.app, rt.scheduler, finished.ready)
    if (starts := start_batch(rt)) is not None:
        for recorded in finished.sent:
            if recorded.attempt:
                starts.expect(recorded.build, recorded.element, recorded.attempt)
    publish_sends(self.app, rt.scheduler, finished.sent)
    return result


def first_push(task: StageTask, payload: Payload) -> bool:
    """Whether this is the element's first push: the first delivery of its
    build's first attempt, never retried. Then no artifact can be under its
    URI but one pushed since submit looked (another build that claimed the
    same URI made this one wait on it instead), so the push needs no lookup
    first (a FetchDirectory saved per element, issue 17); pushing over such
    an artifact would only name an equivalent one."""
    redelivered = bool((task.request.delivery_info or {}).get("redelivered"))
    return int(payload.get("attempt") or 0) == 1 and not task.request.retries and not redelivered


def artifact_index_entry(spec: BuildSpec) -> str:
    """The pushed artifact's entry in the index ``remex artifact list --key``
    reads (:mod:`pipeline.artifact_index`), or "" for an artifact that is not
    an element's (an integrated checkout)."""
    from pipeline.spec import normal_name

    ref = ArtifactRef(spec["project"], normal_name(spec["element"]), spec["cache_key"])
    if ref.uri != spec["artifact_uri"]:
        return ""
    return index_entry(ref)


STAGE_TASKS: dict[str, Callable[[StageTask, Payload], Payload]] = {
    "stage_to_cas": stage_to_cas_task,
    "upload": upload_task,
    "execute": execute_task,
    "fetch_outputs": fetch_outputs_task,
    "push_artifact": push_artifact_task,
}


def register_stage_tasks(app: Celery) -> dict[str, StageTask]:
    """Register the five stage tasks on ``app`` (named ``remex.<stage>``).

    Returns:
        The registered tasks by stage.
    """
    registered: dict[str, StageTask] = {}
    for stage, fn in STAGE_TASKS.items():
        registered[stage] = app.task(bind=True, base=StageTask, name=f"remex.{stage}", stage=stage)(
            fn
        )
    return registered
