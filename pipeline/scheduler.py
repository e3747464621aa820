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
dependents' counters and returns those that became ready; the caller sends
their chains (:meth:`Scheduler.mark_queued`, which gives each send a new
``attempt`` number) and a stage task only starts if its attempt is the
current one (:meth:`Scheduler.start_stage`). If a sender dies in between, the
reconciler finds the element ``ready`` and sends it. Work is O(V+E) and no
task waits on another.

Liveness: a worker keeps a key ``remex:worker:<instance>`` alive while it
runs (:meth:`Scheduler.worker_alive`), and a stage keeps its element's
heartbeat fresh. Once a chain has started on a worker, its next message is
always in that worker's own queue or held by it (data locality), so a
``running`` element whose heartbeat expired is only lost when its worker is
gone: :meth:`Scheduler.stalled` then returns it, and the reconciler sends it
again. (A ``running`` element that waits in a live worker's busy queue is not
re-sent; after ``LOST_AFTER_HEARTBEATS`` heartbeat periods it is anyway.)

Two builds needing the same artifact (same element, same cache key: the same
artifact URI) build it once: the first to claim the URI builds it, the others
wait on it and are finished by the same :meth:`finish` call.

Keys (``B`` = ``remex:build:<build id>``): ``B:meta`` (hash), ``B:spec``,
``B:state``, ``B:pending``, ``B:dependents``, ``B:info`` (hashes by element),
``B:order`` (list), ``B:heartbeat`` (sorted set: element -> deadline);
``remex:builds`` (sorted set of build ids by time), ``remex:active`` (set),
``remex:claim:<artifact URI>`` (string: owner ``build\\telement``),
``remex:waiters:<artifact URI>`` (set of waiting ``build\\telement``) and
``remex:worker:<instance>`` (a live worker).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis

from pipeline.spec import BuildSpec

PREFIX = "remex"
TERMINAL = frozenset({"cached", "built", "failed", "skipped", "cancelled"})
ACTIVE = frozenset({"waiting", "ready", "queued", "running"})
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


def _key(build_id: str, name: str) -> str:
    return f"{PREFIX}:build:{build_id}:{name}"


def worker_key(instance: str) -> str:
    """The liveness key of one worker process."""
    return f"{PREFIX}:worker:{instance}"


# Shared by every script. Keys are derived from ARGV (one Redis, not a cluster).
# Note: cjson encodes an empty Lua table as {}; the Python side reads lists
# with _as_list.
_LUA_PRELUDE = """
local function bkey(b, name) return 'remex:build:' .. b .. ':' .. name end
local TERMINAL = {cached=true, built=true, failed=true, skipped=true, cancelled=true}
local function get_info(b, e)
  local cur = redis.call('HGET', bkey(b, 'info'), e)
  if cur then return cjson.decode(cur) end
  return {}
end
local function put_info(b, e, info)
  redis.call('HSET', bkey(b, 'info'), e, cjson.encode(info))
end
local function split(t)
  local tab = string.find(t, '\\t', 1, true)
  return string.sub(t, 1, tab - 1), string.sub(t, tab + 1)
end
local function expire_build(b, ttl)
  for _, name in ipairs({'meta', 'spec', 'state', 'pending', 'dependents', 'info', 'order',
                         'heartbeat'}) do
    redis.call('EXPIRE', bkey(b, name), ttl)
  end
end
-- A build is done when no element is active: succeeded iff all built or cached.
local function update_build_status(b, now, ttl)
  if redis.call('HGET', bkey(b, 'meta'), 'status') ~= 'running' then return end
  local states = redis.call('HVALS', bkey(b, 'state'))
  if #states == 0 then return end
  local ok = true
  for _, s in ipairs(states) do
    if not TERMINAL[s] then return end
    if s ~= 'built' and s ~= 'cached' then ok = false end
  end
  redis.call('HSET', bkey(b, 'meta'), 'status', ok and 'succeeded' or 'failed', 'finished', now)
  redis.call('SREM', 'remex:active', b)
  expire_build(b, ttl)
end
"""

