"""The build's DAG state in Redis, and the atomic moves between its states.

One build is a set of elements with their build dependencies. An element is

``waiting``   for build dependencies;
``ready``     all done, its chain not yet sent (a short window, or a lost send);
``queued``    its chain was sent;
``running``   a stage task is working on it (with a heartbeat);
``cached``    its artifact existed before the build (no tasks at all);
``built``     its chain finished and its artifact is pushed;
``failed``    a stage failed permanently (the error is kept);
``skipped``   a build dependency failed, so it was never started;
``cancelled`` the build was cancelled before it finished.

Every move that other elements depend on happens in a Lua script, atomically:
:meth:`Scheduler.finish` marks an element built (once), decrements its
dependents' counters and returns those that became ready; the caller sends
their chains and marks them queued. If the caller dies in between, the
reconciler finds them ``ready`` and sends them. Work is O(V+E) and no task
waits on another.

Two builds needing the same element with the same cache key build it once:
the first to claim the cache key builds it, the others wait on it and are
finished by the same :meth:`finish` call.

Keys (``B`` = ``remex:build:<build id>``): ``B:meta`` (hash), ``B:spec``,
``B:state``, ``B:pending``, ``B:dependents``, ``B:info`` (hashes by element),
``B:order`` (list), ``B:heartbeat`` (sorted set: element -> deadline);
``remex:builds`` (sorted set of build ids by time), ``remex:active`` (set),
``remex:claim:<cache key>`` (string: owner) and ``remex:waiters:<cache key>``
(set of waiting ``build\\telement``).
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
# A running element whose heartbeat is older than this is taken as lost.
HEARTBEAT_TIMEOUT = 30.0
# An element ``ready`` this long was not sent (its sender died): send it again.
READY_GRACE = 10.0


def _key(build_id: str, name: str) -> str:
    return f"{PREFIX}:build:{build_id}:{name}"


# Finish one element in every build that waits on its cache key.
# KEYS: none (keys are derived from ARGV: one Redis, not a cluster).
# ARGV[1] owner "build\telement", ARGV[2] cache key, ARGV[3] outcome
# (built|failed), ARGV[4] info JSON to merge, ARGV[5] now.
# Returns a flat list: build, element, build, element ... that became ready.
_FINISH = """
local owner, ck, outcome, info_json, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local targets = {owner}
local waiters = redis.call('SMEMBERS', 'remex:waiters:' .. ck)
for _, w in ipairs(waiters) do if w ~= owner then table.insert(targets, w) end end
redis.call('DEL', 'remex:waiters:' .. ck)
if redis.call('GET', 'remex:claim:' .. ck) == owner then redis.call('DEL', 'remex:claim:' .. ck) end
local ready = {}
local function mark(b, element, state, extra)
  local B = 'remex:build:' .. b .. ':'
  redis.call('HSET', B .. 'state', element, state)
  redis.call('ZREM', B .. 'heartbeat', element)
  local cur = redis.call('HGET', B .. 'info', element)
  local info = cur and cjson.decode(cur) or {}
  for k, v in pairs(extra) do info[k] = v end
  info['finished'] = tonumber(now)
  redis.call('HSET', B .. 'info', element, cjson.encode(info))
end
local function skip_dependents(b, element, why)
  local B = 'remex:build:' .. b .. ':'
  local stack = {element}
  while #stack > 0 do
    local e = table.remove(stack)
    local deps = redis.call('HGET', B .. 'dependents', e)
    if deps then
      for _, d in ipairs(cjson.decode(deps)) do
        local st = redis.call('HGET', B .. 'state', d)
        if st == 'waiting' then
          mark(b, d, 'skipped', {error = why})
          table.insert(stack, d)
        end
      end
    end
  end
