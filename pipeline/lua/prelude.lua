-- Shared by every script (prepended when the scheduler loads them).
-- KEYS[1] is the key prefix (the namespace, "remex" by default); the other
-- keys are derived from it and ARGV (one Redis, not a cluster).
-- Note: cjson encodes an empty Lua table as {}; the Python side reads lists
-- with _as_list.
local PREFIX = KEYS[1]
local function bkey(b, name) return PREFIX .. ':build:' .. b .. ':' .. name end
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
  local tab = string.find(t, '\t', 1, true)
  return string.sub(t, 1, tab - 1), string.sub(t, tab + 1)
end
local function expire_build(b, ttl)
  for _, name in ipairs({'meta', 'spec', 'state', 'pending', 'dependents', 'info', 'order',
                         'heartbeat', 'counts', 'live', 'failed', 'events'}) do
    redis.call('EXPIRE', bkey(b, name), ttl)
  end
end
-- Kept as states move (issue 16), so that status and the reconciler never scan
-- every element: B:counts (state -> how many), B:live (the elements ready,
-- queued or running: what can be lost) and B:failed. Every script that sets
-- an element's state calls count_state(b, e, old, new) right after.
local LIVE = {ready=true, queued=true, running=true}
local function count_state(b, e, old, new)
  -- (A build an older remex wrote has no counts: it keeps none, and is scanned.)
  if old == new or redis.call('EXISTS', bkey(b, 'counts')) == 0 then return end
  if old then redis.call('HINCRBY', bkey(b, 'counts'), old, -1) end
  redis.call('HINCRBY', bkey(b, 'counts'), new, 1)
  if LIVE[new] then redis.call('SADD', bkey(b, 'live'), e)
  elseif LIVE[old] then redis.call('SREM', bkey(b, 'live'), e) end
  if new == 'failed' then redis.call('SADD', bkey(b, 'failed'), e) end
end
-- The build's event stream (B:events): one entry per element state change,
-- written by the move that makes it (so atomic with it), its one field
-- "event" the change as JSON. Trimmed to about EVENTS_MAXLEN entries
-- (pipeline.scheduler.EVENTS_MAXLEN says the same); it expires with the build.
local EVENTS_MAXLEN = 200000
local function emit(b, event)
  redis.call('XADD', bkey(b, 'events'), 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'event',
             cjson.encode(event))
end
-- An element's change as an event: what the info says about it now.
local EVENT_FIELDS = {'attempt', 'stage', 'host', 'worker', 'operation', 'error', 'started',
                      'finished', 'timings', 'built_by', 'action_cached', 'failed_stage',
                      'exit_code', 'waiting_on'}
local function element_event(kind, e, info, now)
  local event = {event = kind, element = e, time = tonumber(now)}
  for _, k in ipairs(EVENT_FIELDS) do
    if info[k] ~= nil and info[k] ~= cjson.null then event[k] = info[k] end
  end
  return event
end
-- The build ends with STATUS: recorded, its last event, its keys set to expire.
local function end_build(b, status, now, ttl)
  redis.call('HSET', bkey(b, 'meta'), 'status', status, 'finished', now)
  redis.call('SREM', PREFIX .. ':active', b)
  emit(b, {event = 'finished', status = status, time = tonumber(now)})
  expire_build(b, ttl)
end
-- A build is done when no element is active: succeeded iff all built or cached.
-- O(1) from the counts; a build written without counts (an older remex) is scanned.
local function update_build_status(b, now, ttl)
  if redis.call('HGET', bkey(b, 'meta'), 'status') ~= 'running' then return end
  local ok = true
  if redis.call('EXISTS', bkey(b, 'counts')) == 1 then
    local c = redis.call('HMGET', bkey(b, 'counts'), 'waiting', 'ready', 'queued', 'running',
                         'failed', 'skipped', 'cancelled')
    for i = 1, 4 do if (tonumber(c[i]) or 0) > 0 then return end end
    for i = 5, 7 do if (tonumber(c[i]) or 0) > 0 then ok = false end end
  else
    local states = redis.call('HVALS', bkey(b, 'state'))
    if #states == 0 then return end
    for _, s in ipairs(states) do
      if not TERMINAL[s] then return end
      if s ~= 'built' and s ~= 'cached' then ok = false end
    end
  end
  end_build(b, ok and 'succeeded' or 'failed', now, ttl)
end
-- Stop one unfinished element (cancel, on-error quit/terminate): state ->
-- STATE, its claim on the artifact URI given up (the builds waiting on it are
-- appended to RELEASED: their caller sends them again) and its waiter entry
-- dropped. Appends its info (with "element") to STOPPED.
local function stop_element(b, e, state, why, now, stopped, released)
  local old = redis.call('HGET', bkey(b, 'state'), e)
  redis.call('HSET', bkey(b, 'state'), e, state)
  count_state(b, e, old, state)
  redis.call('ZREM', bkey(b, 'heartbeat'), e)
  local info = get_info(b, e)
  info['finished'] = tonumber(now)
  if why then info['error'] = why end
  put_info(b, e, info)
  emit(b, element_event(state, e, info, now))
  local me = b .. '\t' .. e
  local spec = redis.call('HGET', bkey(b, 'spec'), e)
  if spec then
    local uri = cjson.decode(spec)['artifact_uri']
    redis.call('SREM', PREFIX .. ':waiters:' .. uri, me)
    if redis.call('GET', PREFIX .. ':claim:' .. uri) == me then
      redis.call('DEL', PREFIX .. ':claim:' .. uri)
      for _, w in ipairs(redis.call('SMEMBERS', PREFIX .. ':waiters:' .. uri)) do
        table.insert(released, w)
      end
      redis.call('DEL', PREFIX .. ':waiters:' .. uri)
    end
  end
  info['element'] = e
  table.insert(stopped, info)
end
-- The stages of a chain in order: within one attempt an element only moves
-- forward, so a copy of an earlier stage's message is stale.
local STAGE_ORDER = {stage_to_cas = 1, upload = 2, execute = 3, fetch_outputs = 4,
                     push_artifact = 5}
local function stage_before(stage, current)
  if not stage or not current or current == cjson.null then return false end
  return (STAGE_ORDER[stage] or 0) < (STAGE_ORDER[current] or 0)
end
-- The current message of this attempt, or a stale copy (an older attempt, an
-- earlier stage, a finished element, a stopped build)? Returns the element's
-- info and state, or nil. (No read of the build's status: a build stops only
-- when none of its elements is queued or running any more, end_build, or by
-- cancel, which moves each of them to cancelled in the same script.)
local function current_message(b, e, attempt, stage)
  local st = redis.call('HGET', bkey(b, 'state'), e)
  if st ~= 'queued' and st ~= 'running' then return nil end
  local info = get_info(b, e)
  if (tonumber(info['attempt']) or 0) ~= attempt or info['waiting_on'] then return nil end
  if stage_before(stage, info['stage']) then return nil end
  return info, st
end
