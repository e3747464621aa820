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

from pipeline.broker import host_queue, send_ready
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
HEARTBEAT_INTERVAL = 5.0
MAX_REUPLOADS = 2

Payload = dict[str, Any]
StageFn = Callable[[StageContext, BuildSpec, State], State]


class StageTask(Task):  # type: ignore[misc]
    """Common behaviour of the stage tasks."""

    abstract = True
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
            build, element, attempt=payload["attempt"], stage=self.stage, host=rt.name
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
        raise Ignore()

    def retry_transient(self, rt: WorkerRuntime, payload: Payload, exc: RemexError) -> Retry:
        """Retry after a transient error with backoff and jitter, or fail when spent."""
        if self.request.retries >= MAX_TRANSIENT_RETRIES:
            self.fail_element(
                rt, payload, f"{self.stage} failed {self.request.retries + 1} times: {exc}"
            )
        countdown = min(60.0, 2.0**self.request.retries) * random.uniform(0.5, 1.0)
        log.warning(
            "%s of %s: transient error, retrying in %.1f s: %s",
            self.stage,
            payload["element"],
            countdown,
            exc,
        )
        return self.retry(exc=exc, countdown=countdown, max_retries=MAX_TRANSIENT_RETRIES)

    def run_stage(self, payload: Payload, fn: StageFn) -> Payload:
        rt, spec = self.begin(payload)
        with heartbeat(rt, payload):
            try:
                state = fn(rt.context, spec, dict(payload["state"]))
            except BuildFailedError as exc:
                self.fail_element(rt, payload, str(exc), log_tail=exc_log_tail(exc))
            except RemexError as exc:
                if exc.transient:
                    raise self.retry_transient(rt, payload, exc) from exc
                self.fail_element(rt, payload, f"{self.stage}: {exc}")
        return {**payload, "state": state}


def exc_log_tail(exc: BuildFailedError) -> str:
    return str(getattr(exc, "log_tail", "") or "")


@contextlib.contextmanager
def heartbeat(rt: WorkerRuntime, payload: Payload) -> Iterator[None]:
    """Keep the element's heartbeat fresh while a stage runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_INTERVAL):
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
    return self.run_stage(payload, upload)


@app.task(bind=True, base=StageTask, name="remex.execute", stage="execute", max_retries=None)
def execute_task(self: StageTask, payload: Payload) -> Payload:
    """Stage 3: execute remotely; re-queue itself while the operation runs."""
    rt, spec = self.begin(payload)
    state = dict(payload["state"])
    with heartbeat(rt, payload):
        try:
            state = execute(rt.context, spec, state, max_wait=EXECUTE_WAIT)
        except MissingBlobsError as exc:
            # The execution CAS lost inputs: back through upload, then again.
            reuploads = int(state.get("reuploads", 0)) + 1
            if reuploads > MAX_REUPLOADS:
                self.fail_element(rt, payload, f"execute: {exc} (after {MAX_REUPLOADS} re-uploads)")
            state = upload(rt.context, spec, {**state, "reuploads": reuploads})
            state.pop("operation", None)
            raise self.retry(args=[{**payload, "state": state}], countdown=0) from exc
        except BuildFailedError as exc:
            self.fail_element(rt, payload, str(exc), log_tail=exc_log_tail(exc))
        except RemexError as exc:
            failures = int(state.get("transient_failures", 0)) + 1
            if not exc.transient or failures > MAX_TRANSIENT_RETRIES:
                self.fail_element(rt, payload, f"execute: {exc}")
            countdown = min(60.0, 2.0**failures) * random.uniform(0.5, 1.0)
            state["transient_failures"] = failures
            raise self.retry(args=[{**payload, "state": state}], countdown=countdown) from exc
    if is_pending(state):
        rt.scheduler.note(
            payload["build"],
            payload["element"],
            {"operation": state.get("operation"), "remote_stage": state.get("stage")},
        )
        raise self.retry(args=[{**payload, "state": state}], countdown=0)
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
