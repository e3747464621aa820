"""The Celery app the workers run, and the per-process things the tasks share.

``celery -A tasks.app worker`` works too, but ``remex worker`` starts it with
the right options (thread pool, queues, events, its own local CAS).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from celery import Celery, signals

from pipeline.broker import make_celery, reconcile
from pipeline.cas import LocalCas
from pipeline.config import RemexConfig, load_config
from pipeline.scheduler import Scheduler
from pipeline.stages import StageContext

log = logging.getLogger(__name__)


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
    instance: str
    """This process, as its liveness key names it: ``NAME/PID/RANDOM``."""

    @property
    def heartbeat_interval(self) -> float:
        """How often a stage refreshes its element's heartbeat (a third of the timeout)."""
        return min(5.0, self.scheduler.heartbeat_timeout / 3)


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
                cas,
                config.execution,
                config.artifact_endpoint,
                storage=config.storage,
                action_cache=config.action_cache,
                correlated_id=worker_name(),
            )
            scheduler = Scheduler.from_url(
                config.broker_url, heartbeat_timeout=config.heartbeat_timeout
            )
            instance = f"{worker_name()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
            _runtime = WorkerRuntime(config, worker_name(), context, scheduler, instance)
        return _runtime


def _every(interval: float, stop: threading.Event, what: str, fn: Callable[[], object]) -> None:
    while True:
        try:
            fn()
        except Exception:  # a Redis hiccup must not kill the loop
            log.exception("%s failed", what)
        if stop.wait(interval):
            return


def _keep_alive() -> None:
    rt = runtime()
    rt.scheduler.worker_alive(rt.instance)


def _reconcile() -> None:
    rt = runtime()
    reconcile(app, rt.scheduler, lock_seconds=rt.config.reconcile_interval)


_stop_threads = threading.Event()


@signals.worker_ready.connect
def _start_threads(**_: object) -> None:
    """The liveness key (its elements are not re-sent while it lives) and the reconciler."""
    _stop_threads.clear()
    config = runtime().config
    for what, interval, fn in (
        ("liveness", config.heartbeat_timeout / 3, _keep_alive),
        ("reconciler", config.reconcile_interval, _reconcile),
    ):
        threading.Thread(
            target=_every,
            args=(interval, _stop_threads, what, fn),
            name=f"remex-{what}",
            daemon=True,
        ).start()


@signals.worker_shutdown.connect
def _stop(**_: object) -> None:
    _stop_threads.set()
    if _runtime is not None:
        with contextlib.suppress(Exception):
            _runtime.scheduler.worker_gone(_runtime.instance)


# Register the stage tasks (last: they import this module's names).
import tasks.stages  # noqa: E402, F401
