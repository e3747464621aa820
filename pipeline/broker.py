"""The Celery side of the scheduler: the app's settings and sending element chains.

``pipeline`` never imports ``tasks``: it names the stage tasks by string and
sends them with a Celery app configured here, which the worker's app
(:mod:`tasks.app`) is built from as well, so both sides agree.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import kombu.exceptions
import kombu.messaging
import redis
from celery import Celery, uuid
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual
from kombu.transport.virtual.base import queue_declare_ok_t  # type: ignore[attr-defined]

from pipeline.config import RemexConfig
from pipeline.scheduler import DEFAULT_KEYS, ElementState, Finished, RecordedSend, Scheduler
from pipeline.stages.policy import DEFAULT_POLICY

log = logging.getLogger(__name__)

DEFAULT_QUEUE = "remex"
FETCH_QUEUE = "remex.fetch"
"""The queue of the ``remex.fetch_source`` tasks: consumed by each worker's
fetch pool (``[worker] fetch-concurrency``), never by its build slots."""
STAGES = ("stage_to_cas", "upload", "execute", "fetch_outputs", "push_artifact")
FETCH_STAGE = "fetch_source"
"""The one task of a fetch node (a spec with ``fetch``): ``remex.fetch_source``."""
TASK_STAGES = (*STAGES, FETCH_STAGE)
"""Every task that works on a build node, and that the scheduler tracks."""
TASK_NAMES = {stage: f"remex.{stage}" for stage in TASK_STAGES}
# Message priority per stage (kombu's Redis transport serves lower numbers
# first): the short stages that finish an element go before those that start
# one, so a worker whose threads wait on executions does not leave finished
# actions queued behind new ones; and an element already staged goes on to
# its Execute before another element is staged, so the execution server gets
# work as soon as it can (a wide build's first 8 actions started 0.28 s
# after submit with execute at 6, 0.14-0.21 s at 3, in ``bench.pipeline``).
STAGE_PRIORITY = {
    "stage_to_cas": 6,
    "upload": 3,
    "execute": 3,
    "fetch_outputs": 0,
    "push_artifact": 0,
    # Alone on its queue: only builds' priorities order fetches.
    "fetch_source": 0,
}
# A build's priority (0-9, lower runs sooner, like REAPI's
# ``ExecutionPolicy.priority``) orders its messages ahead of the stage
# priority: a message's kombu priority is ``build * PRIORITY_SCALE + stage``,
# so every message of a priority-2 build goes before any of a priority-5
# build, and within a build the stage priorities above break ties.
BUILD_PRIORITIES = range(10)
DEFAULT_BUILD_PRIORITY = 5
PRIORITY_SCALE = 10
PRIORITY_STEPS = sorted(
    {
        build * PRIORITY_SCALE + stage
        for build in BUILD_PRIORITIES
        for stage in STAGE_PRIORITY.values()
    }
)
"""kombu's Redis priority steps: one Redis list per value, served lowest first."""


def message_priority(build_priority: int, stage: str) -> int:
    """The kombu priority of ``stage``'s message for a build of ``build_priority``."""
    return build_priority * PRIORITY_SCALE + STAGE_PRIORITY[stage]


# Longer than any task's run time or retry countdown (kombu re-delivers an
# unacknowledged message after this long): a dead worker's element is
# re-sent by the reconciler long before, and the late copy finds itself stale.
VISIBILITY_TIMEOUT = 6 * 3600
RESULT_EXPIRES = 7 * 24 * 3600
# A publish refused (Redis restarting) is retried for about this long
# (0, 0.5, 1, 1.5, 2, 2 ... s), by clients and by a worker publishing a
# chain's next stage alike; after that the element is left ``queued`` with no
# message and no holder, and the reconciler sends it again.
PUBLISH_RETRY_POLICY = {
    "max_retries": 18,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 2.0,
}
# kombu's Redis transport keeps one list per priority step: the queue's own
# name for priority 0, ``name + SEP + str(priority)`` for the others.
PRIORITY_SEP = "\x06\x16"
# What a refused publish raises (kombu wraps most; redis-py's may escape).
PUBLISH_ERRORS: tuple[type[BaseException], ...] = (
    kombu.exceptions.OperationalError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    ConnectionError,
)
# What a batch of publishes that failed raises (kombu 5.7: delivery
# uncertain, or a later publish into the failed batch), or a refused publish.
BATCH_ERRORS: tuple[type[BaseException], ...] = (
    *PUBLISH_ERRORS,
    *(
        (kombu.exceptions.BatchPublishError,)
        if hasattr(kombu.exceptions, "BatchPublishError")
        else ()
    ),
)
RECONCILE_LOCK = DEFAULT_KEYS.reconciler
MAX_ATTEMPTS = DEFAULT_POLICY.max_sends
"""An element whose chain was sent this many times (its workers kept dying)
fails instead of being sent again."""


