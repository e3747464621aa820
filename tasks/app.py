"""The Celery app the workers run: built by :func:`create_app`, never at import.

``remex worker`` calls :func:`create_app` with its configuration and name and
starts the worker with the right options (thread pool, queues, events, its
own local CAS). ``celery -A tasks.app ...`` (Flower, ``inspect ping``) works
too: the module attribute ``app`` is built on first access from the
configuration of the current folder and environment.
"""

from __future__ import annotations

import gc
import logging
import socket
import sys
import threading
from typing import Any

from celery import Celery, bootsteps, signals
from celery.app import trace as celery_trace

from pipeline.broker import TASK_STAGES, make_celery
from pipeline.config import RemexConfig, load_config
from tasks.fetch import register_fetch_task
from tasks.flower import protect_metrics
from tasks.runtime import BackgroundLoops, PendingTakes, RuntimeHolder, WorkerRuntime, take_delay
from tasks.stages import register_stage_tasks
from tasks.stats import remex_stats  # noqa: F401  (registers the inspect command)

__all__ = ["create_app"]

log = logging.getLogger(__name__)

# Task events (for Flower) are sent in batches: at most this long after they
# happen, or when this many are waiting (issue 16: one PUBLISH for many
# events instead of one each).
EVENT_FLUSH_SECONDS = 0.5
EVENT_BATCH = 100


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
            # What the worker made to start (modules, the app, protobuf
            # descriptors) lives as long as it does: out of the collector's
            # generations, an old-generation collection walks only what the
            # stages made since (issue 17: 1.4 % of a worker's CPU was gc).
            gc.freeze()
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
    signals.after_setup_logger.connect(quiet_task_lines, weak=False)
    app.steps["consumer"].add(BrokerEpoch)
    app.steps["consumer"].add(BatchedTaskEvents)
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


class BatchedTaskEvents(bootsteps.StartStopStep):  # type: ignore[misc]
    """Sends the worker's task events (``task-received``, ``-started``,
    ``-succeeded`` ..., and the stages' ``task-progress``) in batches, one
    message (a list of events, which Celery's event receivers and so Flower
    read as each event in turn) every :data:`EVENT_FLUSH_SECONDS` or
    :data:`EVENT_BATCH` events, instead of one PUBLISH per event: three per
    stage task, fifteen per element (issue 16). Celery buffers only until its
    event loop's next turn, which is one message per event here.

    The worker's own events (``worker-heartbeat`` ...) are sent as before.
    The batches are sent from the consumer's event loop (a timer, as Celery
    sends its own buffered events), so a flush never races the consumer's
    restart after a lost connection (the timer goes with the connection and
    comes back with the next); a worker without an event loop uses a thread.
    """

    requires = {"celery.worker.consumer.events:Events"}

    def __init__(self, c: Any, **kwargs: Any) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Any = None
        super().__init__(c, **kwargs)

    def start(self, c: Any) -> None:
        self._consumer = c
        dispatcher = c.event_dispatcher
        if dispatcher is None or not dispatcher.enabled:
            return
        dispatcher.buffer_group = frozenset({"task"})
        dispatcher.buffer_limit = EVENT_BATCH
        dispatcher.on_send_buffered = None
        # Read by StageTask.progress: its events join the batches.
        c.app.remex_events = dispatcher
        hub = getattr(c, "hub", None)
        if hub is not None:
            hub.call_repeatedly(EVENT_FLUSH_SECONDS, self.flush)
        elif self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="remex-task-events", daemon=True)
            self._thread.start()

    def stop(self, c: Any) -> None:
        self.flush()

    def shutdown(self, c: Any) -> None:
        self._stop.set()
        self.flush()

    def flush(self) -> None:
        """Send the events waiting now (a broken connection keeps them for the next)."""
        dispatcher = getattr(self._consumer, "event_dispatcher", None)
        if dispatcher is not None:
            try:
                dispatcher.flush()
            except Exception as exc:  # monitoring must never stop the worker
                log.warning("could not send task events: %s", exc)

    def _run(self) -> None:
        while not self._stop.wait(EVENT_FLUSH_SECONDS):
            self.flush()


RECEIVED_LOGGER = "celery.worker.strategy"
"""The logger of Celery's INFO line for each task a worker receives."""
SUCCESS_LOGGER = "celery.app.trace"
"""The logger of Celery's INFO line for each task that ends ("Task ...
succeeded in ...", and failures, retries)."""
SUCCESS_LINES_KEPT = frozenset({"remex.push_artifact", "remex.fetch_source"})
"""The tasks whose "succeeded" line a worker writes at INFO: a node's last
task (the worker's record of what it built; the fault tests count pushes by
it)."""


class _NodeEndsOnly(logging.Filter):
    """Lets through every record but the "succeeded" line of a task not in
    :data:`SUCCESS_LINES_KEPT`."""

    def filter(self, record: logging.LogRecord) -> bool:
        data = getattr(record, "data", None)
        if record.msg != celery_trace.LOG_SUCCESS or not isinstance(data, dict):
            return True
        return data.get("name") in SUCCESS_LINES_KEPT


_NODE_ENDS_ONLY = _NodeEndsOnly()


def quiet_task_lines(loglevel: Any = None, **_: object) -> None:
    """Unless the worker logs at DEBUG, drop Celery's "Task ... received"
    line and its "succeeded" line of every stage but a node's last.

    Formatting and writing them (a write to the worker's log each) cost a
    worker about a tenth of its CPU per element (issue 17), and Flower
    shows the same from the task events. Failures, retries, the
    ``push_artifact`` and ``fetch_source`` ends and remex's own lines stay.
    Connected to Celery's ``after_setup_logger``: the worker reads the
    levels when it builds its task strategies and tracers, after its logging
    is set up."""
    level = (
        loglevel
        if isinstance(loglevel, int)
        else logging.getLevelName(str(loglevel or "INFO").upper())
    )
    quiet = not isinstance(level, int) or level > logging.DEBUG
    logging.getLogger(RECEIVED_LOGGER).setLevel(logging.WARNING if quiet else logging.NOTSET)
    success = logging.getLogger(SUCCESS_LOGGER)
    if quiet:
        success.addFilter(_NODE_ENDS_ONLY)
    else:
        success.removeFilter(_NODE_ENDS_ONLY)


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
