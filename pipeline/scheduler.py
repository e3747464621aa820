"""The build's DAG state in Redis, and the atomic moves between its states.

One build is a set of elements with their build dependencies. An element is

``waiting``   for build dependencies;
``ready``     all done, its chain not yet sent (a short window, or a lost send);
``queued``    its chain was sent (or it waits on another build's identical element);
``running``   a stage task of its chain began (the worker running it is recorded);
``cached``    its artifact existed before the build (no tasks at all);
``built``     its chain finished and its artifact is pushed;
``failed``    a stage failed permanently (the error is kept);
``skipped``   a build dependency failed, so it was never started;
``cancelled`` the build was cancelled before it finished.

Every move is a Lua script, so it is atomic and checks the state it moves
from: :meth:`Scheduler.finish` marks an element built (once), decrements its
dependents' counters and returns those that became ready (or records their
sends in the same move); the caller sends their chains
(:meth:`Scheduler.record_sends`, which gives each send a new ``attempt``
number) and a stage task only starts if its attempt is the
current one (:meth:`Scheduler.start_stage`). If a sender dies in between, the
reconciler finds the element ``ready`` and sends it. Work is O(V+E) and no
task waits on another. (Redis does not undo the writes a script made before
an error: an element a failed finish counted down but did not make ready,
or did not count down, or did not skip, would wait forever; the reconciler
repairs such a build, :meth:`Scheduler.wake_stuck`.)

Liveness: a worker keeps a key ``remex:worker:<instance>`` alive while it
runs (:meth:`Scheduler.worker_alive`); its value is the worker's *epoch*,
new each time its consumer (re)connects to the broker. A stage that runs
longer than a heartbeat interval keeps its element's heartbeat fresh
(:meth:`Scheduler.heartbeat`); until then the stage's start (``stage_at`` in
the info) stands for one, so the many short stages write none (issue 16).

Holders: whoever has the element's current message. A stage that starts
takes it: a worker process checks the message is current (one read,
:meth:`Scheduler.is_current`, or none for a later stage of a chain it
runs) and records its starts in batches (:meth:`Scheduler.record_starts`,
``holder = instance#epoch``; ``tasks.runtime.StartBatch``), a message Redis
delivered again at once (:meth:`Scheduler.begin_stage`, which counts the
delivery in the element's info); a worker that received a stage
message which has not started within a tenth of the heartbeat timeout
(prefetched, delayed) takes it then (:meth:`Scheduler.take`; a stale copy is
not taken; see ``tasks.runtime.PendingTakes``). A chain's later stages and a
stage's re-queues go to the queue of the worker that ran its first stage
(``remex.host.NAME``, which only that worker consumes), so a stage that ends
keeps holding the element until the next one starts: nothing is written
between two stages (issue 16). Only when that next message cannot be
published (Redis refused it, after retrying) does the stage hand the element
on (:meth:`Scheduler.hand_on`: no holder). An element no stage is running
(no fresh heartbeat, no stage started within a heartbeat timeout) is lost,
and :meth:`Scheduler.stalled` returns it for the reconciler to send again,
when

* its holder is gone: the liveness key expired, or holds a newer epoch
  (Celery drops what it took but had not started when its connection
  breaks, and Redis re-delivers it only after the visibility timeout); or
* it has had no holder for a heartbeat timeout and its message is in no
  queue a live worker consumes (a publish refused while Redis was down, a
  message Redis handed to a worker that died before reading it).

(A ``running`` element whose live holder shows no sign of life, no
heartbeat, stage start or take, for ``LOST_AFTER_HEARTBEATS`` heartbeat
periods, and whose message is in no queue, is re-sent anyway.) An element
whose message is in no queue is re-sent only if its info is the same a
:func:`confirm_delay` later: a worker that had just popped the message
records its take or start by then. Within an attempt a chain only moves forward, so
a copy of an earlier stage's message is stale like one of an older attempt.

Events: each move appends what it changed to the build's stream
(``B:events``) in the same script, so readers see the moves in their order
(:meth:`Scheduler.read_events`); the build's end is its last event. A move
of many elements (a batch of starts or sends, a finish with the sends it
made) writes one entry whose ``events`` field lists them. On
error: a build's ``on_error`` (meta) is applied by :meth:`Scheduler.finish`
when an element fails: ``quit`` cancels every element not started,
``terminate`` the running ones too, in the same atomic move.

Two builds needing the same artifact (same element, same cache key: the same
artifact URI) build it once: the first to claim the URI builds it, the others
wait on it and are finished by the same :meth:`finish` call.

Keys (all named by :class:`Keys`, under a prefix, ``remex`` by default;
``B`` = ``remex:build:<build id>``): ``B:meta`` (hash), ``B:spec``,
``B:state``, ``B:pending``, ``B:info`` (hashes by element; an info also
holds the element's dependents, which only the scripts read; a build of an
older remex has them in ``B:dependents``),
``B:order`` (list), ``B:heartbeat`` (sorted set: element -> deadline),
``B:events`` (stream: one entry per element state change, see
:meth:`Scheduler.read_events`), ``B:counts`` (hash: finished state -> how
many elements are in it; the live ones are counted from ``B:live``, the
waiting ones are the rest, so a move between live states changes no
count), ``B:live`` (set: the elements ready, queued or
running), ``B:failed`` (set);
``remex:builds`` (sorted set of build ids by time), ``remex:active`` (set),
``remex:claim:<artifact URI>`` (string: owner ``build\\telement``; a
finished owner's claim is left to expire, and the next claimant takes it
over),
``remex:waiters:<artifact URI>`` (set of waiting ``build\\telement``) and
``remex:worker:<instance>`` (a live worker) and ``remex:reconciler`` (a lock).
How often a task message was delivered is counted in its element's info
(:meth:`Scheduler.begin_stage`).

The moves' Lua scripts are files in ``pipeline/lua/``, read when a
:class:`Scheduler` is made; the key prefix is passed to them as ``KEYS[1]``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import resources
from typing import Any, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from pipeline import jsonenc
from pipeline.spec import BuildSpec

log = logging.getLogger(__name__)

# Specs, infos and dependents written at submit: compact, made once (a build
# encodes three values per element).
_compact_json = jsonenc.encoder(sort_keys=False, ensure_ascii=True)


DEFAULT_PREFIX = "remex"
"""The namespace of every key remex writes (see :class:`Keys`)."""


class ElementState(StrEnum):
    """The states of an element in a build (see the module docstring)."""

    WAITING = "waiting"
    READY = "ready"
    QUEUED = "queued"
    RUNNING = "running"
    CACHED = "cached"
    BUILT = "built"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


TERMINAL = frozenset(
    {
        ElementState.CACHED,
        ElementState.BUILT,
        ElementState.FAILED,
        ElementState.SKIPPED,
        ElementState.CANCELLED,
    }
)
ACTIVE = frozenset(
    {ElementState.WAITING, ElementState.READY, ElementState.QUEUED, ElementState.RUNNING}
)
# The states an element can be lost in (kept in the ``live`` set, which the
# reconciler and status read instead of every element).
LIVE_STATES = frozenset({ElementState.READY, ElementState.QUEUED, ElementState.RUNNING})
# How long a finished build's state is kept in Redis.
BUILD_TTL_SECONDS = 7 * 24 * 3600
# A running element without a heartbeat for this long, on a worker that is
# gone, is taken as lost (also how long a worker's liveness key lives).
HEARTBEAT_TIMEOUT = 30.0
# A running element without a heartbeat for this many timeouts is taken as
# lost even though its worker is alive (a message lost some other way).
LOST_AFTER_HEARTBEATS = 10
# An element ``ready`` this long was not sent (its sender died): send it again.
READY_GRACE = 10.0
# About how many events a build's stream keeps (``~`` trimming; the Lua
# prelude's EVENTS_MAXLEN is the same): 7-8 per element, so a build of
# 25,000 elements keeps every one. Older ones are dropped first.
EVENTS_MAXLEN = 200_000
# The build states a listing can filter on.
BUILD_STATES = ("running", "succeeded", "failed", "cancelled")
# How long a Redis command retries a refused or broken connection (a Redis
# restart takes seconds; a Redis that stays down is an error after this).
RECONNECT_SECONDS = 30.0
# Why an element with no holder and no message is sent again.
NO_HOLDER = "its message is in no queue a live worker consumes, and no worker holds it"
RECONNECT_BACKOFF_CAP = 2.0
RECONNECT_BACKOFF_BASE = 0.1
# The stages of a chain in order (the Lua prelude's STAGE_ORDER): within one
# attempt an element only moves forward, so a copy of an earlier stage's
# message is stale.
STAGE_ORDER = {"stage_to_cas": 1, "upload": 2, "execute": 3, "fetch_outputs": 4, "push_artifact": 5}
# How many element specs a Scheduler keeps once read (see Scheduler.spec).
SPEC_CACHE_SIZE = 4096
# How many stage starts one script records at most (Lua's unpack limit).
STARTS_PER_SCRIPT = 500
# How many waiting elements one repair script looks at (see Scheduler.wake_stuck).
WAKE_PER_SCRIPT = 1000


def take_delay(heartbeat_timeout: float) -> float:
    """How long a worker may hold a received stage message before it records
    its holder (see ``tasks.runtime.PendingTakes``): a tenth of the heartbeat
    timeout, at most one second."""
    return max(0.05, min(1.0, heartbeat_timeout / 10))


def start_flush_interval(heartbeat_timeout: float) -> float:
    """How often a worker process records the stage starts it batched (see
    :meth:`Scheduler.record_starts`): a tenth of the heartbeat timeout, at
    most half a second (the longer, the more starts one flush records, and
    the more of them are of elements that finish meanwhile; a stage's first
    heartbeat, a third of the timeout after its start, comes later)."""
    return max(0.02, min(0.5, heartbeat_timeout / 10))


def confirm_delay(heartbeat_timeout: float) -> float:
    """How long the reconciler waits before it looks a second time at an
    element whose message it found in no queue: long enough for a worker that
    had just received it to record its take or its start."""
    return 1.5 * take_delay(heartbeat_timeout) + start_flush_interval(heartbeat_timeout) + 0.1


@dataclass(frozen=True)
class Keys:
    """Every Redis key name remex uses, under one prefix.

    The Lua scripts derive the same names from the prefix they are given
    (``KEYS[1]``; see ``pipeline/lua/prelude.lua``).
    """

    prefix: str = DEFAULT_PREFIX

    def build(self, build_id: str, name: str) -> str:
        """One of a build's keys: ``meta``, ``spec``, ``state`` ..."""
        return f"{self.prefix}:build:{build_id}:{name}"

    def events(self, build_id: str) -> str:
        """The build's event stream."""
        return self.build(build_id, "events")

    @property
    def builds(self) -> str:
        """Sorted set of build ids by creation time."""
        return f"{self.prefix}:builds"

    @property
    def active(self) -> str:
        """Set of the builds still running."""
        return f"{self.prefix}:active"

    def claim(self, artifact_uri: str) -> str:
        """Who builds ``artifact_uri`` (``build\\telement``)."""
        return f"{self.prefix}:claim:{artifact_uri}"

    def waiters(self, artifact_uri: str) -> str:
        """Set of the elements waiting on ``artifact_uri``'s builder."""
        return f"{self.prefix}:waiters:{artifact_uri}"

    def worker(self, instance: str) -> str:
        """The liveness key of one worker process."""
        return f"{self.prefix}:worker:{instance}"

    @property
    def reconciler(self) -> str:
        """The lock that lets one reconciler pass run at a time."""
        return f"{self.prefix}:reconciler"