def task_reprs(build_id: str, element: str, attempt: int) -> dict[str, str]:
    """A stage message's ``argsrepr`` (how its arguments read in Flower and
    in worker logs) and ``kwargsrepr`` (the tasks take no keyword
    arguments), given so that Celery does not make them itself: it walks the
    whole payload for the one, and reads its configuration for the other,
    at every publish (4 % of a worker's GIL time for the empty kwargs alone,
    issue 17)."""
    return {"argsrepr": f"{element} [build {build_id}, attempt {attempt}]", "kwargsrepr": "{}"}


def host_queue(worker_name: str) -> str:
    """The queue only the worker named ``worker_name`` consumes (data locality)."""
    return f"{DEFAULT_QUEUE}.host.{worker_name}"


class _RedisQoS(kombu_redis.QoS):  # type: ignore[misc]
    # See RedisTransport. kombu copies every message it delivers into
    # ``unacked`` (ZADD, HSET) and deletes it on ack (ZREM, HDEL): four Redis
    # commands per task, in MULTI ... EXEC six (issue 16), only so that the
    # copy comes back after the visibility timeout. remex never needs it: the
    # scheduler knows who holds each element's message and re-sends the
    # elements of a holder that died, and such a late copy is stale anyway.
    # So the bookkeeping stays in this process (kombu's virtual QoS: what
    # Celery acks), and nothing goes to Redis.
    def append(self, message: Any, delivery_tag: Any) -> None:
        kombu_virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]

    def ack(self, delivery_tag: Any) -> None:
        kombu_virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        # (No stage task asks for a requeue: a retry is a new message.)
        kombu_virtual.QoS.ack(self, delivery_tag)  # type: ignore[no-untyped-call]


class _RedisChannel(kombu_redis.Channel):  # type: ignore[misc]
    # See RedisTransport.
    do_restore = False
    # kombu clamps a message's priority to 0-9 by default; remex's combined
    # build and stage priorities go up to the last step.
    max_priority = PRIORITY_STEPS[-1]
    QoS = _RedisQoS

    @contextlib.contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        # kombu builds a new redis-py client (whose constructor is costly in
        # redis 8) for every message it publishes: a task's LPUSH, the
        # chain's next stage, each batch of task events (issue 17). One
        # client per channel and connection pool does: a redis-py client is
        # safe to share between threads (each command takes a connection
        # from the pool), and a new pool (kombu makes one after a fork or a
        # lost connection) gets a client of its own.
        if client:
            yield client
            return
        pool = self.pool
        shared = self.__dict__.get("_shared_client")
        if shared is None or shared[0] is not pool:
            made = self._create_client()  # type: ignore[no-untyped-call]
            shared = self.__dict__["_shared_client"] = (pool, made)
        yield shared[1]

    def queue_declare(self, queue: str | None = None, passive: bool = False, **kwargs: Any) -> Any:
        # A declare answers with the queue's length: one LLEN per priority
        # step (30 here) for each queue a worker consumes from, at every start
        # and reconnection (issue 16: about one Redis command per element of
        # a 100-element build). Nothing remex runs reads that count from a
        # declare that creates the queue (a Redis queue is a list a publish
        # makes), so only a passive declare, a question about the queue, pays
        # for it.
        if passive or not queue:
            return super().queue_declare(queue, passive, **kwargs)  # type: ignore[no-untyped-call]
        self._new_queue(queue, **kwargs)  # type: ignore[no-untyped-call]
        return queue_declare_ok_t(queue, 0, 0)

    # How many packed BRPOP commands a channel keeps (one per order of its
    # queues, which kombu rotates, and connection): a bound, not a tuning.
    _BRPOP_CACHE_SIZE = 64

    def _brpop_start(self, timeout: float | None = None) -> None:
        # kombu builds and packs the BRPOP command again for every message a
        # worker takes: one key per queue and priority step (30 steps, so 60
        # or more keys), each through ``_q_for_pri``'s bisect, then RESP
        # packing, about a tenth of the consumer loop's CPU (issue 17). The
        # command only changes with the order of the queues (kombu rotates
        # it), the timeout and the connection, so it is packed once for each.
        conn = self.client.connection
        if self.global_keyprefix or not isinstance(conn, redis.connection.AbstractConnection):
            super()._brpop_start(timeout)  # type: ignore[no-untyped-call]
            return
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        cache: dict[tuple[int, tuple[str, ...], float], tuple[Any, Any]]
        cache = self.__dict__.setdefault("_brpop_packed", {})
        key = (id(conn), tuple(queues), timeout or 0)
        entry = cache.get(key)
        if entry is None or entry[0] is not conn:
            keys = [
                self._q_for_pri(queue, pri)  # type: ignore[no-untyped-call]
                for pri in self.priority_steps
                for queue in queues
            ]
            if len(cache) >= self._BRPOP_CACHE_SIZE:
                cache.clear()
            packed = conn.pack_command("BRPOP", *keys, timeout or 0)  # type: ignore[no-untyped-call]
            entry = cache[key] = (conn, packed)
        self._in_poll = conn
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]
        conn.send_packed_command(entry[1])


