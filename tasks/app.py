"""The Celery app the workers run: built by :func:`create_app`, never at import.

``remex worker`` calls :func:`create_app` with its configuration and name and
starts the worker with the right options (thread pool, queues, events, its
own local CAS). ``celery -A tasks.app ...`` (Flower, ``inspect ping``) works
too: the module attribute ``app`` is built on first access from the
configuration of the current folder and environment.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
from typing import Any

from celery import Celery, bootsteps, signals

from pipeline.broker import TASK_STAGES, make_celery
from pipeline.config import RemexConfig, load_config
from tasks.fetch import register_fetch_task
from tasks.flower import protect_metrics
from tasks.runtime import BackgroundLoops, PendingTakes, RuntimeHolder, WorkerRuntime, take_delay
from tasks.stages import register_stage_tasks
from tasks.stats import remex_stats  # noqa: F401  (registers the inspect command)

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def create_app(config: RemexConfig, *, worker_name: str | None = None) -> Celery:
    """A Celery app with remex's settings, the five stage tasks and ``remex.fetch_source``.

    Args:
        config: where the broker and the servers are.
        worker_name: this worker's name (its own queue is ``remex.host.NAME``);
            default: the host name.

    Raises:
        ConfigError: no broker is configured and no stack is up.
    """
    name = worker_name or socket.gethostname()
    app = make_celery(config)
    holder = RuntimeHolder(lambda: WorkerRuntime.connect(config, name))
    # Read by the tasks (StageTask.runtime): late binding, no module global.
    app.remex_runtime = holder
    register_stage_tasks(app)
    register_fetch_task(app)
    loops = BackgroundLoops(app, holder)
    # Read by StageTask.begin: a stage that starts needs no take of its own.
    app.remex_takes = takes = PendingTakes(holder, take_delay(config))

    # Signals are process-wide: act only for this app's worker.
    def on_ready(sender: Any = None, **_: object) -> None:
        if getattr(sender, "app", None) is app:
            loops.start()

    def on_shutdown(sender: Any = None, **_: object) -> None:
        if getattr(sender, "app", None) is app:
            loops.stop()

    def on_received(sender: Any = None, request: Any = None, **_: object) -> None:
        if getattr(sender, "app", None) is app and request is not None:
            record_taken(takes, request)

    signals.worker_ready.connect(on_ready, weak=False)
    signals.worker_shutdown.connect(on_shutdown, weak=False)
    signals.task_received.connect(on_received, weak=False)
    app.steps["consumer"].add(BrokerEpoch)
    return app


class BrokerEpoch(bootsteps.StartStopStep):  # type: ignore[misc]
    """Starts a new epoch each time the worker's consumer (re)connects to the
    broker. On a lost connection Celery drops the messages it had taken but
    not started (their delivery tags died with the channel); the new epoch
    tells the reconciler that whatever the old one held is gone."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def start(self, c: Any) -> None:
        holder: RuntimeHolder = c.app.remex_runtime
        try:
            holder.get().new_epoch()
        except Exception as exc:  # never stop the consumer for it
            log.warning("could not start a new broker epoch: %s", exc)


def record_taken(takes: PendingTakes, request: Any) -> None:
    """A stage message arrived (maybe prefetched, maybe with a countdown):
    record this worker as its holder if it does not start at once (see
    :class:`tasks.runtime.PendingTakes`), so the reconciler knows whom to watch."""
    stage = str(getattr(request, "name", "") or "").removeprefix("remex.")
    if stage not in TASK_STAGES:
        return
    try:
        args = request.args
        payload = args[0] if args else None
        if not isinstance(payload, dict) or "attempt" not in payload:
            return
        takes.received(
            str(request.id),
            payload["build"],
            payload["element"],
            int(payload["attempt"]),
            stage,
        )
    except Exception as exc:  # the reconciler copes without it
        log.warning("could not record a received task: %s", exc)


_default: Celery | None = None
_default_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    """``tasks.app.app``: the app ``celery -A tasks.app`` finds, built on first access."""
    global _default
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _default_lock:
        if _default is None:
            if "flower" in sys.modules:
                # `celery -A tasks.app flower`: the CLI loaded Flower's command.
                protect_metrics()
            _default = create_app(load_config())
        return _default