DEFAULT_KEYS = Keys()


def worker_key(instance: str) -> str:
    """The liveness key of one worker process (default prefix)."""
    return DEFAULT_KEYS.worker(instance)


def load_script(name: str) -> str:
    """The Lua script ``pipeline/lua/NAME.lua``, after the shared prelude."""
    folder = resources.files("pipeline") / "lua"
    return (folder / "prelude.lua").read_text() + (folder / f"{name}.lua").read_text()


SCRIPTS = (
    "finish",
    "send_many",
    "beat",
    "take",
    "start",
    "starts",
    "hand_on",
    "stale",
    "note",
    "cancel",
    "status",
    "wake",
)
"""The scripts of the moves (``pipeline/lua/NAME.lua``)."""


def reconnect_retries(seconds: float) -> int:
    """How many retries of the backoff (0.1 s doubling, capped at 2 s) fill ``seconds``."""
    total, delay, retries = 0.0, RECONNECT_BACKOFF_BASE, 0
    while total < seconds:
        total += min(delay, RECONNECT_BACKOFF_CAP)
        delay *= 2
        retries += 1
    return retries


def redis_client(url: str, *, reconnect_seconds: float = RECONNECT_SECONDS) -> redis.Redis:
    """A redis-py client (``decode_responses``) that retries a refused or broken
    connection with bounded exponential backoff instead of failing at once."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=2.0,
        retry=Retry(
            ExponentialBackoff(cap=RECONNECT_BACKOFF_CAP, base=RECONNECT_BACKOFF_BASE),
            reconnect_retries(reconnect_seconds),
        ),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    )


def split_holder(holder: str) -> tuple[str, str]:
    """A holder ``instance#epoch`` as (worker instance, consumer epoch)."""
    instance, _, epoch = holder.rpartition("#")
    return instance, epoch


def _as_list(value: Any) -> list[Any]:
    """A JSON list written by Lua's cjson, which writes an empty one as ``{}``."""
    return list(value) if isinstance(value, list) else []


@dataclass(frozen=True)
class ElementStatus:
    """One element of a build, as ``status`` reports it."""

    element: str
    state: str
    """An :class:`ElementState` value (``unknown`` if Redis lost it)."""
    info: dict[str, Any]


@dataclass(frozen=True)
class BuildStatus:
    """A build, as ``status`` reports it."""

    build_id: str
    status: str
    """``running``, ``succeeded``, ``failed`` or ``cancelled``."""
    meta: dict[str, Any]
    elements: list[ElementStatus]
    """Every element in plan order; or, in a summary (``state_counts`` set),
    only those ready, queued, running or failed."""
    state_counts: dict[str, int] | None = None
    """How many elements are in each state, kept by the scheduler as states
    move (a summary); None: counted from ``elements``."""

    @property
    def done(self) -> bool:
        return self.status != "running"

    @property
    def summary(self) -> bool:
        """Whether ``elements`` lists only the live and failed elements."""
        return self.state_counts is not None

    @property
    def total(self) -> int:
        """How many elements the build has."""
        return sum(self.counts().values())

    def counts(self) -> dict[str, int]:
        """State -> how many elements are in it (states with none left out)."""
        if self.state_counts is not None:
            return {state: n for state, n in self.state_counts.items() if n > 0}
        counts: dict[str, int] = {}
        for element in self.elements:
            counts[element.state] = counts.get(element.state, 0) + 1
        return counts


@dataclass(frozen=True)
class Event:
    """One entry of a build's event stream: an element's state change, or
    the build's start (``submitted``) or end (``finished``).

    ``data`` holds ``event`` (``submitted``, ``cached``, ``queued``,
    ``waiting``, ``stage``, ``operation``, ``built``, ``failed``,
    ``skipped``, ``cancelled``, ``finished``), ``time`` and, as they apply,
    ``element``, ``attempt``, ``stage``, ``host``, ``worker``,
    ``operation``, ``error``, ``started``, ``finished``, ``timings``,
    ``waiting_on``, ``built_by``, ``status`` ...
    """

    id: str
    """The stream entry's id (resume after it)."""
    data: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.data.get("event", ""))

    @property
    def final(self) -> bool:
        """The build's last event."""
        return self.kind == "finished"