# Finish one element in every build that waits on its artifact URI.
# ARGV[1] owner "build\telement", ARGV[2] artifact URI, ARGV[3] outcome
# (built|failed), ARGV[4] info JSON to merge, ARGV[5] now, ARGV[6] TTL.
# Returns a flat list: build, element, build, element ... that became ready.
_FINISH = (
    _LUA_PRELUDE
    + """
local owner, uri, outcome, info_json = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now, ttl = ARGV[5], ARGV[6]
local targets = {owner}
local waiters = redis.call('SMEMBERS', 'remex:waiters:' .. uri)
for _, w in ipairs(waiters) do if w ~= owner then table.insert(targets, w) end end
redis.call('DEL', 'remex:waiters:' .. uri)
if redis.call('GET', 'remex:claim:' .. uri) == owner then
  redis.call('DEL', 'remex:claim:' .. uri)
end
local ready = {}
local touched = {}
local function mark(b, element, state, extra)
  redis.call('HSET', bkey(b, 'state'), element, state)
  redis.call('ZREM', bkey(b, 'heartbeat'), element)
  local info = get_info(b, element)
  for k, v in pairs(extra) do info[k] = v end
  info['finished'] = tonumber(now)
  put_info(b, element, info)
end
local function skip_dependents(b, element, why)
  local stack = {element}
  while #stack > 0 do
    local e = table.remove(stack)
    local deps = redis.call('HGET', bkey(b, 'dependents'), e)
    if deps then
      for _, d in ipairs(cjson.decode(deps)) do
        local st = redis.call('HGET', bkey(b, 'state'), d)
        if st == 'waiting' or st == 'ready' then
          mark(b, d, 'skipped', {error = why})
          table.insert(stack, d)
        end
      end
    end
  end
end
local info = cjson.decode(info_json)
for _, t in ipairs(targets) do
  local b, element = split(t)
  local st = redis.call('HGET', bkey(b, 'state'), element)
  if st and not TERMINAL[st] then
    touched[b] = true
    local extra = {}
    for k, v in pairs(info) do extra[k] = v end
    if t ~= owner then extra['built_by'] = owner end
    mark(b, element, outcome, extra)
    if outcome == 'built' then
      local deps = redis.call('HGET', bkey(b, 'dependents'), element)
      if deps then
        for _, d in ipairs(cjson.decode(deps)) do
          local left = redis.call('HINCRBY', bkey(b, 'pending'), d, -1)
          if left <= 0 and redis.call('HGET', bkey(b, 'state'), d) == 'waiting' then
            redis.call('HSET', bkey(b, 'state'), d, 'ready')
            local dinfo = get_info(b, d)
            dinfo['ready_at'] = tonumber(now)
            put_info(b, d, dinfo)
            table.insert(ready, b)
            table.insert(ready, d)
          end
        end
      end
    else
      skip_dependents(b, element, 'dependency ' .. element .. ' failed')
    end
  end
end
for b, _ in pairs(touched) do update_build_status(b, now, ttl) end
return ready
"""
)

# Claim an artifact URI for building, or wait on its current builder.
# ARGV[1] claimant "build\telement", ARGV[2] artifact URI, ARGV[3] claim TTL seconds.
# Returns the owner ("" when the claimant now owns it).
_CLAIM = (
    _LUA_PRELUDE
    + """
local me, uri, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local owner = redis.call('GET', 'remex:claim:' .. uri)
if owner and owner ~= me then
  local b, element = split(owner)
  local st = redis.call('HGET', bkey(b, 'state'), element)
  if st == 'queued' or st == 'running' or st == 'ready' then
    redis.call('SADD', 'remex:waiters:' .. uri, me)
    redis.call('EXPIRE', 'remex:waiters:' .. uri, ttl)
    return owner
  end
end
redis.call('SET', 'remex:claim:' .. uri, me, 'EX', ttl)
return ''
"""
)

# Record a send: the next attempt number, the task ids; state -> queued.
# ARGV[1] build, ARGV[2] element, ARGV[3] task ids JSON, ARGV[4] now.
# Returns the new attempt, or 0 when the element must not be sent (finished,
# cancelled, still waiting for dependencies).
_QUEUE = (
    _LUA_PRELUDE
    + """
local b, e, task_ids, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
if redis.call('HGET', bkey(b, 'meta'), 'status') ~= 'running' then return 0 end
local st = redis.call('HGET', bkey(b, 'state'), e)
if st ~= 'ready' and st ~= 'queued' and st ~= 'running' then return 0 end
local info = get_info(b, e)
local attempt = (tonumber(info['attempt']) or 0) + 1
info['attempt'] = attempt
info['task_ids'] = cjson.decode(task_ids)
info['queued_at'] = now
info['waiting_on'] = nil
info['stage'] = nil
put_info(b, e, info)
redis.call('HSET', bkey(b, 'state'), e, 'queued')
redis.call('ZREM', bkey(b, 'heartbeat'), e)
return attempt
"""
)

