"""The Celery app the workers run, and the per-process things the tasks share.

``celery -A tasks.app worker`` works too, but ``remex worker`` starts it with
the right options (thread pool, queues, events, its own local CAS).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from celery import Celery, signals

from pipeline.broker import make_celery, reconcile
from pipeline.cas import LocalCas
from pipeline.config import RemexConfig, load_config
from pipeline.scheduler import Scheduler
from pipeline.stages import StageContext

log = logging.getLogger(__name__)

RECONCILE_INTERVAL = 5.0


def _project_dir() -> Path | None:
    value = os.environ.get("REMEX_PROJECT_DIR")
    return Path(value) if value else None


app: Celery = make_celery(load_config(_project_dir()))


@dataclass
class WorkerRuntime:
    """What every task of this worker process shares (all thread-safe)."""

    config: RemexConfig
    name: str
    context: StageContext
    scheduler: Scheduler


_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()


def worker_name() -> str:
    """This worker's name: ``REMEX_WORKER_NAME`` (set by ``remex worker``) or the host name."""
    return os.environ.get("REMEX_WORKER_NAME") or socket.gethostname()


def runtime() -> WorkerRuntime:
    """The worker's shared runtime, built on first use."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            config = load_config(_project_dir())
            cas = LocalCas(config.cas_dir, quota_bytes=config.cas_quota_bytes)
            context = StageContext.connect(
                cas, config.execution, config.artifact_endpoint, correlated_id=worker_name()
            )
            _runtime = WorkerRuntime(
                config, worker_name(), context, Scheduler.from_url(config.broker_url)
            )
        return _runtime


def _reconcile_forever(stop: threading.Event) -> None:
    while not stop.wait(RECONCILE_INTERVAL):
        try:
            rt = runtime()
            reconcile(app, rt.scheduler)
        except Exception:  # a Redis hiccup must not kill the loop
            log.exception("reconciler pass failed")


_stop_reconciler = threading.Event()


@signals.worker_ready.connect
def _start_reconciler(**_: object) -> None:
    thread = threading.Thread(
        target=_reconcile_forever, args=(_stop_reconciler,), name="remex-reconciler", daemon=True
    )
    thread.start()


@signals.worker_shutdown.connect
def _stop(**_: object) -> None:
    _stop_reconciler.set()


# Register the stage tasks (last: they import this module's names).
import tasks.stages  # noqa: E402, F401