@dataclass
class StageStart:
    """One stage start a worker process records later, in a batch (see
    :meth:`Scheduler.record_starts`)."""

    build: str
    element: str
    attempt: int
    stage: str
    host: str
    worker: str
    holder: str
    at: float
    """When the stage started (epoch seconds)."""
    first: float = 0.0
    """When the first stage of the same batch started (0: ``at``)."""
    take: bool = False
    """Not a start: the message was received, not started yet (see
    :meth:`Scheduler.take`); only its holder and ``taken_at`` are recorded."""
    note: bool = False
    """Not a start: only :attr:`notes` are recorded."""
    notes: dict[str, Any] = field(default_factory=dict)
    """Changes to merge into the info (see :meth:`Scheduler.note`)."""

    def as_json(self) -> dict[str, Any]:
        return {
            "b": self.build,
            "e": self.element,
            "attempt": self.attempt,
            "stage": self.stage,
            "host": self.host,
            "worker": self.worker,
            "holder": self.holder,
            "at": self.at,
            "first": self.first or self.at,
            "take": self.take,
            "note": self.note,
            "notes": self.notes,
        }


@dataclass
class RecordedStarts:
    """What :meth:`Scheduler.record_starts` found."""

    stale: list[tuple[str, str]]
    """The (build, element) pairs whose starts were stale (nothing recorded)."""
    orphans: list[str]
    """Remote operations named by stale starts of cancelled elements, that no
    one recorded, so no one cancelled them."""


def info_current(info: Mapping[str, Any], attempt: int, stage: str | None) -> bool:
    """Whether a message of ``stage`` for ``attempt`` is current by the
    element's info (the Lua prelude's ``info_current``): the element is not
    finished nor waiting on another build, the attempt is its latest, and
    the stage is not before the one it reached."""
    if info.get("finished") is not None or info.get("waiting_on") is not None:
        return False
    if attempt < 1 or int(info.get("attempt") or 0) != attempt:
        return False
    current = info.get("stage")
    return not (stage and current and STAGE_ORDER.get(stage, 0) < STAGE_ORDER.get(current, 0))


@dataclass(frozen=True)
class RecordedSend:
    """A send recorded in Redis (:meth:`Scheduler.record_sends`, or a finish
    that sent the dependents it made ready): the caller publishes its tasks
    when ``attempt`` is set."""

    build: str
    element: str
    attempt: int
    """The new attempt; 0 when it is not to be sent (see ``owner``)."""
    owner: str
    """``build\\telement`` it waits on (another build builds the same
    artifact), or ""; with attempt 0 and no owner it must not be sent."""
    spec: BuildSpec | None
    task_ids: list[str]


@dataclass(frozen=True)
class Finished:
    """What :meth:`Scheduler.finish_element` did."""

    ready: list[tuple[str, str]]
    """(build, element) pairs that became ready: the caller sends them."""
    stopped: list[dict[str, Any]]
    """Infos (with ``build`` and ``element``) of elements an on-error mode
    cancelled while queued or running: the caller revokes their tasks (and
    on ``terminate`` cancels their remote operations)."""
    released: list[tuple[str, str]]
    """(build, element) pairs of other builds that waited on a stopped
    element: the caller sends them again."""
    sent: list[RecordedSend] = field(default_factory=list)
    """With ``send=True``: the dependents made ready, their sends recorded
    in the same move (not in ``ready``): the caller publishes them."""


@dataclass(frozen=True)
class BuildSummary:
    """One build, as a listing shows it (read without reading its elements)."""

    build_id: str
    status: str
    meta: dict[str, Any]
    counts: dict[str, int]
    """Elements in each finished state, and ``total`` and ``active``."""

    @property
    def created(self) -> float:
        return float(self.meta.get("created") or 0.0)

    @property
    def duration(self) -> float:
        """Seconds from submission to the end (or to now, while running)."""
        end = self.meta.get("finished")
        return (float(end) if end else time.time()) - self.created

    def as_json(self) -> dict[str, Any]:
        """The listing's JSON object for this build."""
        meta = self.meta
        return {
            "build": self.build_id,
            "status": self.status,
            "project": meta.get("project", ""),
            "targets": meta.get("targets", []),
            "host": meta.get("host", ""),
            "user": meta.get("user", ""),
            "priority": meta.get("priority"),
            "on_error": meta.get("on_error", "continue"),
            "created": self.created,
            "finished": float(meta["finished"]) if meta.get("finished") else None,
            "duration": round(self.duration, 3),
            "counts": self.counts,
        }