# Wait on another build's element: state -> queued, info.waiting_on = owner.
# ARGV[1] build, ARGV[2] element, ARGV[3] owner. Returns 1, or 0 if not active.
_WAIT_ON = (
    _LUA_PRELUDE
    + """
local b, e, owner = ARGV[1], ARGV[2], ARGV[3]
local st = redis.call('HGET', bkey(b, 'state'), e)
if st ~= 'ready' and st ~= 'queued' and st ~= 'running' then return 0 end
local info = get_info(b, e)
info['waiting_on'] = owner
put_info(b, e, info)
redis.call('HSET', bkey(b, 'state'), e, 'queued')
return 1
"""
)

# A stage task begins: only for the current attempt of an unfinished element
# of a running build. ARGV[1] build, ARGV[2] element, ARGV[3] attempt,
# ARGV[4] stage, ARGV[5] host, ARGV[6] worker instance, ARGV[7] now,
# ARGV[8] heartbeat deadline. Returns 1, or 0 when the task is stale.
_START = (
    _LUA_PRELUDE
    + """
local b, e, attempt, stage, host, worker, now, deadline =
  ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8]
if redis.call('HGET', bkey(b, 'meta'), 'status') ~= 'running' then return 0 end
local st = redis.call('HGET', bkey(b, 'state'), e)
if st ~= 'queued' and st ~= 'running' then return 0 end
local info = get_info(b, e)
if (tonumber(info['attempt']) or 0) ~= attempt or info['waiting_on'] then return 0 end
info['stage'] = stage
info['host'] = host
info['worker'] = worker
local hosts = info['hosts']
if type(hosts) ~= 'table' then hosts = {} end
local seen = false
for _, h in ipairs(hosts) do if h == host then seen = true end end
if not seen then table.insert(hosts, host) end
info['hosts'] = hosts
if not info['started'] then info['started'] = now end
put_info(b, e, info)
redis.call('HSET', bkey(b, 'state'), e, 'running')
redis.call('ZADD', bkey(b, 'heartbeat'), deadline, e)
return 1
"""
)

# Merge changes into an element's info. ARGV[1] build, ARGV[2] element,
# ARGV[3] changes JSON. Returns 1, or 0 if the element does not exist.
_NOTE = (
    _LUA_PRELUDE
    + """
local b, e, changes = ARGV[1], ARGV[2], cjson.decode(ARGV[3])
if not redis.call('HGET', bkey(b, 'state'), e) then return 0 end
local info = get_info(b, e)
for k, v in pairs(changes) do info[k] = v end
put_info(b, e, info)
return 1
"""
)

# Cancel a running build: active elements -> cancelled; give up the URIs they
# claimed and leave the waiter sets they were in. A finished build stays as it
# is. ARGV[1] build, ARGV[2] now, ARGV[3] TTL.
# Returns JSON {"stopped": [info + element ...], "released": ["build\telement" ...]}.
_CANCEL = (
    _LUA_PRELUDE
    + """
local b, now, ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local stopped, released = {}, {}
if redis.call('HGET', bkey(b, 'meta'), 'status') ~= 'running' then
  return cjson.encode({stopped = stopped, released = released})
end
local states = redis.call('HGETALL', bkey(b, 'state'))
for i = 1, #states, 2 do
  local e, st = states[i], states[i + 1]
  if not TERMINAL[st] then
    redis.call('HSET', bkey(b, 'state'), e, 'cancelled')
    redis.call('ZREM', bkey(b, 'heartbeat'), e)
    local info = get_info(b, e)
    info['finished'] = now
    put_info(b, e, info)
    local me = b .. '\\t' .. e
    local spec = redis.call('HGET', bkey(b, 'spec'), e)
    if spec then
      local uri = cjson.decode(spec)['artifact_uri']
      redis.call('SREM', 'remex:waiters:' .. uri, me)
      if redis.call('GET', 'remex:claim:' .. uri) == me then
        redis.call('DEL', 'remex:claim:' .. uri)
        for _, w in ipairs(redis.call('SMEMBERS', 'remex:waiters:' .. uri)) do
          table.insert(released, w)
        end
        redis.call('DEL', 'remex:waiters:' .. uri)
      end
    end
    info['element'] = e
    table.insert(stopped, info)
  end
end
redis.call('HSET', bkey(b, 'meta'), 'status', 'cancelled', 'finished', now)
redis.call('SREM', 'remex:active', b)
expire_build(b, ttl)
return cjson.encode({stopped = stopped, released = released})
"""
)

