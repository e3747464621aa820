"""The five stage tasks: each decodes its payload, calls one function of
:mod:`pipeline.stages`, and maps errors to a retry or to the element's failure.

A payload is ``{"build", "element", "attempt", "state"}``; each task returns
the same with the new state, which Celery's chain hands to the next task.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Retry

from pipeline.broker import host_queue, send_ready, task_label
from pipeline.errors import MissingBlobsError, RemexError
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
from tasks.app import WorkerRuntime, app, runtime

log = logging.getLogger(__name__)

# How often a message may be delivered again after its worker died, before
# the element fails (Redis keeps no delivery count, so remex does).
MAX_DELIVERIES = 3
# Transient failures of one stage retried before the element fails.
MAX_TRANSIENT_RETRIES = 5
# The execute task follows an operation this long, then re-queues itself.
EXECUTE_WAIT = 10.0
MAX_REUPLOADS = 2

Payload = dict[str, Any]
StageFn = Callable[[StageContext, BuildSpec, State], State]


class ElementFailed(RemexError):
    """The element failed for good (recorded in the scheduler); ends its chain.

    Raised so that Celery records the task as FAILURE with the reason (and
    Flower shows it); listed in the tasks' ``throws``, so it is logged
    without a traceback.
    """


class StageTask(Task):  # type: ignore[misc]
    """Common behaviour of the stage tasks."""

    abstract = True
    throws = (ElementFailed,)
    acks_late = True
    reject_on_worker_lost = True
    max_retries = MAX_TRANSIENT_RETRIES
    stage = ""

    def begin(self, payload: Payload) -> tuple[WorkerRuntime, BuildSpec]:
        """Check the delivery is current; mark the element running at this stage."""
        rt = runtime()
        build, element = payload["build"], payload["element"]
        delivery_key = f"remex:delivery:{self.request.id}:{self.request.retries}"
        deliveries = rt.scheduler.redis.incr(delivery_key)
        rt.scheduler.redis.expire(delivery_key, 24 * 3600)
        if not rt.scheduler.start_stage(
            build,
            element,
            attempt=payload["attempt"],
            stage=self.stage,
            host=rt.name,
            worker=rt.instance,
        ):
            log.info("%s of %s (build %s) is stale; ignored", self.stage, element, build)
            raise Ignore()
        if int(deliveries) > MAX_DELIVERIES:
            self.fail_element(
                rt,
                payload,
                f"{self.stage} was delivered {deliveries} times: the workers running it keep dying",
            )
        return rt, rt.scheduler.spec(build, element)

    def fail_element(self, rt: WorkerRuntime, payload: Payload, reason: str, **extra: Any) -> None:
        """Mark the element failed (and its dependents skipped); stop the chain."""
        ready = rt.scheduler.finish(
            payload["build"],
            payload["element"],
            "failed",
            {"error": reason, "failed_stage": self.stage, **extra},
        )
        send_ready(self.app, rt.scheduler, ready)
        raise ElementFailed(f"{payload['element']}: {reason}")

    def progress(self, payload: Payload, **fields: Any) -> None:
        """A ``task-progress`` event (Flower's event stream shows it live)."""
        with contextlib.suppress(Exception):  # monitoring must never fail a build
            self.send_event(
                "task-progress",
                build=payload["build"],
                element=payload["element"],
                stage=self.stage,
                **fields,
            )

    def fail_build_failed(self, rt: WorkerRuntime, payload: Payload, exc: BuildFailedError) -> None:
        """The element's build failed (its command, say): keep the reason and the log tail."""
        self.fail_element(
            rt, payload, exc.reason, log_tail=exc_log_tail(exc), exit_code=exc.exit_code
        )

    def retry_transient(self, rt: WorkerRuntime, payload: Payload, exc: Exception) -> Retry:
        """Retry after a transient error with backoff and jitter, or fail when spent.

        The retry goes to this worker's own queue: once a chain runs on a
        worker its next message stays with it, so the element is only taken
        as lost when this worker is (see :mod:`pipeline.scheduler`).
        """
        if self.request.retries >= MAX_TRANSIENT_RETRIES:
            self.fail_element(
                rt, payload, f"{self.stage} failed {self.request.retries + 1} times: {exc}"
            )
        countdown = backoff(self.request.retries + 1)
        log.warning(
            "%s of %s: transient error, retrying in %.1f s: %s",
            self.stage,
            payload["element"],
            countdown,
            exc,
        )
        return self.retry(
            exc=exc,
            countdown=countdown,
            max_retries=MAX_TRANSIENT_RETRIES,
            queue=host_queue(rt.name),
            argsrepr=task_label(payload["build"], payload["element"], payload["attempt"]),
        )

    def run_stage(self, payload: Payload, fn: StageFn) -> Payload:
        rt, spec = self.begin(payload)
        with heartbeat(rt, payload):
            try:
                state = fn(rt.context, spec, dict(payload["state"]))
            except BuildFailedError as exc:
                self.fail_build_failed(rt, payload, exc)
            except RemexError as exc:
                if exc.transient:
                    raise self.retry_transient(rt, payload, exc) from exc
                self.fail_element(rt, payload, f"{self.stage}: {exc}")
            except Exception as exc:
                # Not one of remex's errors: a bug or the host's trouble (disk
                # full ...). Retried like a transient error, then the element
                # fails with it, rather than stalling the build.
                log.exception("%s of %s: unexpected error", self.stage, payload["element"])
                raise self.retry_transient(rt, payload, exc) from exc
        return {**payload, "state": state}


def backoff(failures: int) -> float:
    """Seconds to wait after ``failures`` failures in a row: exponential, capped, jittered."""
    return min(60.0, 2.0 ** (failures - 1)) * random.uniform(0.5, 1.0)


def exc_log_tail(exc: BuildFailedError) -> str:
    """The last lines the failed command printed (stdout, then stderr)."""
    parts = [
        tail.rstrip("\n") for tail in (exc.stdout_tail, exc.stderr_tail) if tail and tail.strip()
    ]
    return "\n".join(parts)


@contextlib.contextmanager
def heartbeat(rt: WorkerRuntime, payload: Payload) -> Iterator[None]:
    """Keep the element's heartbeat fresh while a stage runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(rt.heartbeat_interval):
            with contextlib.suppress(Exception):
                rt.scheduler.heartbeat(payload["build"], payload["element"])

    thread = threading.Thread(target=beat, name="remex-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


@app.task(bind=True, base=StageTask, name="remex.stage_to_cas", stage="stage_to_cas")
def stage_to_cas_task(self: StageTask, payload: Payload) -> Payload:
    """Stage 1: input root and Action in the local CAS; ActionCache lookup."""
    result = self.run_stage(payload, stage_to_cas)
    # Data locality: the rest of the chain prefers this worker, which now
    # holds the input root in its local CAS.
    queue = host_queue(runtime().name)
    for signature in self.request.chain or ():
        signature.setdefault("options", {})["queue"] = queue
    return result


@app.task(bind=True, base=StageTask, name="remex.upload", stage="upload")
def upload_task(self: StageTask, payload: Payload) -> Payload:
    """Stage 2: upload what the execution CAS lacks."""
    result = self.run_stage(payload, upload)
    uploaded = result["state"].get("uploaded") or {}
    self.progress(payload, blobs_done=uploaded.get("blobs", 0), bytes_done=uploaded.get("bytes", 0))
    return result


@app.task(bind=True, base=StageTask, name="remex.execute", stage="execute", max_retries=None)
def execute_task(self: StageTask, payload: Payload) -> Payload:
    """Stage 3: execute remotely; re-queue itself while the operation runs.

    Every re-queue goes to this worker's own queue, with the state (operation
    name, re-upload flag, failures in a row) in its arguments.
    """
    rt, spec = self.begin(payload)
    state = dict(payload["state"])
    own_queue = host_queue(rt.name)

    def again(countdown: float, exc: Exception | None = None) -> Retry:
        return self.retry(
            args=[{**payload, "state": state}],
            countdown=countdown,
            queue=own_queue,
            exc=exc,
            argsrepr=task_label(payload["build"], payload["element"], payload["attempt"]),
        )

    with heartbeat(rt, payload):
        try:
            if state.get("reupload"):
                state = upload(rt.context, spec, state)
                state.pop("reupload", None)
            state = execute(
                rt.context,
                spec,
                state,
                max_wait=EXECUTE_WAIT,
                # Recorded as soon as the server names it: status shows it and
                # cancel can cancel it while this task still follows it.
                on_operation=lambda name: rt.scheduler.note(
                    payload["build"], payload["element"], {"operation": name}
                ),
            )
            state.pop("transient_failures", None)
        except MissingBlobsError as exc:
            # The execution CAS lost inputs: back through upload, then again.
            reuploads = int(state.get("reuploads", 0)) + 1
            if reuploads > MAX_REUPLOADS:
                self.fail_element(rt, payload, f"execute: {exc} (after {MAX_REUPLOADS} re-uploads)")
            log.warning("execute of %s: %s; uploading again", payload["element"], exc)
            state.update(reuploads=reuploads, reupload=True)
            state.pop("operation", None)
            raise again(0) from exc
        except BuildFailedError as exc:
            self.fail_build_failed(rt, payload, exc)
        except Exception as exc:
            # Transient RemexErrors, and errors that are not remex's (a bug, the
            # host's trouble): retried with backoff, a bounded number of times in a row.
            transient = exc.transient if isinstance(exc, RemexError) else True
            failures = int(state.get("transient_failures", 0)) + 1
            if not transient or failures > MAX_TRANSIENT_RETRIES:
                self.fail_element(rt, payload, f"execute: {exc}")
            if not isinstance(exc, RemexError):
                log.exception("execute of %s: unexpected error", payload["element"])
            countdown = backoff(failures)
            log.warning(
                "execute of %s: transient error, retrying in %.1f s: %s",
                payload["element"],
                countdown,
                exc,
            )
            state["transient_failures"] = failures
            raise again(countdown, exc) from exc
    if is_pending(state):
        self.progress(
            payload,
            operation=state.get("operation"),
            remote_stage=state.get("stage"),
            waited_seconds=round(float(state.get("timings", {}).get("execute", 0.0)), 1),
        )
        rt.scheduler.note(
            payload["build"],
            payload["element"],
            {"operation": state.get("operation"), "remote_stage": state.get("stage")},
        )
        raise again(0)
    return {**payload, "state": state}


@app.task(bind=True, base=StageTask, name="remex.fetch_outputs", stage="fetch_outputs")
def fetch_outputs_task(self: StageTask, payload: Payload) -> Payload:
    """Stage 4: download outputs and logs, verified; a non-zero exit fails the element."""
    return self.run_stage(payload, fetch_outputs)


@app.task(bind=True, base=StageTask, name="remex.push_artifact", stage="push_artifact")
def push_artifact_task(self: StageTask, payload: Payload) -> Payload:
    """Stage 5: push the artifact; mark the element built; send what became ready."""
    result = self.run_stage(payload, push_artifact)
    rt = runtime()
    state = result["state"]
    info = {
        "artifact": state.get("artifact"),
        "exit_code": state.get("exit_code"),
        "action_cached": bool(state.get("cached") or state.get("remote_cache_hit")),
        "timings": state.get("timings"),
    }
    ready = rt.scheduler.finish(payload["build"], payload["element"], "built", info)
    send_ready(self.app, rt.scheduler, ready)
    return result