class Scheduler:
    """Reads and moves the state of builds in Redis. Thread-safe (like redis-py).

    Args:
        client: a redis-py client with ``decode_responses=True``.
        heartbeat_timeout: how long a heartbeat (and a worker's liveness key)
            written by this scheduler lasts; the reconciler's patience.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        self.redis = client
        self.heartbeat_timeout = heartbeat_timeout
        self.keys = Keys(prefix)
        self._specs: OrderedDict[tuple[str, str], BuildSpec] = OrderedDict()
        self._specs_lock = threading.Lock()
        # Read once, when the scheduler starts; redis-py runs them by SHA.
        scripts = {name: client.register_script(load_script(name)) for name in SCRIPTS}
        self._finish = scripts["finish"]
        self._send_many = scripts["send_many"]
        self._beat = scripts["beat"]
        self._take = scripts["take"]
        self._start = scripts["start"]
        self._starts = scripts["starts"]
        self._hand_on = scripts["hand_on"]
        self._stale = scripts["stale"]
        self._note = scripts["note"]
        self._cancel = scripts["cancel"]
        self._status = scripts["status"]
        self._wake = scripts["wake"]

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
        prefix: str = DEFAULT_PREFIX,
        reconnect_seconds: float = RECONNECT_SECONDS,
    ) -> Scheduler:
        """A scheduler on the Redis at ``url``.

        Every command retries a refused or broken connection with backoff for
        about ``reconnect_seconds`` (a Redis restart is a pause), then raises
        :class:`redis.exceptions.ConnectionError`.
        """
        return cls(
            redis_client(url, reconnect_seconds=reconnect_seconds),
            heartbeat_timeout=heartbeat_timeout,
            prefix=prefix,
        )

    # --- creating a build ----------------------------------------------------

    def create_build(
        self,
        specs: Sequence[BuildSpec],
        build_deps: Mapping[str, Sequence[str]],
        cached: Iterable[str],
        meta: Mapping[str, Any],
        *,
        build_id: str | None = None,
    ) -> tuple[str, list[str]]:
        """Record a new build; return its id and the elements ready to send.

        Args:
            specs: every element of the build, dependencies first.
            build_deps: element -> the elements it build-depends on (within ``specs``).
            cached: elements whose artifact already exists (done, no tasks).
            meta: project, targets ... kept with the build.
        """
        build_id = build_id or uuid.uuid4().hex[:12]
        cached = set(cached)
        now = time.time()
        meta = {"on_error": "continue", **meta, "elements": len(specs)}
        dependents: dict[str, list[str]] = {s["element"]: [] for s in specs}
        pending: dict[Any, Any] = {}
        states: dict[Any, Any] = {}
        for spec in specs:
            name = spec["element"]
            deps = [d for d in build_deps.get(name, ()) if d not in cached]
            for dep in build_deps.get(name, ()):
                dependents[dep].append(name)
            pending[name] = len(deps)
            if name in cached:
                states[name] = ElementState.CACHED
            else:
                states[name] = ElementState.READY if not deps else ElementState.WAITING
        info: dict[Any, Any] = {}
        # The finished states (the live ones are counted from the live set,
        # the waiting ones are the rest); every one, so that the hash exists.
        counts: dict[Any, Any] = dict.fromkeys(sorted(TERMINAL), 0)
        live: list[str] = []
        encode = _compact_json
        for name, state in states.items():
            if state in TERMINAL:
                counts[state] += 1
            entry: dict[str, Any] = {"attempt": 0}
            if state == ElementState.CACHED:
                entry["finished"] = now
            elif state == ElementState.READY:
                entry["ready_at"] = now
                live.append(name)
            info[name] = entry
        for s in specs:
            entry = info[s["element"]]
            entry["cache_key"] = s["cache_key"]
            entry["kind"] = s["kind"]
            # (In the info, which the finish reads anyway: issue 16. Readers
            # of the info never see them, see _decode_info.)
            entry["dependents"] = dependents[s["element"]]
            info[s["element"]] = encode(entry)
        pipe = self.redis.pipeline()
        pipe.hset(
            self.keys.build(build_id, "meta"),
            mapping={
                "created": now,
                "status": "running",
                **{k: json.dumps(v) for k, v in meta.items()},
            },
        )
        if specs:
            # Specs are most of a build's bytes: one compact encoder for all.
            pipe.hset(
                self.keys.build(build_id, "spec"),
                mapping={s["element"]: encode(s) for s in specs},
            )
            pipe.hset(self.keys.build(build_id, "state"), mapping=states)
            pipe.hset(self.keys.build(build_id, "counts"), mapping=counts)
            if live:
                pipe.sadd(self.keys.build(build_id, "live"), *live)
            pipe.hset(self.keys.build(build_id, "pending"), mapping=pending)
            pipe.hset(self.keys.build(build_id, "info"), mapping=info)
            pipe.rpush(self.keys.build(build_id, "order"), *[s["element"] for s in specs])
        # The stream's first events, in the same transaction as the state.
        events = self.keys.events(build_id)
        self._add_event(pipe, events, {"event": "submitted", "time": now, "elements": len(specs)})
        for spec in specs:
            if spec["element"] in cached:
                self._add_event(
                    pipe, events, {"event": "cached", "element": spec["element"], "time": now}
                )
        pipe.zadd(self.keys.builds, {build_id: now})
        pipe.sadd(self.keys.active, build_id)
        pipe.execute()
        ready = [str(name) for name, state in states.items() if state == ElementState.READY]
        self._update_build_status(build_id)
        return build_id, ready

    # --- reading -------------------------------------------------------------

    def spec(self, build_id: str, element: str) -> BuildSpec:
        """An element's spec. A spec never changes once its build is
        submitted: the last SPEC_CACHE_SIZE read are kept (the sender of an
        element and its stages, in one worker process, read it once).

        Raises:
            KeyError: no such element (or build).
        """
        key = (build_id, element)
        with self._specs_lock:
            cached = self._specs.get(key)
            if cached is not None:
                self._specs.move_to_end(key)
                return cached
        raw = self.redis.hget(self.keys.build(build_id, "spec"), element)
        if raw is None:
            raise KeyError(f"build {build_id} has no element {element!r}")
        spec = cast(BuildSpec, json.loads(cast(str, raw)))
        with self._specs_lock:
            self._specs[key] = spec
            while len(self._specs) > SPEC_CACHE_SIZE:
                self._specs.popitem(last=False)
        return spec

    def state(self, build_id: str, element: str) -> str | None:
        return cast("str | None", self.redis.hget(self.keys.build(build_id, "state"), element))

    def info(self, build_id: str, element: str) -> dict[str, Any]:
        raw = self.redis.hget(self.keys.build(build_id, "info"), element)
        return _decode_info(cast("str | None", raw))

    def build_exists(self, build_id: str) -> bool:
        return bool(self.redis.exists(self.keys.build(build_id, "meta")))

    def status(self, build_id: str, *, every: bool = True) -> BuildStatus:
        """A build: every element in plan order, or (``every=False``) a summary:
        the counts per state and only the elements ready, queued, running or
        failed, read from the sets the scripts keep, in O(those elements) not
        O(the build). A build written without counts (an older remex) is
        always read whole.

        Raises:
            KeyError: no such build (or it expired).
        """
        if not every:
            summary = self._summary(build_id)
            if summary is not None:
                return summary
        pipe = self.redis.pipeline()
        pipe.hgetall(self.keys.build(build_id, "meta"))
        pipe.lrange(self.keys.build(build_id, "order"), 0, -1)
        pipe.hgetall(self.keys.build(build_id, "state"))
        pipe.hgetall(self.keys.build(build_id, "info"))
        meta_raw, order, states, infos = pipe.execute()
        meta = _decode_meta(build_id, meta_raw)
        elements = [
            ElementStatus(name, states.get(name, "unknown"), _decode_info(infos.get(name)))
            for name in order
        ]
        return BuildStatus(build_id, str(meta.get("status", "running")), meta, elements)

    def _summary(self, build_id: str) -> BuildStatus | None:
        pipe = self.redis.pipeline()
        pipe.hgetall(self.keys.build(build_id, "meta"))
        pipe.hgetall(self.keys.build(build_id, "counts"))
        pipe.smembers(self.keys.build(build_id, "live"))
        pipe.smembers(self.keys.build(build_id, "failed"))
        meta_raw, counts_raw, live, failed = pipe.execute()
        meta = _decode_meta(build_id, meta_raw)
        if not counts_raw:
            return None
        names = sorted(set(live) | set(failed))
        elements: list[ElementStatus] = []
        if names:
            pipe = self.redis.pipeline()
            pipe.hmget(self.keys.build(build_id, "state"), names)
            pipe.hmget(self.keys.build(build_id, "info"), names)
            states, infos = pipe.execute()
            elements = [
                ElementStatus(name, state or "unknown", _decode_info(info))
                for name, state, info in zip(names, states, infos, strict=True)
            ]
        # The hash counts the finished states (one an older remex wrote counts
        # the others too: the live set is the truth for those, and the
        # waiting ones are the rest).
        counts = {str(state): int(n) for state, n in counts_raw.items() if state in TERMINAL}
        for element in elements:
            if element.state in LIVE_STATES:
                counts[element.state] = counts.get(element.state, 0) + 1
        total = int(meta.get("elements") or 0)
        unknown = sum(1 for e in elements if e.state not in LIVE_STATES and e.state not in TERMINAL)
        counts[ElementState.WAITING] = max(0, total - sum(counts.values()) - unknown)
        return BuildStatus(
            build_id, str(meta.get("status", "running")), meta, elements, state_counts=counts
        )

    def active_builds(self) -> list[str]:
        return sorted(cast(set[str], self.redis.smembers(self.keys.active)))

    def build_priorities(self, build_ids: Sequence[str]) -> set[int] | None:
        """The priorities of these builds (their messages' priorities follow
        from them), or None when one has none recorded (every priority may be
        in use)."""
        if not build_ids:
            return set()
        pipe = self.redis.pipeline(transaction=False)
        for build_id in build_ids:
            pipe.hget(self.keys.build(build_id, "meta"), "priority")
        priorities: set[int] = set()
        for raw in pipe.execute():
            try:
                priorities.add(int(json.loads(raw)))
            except (TypeError, ValueError):
                return None
        return priorities

    def build_status_value(self, build_id: str) -> str:
        return cast(str, self.redis.hget(self.keys.build(build_id, "meta"), "status") or "")

    def read_events(
        self, build_id: str, after: str = "0", *, block: float | None = None, count: int = 1000
    ) -> list[Event]:
        """The build's events after stream id ``after`` (``"0"``: from the
        start), oldest first, at most ``count`` stream entries (an entry may
        hold the events of many elements: each is yielded, all with its id).
        With ``block`` (seconds), wait that long for the first one when
        there is none yet (XREAD BLOCK, a command of Redis's ``@blocking``
        category); without, read what is there (XRANGE, not ``@blocking``).

        Raises:
            redis.exceptions.NoPermissionError: ``block`` given, and the Redis
                user may not run XREAD.
        """
        key = self.keys.events(build_id)
        entries: list[tuple[str, dict[str, str]]]
        if block is None:
            start = "-" if after in ("0", "0-0") else f"({after}"
            entries = cast(Any, self.redis.xrange(key, min=start, count=count))
        else:
            reply = cast(Any, self.redis.xread({key: after}, count=count, block=int(block * 1000)))
            entries = [entry for _, stream in reply or () for entry in stream]
        events: list[Event] = []
        for entry_id, fields in entries:
            try:
                if "events" in fields:
                    # One entry for the moves of many elements (a batch of
                    # stage starts, a finish and the sends it made): each is
                    # an event of its own, all with the entry's id.
                    batch = json.loads(fields["events"])
                else:
                    batch = [json.loads(fields.get("event", "{}"))]
            except json.JSONDecodeError:
                continue  # not written by remex
            for data in _as_list(batch):
                if isinstance(data, dict):
                    events.append(Event(str(entry_id), data))
        return events

    def builds(self, state: str | None = None) -> list[BuildSummary]:
        """The builds Redis still holds, newest first (``state``: only those
        whose status is that). A build's element counts are kept as its
        elements finish, so this reads no element. Builds whose state expired
        (the result TTL) leave the index here.

        Raises:
            ValueError: ``state`` is not one of :data:`BUILD_STATES`.
        """
        if state is not None and state not in BUILD_STATES:
            raise ValueError(f"unknown build state {state!r} (one of {', '.join(BUILD_STATES)})")
        ids = [str(b) for b in self.redis.zrevrange(self.keys.builds, 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for build_id in ids:
            pipe.hgetall(self.keys.build(build_id, "meta"))
            pipe.hgetall(self.keys.build(build_id, "counts"))
        replies = pipe.execute() if ids else []
        out: list[BuildSummary] = []
        expired: list[str] = []
        for index, build_id in enumerate(ids):
            meta_raw, counts_raw = replies[2 * index], replies[2 * index + 1]
            if not meta_raw:
                expired.append(build_id)
                continue
            meta = _decode_meta(build_id, meta_raw)
            status = str(meta.get("status", "running"))
            if state is not None and status != state:
                continue
            # The finished states (the counts keep every state as it moves).
            counts = {str(k): int(v) for k, v in counts_raw.items() if k in TERMINAL and int(v)}
            total = int(meta.get("elements") or 0)
            counts["total"] = total
            counts["active"] = max(0, total - sum(counts[s] for s in counts if s in TERMINAL))
            out.append(BuildSummary(build_id, status, meta, counts))
        if expired:
            self.redis.zrem(self.keys.builds, *expired)
        return out

    # --- moving ----------------------------------------------------------------

    def record_sends(
        self, sends: Sequence[tuple[str, str, list[str]]], *, chunk: int = 200
    ) -> list[RecordedSend]:
        """Record the sends of (build, element, task ids), in one script per
        ``chunk`` of them (per build in it: one read of their specs and
        infos, one write of their infos and states, one event entry). Each
        element's artifact URI is claimed: when another build builds it,
        the element waits on that one (queued, ``waiting_on``); else the
        send gets the next attempt number and the task ids (queued). An
        element finished, cancelled or still waiting for dependencies is
        not sent.

        Returns:
            A RecordedSend for each (grouped by build), whose spec saves the
            caller a read: the new attempt and no owner when its tasks are
            to be published; attempt 0 and the owner (``build\\telement``)
            when it waits on another build; attempt 0 and no owner when it
            must not be sent.
        """
        out: list[RecordedSend] = []
        for i in range(0, len(sends), chunk):
            part = [list(item) for item in sends[i : i + chunk]]
            raw = self._send_many(
                keys=[self.keys.prefix], args=[time.time(), BUILD_TTL_SECONDS, json.dumps(part)]
            )
            out += [self._recorded(item) for item in _as_list(json.loads(cast(str, raw)))]
        return out

    def _recorded(self, item: Sequence[Any]) -> RecordedSend:
        build, element, attempt, owner, raw_spec, task_ids = item
        spec = cast(BuildSpec, json.loads(raw_spec)) if raw_spec else None
        if spec is not None:
            with self._specs_lock:
                self._specs[(str(build), str(element))] = spec
        return RecordedSend(
            str(build),
            str(element),
            int(attempt),
            str(owner or ""),
            spec,
            [str(t) for t in _as_list(task_ids)],
        )

    def take(self, build_id: str, element: str, *, attempt: int, stage: str, holder: str) -> bool:
        """A worker received the element's stage message (it may start it later);
        ``holder`` (``instance#epoch``) holds it now. False when the message is
        stale (an older attempt, an earlier stage, a finished element, a stopped
        build): it will be dropped when it starts."""
        taken = self._take(
            keys=[self.keys.prefix],
            args=[build_id, element, attempt, stage, holder, time.time()],
        )
        return bool(taken)

    def hand_on(self, build_id: str, element: str, *, attempt: int, holder: str) -> bool:
        """``holder`` holds the element no more: its next message goes to a
        queue other workers consume (a re-queue of a fetch), or could not be
        published (Redis refused it). No one holds it until a worker takes a
        message of it; the reconciler sends it again when none is in a queue.
        False when ``holder`` no longer held it. (A chain's next stage goes to
        its holder's own queue: no hand-on.)"""
        handed = self._hand_on(
            keys=[self.keys.prefix], args=[build_id, element, attempt, holder, time.time()]
        )
        return bool(handed)

    def is_stale(self, build_id: str, element: str, *, attempt: int, stage: str) -> bool:
        """Whether a message of ``stage`` for ``attempt`` is stale (an older
        attempt, an earlier stage, a finished element, a stopped or expired
        build): once stale, always stale."""
        return bool(self._stale(keys=[self.keys.prefix], args=[build_id, element, attempt, stage]))

    def start_stage(
        self,
        build_id: str,
        element: str,
        *,
        attempt: int,
        stage: str,
        host: str,
        worker: str = "",
        holder: str = "",
    ) -> bool:
        """A stage task begins; False when the task is stale (an older attempt,
        an earlier stage of this attempt, a finished element, a cancelled
        build). ``worker`` is the worker process's instance (see
        :meth:`worker_alive`), ``holder`` its ``instance#epoch``."""
        return bool(
            self.begin_stage(
                build_id,
                element,
                attempt=attempt,
                stage=stage,
                host=host,
                worker=worker,
                holder=holder,
            )
        )

    def begin_stage(
        self,
        build_id: str,
        element: str,
        *,
        attempt: int,
        stage: str,
        host: str,
        worker: str = "",
        holder: str = "",
        task_id: str = "",
        retries: int = 0,
    ) -> int:
        """As :meth:`start_stage`, and count this delivery of the task message
        (``task_id``, retry number ``retries``) in the same move (one script,
        not a second call). Returns how often the message was
        delivered (1 the first time), or 0 when the task is stale. Only the
        element's latest delivery is counted: a copy of an earlier message
        starts its count again."""
        now = time.time()
        delivered = self._start(
            keys=[self.keys.prefix],
            args=[
                build_id,
                element,
                attempt,
                stage,
                host,
                worker,
                now,
                now + self.heartbeat_timeout,
                holder,
                f"{task_id}:{retries}" if task_id else "",
            ],
        )
        return int(delivered)

    def is_current(self, build_id: str, element: str, *, attempt: int, stage: str) -> bool:
        """Whether a message of ``stage`` for ``attempt`` is current (not an
        older attempt's, nor an earlier stage's, nor one of a finished
        element): one read of the element's info, no write. A stage that
        starts checks this, and records its start later in a batch
        (:meth:`record_starts`), which checks again."""
        return info_current(self.info(build_id, element), attempt, stage)

    def record_starts(self, starts: Sequence[StageStart]) -> RecordedStarts:
        """Record stage starts that a worker process batched (one script per
        STARTS_PER_SCRIPT of them; per build in it, one read and one write of
        the infos, one write of the states and one stream entry of the
        events): each element's holder, host, stage and the time its stage
        started, as :meth:`begin_stage` does, without counting deliveries.
        A start whose message is stale by now records nothing.

        Returns:
            The (build, element) pairs of the stale ones, and the remote
            operations they named that were never recorded because their
            element was cancelled first (the caller cancels them: whoever
            cancelled the element could not see them).
        """
        recorded = RecordedStarts([], [])
        for i in range(0, len(starts), STARTS_PER_SCRIPT):
            chunk = [start.as_json() for start in starts[i : i + STARTS_PER_SCRIPT]]
            raw = self._starts(keys=[self.keys.prefix], args=[json.dumps(chunk)])
            data = json.loads(cast(str, raw))
            recorded.stale += _pairs(data.get("stale"))
            recorded.orphans += [str(op) for op in _as_list(data.get("orphans"))]
        return recorded

    def heartbeat(self, build_id: str, element: str) -> bool:
        """The element's stage is still working (a stage that runs longer than a
        heartbeat interval says so; until then its start time stands for a
        heartbeat). Nothing is written for an element that does not run (a
        late beat of a finished stage). Returns whether it runs."""
        return bool(
            self._beat(
                keys=[self.keys.prefix],
                args=[build_id, element, time.time() + self.heartbeat_timeout],
            )
        )

    def worker_alive(self, instance: str, epoch: str = "1") -> None:
        """Worker process ``instance`` is alive (for ``heartbeat_timeout`` seconds),
        connected to the broker since ``epoch`` (see :meth:`holder_alive`)."""
        self.redis.set(self.keys.worker(instance), epoch, px=int(self.heartbeat_timeout * 1000))

    def live_workers(self) -> list[str]:
        """The instances (``NAME/PID/RANDOM``) of the worker processes alive now."""
        start = len(self.keys.worker(""))
        return [str(key)[start:] for key in self.redis.scan_iter(self.keys.worker("*"), count=1000)]

    def holder_alive(self, holder: str) -> bool:
        """Whether ``holder`` (``instance#epoch``) still holds what it took: its
        worker is alive and has kept its broker connection since. A worker
        whose connection broke drops the messages it had taken but not
        started (Celery forgets them; the broker re-delivers them only after
        the visibility timeout), so a new epoch ends the old holds."""
        instance, epoch = split_holder(holder)
        return bool(instance) and self.redis.get(self.keys.worker(instance)) == epoch

    def worker_gone(self, instance: str) -> None:
        """Worker process ``instance`` stops (its elements may be re-sent at once)."""
        self.redis.delete(self.keys.worker(instance))

    def try_reconciler_lock(self, seconds: float) -> bool:
        """Take the reconciler's lock for ``seconds`` (False: another pass holds it)."""
        return bool(self.redis.set(self.keys.reconciler, "1", nx=True, px=int(seconds * 1000)))

    def hold_reconciler_lock(self, seconds: float) -> None:
        """The pass that holds the lock ended: keep it ``seconds`` more, so
        passes start at most once per ``seconds`` however long one takes."""
        self.redis.pexpire(self.keys.reconciler, int(seconds * 1000))

    def sending(self, build_id: str) -> None:
        """A process is sending this build's ready elements (a long list):
        the reconciler leaves its ready elements alone for a heartbeat
        timeout. Said again while the sending goes on, so that a sender
        that dies mid-list is noticed a timeout later."""
        self.redis.set(
            self.keys.build(build_id, "sending"), "1", px=int(self.heartbeat_timeout * 1000)
        )

    def note(self, build_id: str, element: str, changes: Mapping[str, Any]) -> None:
        """Merge ``changes`` into an element's info (operation name, progress ...)."""
        self._note(
            keys=[self.keys.prefix],
            args=[build_id, element, json.dumps(dict(changes)), time.time()],
        )

    def finish(
        self,
        build_id: str,
        element: str,
        outcome: str,
        info: Mapping[str, Any],
        *,
        artifact_uri: str | None = None,
        index_entry: str = "",
    ) -> list[tuple[str, str]]:
        """Mark an element ``built`` or ``failed`` (once), in this build and in
        every build waiting on the same artifact; return the (build, element)
        pairs that became ready to send. A failure skips the dependents (and
        applies the build's on-error mode: see :meth:`finish_element`).

        ``artifact_uri``: the element's (read from its spec when not given);
        ``index_entry``: the pushed artifact's entry in the artifact index
        (:func:`pipeline.artifact_index.index_entry`), added in the same move."""
        return self.finish_element(
            build_id, element, outcome, info, artifact_uri=artifact_uri, index_entry=index_entry
        ).ready

    def finish_element(
        self,
        build_id: str,
        element: str,
        outcome: str,
        info: Mapping[str, Any],
        *,
        artifact_uri: str | None = None,
        index_entry: str = "",
        send: bool = False,
    ) -> Finished:
        """As :meth:`finish`, with what a failure stopped: in a build whose
        on-error mode is ``quit`` every element not started is cancelled, with
        ``terminate`` the running ones too (in one atomic move with the failure).

        ``send``: the dependents made ready are sent in the same move
        (:attr:`Finished.sent`, for the caller to publish; their task ids
        derived from build, element and attempt) instead of made ready
        (issue 16: no ready state to write, no send of their own)."""
        if outcome not in (ElementState.BUILT, ElementState.FAILED):
            raise ValueError(f"outcome must be 'built' or 'failed', not {outcome!r}")
        uri = artifact_uri or self.spec(build_id, element)["artifact_uri"]
        raw = self._finish(
            keys=[self.keys.prefix],
            args=[
                f"{build_id}\t{element}",
                uri,
                outcome,
                json.dumps(dict(info)),
                time.time(),
                BUILD_TTL_SECONDS,
                index_entry,
                "1" if send else "",
            ],
        )
        data = json.loads(cast(str, raw))
        return Finished(
            ready=[(str(b), str(e)) for b, e in _as_list(data.get("ready"))],
            sent=[self._recorded(item) for item in _as_list(data.get("sent"))],
            stopped=[dict(i) for i in _as_list(data.get("stopped"))],
            released=_pairs(data.get("released")),
        )

    def cancel(self, build_id: str) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        """Mark a build cancelled and its unfinished elements too.

        Returns:
            The cancelled elements' infos (with ``element``, task ids and
            operation names, for the caller to revoke and cancel), and the
            (build, element) pairs of other builds that waited on one of them
            (the caller sends them again: they build it themselves now).

        Raises:
            KeyError: no such build.
        """
        if not self.build_exists(build_id):
            raise KeyError(f"no build {build_id!r}")
        raw = self._cancel(keys=[self.keys.prefix], args=[build_id, time.time(), BUILD_TTL_SECONDS])
        data = json.loads(cast(str, raw))
        stopped = [dict(info) for info in _as_list(data.get("stopped"))]
        return stopped, _pairs(data.get("released"))

    # --- reconciling -----------------------------------------------------------

    def stalled(
        self,
        build_id: str,
        now: float | None = None,
        *,
        queued_task_ids: Callable[[], set[str]] | None = None,
    ) -> list[tuple[str, str]]:
        """Elements to send again, as (element, reason) pairs:

        * ``ready`` for longer than READY_GRACE (their sender died);
        * ``queued`` or ``running`` (no stage running: no fresh heartbeat) and
          taken by a holder that is gone: its worker died, or lost its broker
          connection and so dropped what it had taken but not started;
        * ``queued`` or ``running`` with no holder for longer than the
          heartbeat timeout, whose message is in no queue a live worker
          consumes (a send or a chain's next stage was refused while Redis
          was down): ``queued_task_ids`` returns the task ids of every such
          message (None: none are);
        * ``running`` with an expired heartbeat whose worker is gone (or, after
          LOST_AFTER_HEARTBEATS timeouts and with its message in no queue,
          whatever the reason); a stage's start counts as a heartbeat
          (``stage_at``: a stage writes heartbeats only once it has run a
          heartbeat interval);
        * ``queued`` waiting on another build's element that stopped without
          finishing (that build was cancelled or expired).
        """
        return self._stalled_in(build_id, self._live_states(build_id), now, queued_task_ids)

    def reconcile_build(
        self,
        build_id: str,
        now: float | None = None,
        *,
        queued_task_ids: Callable[[], set[str]] | None = None,
    ) -> tuple[list[tuple[str, str]], list[str]]:
        """What a reconciler pass finds in one build: the elements to send
        again (:meth:`stalled`) and those it made ready because they waited
        with no dependency left (:meth:`wake_stuck`), which the caller
        sends. One read of the live set for both: only a build whose live
        set is empty (which no move leaves so while it runs) is checked for
        stuck elements, so a pass over a build that runs well costs nothing
        more."""
        kept, states = self._live_view(build_id)
        if kept and not states:
            return [], self.wake_stuck(build_id)
        return self._stalled_in(build_id, states, now, queued_task_ids), []

    def _stalled_in(
        self,
        build_id: str,
        states: Mapping[str, str],
        now: float | None,
        queued_task_ids: Callable[[], set[str]] | None,
    ) -> list[tuple[str, str]]:
        """:meth:`stalled`, from the live elements' states already read."""
        now = time.time() if now is None else now
        # Someone is sending a long list of this build's ready elements (a
        # wide layer made ready at once): they are not lost, only not sent yet.
        senders_busy = bool(self.redis.exists(self.keys.build(build_id, "sending")))
        heartbeat_pairs = cast(
            list[tuple[str, float]],
            self.redis.zrange(self.keys.build(build_id, "heartbeat"), 0, -1, withscores=True),
        )
        deadlines = {str(e): float(deadline) for e, deadline in heartbeat_pairs}
        # (A running element without a heartbeat may have started its stage
        # lately: its info says, so it is read.)
        candidates = [
            e
            for e, s in states.items()
            if s in (ElementState.READY, ElementState.QUEUED)
            or (s == ElementState.RUNNING and deadlines.get(e, 0.0) <= now)
        ]
        if not candidates:
            return []
        raw_infos = cast(
            list["str | None"], self.redis.hmget(self.keys.build(build_id, "info"), candidates)
        )
        infos = dict(zip(candidates, raw_infos, strict=True))
        in_queues: set[str] | None = None
        # Many elements share a holder (a worker holds all it runs): one
        # read of each holder's liveness per pass, not one per element.
        alive: dict[str, bool] = {}
        out: list[tuple[str, str]] = []
        # Lost only if their info is the same a moment later (_confirm_lost).
        suspects: list[tuple[str, str]] = []
        for element in candidates:
            state = states[element]
            info = _decode_info(infos[element])
            if state == ElementState.READY:
                since = float(info.get("ready_at") or info.get("queued_at") or 0)
                if now - since > READY_GRACE and not senders_busy:
                    out.append((element, "ready but never sent"))
                continue
            if info.get("waiting_on"):
                owner = str(info["waiting_on"])
                b, _, e = owner.partition("\t")
                if self.state(b, e) not in (
                    ElementState.READY,
                    ElementState.QUEUED,
                    ElementState.RUNNING,
                ):
                    out.append((element, f"the build it waited on ({b}) stopped"))
                continue
            # The last sign of life of a running element: its last heartbeat,
            # its stage's start, or its message's take (a message that waited
            # behind a backlog in its holder's queue, prefetched now).
            deadline = deadlines.get(element)
            beat = deadline - self.heartbeat_timeout if deadline else 0.0
            last = max(beat, float(info.get("stage_at") or 0), float(info.get("taken_at") or 0))
            if state == ElementState.RUNNING and now - last <= self.heartbeat_timeout:
                continue
            silent = now - last if last else 0.0
            holder = str(info.get("holder") or "")
            worker = str(info.get("worker") or "")
            if holder:
                if holder not in alive:
                    alive[holder] = self.holder_alive(holder)
                if not alive[holder]:
                    instance, _ = split_holder(holder)
                    out.append((element, f"worker {instance}, which had taken it, is gone"))
                elif silent > LOST_AFTER_HEARTBEATS * self.heartbeat_timeout:
                    # Its holder is alive: lost only if its message waits in no
                    # queue (a chain's next stage stays with its holder, and may
                    # wait behind others in its queue).
                    if in_queues is None:
                        in_queues = queued_task_ids() if queued_task_ids is not None else set()
                    if in_queues.isdisjoint(str(t) for t in info.get("task_ids", [])):
                        suspects.append((element, f"no heartbeat for {silent:.0f} s"))
            elif state == ElementState.RUNNING and worker:
                # Started without a holder (a worker of an older remex).
                if not self.redis.exists(self.keys.worker(worker)):
                    out.append(
                        (element, f"heartbeat expired and worker {info.get('host', '?')} is gone")
                    )
                elif silent > LOST_AFTER_HEARTBEATS * self.heartbeat_timeout:
                    out.append((element, f"no heartbeat for {silent:.0f} s"))
            else:
                since = max(float(info.get("queued_at") or 0), float(info.get("handed_at") or 0))
                # (A long list of sends is recorded before it is published.)
                if now - since <= self.heartbeat_timeout or senders_busy:
                    continue
                if in_queues is None:
                    in_queues = queued_task_ids() if queued_task_ids is not None else set()
                if in_queues.isdisjoint(str(t) for t in info.get("task_ids", [])):
                    suspects.append((element, NO_HOLDER))
        return out + self._confirm_lost(build_id, suspects, infos)

    def wake_stuck(self, build_id: str, *, scan_count: int = 1000) -> list[str]:
        """Make ready the elements of a build that wait with no dependency
        left, and return them (the caller sends them); skip those a failed
        dependency leaves waiting; end the build when nothing is left to do
        but its status says running.

        No move leaves either so, but Redis keeps the writes a script made
        before an error (a finish that failed half-way: its dependents
        counted down to 0, none made ready or sent). The reconciler only
        watches the live elements, so such a build would wait forever.
        The check is O(1) per pass (the live set's size, the kept counts):
        a running build with no live element but with waiting ones can only
        be stuck (every move leaves the waiting elements whose dependencies
        are all done live), and only then are its states scanned
        (``scan_count`` to an HSCAN) and the waiting ones' counts read.
        When no count is 0 (a decrement or a skip was lost), the
        dependencies' states decide (:meth:`_recount_stuck`). A build
        written without counts (an older remex) is left alone.
        """
        # (No transaction: with nothing live, nothing of the build moves
        # but by the reconciler, which runs one pass at a time, or by a
        # cancel, which ends it; while something is live, the rest is moot.)
        pipe = self.redis.pipeline(transaction=False)
        pipe.scard(self.keys.build(build_id, "live"))
        pipe.hmget(self.keys.build(build_id, "counts"), sorted(TERMINAL))
        pipe.hmget(self.keys.build(build_id, "meta"), ["status", "elements"])
        live, counts, (status, elements) = pipe.execute()
        if live or status != "running" or all(c is None for c in counts):
            return []
        finished = sum(int(c or 0) for c in counts)
        if finished >= int(json.loads(elements or "0")):
            # Everything finished, and the build did not end (its last
            # finish failed before it could say so).
            self._update_build_status(build_id)
            return []
        woken: list[str] = []
        key = self.keys.build(build_id, "state")
        states = {
            str(name): str(state) for name, state in self.redis.hscan_iter(key, count=scan_count)
        }
        waiting = [name for name, state in states.items() if state == ElementState.WAITING]
        for i in range(0, len(waiting), WAKE_PER_SCRIPT):
            raw = self._wake(
                keys=[self.keys.prefix],
                args=[build_id, time.time(), json.dumps(waiting[i : i + WAKE_PER_SCRIPT])],
            )
            woken += [str(e) for e in _as_list(json.loads(cast(str, raw)))]
        if woken or not waiting:
            return woken
        return self._recount_stuck(build_id, states, waiting, scan_count)

    def _recount_stuck(
        self, build_id: str, states: dict[str, str], waiting: list[str], scan_count: int
    ) -> list[str]:
        """A stuck build whose waiting elements all count dependencies left:
        a decrement (or a failure's skip) was lost. Each waiting element's
        dependencies (from every element's ``dependents``: the whole build's
        infos and states are read, once, and only for a stuck build) say
        what it waits for: all built or cached, it is made ready (its count
        set to 0) and returned; one failed, skipped or cancelled (or to be
        skipped), it is skipped, as the finish would have. ``states``: every
        element's, as :meth:`wake_stuck` scanned them (updated here);
        ``waiting``: those of them waiting."""
        dependencies: dict[str, list[str]] = {}
        dependents: dict[str, list[str]] = {}
        for name, raw in self.redis.hscan_iter(self.keys.build(build_id, "info"), count=scan_count):
            info = json.loads(raw) if raw else {}
            listed = info.get("dependents") if isinstance(info, dict) else None
            for dependent in listed or []:
                dependencies.setdefault(str(dependent), []).append(str(name))
                dependents.setdefault(str(name), []).append(str(dependent))
        done = {ElementState.BUILT, ElementState.CACHED}
        # Skipped: what waits behind a failed, skipped or cancelled element,
        # through any number of waiting ones (one walk of the dependents).
        skip: dict[str, str] = {}
        stack = [e for e, state in states.items() if state in TERMINAL and state not in done]
        while stack:
            element = stack.pop()
            state = states.get(element)
            verb = "failed" if state == ElementState.FAILED else f"was {state or 'skipped'}"
            for dependent in dependents.get(element, []):
                if states.get(dependent) == ElementState.WAITING and dependent not in skip:
                    skip[dependent] = f"dependency {element} {verb}"
                    states[dependent] = ElementState.SKIPPED
                    stack.append(dependent)
        ready = [
            e
            for e in sorted(waiting)
            if e not in skip and all(states.get(d) in done for d in dependencies.get(e, []))
        ]
        if not ready and not skip:
            log.warning(
                "build %s: %d element(s) wait with nothing live and nothing to repair",
                build_id,
                len(waiting),
            )
            return []
        woken: list[str] = []
        skipped = sorted(skip.items())
        for i in range(0, max(len(ready), len(skipped)), WAKE_PER_SCRIPT):
            raw = self._wake(
                keys=[self.keys.prefix],
                args=[
                    build_id,
                    time.time(),
                    "[]",
                    json.dumps(ready[i : i + WAKE_PER_SCRIPT]),
                    json.dumps([list(pair) for pair in skipped[i : i + WAKE_PER_SCRIPT]]),
                    BUILD_TTL_SECONDS,
                ],
            )
            woken += [str(e) for e in _as_list(json.loads(cast(str, raw)))]
        log.warning(
            "build %s was stuck (a lost count): %d element(s) made ready, %d skipped",
            build_id,
            len(woken),
            len(skipped),
        )
        return woken

    def _confirm_lost(
        self,
        build_id: str,
        suspects: list[tuple[str, str]],
        infos: Mapping[str, str | None],
    ) -> list[tuple[str, str]]:
        """The elements whose message was in no queue and whose info is the
        same a :func:`confirm_delay` later. A worker that had just popped
        the message from its queue (prefetched after it waited behind a
        backlog, or started with its start not yet recorded: see
        :meth:`record_starts`) records its take or start within that delay,
        which changes the info; one that did not has lost it. (A 10,000-element
        build re-sent 166 elements of live holders once without this look.)"""
        if not suspects:
            return []
        time.sleep(confirm_delay(self.heartbeat_timeout))
        names = [element for element, _ in suspects]
        again = cast(list["str | None"], self.redis.hmget(self.keys.build(build_id, "info"), names))
        return [pair for pair, raw in zip(suspects, again, strict=True) if raw == infos[pair[0]]]

    def verify_counts(self, build_id: str) -> list[str]:
        """Compare what the scripts keep as states move (``counts`` of the
        finished states, ``live``, ``failed``; the waiting elements are the
        rest) with the states
        themselves (a scan: O(elements); for tests and checks, not for the hot
        path). Returns the differences
        found, as sentences (none: they agree, or the build keeps no counts)."""
        pipe = self.redis.pipeline()
        pipe.hgetall(self.keys.build(build_id, "state"))
        pipe.hgetall(self.keys.build(build_id, "counts"))
        pipe.smembers(self.keys.build(build_id, "live"))
        pipe.smembers(self.keys.build(build_id, "failed"))
        states, counts_raw, live, failed = pipe.execute()
        if not counts_raw:
            return []
        expected: dict[str, int] = {}
        for state in states.values():
            if state in TERMINAL:
                expected[state] = expected.get(state, 0) + 1
        counts = {k: int(v) for k, v in counts_raw.items() if int(v)}
        problems = []
        if counts != expected:
            problems.append(f"counts {counts} but states give {expected}")
        # The waiting elements are what the others leave of the build's.
        meta_elements = self.redis.hget(self.keys.build(build_id, "meta"), "elements")
        left = int(json.loads(cast(str, meta_elements) or "0")) - sum(counts.values()) - len(live)
        waiting = sum(1 for s in states.values() if s == ElementState.WAITING)
        if left != waiting:
            problems.append(f"{waiting} elements wait, but the counts leave {left}")
        want_live = {e for e, s in states.items() if s in LIVE_STATES}
        if set(live) != want_live:
            problems.append(f"live set differs: {sorted(set(live) ^ want_live)[:10]}")
        want_failed = {e for e, s in states.items() if s == ElementState.FAILED}
        if set(failed) != want_failed:
            problems.append(f"failed set differs: {sorted(set(failed) ^ want_failed)[:10]}")
        return problems

    def _live_states(self, build_id: str) -> dict[str, str]:
        """The state of each element that can be lost (ready, queued, running),
        from the set the scripts keep: a pass costs O(live elements), however
        many have finished. A build written without that set (an older remex)
        is scanned whole."""
        return self._live_view(build_id)[1]

    def _live_view(self, build_id: str) -> tuple[bool, dict[str, str]]:
        """As :meth:`_live_states`, and whether the build keeps counts (and
        the live set)."""
        pipe = self.redis.pipeline()
        pipe.exists(self.keys.build(build_id, "counts"))
        pipe.smembers(self.keys.build(build_id, "live"))
        kept, live = pipe.execute()
        if not kept:
            return False, cast(
                dict[str, str], self.redis.hgetall(self.keys.build(build_id, "state"))
            )
        names = sorted(live)
        if not names:
            return True, {}
        key = self.keys.build(build_id, "state")
        states = cast(list["str | None"], self.redis.hmget(key, names))
        return True, {name: state for name, state in zip(names, states, strict=True) if state}

    # --- private -----------------------------------------------------------------

    @staticmethod
    def _add_event(pipe: Any, key: str, data: Mapping[str, Any]) -> None:
        pipe.xadd(key, {"event": json.dumps(dict(data))}, maxlen=EVENTS_MAXLEN, approximate=True)

    def _update_build_status(self, build_id: str) -> None:
        self._status(keys=[self.keys.prefix], args=[build_id, time.time(), BUILD_TTL_SECONDS])


def _pairs(value: Any) -> list[tuple[str, str]]:
    """``build\\telement`` strings (from Lua) as (build, element) pairs."""
    out = []
    for item in _as_list(value):
        b, _, e = str(item).partition("\t")
        out.append((b, e))
    return out


def _decode_meta(build_id: str, raw: Mapping[str, str]) -> dict[str, Any]:
    if not raw:
        raise KeyError(f"no build {build_id!r}")
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    return meta


def _decode_info(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    info = json.loads(raw)
    if not isinstance(info, dict):
        return {}
    # (The scripts' own: the finish reads them from the info.)
    info.pop("dependents", None)
    for key in ("hosts", "task_ids"):
        if key in info:
            info[key] = _as_list(info[key])
    return info
