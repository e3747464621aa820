-- Shared by every script (prepended when the scheduler loads them).
-- KEYS[1] is the key prefix (the namespace, "remex" by default); the other
-- keys are derived from it and ARGV (one Redis, not a cluster).
-- Note: cjson encodes an empty Lua table as {}; the Python side reads lists
-- with _as_list.
local PREFIX = KEYS[1]
local function bkey(b, name) return PREFIX .. ':build:' .. b .. ':' .. name end
local TERMINAL = {cached=true, built=true, failed=true, skipped=true, cancelled=true}
-- A field of a decoded info that is set (cjson decodes JSON null as cjson.null, a true value).
local function present(v) return v ~= nil and v ~= cjson.null end
local function get_info(b, e)
  local cur = redis.call('HGET', bkey(b, 'info'), e)
  if cur then return cjson.decode(cur) end
  return {}
end
local function put_info(b, e, info)
  redis.call('HSET', bkey(b, 'info'), e, cjson.encode(info))
end
-- Commands over many fields or members, a chunk at a time: Lua's unpack
-- (one command's arguments) fails past a few thousand values, and a script
-- that fails keeps the writes it made before (a 10,000-element layer once
-- stopped a finish half-way). UNPACK_CHUNK values to a command.
local UNPACK_CHUNK = 1000
-- HMGET of NAMES (any number): the values in the same order.
local function hmget_all(key, names)
  if #names == 0 then return {} end
  if #names <= UNPACK_CHUNK then return redis.call('HMGET', key, unpack(names)) end
  local out = {}
  for i = 1, #names, UNPACK_CHUNK do
    local raw = redis.call('HMGET', key, unpack(names, i, math.min(i + UNPACK_CHUNK - 1, #names)))
    for j = 1, #raw do out[i + j - 1] = raw[j] end
  end
  return out
end
-- HSET of PAIRS (a flat list field, value ...; any length).
local function hset_all(key, pairs)
  for i = 1, #pairs, 2 * UNPACK_CHUNK do
    redis.call('HSET', key, unpack(pairs, i, math.min(i + 2 * UNPACK_CHUNK - 1, #pairs)))
  end
end
-- SADD of MEMBERS (any number).
local function sadd_all(key, members)
  for i = 1, #members, UNPACK_CHUNK do
    redis.call('SADD', key, unpack(members, i, math.min(i + UNPACK_CHUNK - 1, #members)))
  end
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
-- every element: B:live (the elements ready, queued or running: what can be
-- lost), B:counts (how many elements are in each finished state) and
-- B:failed. The live states are counted from B:live (whose states status
-- reads anyway) and the waiting ones are what is left of the build's
-- elements, so only entering or leaving the live set and finishing change
-- them: a move between live states (sent, started, sent again) changes
-- nothing. Every script that sets an element's state calls
-- count_state(b, e, old, new) right after.
local LIVE = {ready=true, queued=true, running=true}
local KEEPS_COUNTS = {}
-- (A build an older remex wrote has no counts: it keeps none, and is scanned.
-- Asked once per build and script.)
local function keeps_counts(b)
  if KEEPS_COUNTS[b] == nil then
    KEEPS_COUNTS[b] = redis.call('EXISTS', bkey(b, 'counts')) == 1
  end
  return KEEPS_COUNTS[b]
end
local function count_state(b, e, old, new)
  if old == new or (LIVE[old] and LIVE[new]) then return end
  if LIVE[old] and not LIVE[new] then
    -- Leaving the live set: that the element was in it says that the build
    -- keeps counts (one read less than asking).
    local removed = redis.call('SREM', bkey(b, 'live'), e) == 1
    if removed then KEEPS_COUNTS[b] = true end
    if not removed and not keeps_counts(b) then return end
  elseif not keeps_counts(b) then
    return
  elseif LIVE[new] then
    redis.call('SADD', bkey(b, 'live'), e)
  end
  if TERMINAL[old] then redis.call('HINCRBY', bkey(b, 'counts'), old, -1) end
  if TERMINAL[new] then redis.call('HINCRBY', bkey(b, 'counts'), new, 1) end
  if new == 'failed' then redis.call('SADD', bkey(b, 'failed'), e) end
end
-- A stage's heartbeat (B:heartbeat) is written only by a stage that runs
-- longer than a heartbeat interval (beat.lua), which marks the element's info
-- ("beat"): only then does a move need to remove it.
local function drop_heartbeat(b, e, info)
  if info['beat'] then
    redis.call('ZREM', bkey(b, 'heartbeat'), e)
    info['beat'] = nil
  end
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
-- The artifact index (pipeline.artifact_index): its two sorted sets, which
-- finish.lua adds to. They expire a TTL after the last build that ended, and
-- entries past the TTL are dropped then (readers drop them too).
local function index_keys()
  return PREFIX .. ':artifacts:bykey', PREFIX .. ':artifacts:bytime'
end
local function sweep_index(now, ttl)
  local by_key, by_time = index_keys()
  -- (At most 1000 a time: unpack's limit. What is left goes with the next end.)
  local old = redis.call('ZRANGEBYSCORE', by_time, '-inf', tonumber(now) - tonumber(ttl),
                         'LIMIT', 0, 1000)
  if #old > 0 then
    redis.call('ZREM', by_key, unpack(old))
    redis.call('ZREM', by_time, unpack(old))
  end
  redis.call('EXPIRE', by_key, tonumber(ttl) + 1)
  redis.call('EXPIRE', by_time, tonumber(ttl) + 1)
end
-- The build ends with STATUS: recorded, its last event, its keys set to expire.
local function end_build(b, status, now, ttl)
  redis.call('HSET', bkey(b, 'meta'), 'status', status, 'finished', now)
  redis.call('SREM', PREFIX .. ':active', b)
  emit(b, {event = 'finished', status = status, time = tonumber(now)})
  expire_build(b, ttl)
  sweep_index(now, ttl)
end
-- A build is done when no element is active: succeeded iff all built or cached.
-- O(1) from the live set and the counts (the live set first: while it is not
-- empty, that is the only read); a build written without counts (an older
-- remex) is scanned.
local function update_build_status(b, now, ttl)
  local ok = true
  if keeps_counts(b) then
    if redis.call('SCARD', bkey(b, 'live')) > 0 then return end
    local c = redis.call('HMGET', bkey(b, 'counts'), 'cached', 'built', 'failed', 'skipped',
                         'cancelled')
    local meta = redis.call('HMGET', bkey(b, 'meta'), 'status', 'elements')
    if meta[1] ~= 'running' then return end
    local finished = 0
    for i = 1, 5 do finished = finished + (tonumber(c[i]) or 0) end
    -- (Elements neither live nor finished wait for dependencies.)
    if finished < (tonumber(meta[2]) or 0) then return end
    for i = 3, 5 do if (tonumber(c[i]) or 0) > 0 then ok = false end end
  else
    if redis.call('HGET', bkey(b, 'meta'), 'status') ~= 'running' then return end
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
  local info = get_info(b, e)
  drop_heartbeat(b, e, info)
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
-- As current_message, from the element's info alone (one read less, for the
-- moves every stage makes): every move to a finished state records
-- "finished" in the info, an element never sent has attempt 0, and one sent
-- is queued until its first stage of the attempt starts (a send clears
-- "stage", begin_attempt), running after. Returns the info and the state, or nil.
local function info_current(info, attempt, stage)
  if present(info['finished']) or present(info['waiting_on']) then return nil end
  if (tonumber(info['attempt']) or 0) ~= attempt or attempt < 1 then return nil end
  if stage_before(stage, info['stage']) then return nil end
  if not present(info['stage']) then return 'queued' end
  return 'running'
end
local function current_from_info(b, e, attempt, stage)
  local info = get_info(b, e)
  local st = info_current(info, attempt, stage)
  if not st then return nil end
  return info, st
end
-- A batch of events as one stream entry (its field "events": a JSON list;
-- pipeline.scheduler.Scheduler.read_events yields each): one XADD for the
-- moves of many elements (issue 16).
local function emit_many(b, events)
  if #events == 1 then return emit(b, events[1]) end
  if #events == 0 then return end
  redis.call('XADD', bkey(b, 'events'), 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'events',
             cjson.encode(events))
end
-- A send's new attempt in the element's info (the caller writes it): its
-- number and task ids, and nothing of the last attempt's stages.
local function begin_attempt(b, e, info, attempt, task_ids, now)
  info['attempt'] = attempt
  info['task_ids'] = task_ids
  info['queued_at'] = now
  info['waiting_on'] = nil
  info['stage'] = nil
  info['stage_at'] = nil
  info['holder'] = nil
  info['handed_at'] = nil
  info['taken_at'] = nil
  info['delivery'] = nil
  drop_heartbeat(b, e, info)
end
-- Make waiting elements of build b ready (their dependencies are done): per
-- chunk of UNPACK_CHUNK one read of their infos and one write each of
-- infos, states and the live set, not four commands per element (issue
-- 16: a 10,000-element layer made ready by one finish). One that finished meanwhile (skipped,
-- cancelled: its info says so) is left be; so is one that does not wait
-- any more, when CHECK is set (a repair, which reads the states too).
-- The names made ready are appended to READY as {b, element}.
local function make_ready(b, names, now, ready, check)
  if #names == 0 then return end
  local raw = hmget_all(bkey(b, 'info'), names)
  local states
  if check then states = hmget_all(bkey(b, 'state'), names) end
  local infos, moves, joined = {}, {}, {}
  for j, d in ipairs(names) do
    local dinfo = raw[j] and cjson.decode(raw[j]) or {}
    if not present(dinfo['finished']) and (not check or states[j] == 'waiting') then
      dinfo['ready_at'] = tonumber(now)
      table.insert(infos, d)
      table.insert(infos, cjson.encode(dinfo))
      table.insert(moves, d)
      table.insert(moves, 'ready')
      table.insert(joined, d)
      table.insert(ready, {b, d})
    end
  end
  hset_all(bkey(b, 'info'), infos)
  hset_all(bkey(b, 'state'), moves)
  -- (waiting -> ready joins the live set and changes no count.)
  if #joined > 0 and keeps_counts(b) then sadd_all(bkey(b, 'live'), joined) end
end

-- Claim building artifact URI for ME ("build\telement"), or find its
-- current builder (another build's element that is ready, queued or
-- running). Returns "" when ME owns it now, else the owner.
local function claim_uri(me, uri, ttl)
  local key = PREFIX .. ':claim:' .. uri
  -- Claimed in one command (SET ... GET), given back in the rare case that
  -- its owner still builds it (issue 16: one command less).
  local owner = redis.call('SET', key, me, 'EX', ttl, 'GET')
  if owner == me then return '' end
  if owner then
    local ob, oe = split(owner)
    if LIVE[redis.call('HGET', bkey(ob, 'state'), oe)] then
      redis.call('SET', key, owner, 'EX', ttl)
      redis.call('SADD', PREFIX .. ':waiters:' .. uri, me)
      redis.call('EXPIRE', PREFIX .. ':waiters:' .. uri, ttl)
      -- (Its finish reads the waiters only when this says so.)
      local oinfo = get_info(ob, oe)
      if not present(oinfo['waited']) then
        oinfo['waited'] = 1
        put_info(ob, oe, oinfo)
      end
      return owner
    end
  end
  return ''
end
-- The task ids of a send a script makes (a finish sends the dependents it
-- made ready): derived from the build, element, attempt and stage number,
-- and recorded in the info like those a sender chose.
local function derived_task_id(b, e, attempt, i)
  local h = redis.sha1hex(b .. '\t' .. e .. '\t' .. attempt .. '\t' .. i)
  return string.sub(h, 1, 8) .. '-' .. string.sub(h, 9, 12) .. '-' .. string.sub(h, 13, 16)
         .. '-' .. string.sub(h, 17, 20) .. '-' .. string.sub(h, 21, 32)
end
-- Send elements of build b in one move: for each, claim its artifact URI;
-- wait on the build that builds it (state -> queued, info.waiting_on = the
-- owner), or record the send (the next attempt, the task ids; state ->
-- queued). One read of their specs and infos (and of the states of those
-- never sent nor made ready, rare), one write of their infos and states, and their events appended to EVENTS (the caller writes them as one
-- entry). ITEMS: a list of {e = element, ids = task ids (nil: derived)};
-- FROM_WAITING: they were waiting until now (made ready by a finish: they
-- join the live set). Returns a list of {element, attempt, owner, spec JSON,
-- task ids}: attempt 0 and the owner when it waits on another build; the
-- new attempt and "" when its tasks are to be sent; 0 and "" when it must not
-- be sent (finished, cancelled, not ready).
-- INFOS, STATES (optional): lists of field, value to add the writes to (the
-- caller writes them, with its own); else they are written here.
local function send_elements(b, items, now, ttl, events, from_waiting, infos, states)
  local out = {}
  if #items == 0 then return out end
  local own_writes = infos == nil
  if own_writes then infos, states = {}, {} end
  local names = {}
  for i, it in ipairs(items) do names[i] = it.e end
  local specs = hmget_all(bkey(b, 'spec'), names)
  local raw = hmget_all(bkey(b, 'info'), names)
  local decoded = {}
  -- Never sent, never made ready nor made to wait: only its state says
  -- whether it may be sent (live, or it waits for dependencies), read for
  -- all such in one command (none, usually).
  local unsure = {}
  for i, _ in ipairs(items) do
    local info = raw[i] and cjson.decode(raw[i]) or {}
    decoded[i] = info
    if not from_waiting and (tonumber(info['attempt']) or 0) == 0
        and not present(info['ready_at']) and not present(info['waiting_on']) then
      table.insert(unsure, i)
    end
  end
  local live_now = {}
  if #unsure > 0 then
    local unsure_names = {}
    for k, i in ipairs(unsure) do unsure_names[k] = names[i] end
    local st = hmget_all(bkey(b, 'state'), unsure_names)
    for k, i in ipairs(unsure) do live_now[i] = LIVE[st[k]] or false end
  end
  local joined = {}
  for i, it in ipairs(items) do
    local e = it.e
    local info = decoded[i]
    local spec = specs[i] and cjson.decode(specs[i]) or nil
    local attempt, owner, ids = 0, '', {}
    if spec and not present(info['finished']) and live_now[i] ~= false then
      local next_attempt = (tonumber(info['attempt']) or 0) + 1
      owner = claim_uri(b .. '\t' .. e, spec['artifact_uri'], ttl)
      if owner ~= '' then
        info['waiting_on'] = owner
        drop_heartbeat(b, e, info)
        table.insert(events, {event = 'waiting', element = e, waiting_on = owner, time = now})
      else
        attempt = next_attempt
        local n = present(spec['fetch']) and 1 or 5
        for k = 1, n do
          ids[k] = (type(it.ids) == 'table' and it.ids[k]) or derived_task_id(b, e, attempt, k)
        end
        begin_attempt(b, e, info, attempt, ids, now)
        table.insert(events, {event = 'queued', element = e, attempt = attempt, time = now})
      end
      table.insert(infos, e)
      table.insert(infos, cjson.encode(info))
      table.insert(states, e)
      table.insert(states, 'queued')
      if from_waiting then table.insert(joined, e) end
    end
    out[i] = {e, attempt, owner, specs[i] or '', ids}
  end
  if own_writes then
    hset_all(bkey(b, 'info'), infos)
    hset_all(bkey(b, 'state'), states)
  end
  -- (waiting -> queued joins the live set; a move between live states
  -- changes no count.)
  if #joined > 0 and keeps_counts(b) then sadd_all(bkey(b, 'live'), joined) end
  return out
end
