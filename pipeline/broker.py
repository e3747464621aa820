"""The Celery side of the scheduler: the app's settings and sending element chains.

``pipeline`` never imports ``tasks``: it names the stage tasks by string and
sends them with a Celery app configured here, which the worker's app
(:mod:`tasks.app`) is built from as well, so both sides agree.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery, chain, uuid

from pipeline.config import RemexConfig
from pipeline.scheduler import DEFAULT_KEYS, ElementState, Scheduler
from pipeline.stages.policy import DEFAULT_POLICY

log = logging.getLogger(__name__)

DEFAULT_QUEUE = "remex"
STAGES = ("stage_to_cas", "upload", "execute", "fetch_outputs", "push_artifact")
TASK_NAMES = {stage: f"remex.{stage}" for stage in STAGES}
# Message priority per stage (kombu's Redis transport serves lower numbers
# first): the short stages that finish an element go before those that start
# one, so a worker whose threads wait on executions does not leave finished
# actions queued behind new ones.
STAGE_PRIORITY = {
    "stage_to_cas": 6,
    "upload": 3,
    "execute": 6,
    "fetch_outputs": 0,
    "push_artifact": 0,
}

# Longer than any task's run time or retry countdown (kombu re-delivers an
# unacknowledged message after this long): a dead worker's element is
# re-sent by the reconciler long before, and the late copy finds itself stale.
VISIBILITY_TIMEOUT = 6 * 3600
RESULT_EXPIRES = 7 * 24 * 3600
RECONCILE_LOCK = DEFAULT_KEYS.reconciler
MAX_ATTEMPTS = DEFAULT_POLICY.max_sends
"""An element whose chain was sent this many times (its workers kept dying)
fails instead of being sent again."""


def task_label(build_id: str, element: str, attempt: int) -> str:
    """How a stage task's arguments read in Flower and in worker logs."""
    return f"{element} [build {build_id}, attempt {attempt}]"


def host_queue(worker_name: str) -> str:
    """The queue only the worker named ``worker_name`` consumes (data locality)."""
    return f"{DEFAULT_QUEUE}.host.{worker_name}"


def celery_settings(config: RemexConfig) -> dict[str, Any]:
    """The Celery settings remex runs with (worker and client alike).

    Raises:
        ConfigError: no broker is configured and no stack is up.
    """
    transport = {
        "visibility_timeout": VISIBILITY_TIMEOUT,
        # One Redis list per priority, served in this order.
        "priority_steps": sorted(set(STAGE_PRIORITY.values())),
    }
    return {
        "broker_url": config.require_broker(),
        "result_backend": config.backend_url,
        # JSON only: a pickle payload from the broker could run code.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        # A task is acknowledged when it ends, so a worker lost mid-task does
        # not lose the task; remex caps redeliveries itself (Redis keeps no count).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT},
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "broker_connection_retry_on_startup": True,
        # Events for Flower.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        "result_expires": RESULT_EXPIRES,
        "result_extended": True,
        "task_default_queue": DEFAULT_QUEUE,
        "worker_hijack_root_logger": False,
    }


def make_celery(config: RemexConfig) -> Celery:
    """A Celery app with remex's settings (no tasks registered).

    Raises:
        ConfigError: no broker is configured and no stack is up.
    """
    app = Celery("remex")
    app.conf.update(celery_settings(config))
    return app


def send_element(app: Celery, scheduler: Scheduler, build_id: str, element: str) -> str:
    """Send an element's five-stage chain, unless another build is already
    building the same artifact (then this element waits on it).

    Returns "sent", "waiting", or "not sent" (the element finished or its
    build was cancelled meanwhile).
    """
    spec = scheduler.spec(build_id, element)
    owner = scheduler.claim(build_id, element, spec["artifact_uri"])
    if owner:
        scheduler.mark_waiting_on(build_id, element, owner)
        return "waiting"
    # Task ids chosen here, so the scheduler knows them before anything runs
    # (``cancel`` revokes them).
    task_ids = [uuid() for _ in STAGES]
    # Recorded before sending: a task that starts at once finds its attempt.
    attempt = scheduler.mark_queued(build_id, element, task_ids=task_ids)
    if not attempt:
        return "not sent"
    payload = {"build": build_id, "element": element, "attempt": attempt, "state": {}}
    label = task_label(build_id, element, attempt)
    signatures = [
        app.signature(TASK_NAMES["stage_to_cas"], args=(payload,)),
        *(app.signature(TASK_NAMES[stage]) for stage in STAGES[1:]),
    ]
    for stage, signature, task_id in zip(STAGES, signatures, task_ids, strict=True):
        signature.set(task_id=task_id, argsrepr=label, priority=STAGE_PRIORITY[stage])
    chain(*signatures).apply_async()
    return "sent"


def send_ready(app: Celery, scheduler: Scheduler, ready: list[tuple[str, str]]) -> None:
    """Send every (build, element) that became ready."""
    for build_id, element in ready:
        send_element(app, scheduler, build_id, element)


def reconcile(app: Celery, scheduler: Scheduler, *, lock_seconds: float = 5.0) -> int:
    """Re-send elements that are ready but were never sent, running ones whose
    worker died, and those waiting on another build's element that stopped.
    At most one pass per ``lock_seconds`` across all workers (a Redis lock).
    An element sent ``MAX_ATTEMPTS`` times fails instead. Returns how many
    elements were re-sent."""
    if not scheduler.try_reconciler_lock(lock_seconds):
        return 0
    resent = 0
    now = time.time()
    for build_id in scheduler.active_builds():
        for element, reason in scheduler.stalled(build_id, now):
            attempts = int(scheduler.info(build_id, element).get("attempt", 0))
            if attempts >= MAX_ATTEMPTS:
                log.error(
                    "%s of build %s: %s, after %d attempts", element, build_id, reason, attempts
                )
                ready = scheduler.finish(
                    build_id,
                    element,
                    ElementState.FAILED,
                    {"error": f"{reason} (sent {attempts} times; giving up)"},
                )
                send_ready(app, scheduler, ready)
                continue
            log.warning("re-sending %s of build %s: %s", element, build_id, reason)
            scheduler.note(build_id, element, {"resent_because": reason})
            if send_element(app, scheduler, build_id, element) == "sent":
                resent += 1
    return resent