# Recompute a build's status. ARGV[1] build, ARGV[2] now, ARGV[3] TTL.
_STATUS = (
    _LUA_PRELUDE
    + """
update_build_status(ARGV[1], tonumber(ARGV[2]), ARGV[3])
return redis.call('HGET', bkey(ARGV[1], 'meta'), 'status')
"""
)


def _as_list(value: Any) -> list[Any]:
    """A JSON list written by Lua's cjson, which writes an empty one as ``{}``."""
    return list(value) if isinstance(value, list) else []


@dataclass(frozen=True)
class ElementStatus:
    """One element of a build, as ``status`` reports it."""

    element: str
    state: str
    info: dict[str, Any]


@dataclass(frozen=True)
class BuildStatus:
    """A build, as ``status`` reports it."""

    build_id: str
    status: str
    """``running``, ``succeeded``, ``failed`` or ``cancelled``."""
    meta: dict[str, Any]
    elements: list[ElementStatus]

    @property
    def done(self) -> bool:
        return self.status != "running"

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for element in self.elements:
            counts[element.state] = counts.get(element.state, 0) + 1
        return counts


class Scheduler:
    """Reads and moves the state of builds in Redis. Thread-safe (like redis-py).

    Args:
        client: a redis-py client with ``decode_responses=True``.
        heartbeat_timeout: how long a heartbeat (and a worker's liveness key)
            written by this scheduler lasts; the reconciler's patience.
    """

    def __init__(
        self, client: redis.Redis, *, heartbeat_timeout: float = HEARTBEAT_TIMEOUT
    ) -> None:
        self.redis = client
        self.heartbeat_timeout = heartbeat_timeout
        self._finish = client.register_script(_FINISH)
        self._claim = client.register_script(_CLAIM)
        self._queue = client.register_script(_QUEUE)
        self._wait_on = client.register_script(_WAIT_ON)
        self._start = client.register_script(_START)
        self._note = client.register_script(_NOTE)
        self._cancel = client.register_script(_CANCEL)
        self._status = client.register_script(_STATUS)

    @classmethod
    def from_url(cls, url: str, *, heartbeat_timeout: float = HEARTBEAT_TIMEOUT) -> Scheduler:
        return cls(
            redis.Redis.from_url(url, decode_responses=True), heartbeat_timeout=heartbeat_timeout
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
                states[name] = "cached"
            else:
                states[name] = "ready" if not deps else "waiting"
        info: dict[Any, Any] = {}
        for s in specs:
            name = s["element"]
            entry: dict[str, Any] = {"cache_key": s["cache_key"], "kind": s["kind"], "attempt": 0}
            if states[name] == "cached":
                entry["finished"] = now
            elif states[name] == "ready":
                entry["ready_at"] = now
            info[name] = json.dumps(entry)
        pipe = self.redis.pipeline()
        pipe.hset(
            _key(build_id, "meta"),
            mapping={
                "created": now,
                "status": "running",
                **{k: json.dumps(v) for k, v in meta.items()},
            },
        )
        if specs:
            pipe.hset(_key(build_id, "spec"), mapping={s["element"]: json.dumps(s) for s in specs})
            pipe.hset(_key(build_id, "state"), mapping=states)
            pipe.hset(_key(build_id, "pending"), mapping=pending)
            pipe.hset(
                _key(build_id, "dependents"),
                mapping={k: json.dumps(v) for k, v in dependents.items()},
            )
            pipe.hset(_key(build_id, "info"), mapping=info)
            pipe.rpush(_key(build_id, "order"), *[s["element"] for s in specs])
        pipe.zadd(f"{PREFIX}:builds", {build_id: now})
        pipe.sadd(f"{PREFIX}:active", build_id)
        pipe.execute()
        ready = [str(name) for name, state in states.items() if state == "ready"]
        self._update_build_status(build_id)
        return build_id, ready

    # --- reading -------------------------------------------------------------

    def spec(self, build_id: str, element: str) -> BuildSpec:
        raw = self.redis.hget(_key(build_id, "spec"), element)
        if raw is None:
            raise KeyError(f"build {build_id} has no element {element!r}")
        return cast(BuildSpec, json.loads(cast(str, raw)))

    def state(self, build_id: str, element: str) -> str | None:
        return cast("str | None", self.redis.hget(_key(build_id, "state"), element))

    def info(self, build_id: str, element: str) -> dict[str, Any]:
        raw = self.redis.hget(_key(build_id, "info"), element)
        return _decode_info(cast("str | None", raw))

    def build_exists(self, build_id: str) -> bool:
        return bool(self.redis.exists(_key(build_id, "meta")))

    def status(self, build_id: str) -> BuildStatus:
        """Everything about a build, elements in plan order.

        Raises:
            KeyError: no such build (or it expired).
        """
        pipe = self.redis.pipeline()
        pipe.hgetall(_key(build_id, "meta"))
        pipe.lrange(_key(build_id, "order"), 0, -1)
        pipe.hgetall(_key(build_id, "state"))
        pipe.hgetall(_key(build_id, "info"))
        meta_raw, order, states, infos = pipe.execute()
        if not meta_raw:
            raise KeyError(f"no build {build_id!r}")
        meta: dict[str, Any] = {}
        for key, value in meta_raw.items():
            try:
                meta[key] = json.loads(value)
            except json.JSONDecodeError:
                meta[key] = value
        elements = [
            ElementStatus(name, states.get(name, "unknown"), _decode_info(infos.get(name)))
            for name in order
        ]
        return BuildStatus(build_id, str(meta.get("status", "running")), meta, elements)

    def active_builds(self) -> list[str]:
        return sorted(cast(set[str], self.redis.smembers(f"{PREFIX}:active")))

    def build_status_value(self, build_id: str) -> str:
        return cast(str, self.redis.hget(_key(build_id, "meta"), "status") or "")

    # --- moving ----------------------------------------------------------------

    def claim(self, build_id: str, element: str, artifact_uri: str) -> str:
        """Claim building ``artifact_uri`` for this element; return "" (claimed)
        or the ``build\\telement`` it now waits on."""
        owner = self._claim(args=[f"{build_id}\t{element}", artifact_uri, BUILD_TTL_SECONDS])
        return cast(str, owner)

    def mark_queued(self, build_id: str, element: str, *, task_ids: list[str]) -> int:
        """Record that the element's chain is about to be sent; return its new
        attempt number, or 0 when it must not be sent (finished, cancelled, or
        not ready)."""
        attempt = self._queue(args=[build_id, element, json.dumps(task_ids), time.time()])
        return int(attempt)

    def mark_waiting_on(self, build_id: str, element: str, owner: str) -> bool:
        """The element waits on ``owner`` (``build\\telement``) building the same artifact."""
        return bool(self._wait_on(args=[build_id, element, owner]))

    def start_stage(
        self, build_id: str, element: str, *, attempt: int, stage: str, host: str, worker: str = ""
    ) -> bool:
        """A stage task begins; False when the task is stale (an older attempt,
        a finished element, a cancelled build). ``worker`` is the worker
        process's instance (see :meth:`worker_alive`)."""
        now = time.time()
        started = self._start(
            args=[
                build_id,
                element,
                attempt,
                stage,
                host,
                worker,
                now,
                now + self.heartbeat_timeout,
            ]
        )
        return bool(started)

    def heartbeat(self, build_id: str, element: str) -> None:
        """The element's stage is still working."""
        self.redis.zadd(
            _key(build_id, "heartbeat"),
            {element: time.time() + self.heartbeat_timeout},
            xx=True,
        )

    def worker_alive(self, instance: str) -> None:
        """Worker process ``instance`` is alive (for ``heartbeat_timeout`` seconds)."""
        self.redis.set(worker_key(instance), "1", px=int(self.heartbeat_timeout * 1000))

    def worker_gone(self, instance: str) -> None:
        """Worker process ``instance`` stops (its elements may be re-sent at once)."""
        self.redis.delete(worker_key(instance))

    def note(self, build_id: str, element: str, changes: Mapping[str, Any]) -> None:
        """Merge ``changes`` into an element's info (operation name, progress ...)."""
        self._note(args=[build_id, element, json.dumps(dict(changes))])

    def finish(
        self, build_id: str, element: str, outcome: str, info: Mapping[str, Any]
    ) -> list[tuple[str, str]]:
        """Mark an element ``built`` or ``failed`` (once), in this build and in
        every build waiting on the same artifact; return the (build, element)
        pairs that became ready to send. A failure skips the dependents."""
        if outcome not in ("built", "failed"):
            raise ValueError(f"outcome must be 'built' or 'failed', not {outcome!r}")
        uri = self.spec(build_id, element)["artifact_uri"]
        flat = self._finish(
            args=[
                f"{build_id}\t{element}",
                uri,
                outcome,
                json.dumps(dict(info)),
                time.time(),
                BUILD_TTL_SECONDS,
            ]
        )
        return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]

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
        raw = self._cancel(args=[build_id, time.time(), BUILD_TTL_SECONDS])
        data = json.loads(cast(str, raw))
        stopped = [dict(info) for info in _as_list(data.get("stopped"))]
        released = []
        for waiter in _as_list(data.get("released")):
            b, _, e = str(waiter).partition("\t")
            released.append((b, e))
        return stopped, released

    # --- reconciling -----------------------------------------------------------

    def stalled(self, build_id: str, now: float | None = None) -> list[tuple[str, str]]:
        """Elements to send again, as (element, reason) pairs:

        * ``ready`` for longer than READY_GRACE (their sender died);
        * ``running`` with an expired heartbeat whose worker is gone (or, after
          LOST_AFTER_HEARTBEATS timeouts, whatever the reason);
        * ``queued`` waiting on another build's element that stopped without
          finishing (that build was cancelled or expired).
        """
        now = time.time() if now is None else now
        pipe = self.redis.pipeline()
        pipe.hgetall(_key(build_id, "state"))
        pipe.zrangebyscore(_key(build_id, "heartbeat"), 0, now, withscores=True)
        states, expired_pairs = pipe.execute()
        states = cast(dict[str, str], states)
        expired = {str(e): float(deadline) for e, deadline in expired_pairs}
        candidates = [
            e
            for e, s in states.items()
            if s in ("ready", "queued") or (s == "running" and e in expired)
        ]
        if not candidates:
            return []
        raw_infos = cast(list["str | None"], self.redis.hmget(_key(build_id, "info"), candidates))
        infos = dict(zip(candidates, raw_infos, strict=True))
        out: list[tuple[str, str]] = []
        for element in candidates:
            state = states[element]
            info = _decode_info(infos[element])
            if state == "ready":
                since = float(info.get("ready_at") or info.get("queued_at") or 0)
                if now - since > READY_GRACE:
                    out.append((element, "ready but never sent"))
            elif state == "running":
                silent = now - expired[element] + self.heartbeat_timeout
                worker = str(info.get("worker") or "")
                if not worker or not self.redis.exists(worker_key(worker)):
                    out.append(
                        (element, f"heartbeat expired and worker {info.get('host', '?')} is gone")
                    )
                elif silent > LOST_AFTER_HEARTBEATS * self.heartbeat_timeout:
                    out.append((element, f"no heartbeat for {silent:.0f} s"))
            elif info.get("waiting_on"):
                owner = str(info["waiting_on"])
                b, _, e = owner.partition("\t")
                if self.state(b, e) not in ("ready", "queued", "running"):
                    out.append((element, f"the build it waited on ({b}) stopped"))
        return out

    # --- private -----------------------------------------------------------------

    def _update_build_status(self, build_id: str) -> None:
        self._status(args=[build_id, time.time(), BUILD_TTL_SECONDS])


def _decode_info(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    info = json.loads(raw)
    if not isinstance(info, dict):
        return {}
    for key in ("hosts", "task_ids"):
        if key in info:
            info[key] = _as_list(info[key])
    return info
