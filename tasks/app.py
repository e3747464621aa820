"""The Celery app the workers run: built by :func:`create_app`, never at import.

``remex worker`` calls :func:`create_app` with its configuration and name and
starts the worker with the right options (thread pool, queues, events, its
own local CAS). ``celery -A tasks.app ...`` (Flower, ``inspect ping``) works
too: the module attribute ``app`` is built on first access from the
configuration of the current folder and environment.
"""

from __future__ import annotations

import socket
import sys
import threading
from typing import Any

from celery import Celery, signals

from pipeline.broker import make_celery
from pipeline.config import RemexConfig, load_config
from tasks.flower import protect_metrics
from tasks.runtime import BackgroundLoops, RuntimeHolder, WorkerRuntime
from tasks.stages import register_stage_tasks
from tasks.stats import remex_stats  # noqa: F401  (registers the inspect command)

__all__ = ["create_app"]


def create_app(config: RemexConfig, *, worker_name: str | None = None) -> Celery:
    """A Celery app with remex's settings and the five stage tasks.

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
    loops = BackgroundLoops(app, holder)

    # Signals are process-wide: act only for this app's worker.
    def on_ready(sender: Any = None, **_: object) -> None:
        if getattr(sender, "app", None) is app:
            loops.start()

    def on_shutdown(sender: Any = None, **_: object) -> None:
        if getattr(sender, "app", None) is app:
            loops.stop()

    signals.worker_ready.connect(on_ready, weak=False)
    signals.worker_shutdown.connect(on_shutdown, weak=False)
    return app


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