class RedisTransport(kombu_redis.Transport):  # type: ignore[misc]
    """kombu's Redis transport, except that a closing channel does not put
    the messages it had taken back into their queues, and acknowledging a
    message of a closed channel only forgets it.

    kombu 5.7 does both on a channel whose connection Redis dropped, with the
    transport already released: they raise AttributeError and Celery stops
    the worker ("Unrecoverable error"), so a Redis restart killed every
    worker. Neither is needed: the scheduler records who holds each message,
    and a holder that stops or loses its connection is gone, so the
    reconciler sends its elements again. For the same reason it keeps no copy
    of a delivered message in Redis (``unacked``; see ``_RedisQoS``): a copy
    would only come back after the visibility timeout, stale.
    """

    Channel = _RedisChannel


TRANSPORT = f"{__name__}:RedisTransport"
"""The kombu transport of ``redis://`` and ``rediss://`` brokers."""


def celery_settings(config: RemexConfig) -> dict[str, Any]:
    """The Celery settings remex runs with (worker and client alike).

    Raises:
        ConfigError: no broker is configured and no stack is up.
    """
    transport = {
        "visibility_timeout": VISIBILITY_TIMEOUT,
        # One Redis list per priority, served in this order.
        "priority_steps": list(PRIORITY_STEPS),
    }
    broker_url = config.require_broker()
    redis_broker = broker_url.partition("://")[0] in ("redis", "rediss")
    return {
        "broker_url": broker_url,
        **({"broker_transport": TRANSPORT} if redis_broker else {}),
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
        # A Redis restart is a pause: publishes and result writes retry
        # (bounded) instead of failing the task or losing the next stage.
        "task_publish_retry": True,
        "task_publish_retry_policy": dict(PUBLISH_RETRY_POLICY),
        "result_backend_always_retry": True,
        "result_backend_max_retries": 30,
        "result_backend_base_sleep_between_retries_ms": 100,
        "result_backend_max_sleep_between_retries_ms": 2000,
        # Events for Flower.
        "worker_send_task_events": True,
        # No "task-sent" event: Flower shows each task from its "task-received"
        # (one PUBLISH less per task, issue 16).
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


def send_element(
    app: Celery,
    scheduler: Scheduler,
    build_id: str,
    element: str,
) -> str:
    """Send an element's five-stage chain, or a fetch node's one
    ``remex.fetch_source`` task (on the ``remex.fetch`` queue), unless
    another build is already building the same artifact or fetching the
    same source (then this node waits on it).

    Returns "sent", "waiting", "not sent" (the element finished or its
    build was cancelled meanwhile) or "refused" (the broker refused the
    message after retrying: the element stays ``queued`` with no message and
    no holder, and the reconciler sends it again once Redis is back).
    """
    # Task ids chosen here, so the scheduler knows them before anything runs
    # (``cancel`` revokes them; a fetch node uses the first). Claim, then
    # wait or queue, in one move; recorded before sending: a task that
    # starts at once finds its attempt.
    [recorded] = scheduler.record_sends([(build_id, element, [uuid() for _ in STAGES])])
    return publish_send(app, recorded)


def publish_send(app: Celery, recorded: RecordedSend, *, producer: Any = None) -> str:
    """Publish the tasks of a send the scheduler recorded
    (:meth:`Scheduler.record_sends`, or a finish that sent the dependents it
    made ready); returns as :func:`send_element`. ``producer``: a kombu
    producer to publish with (:func:`publish_sends` passes one whose
    publishes are batched); default: one from the app's pool, each message
    its own round trip."""
    if recorded.owner:
        return "waiting"
    if not recorded.attempt or recorded.spec is None:
        return "not sent"
    build_id, element, attempt = recorded.build, recorded.element, recorded.attempt
    spec, task_ids = recorded.spec, recorded.task_ids
    build_priority = int(spec.get("priority", DEFAULT_BUILD_PRIORITY))
    publish = {"producer": producer} if producer is not None else {}
    if "fetch" in spec:
        return _send_fetch(app, build_id, element, build_priority, attempt, task_ids[0], publish)
    payload = {"build": build_id, "element": element, "attempt": attempt, "state": {}}
    options = {**task_reprs(build_id, element, attempt), **no_result(), **no_declare(app)}
    # The chain's later stages ride in the first message, last first, as
    # Celery's chain puts them (each worker publishes the next one when its
    # stage ends). Sent as the first task with its ``chain`` rather than
    # through ``celery.chain``, which freezes every step (results, parent and
    # root ids) first: half of the sender's CPU per element (issue 17).
    rest = [
        dict(
            app.signature(
                TASK_NAMES[stage],
                options={
                    "task_id": task_id,
                    "priority": message_priority(build_priority, stage),
                    **options,
                },
            )
        )
        for stage, task_id in zip(STAGES[1:], task_ids[1:], strict=True)
    ]
    rest.reverse()
    try:
        app.send_task(
            TASK_NAMES["stage_to_cas"],
            args=(payload,),
            task_id=task_ids[0],
            root_id=task_ids[0],
            priority=message_priority(build_priority, "stage_to_cas"),
            chain=rest,
            **options,
            **publish,
        )
    except PUBLISH_ERRORS as exc:
        log.warning(
            "could not send %s of build %s (the reconciler will): %s", element, build_id, exc
        )
        return "refused"
    return "sent"


def _send_fetch(
    app: Celery,
    build_id: str,
    element: str,
    build_priority: int,
    attempt: int,
    task_id: str,
    publish: dict[str, Any],
) -> str:
    """Send a fetch node's one ``remex.fetch_source`` task (see :func:`send_element`)."""
    payload = {"build": build_id, "element": element, "attempt": attempt, "state": {}}
    try:
        app.send_task(
            TASK_NAMES[FETCH_STAGE],
            args=(payload,),
            task_id=task_id,
            queue=FETCH_QUEUE,
            priority=message_priority(build_priority, FETCH_STAGE),
            **task_reprs(build_id, element, attempt),
            **no_result(),
            **no_declare(app),
            **publish,
        )
    except PUBLISH_ERRORS as exc:
        log.warning(
            "could not send %s of build %s (the reconciler will): %s", element, build_id, exc
        )
        return "refused"
    return "sent"


def no_result() -> dict[str, Any]:
    """Publish options saying the sender will never read the task's result.

    The stage tasks store none (``StageTask.ignore_result``), but a sender
    that does not know the task classes (``remex build``, a script: it names
    them by string) would otherwise have Celery's Redis result backend
    SUBSCRIBE to each task's result channel as it sends it: one more command
    and round trip per element sent, and a subscription Redis keeps until the
    sender exits (issue 17). The option also rides in the chain's later
    messages, where it changes nothing."""
    return {"ignore_result": True}


def no_declare(app: Celery) -> dict[str, Any]:
    """Publish options that skip declaring the target queue, on a Redis broker.

    Celery declares a message's queue on each new producer connection, and
    kombu's Redis transport answers a declaration with the queue's length:
    one LLEN per priority step (40 here) for nothing, since a Redis queue is
    just a list that a publish creates (issue 16). Other brokers declare."""
    if str(app.conf.broker_url or "").partition("://")[0] in ("redis", "rediss"):
        return {"declare": []}
    return {}


# A list of ready elements longer than this (a wide layer) tells the
# reconciler it is being sent; a shorter one is sent well within READY_GRACE.
LONG_SEND = 50
SENDING_EVERY = 1.0
# How many sends one script records (see send_ready).
SEND_CHUNK = 200
"""Seconds between two "still sending" marks of a long list."""


SEND_BATCH = 8
""":func:`send_ready` publishes the chains of a list of elements this many
to a Redis round trip (a pipeline): enough to save most round trips of a
wide layer, few enough that the first chains go out at once."""


def send_ready(app: Celery, scheduler: Scheduler, ready: list[tuple[str, str]]) -> None:
    """Send every (build, element) that became ready.

    Sending 10,000 chains takes a while (a wide layer made ready by one
    element, or submitted at once): the build is marked as being sent, again
    every second, so that the reconciler does not take the elements not sent
    yet for ones whose sender died (and send them a second time).

    Several elements cost fewer round trips to Redis than one each (issue
    17; on a loaded machine each round trip waits for Redis's and then this
    process's turn on a core): their specs are read in one HMGET per build,
    and their first messages published :data:`SEND_BATCH` to a pipeline.
    Each element is still recorded as sent (its task ids known) before its
    message can go out. A batch that Redis refuses leaves its elements
    ``queued`` with no message, as a refused publish does: the reconciler
    sends them again.
    """
    # Recorded SEND_CHUNK at a time (one script each, issue 16), then published.
    sends = [(b, e, [uuid() for _ in STAGES]) for b, e in ready]
    for i in range(0, len(sends), SEND_CHUNK):
        publish_sends(app, scheduler, scheduler.record_sends(sends[i : i + SEND_CHUNK]))


def publish_sends(app: Celery, scheduler: Scheduler, sends: list[RecordedSend]) -> None:
    """Publish recorded sends (see :func:`publish_send`), :data:`SEND_BATCH`
    to a Redis round trip. A long list takes a while: the build is marked as
    being sent, again every second, so that the reconciler does not take the
    elements not published yet for lost."""
    if len(sends) <= 1 or not _batches_publishes(app):
        for recorded in sends:
            publish_send(app, recorded)
        return
    marked: dict[str, float] = {}
    long = len(sends) > LONG_SEND
    pending = collections.deque(sends)
    try:
        with app.producer_or_acquire() as producer, producer.batch(SEND_BATCH):
            while pending:
                recorded = pending.popleft()
                build_id = recorded.build
                if long and time.monotonic() - marked.get(build_id, -SENDING_EVERY) >= (
                    SENDING_EVERY
                ):
                    scheduler.sending(build_id)
                    marked[build_id] = time.monotonic()
                publish_send(app, recorded, producer=producer)
    except BATCH_ERRORS as exc:
        # The elements of the failed batch stay queued with no message (the
        # reconciler sends them again); the rest go one at a time, each
        # publish retried as usual.
        log.warning("could not send a batch of chains (the reconciler will): %s", exc)
        while pending:
            publish_send(app, pending.popleft())


def _batches_publishes(app: Celery) -> bool:
    """Whether publishes can be batched in a pipeline (kombu 5.7's
    ``Producer.batch``, which its Redis transport implements)."""
    redis_broker = str(app.conf.broker_url or "").partition("://")[0] in ("redis", "rediss")
    return redis_broker and hasattr(kombu.messaging.Producer, "batch")


def fail_element(
    app: Celery,
    scheduler: Scheduler,
    build_id: str,
    element: str,
    info: dict[str, Any],
    *,
    cancel_operation: Callable[[str], object] | None = None,
) -> Finished:
    """Mark an element failed and act on what its build's on-error mode did
    (see :meth:`Scheduler.finish_element`): send what became ready and the
    other builds' elements released, revoke the task messages of the elements
    stopped and, with ``terminate``, cancel the remote operations of those
    that were running (``cancel_operation``; best effort, as ``remex
    cancel``)."""
    finished = scheduler.finish_element(build_id, element, ElementState.FAILED, info)
    send_ready(app, scheduler, [*finished.ready, *finished.released])
    stop_stopped(app, finished.stopped, cancel_operation)
    return finished


def stop_stopped(
    app: Celery,
    stopped: list[dict[str, Any]],
    cancel_operation: Callable[[str], object] | None,
) -> None:
    """Revoke the task messages of stopped elements; cancel the remote
    operations of those that were running (errors are logged: the operation
    may have finished meanwhile)."""
    task_ids = [str(t) for info in stopped for t in info.get("task_ids", []) if t]
    if task_ids:
        try:
            app.control.revoke(task_ids)
        except PUBLISH_ERRORS as exc:
            # Their stages find the element cancelled when they start anyway.
            log.warning("could not revoke %d task(s): %s", len(task_ids), exc)
    if cancel_operation is None:
        return
    for info in stopped:
        if info.get("was") == ElementState.RUNNING and info.get("operation"):
            try:
                cancel_operation(str(info["operation"]))
            except Exception as exc:  # best effort, as remex cancel
                log.warning("could not cancel operation %s: %s", info["operation"], exc)


def queue_lists(queue: str, build_priorities: Iterable[int] | None = None) -> list[str]:
    """The Redis lists kombu keeps ``queue``'s messages in (one per priority
    step), or only those the messages of builds of ``build_priorities`` go to."""
    steps: Iterable[int] = PRIORITY_STEPS
    if build_priorities is not None:
        wanted = {message_priority(p, stage) for p in build_priorities for stage in STAGE_PRIORITY}
        steps = [step for step in PRIORITY_STEPS if step in wanted]
    return [queue if priority == 0 else f"{queue}{PRIORITY_SEP}{priority}" for priority in steps]


def queued_task_ids(
    scheduler: Scheduler, build_priorities: Iterable[int] | None = None
) -> set[str]:
    """The task ids of the messages waiting in a queue some live worker consumes:
    the default queue, the fetch queue and the host queues of the workers whose liveness key
    exists (a message in a dead worker's own queue is as good as lost). With
    ``build_priorities``, only the lists the messages of builds of those
    priorities go to (3 per queue instead of one per priority step, 40)."""
    # An instance is NAME/PID/RANDOM.
    names = {instance.rsplit("/", 2)[0] for instance in scheduler.live_workers()}
    lists = queue_lists(DEFAULT_QUEUE, build_priorities) + queue_lists(
        FETCH_QUEUE, build_priorities
    )
    for name in sorted(names):
        lists += queue_lists(host_queue(name), build_priorities)
    pipe = scheduler.redis.pipeline()
    for key in lists:
        pipe.lrange(key, 0, -1)
    ids: set[str] = set()
    for messages in pipe.execute():
        for raw in messages:
            try:
                ids.add(str(json.loads(raw)["headers"]["id"]))
            except (ValueError, KeyError, TypeError):
                continue  # not a task message of ours
    return ids


UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"
"""kombu's Redis transport: the messages taken and not acknowledged (delivery
tag -> ``[message, exchange, routing key]``), and their delivery times."""


def stage_payload(raw: str) -> tuple[str, dict[str, Any]] | None:
    """The stage and payload of a task message as kombu stores it in
    ``unacked`` (None: not a stage task message of remex)."""
    try:
        message = json.loads(raw)[0]
        stage = str(message["headers"]["task"]).removeprefix("remex.")
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    payload = args[0] if isinstance(args, list) and args else None
    if stage not in TASK_STAGES or not isinstance(payload, dict) or "attempt" not in payload:
        return None
    return stage, payload


def drop_stale_unacked(scheduler: Scheduler) -> int:
    """Delete the ``unacked`` entries of stale stage messages; return how many.

    A worker that lost its connection (a Redis restart) or died leaves the
    messages it had taken there; kombu would hand them out again only after
    the visibility timeout (6 h), as stale copies. Their elements were sent
    again already (see :func:`reconcile`), so they are dropped now instead.
    A current message (its stage running, or taken) is never touched.
    """
    dropped = 0
    entries = cast(dict[str, str], scheduler.redis.hgetall(UNACKED))
    for tag, raw in entries.items():
        found = stage_payload(raw)
        if found is None:
            continue
        stage, payload = found
        if scheduler.is_stale(
            str(payload.get("build")),
            str(payload.get("element")),
            attempt=int(payload["attempt"]),
            stage=stage,
        ):
            pipe = scheduler.redis.pipeline()
            pipe.hdel(UNACKED, tag)
            pipe.zrem(UNACKED_INDEX, tag)
            pipe.execute()
            dropped += 1
    return dropped


def reconcile(
    app: Celery,
    scheduler: Scheduler,
    *,
    lock_seconds: float = 5.0,
    cancel_operation: Callable[[str], object] | None = None,
) -> int:
    """Re-send elements that are ready but were never sent, lost ones (their
    holder is gone, or their message is in no queue), those waiting on
    another build's element that stopped, and those left waiting with no
    dependency left (:meth:`Scheduler.wake_stuck`); drop stale
    unacknowledged messages.
    At most one pass per ``lock_seconds`` across all workers (a Redis lock).
    An element sent ``MAX_ATTEMPTS`` times fails instead. Returns how many
    elements were re-sent. ``cancel_operation`` cancels a remote operation
    (the running elements an on-error ``terminate`` stops; see
    :func:`fail_element`)."""
    # Held for the whole pass (a pass re-sending thousands of elements takes
    # longer than the interval: two at once would send them twice each),
    # then for the interval.
    if not scheduler.try_reconciler_lock(max(lock_seconds, PASS_LOCK_SECONDS)):
        return 0
    try:
        return _reconcile_pass(app, scheduler, cancel_operation)
    finally:
        with contextlib.suppress(Exception):
            scheduler.hold_reconciler_lock(lock_seconds)


# The longest a reconciler pass may hold the lock (a worker killed mid-pass
# holds it this long).
PASS_LOCK_SECONDS = 30.0


def _reconcile_pass(
    app: Celery, scheduler: Scheduler, cancel_operation: Callable[[str], object] | None
) -> int:
    resent = 0
    now = time.time()
    in_queues: set[str] | None = None

    active = scheduler.active_builds()

    def queued() -> set[str]:
        # Read once per pass, and only when an element needs it; only the
        # lists the active builds' messages go to.
        nonlocal in_queues
        if in_queues is None:
            in_queues = queued_task_ids(scheduler, scheduler.build_priorities(active))
        return in_queues

    for build_id in active:
        # Waiting with no dependency left (a move that failed half-way):
        # made ready, then sent like any ready element.
        stalled, woken = scheduler.reconcile_build(build_id, now, queued_task_ids=queued)
        if woken:
            log.warning(
                "build %s: %d element(s) waited with no dependency left (%s); sending them",
                build_id,
                len(woken),
                ", ".join(woken[:5]) + (" ..." if len(woken) > 5 else ""),
            )
            send_ready(app, scheduler, [(build_id, e) for e in woken])
            resent += len(woken)
        for element, reason in stalled:
            attempts = int(scheduler.info(build_id, element).get("attempt", 0))
            if attempts >= MAX_ATTEMPTS:
                log.error(
                    "%s of build %s: %s, after %d attempts", element, build_id, reason, attempts
                )
                fail_element(
                    app,
                    scheduler,
                    build_id,
                    element,
                    {"error": f"{reason} (sent {attempts} times; giving up)"},
                    cancel_operation=cancel_operation,
                )
                continue
            log.warning("re-sending %s of build %s: %s", element, build_id, reason)
            scheduler.note(build_id, element, {"resent_because": reason})
            if send_element(app, scheduler, build_id, element) == "sent":
                resent += 1
    dropped = drop_stale_unacked(scheduler)
    if dropped:
        log.info("dropped %d stale unacknowledged message(s)", dropped)
    return resent