end
local info = cjson.decode(info_json)
for _, t in ipairs(targets) do
  local tab = string.find(t, '\\t', 1, true)
  local b, element = string.sub(t, 1, tab - 1), string.sub(t, tab + 1)
  local B = 'remex:build:' .. b .. ':'
  local st = redis.call('HGET', B .. 'state', element)
  if st and st ~= 'built' and st ~= 'failed' and st ~= 'cached' and st ~= 'skipped'
      and st ~= 'cancelled' then
    local extra = {}
    for k, v in pairs(info) do extra[k] = v end
    if t ~= owner then extra['built_by'] = owner end
    mark(b, element, outcome, extra)
    if outcome == 'built' then
      local deps = redis.call('HGET', B .. 'dependents', element)
      if deps then
        for _, d in ipairs(cjson.decode(deps)) do
          local left = redis.call('HINCRBY', B .. 'pending', d, -1)
          if left <= 0 and redis.call('HGET', B .. 'state', d) == 'waiting' then
            redis.call('HSET', B .. 'state', d, 'ready')
            local cur = redis.call('HGET', B .. 'info', d)
            local dinfo = cur and cjson.decode(cur) or {}
            dinfo['ready_at'] = tonumber(now)
            redis.call('HSET', B .. 'info', d, cjson.encode(dinfo))
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
return ready
"""

# Claim a cache key for building, or wait on its current builder.
# ARGV[1] claimant "build\telement", ARGV[2] cache key, ARGV[3] claim TTL seconds.
# Returns the owner ("" when the claimant now owns it).
_CLAIM = """
local me, ck, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local owner = redis.call('GET', 'remex:claim:' .. ck)
if owner and owner ~= me then
  local tab = string.find(owner, '\\t', 1, true)
  local b, element = string.sub(owner, 1, tab - 1), string.sub(owner, tab + 1)
  local st = redis.call('HGET', 'remex:build:' .. b .. ':state', element)
  if st == 'queued' or st == 'running' or st == 'ready' then
    redis.call('SADD', 'remex:waiters:' .. ck, me)
    redis.call('EXPIRE', 'remex:waiters:' .. ck, ttl)
    return owner
  end
end
redis.call('SET', 'remex:claim:' .. ck, me, 'EX', ttl)
return ''
"""


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
    """

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._finish = client.register_script(_FINISH)
        self._claim = client.register_script(_CLAIM)

    @classmethod
    def from_url(cls, url: str) -> Scheduler:
        return cls(redis.Redis.from_url(url, decode_responses=True))

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
        info: dict[Any, Any] = {
            s["element"]: json.dumps(
                {"cache_key": s["cache_key"], "kind": s["kind"], "attempt": 0}
                | ({"finished": now} if s["element"] in cached else {})
            )
            for s in specs
        }
        pipe = self.redis.pipeline()
        pipe.hset(
            _key(build_id, "meta"),
            mapping={
                "created": now,
                "status": "running",
                **{k: json.dumps(v) for k, v in meta.items()},
            },
        )
        pipe.hset(_key(build_id, "spec"), mapping={s["element"]: json.dumps(s) for s in specs})
        pipe.hset(_key(build_id, "state"), mapping=states)
        pipe.hset(_key(build_id, "pending"), mapping=pending)
        pipe.hset(
            _key(build_id, "dependents"), mapping={k: json.dumps(v) for k, v in dependents.items()}
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
        return json.loads(cast(str, raw)) if raw else {}

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
            ElementStatus(name, states.get(name, "unknown"), json.loads(infos.get(name, "{}")))
            for name in order
        ]
        return BuildStatus(build_id, str(meta.get("status", "running")), meta, elements)

    def active_builds(self) -> list[str]:
        return sorted(cast(set[str], self.redis.smembers(f"{PREFIX}:active")))

    # --- moving ----------------------------------------------------------------

    def claim(self, build_id: str, element: str, cache_key: str) -> str:
        """Claim ``cache_key`` for this element; return "" or the owner it now waits on."""
        owner = self._claim(args=[f"{build_id}\t{element}", cache_key, BUILD_TTL_SECONDS])
        return cast(str, owner)

    def mark_queued(
        self, build_id: str, element: str, *, attempt: int, task_ids: list[str]
    ) -> None:
        self._merge_info(
            build_id,
            element,
            {"attempt": attempt, "task_ids": task_ids, "queued_at": time.time()},
            state="queued",
        )

    def mark_waiting_on(self, build_id: str, element: str, owner: str) -> None:
        self._merge_info(build_id, element, {"waiting_on": owner}, state="queued")

    def start_stage(
        self, build_id: str, element: str, *, attempt: int, stage: str, host: str
    ) -> bool:
        """A stage task begins; False when the task is stale (superseded or finished)."""
        info = self.info(build_id, element)
        state = self.state(build_id, element)
        if state in TERMINAL or state is None or info.get("attempt", 0) != attempt:
            return False
        if self.build_status_value(build_id) == "cancelled":
            return False
        hosts = list(info.get("hosts", []))
        if host not in hosts:
            hosts.append(host)
        changes: dict[str, Any] = {"stage": stage, "host": host, "hosts": hosts}
        if "started" not in info:
            changes["started"] = time.time()
        self._merge_info(build_id, element, changes, state="running")
        self.heartbeat(build_id, element)
        return True

    def heartbeat(self, build_id: str, element: str) -> None:
        self.redis.zadd(_key(build_id, "heartbeat"), {element: time.time() + HEARTBEAT_TIMEOUT})

    def note(self, build_id: str, element: str, changes: Mapping[str, Any]) -> None:
        """Merge ``changes`` into an element's info (operation name, progress ...)."""
        self._merge_info(build_id, element, changes)

    def finish(
        self, build_id: str, element: str, outcome: str, info: Mapping[str, Any]
    ) -> list[tuple[str, str]]:
        """Mark an element ``built`` or ``failed`` (once), in this build and in
        every build waiting on its cache key; return the (build, element) pairs
        that became ready to send."""
        cache_key = self.spec(build_id, element)["cache_key"]
        flat = self._finish(
            args=[f"{build_id}\t{element}", cache_key, outcome, json.dumps(dict(info)), time.time()]
        )
        ready = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
        touched = {build_id} | {b for b, _ in ready}
        for waiter in self._builds_of(ready):
            touched.add(waiter)
        for b in touched:
            self._update_build_status(b)
        return ready

    def finish_waiters_status(self, build_ids: Iterable[str]) -> None:
        for b in build_ids:
            self._update_build_status(b)

    def cancel(self, build_id: str) -> list[dict[str, Any]]:
        """Mark a build cancelled and its unfinished elements too; return their infos
        (task ids and operation names, for the caller to revoke and cancel)."""
        status = self.status(build_id)
        stopped: list[dict[str, Any]] = []
        pipe = self.redis.pipeline()
        for element in status.elements:
            if element.state in ACTIVE:
                pipe.hset(_key(build_id, "state"), element.element, "cancelled")
                stopped.append({"element": element.element, **element.info})
        pipe.hset(_key(build_id, "meta"), mapping={"status": "cancelled", "finished": time.time()})
        pipe.srem(f"{PREFIX}:active", build_id)
        pipe.execute()
        self._expire(build_id)
        return stopped

    def build_status_value(self, build_id: str) -> str:
        return cast(str, self.redis.hget(_key(build_id, "meta"), "status") or "")

    # --- reconciling -----------------------------------------------------------

    def stalled(self, build_id: str, now: float | None = None) -> list[tuple[str, str]]:
        """Elements to send again: ``ready`` for longer than READY_GRACE (their
        sender died) and ``running``/``queued`` ones whose heartbeat expired
        (their worker died). Returns (element, reason) pairs."""
        now = time.time() if now is None else now
        states = cast(dict[str, str], self.redis.hgetall(_key(build_id, "state")))
        expired = set(
            cast(list[str], self.redis.zrangebyscore(_key(build_id, "heartbeat"), 0, now))
        )
        out: list[tuple[str, str]] = []
        for element, state in states.items():
            if state == "ready":
                info = self.info(build_id, element)
                if now - float(info.get("ready_at", info.get("queued_at", 0))) > READY_GRACE:
                    out.append((element, "ready but never sent"))
            elif state == "running" and element in expired:
                out.append((element, "heartbeat expired"))
        return out

    # --- private -----------------------------------------------------------------

    def _merge_info(
        self, build_id: str, element: str, changes: Mapping[str, Any], *, state: str | None = None
    ) -> None:
        info = self.info(build_id, element)
        info.update(changes)
        pipe = self.redis.pipeline()
        pipe.hset(_key(build_id, "info"), element, json.dumps(info))
        if state is not None:
            pipe.hset(_key(build_id, "state"), element, state)
        pipe.execute()

    def _builds_of(self, pairs: Iterable[tuple[str, str]]) -> set[str]:
        return {b for b, _ in pairs}

    def _update_build_status(self, build_id: str) -> None:
        states = cast(dict[str, str], self.redis.hgetall(_key(build_id, "state")))
        if not states or self.build_status_value(build_id) == "cancelled":
            return
        if any(s in ACTIVE for s in states.values()):
            return
        ok = all(s in ("built", "cached") for s in states.values())
        self.redis.hset(
            _key(build_id, "meta"),
            mapping={"status": "succeeded" if ok else "failed", "finished": time.time()},
        )
        self.redis.srem(f"{PREFIX}:active", build_id)
        self._expire(build_id)

    def _expire(self, build_id: str) -> None:
        pipe = self.redis.pipeline()
        for name in (
            "meta",
            "spec",
            "state",
            "pending",
            "dependents",
            "info",
            "order",
            "heartbeat",
        ):
            pipe.expire(_key(build_id, name), BUILD_TTL_SECONDS)
        pipe.execute()
