-- Finish one element in every build that waits on its artifact URI.
-- ARGV[1] owner "build\telement", ARGV[2] artifact URI, ARGV[3] outcome
-- (built|failed), ARGV[4] info JSON to merge, ARGV[5] now, ARGV[6] TTL,
-- ARGV[7] (optional) the artifact index entry of the pushed artifact
-- ("KEY PROJECT/NORMAL-NAME", see pipeline.artifact_index), added when built.
-- A failure skips the element's dependents and then applies the build's
-- on-error mode (meta on_error): "continue" leaves the rest be; "quit"
-- cancels every element that has not started (running ones finish);
-- "terminate" cancels the running ones too.
-- Returns JSON {"ready": [[build, element] ...] (to send), "stopped": [info +
-- element + build + was (the state it had) ...] (cancelled while queued or
-- running: the caller revokes
-- their tasks and, on terminate, cancels their operations), "released":
-- ["build\telement" ...] (other builds' elements that waited on a stopped one)}.
local owner, uri, outcome, info_json = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now, ttl = ARGV[5], ARGV[6]
local targets = {owner}
-- The owner's info says whether another build waits on it ("waited", set by
-- claim_uri): only then are the waiters read (issue 16).
local owner_b, owner_e = split(owner)
local owner_info = get_info(owner_b, owner_e)
if present(owner_info['waited']) then
  local waiters = redis.call('SMEMBERS', PREFIX .. ':waiters:' .. uri)
  for _, w in ipairs(waiters) do if w ~= owner then table.insert(targets, w) end end
  if #waiters > 0 then redis.call('DEL', PREFIX .. ':waiters:' .. uri) end
end
-- (The owner's claim on the URI is left to expire: whoever claims the URI
-- next takes it over, its owner being finished. Issue 16: two commands less.)
local ready, stopped, released = {}, {}, {}
-- ARGV[8] "1": send the dependents made ready in this move (returned as
-- "sent": [build, element, attempt, owner, spec JSON, task ids] for the
-- caller to publish), else make them ready (returned as "ready").
local send_ready = ARGV[8] == '1'
-- At most this many dependents of a build are sent in this move; the rest
-- of a wider layer are made ready (a few commands per 1,000, make_ready),
-- for the caller to send SEND_CHUNK to a script (pipeline.broker.send_ready,
-- which also marks the build as being sent): a move that sends 10,000
-- would hold Redis up for long, and return every spec at once.
local SEND_IN_MOVE = 200
local to_send, send_order = {}, {}
-- The events of this move per build, written as one entry each at the end.
local pending_events = {}
local function events_of(b)
  if not pending_events[b] then pending_events[b] = {} end
  return pending_events[b]
end
local function flush_events()
  for b, events in pairs(pending_events) do emit_many(b, events) end
  pending_events = {}
end
local touched = {}
-- The writes of the built path per build ({infos = {e, json ...}, states =
-- {e, state ...}}), made at the end as one HSET each with those of the
-- sends (issue 16). (A failure writes at once: skip_dependents reads the
-- states it writes.)
local writes = {}
local function writes_of(b)
  if not writes[b] then writes[b] = {infos = {}, states = {}} end
  return writes[b]
end
local function flush_writes()
  for b, w in pairs(writes) do
    hset_all(bkey(b, 'info'), w.infos)
    hset_all(bkey(b, 'state'), w.states)
  end
  writes = {}
end
-- An element's dependents: in its info (issue 16: no read of their own);
-- a build an older remex wrote keeps them in B:dependents.
local function dependents_of(b, e, info)
  if info['dependents'] ~= nil then
    if type(info['dependents']) == 'table' then return info['dependents'] end
    return {}
  end
  local deps = redis.call('HGET', bkey(b, 'dependents'), e)
  if deps then return cjson.decode(deps) end
  return {}
end
-- (OLD: the state the caller read; DEFER: write with the others at the end.)
-- Returns the element's info.
local function mark(b, element, old, state, extra, read, defer)
  if defer then
    table.insert(writes_of(b).states, element)
    table.insert(writes_of(b).states, state)
  else
    redis.call('HSET', bkey(b, 'state'), element, state)
  end
  count_state(b, element, old, state)
  local info = read or get_info(b, element)
  drop_heartbeat(b, element, info)
  -- (A start the worker had not recorded yet comes with the finish: the
  -- first start of the attempt stays, its host joins the hosts.)
  if present(extra['started']) and present(info['started']) then extra['started'] = nil end
  if type(extra['host']) == 'string' then
    local hosts = info['hosts']
    if type(hosts) ~= 'table' then hosts = {} end
    local seen = false
    for _, h in ipairs(hosts) do if h == extra['host'] then seen = true end end
    if not seen then table.insert(hosts, extra['host']) end
    info['hosts'] = hosts
  end
  -- (A remote operation the worker had not recorded yet is an event, as
  -- starts.lua makes it, before the finish.)
  if present(extra['operation']) and extra['operation'] ~= info['operation'] then
    table.insert(events_of(b), {event = 'operation', element = element,
                                operation = extra['operation'], stage = 'execute',
                                attempt = info['attempt'], time = tonumber(now)})
  end
  for k, v in pairs(extra) do info[k] = v end
  info['finished'] = tonumber(now)
  if defer then
    table.insert(writes_of(b).infos, element)
    table.insert(writes_of(b).infos, cjson.encode(info))
  else
    put_info(b, element, info)
  end
  table.insert(events_of(b), element_event(state, element, info, now))
  return info
end
local function skip_dependents(b, element, why)
  local stack = {element}
  while #stack > 0 do
    local e = table.remove(stack)
    for _, d in ipairs(dependents_of(b, e, get_info(b, e))) do
      local st = redis.call('HGET', bkey(b, 'state'), d)
      if st == 'waiting' or st == 'ready' then
        mark(b, d, st, 'skipped', {error = why})
        table.insert(stack, d)
      end
    end
  end
end
-- on-error quit/terminate: stop what is left of build b after ELEMENT failed.
local function stop_rest(b, element)
  local mode = redis.call('HGET', bkey(b, 'meta'), 'on_error')
  if mode then mode = cjson.decode(mode) end
  if mode ~= 'quit' and mode ~= 'terminate' then return end
  flush_events()  -- (stop_element writes its events itself, after these)
  local why = element .. ' failed and on-error is ' .. mode
  local states = redis.call('HGETALL', bkey(b, 'state'))
  for i = 1, #states, 2 do
    local e, st = states[i], states[i + 1]
    if st == 'waiting' or st == 'ready' or st == 'queued'
        or (st == 'running' and mode == 'terminate') then
      local before = #stopped
      stop_element(b, e, 'cancelled', why, now, stopped, released)
      if st ~= 'queued' and st ~= 'running' then
        table.remove(stopped, before + 1)  -- never sent: nothing to revoke
      else
        stopped[before + 1]['build'] = b
        stopped[before + 1]['was'] = st
      end
    end
  end
end
local info = cjson.decode(info_json)
-- The owner's state, from its info (one read less): finished ones have
-- "finished"; else, once its chain was sent, it is queued or running.
local function owner_state()
  if present(owner_info['finished']) then return 'built' end
  if (tonumber(owner_info['attempt']) or 0) < 1 then
    return redis.call('HGET', bkey(owner_b, 'state'), owner_e)  -- never sent
  end
  if present(owner_info['stage']) then return 'running' end
  return 'queued'
end
-- One dependency fewer for each of DEPS (element names) in build b: returns
-- them (each once) and the counts left, in the same order. One HINCRBY for
-- one dependent; for more, one read and one write of the counts per
-- UNPACK_CHUNK, not a command each (issue 16; a dependent listed twice is
-- counted twice).
local function decrement_pending(b, deps)
  local key = bkey(b, 'pending')
  if #deps == 1 then return deps, {redis.call('HINCRBY', key, deps[1], -1)} end
  local times, unique = {}, {}
  for _, d in ipairs(deps) do
    if not times[d] then table.insert(unique, d) end
    times[d] = (times[d] or 0) + 1
  end
  local raw = hmget_all(key, unique)
  local lefts, counts = {}, {}
  for i, d in ipairs(unique) do
    lefts[i] = (tonumber(raw[i]) or 0) - times[d]
    table.insert(counts, d)
    table.insert(counts, lefts[i])
  end
  hset_all(key, counts)
  return unique, lefts
end
for _, t in ipairs(targets) do
  local b, element = split(t)
  local st
  if t == owner then st = owner_state() else st = redis.call('HGET', bkey(b, 'state'), element) end
  if st and not TERMINAL[st] then
    touched[b] = true
    local extra = {}
    for k, v in pairs(info) do extra[k] = v end
    if t ~= owner then extra['built_by'] = owner end
    local built = outcome == 'built'
    local finished_info = mark(b, element, st, outcome, extra,
                               t == owner and owner_info or nil, built)
    if built then
      do
        local deps, lefts = decrement_pending(b, dependents_of(b, element, finished_info))
        local to_ready = {}
        for i, d in ipairs(deps) do
          -- The counter reaches 0 once (each dependency is finished once);
          -- then the dependent waited, unless it finished meanwhile (skipped,
          -- cancelled: its info says so, no state read).
          local left = lefts[i]
          if left == 0 and send_ready and #(to_send[b] or {}) < SEND_IN_MOVE then
            -- Sent in this move (below), not made ready first (issue 16).
            if not to_send[b] then
              to_send[b] = {}
              table.insert(send_order, b)
            end
            table.insert(to_send[b], {e = d})
          elseif left == 0 then
            table.insert(to_ready, d)
          end
        end
        -- The rest made ready a chunk at a time (make_ready), for the caller
        -- to send.
        make_ready(b, to_ready, now, ready)
      end
    else
      -- The dependency's error goes with it: a failed fetch says why at once.
      local why = 'dependency ' .. element .. ' failed'
      if type(info['error']) == 'string' and info['error'] ~= '' then
        why = why .. ': ' .. info['error']
      end
      skip_dependents(b, element, why)
      stop_rest(b, element)
    end
  end
end
local entry = ARGV[7] or ''
if entry ~= '' and outcome == 'built' then
  -- The artifact index, in this move rather than a transaction of its own
  -- (issue 16); end_build sets its expiry.
  -- (An entry new to one set is new to both: they gain and lose members
  -- together. A known one only gets its time, issue 16.)
  local by_key, by_time = index_keys()
  if redis.call('ZADD', by_time, now, entry) == 1 then redis.call('ZADD', by_key, 0, entry) end
end
-- The dependents made ready, sent: one read and one write of their specs,
-- infos and states per build, their events with the finish's.
local sent = {}
for _, b in ipairs(send_order) do
  local w = writes_of(b)
  for _, r in ipairs(send_elements(b, to_send[b], tonumber(now), tonumber(ttl), events_of(b), true,
                                   w.infos, w.states)) do
    table.insert(sent, {b, r[1], r[2], r[3], r[4], r[5]})
  end
  -- (Written before the next build's sends: one of those may find this
  -- build's element the builder of its artifact, and reads its state.)
  flush_writes()
end
flush_writes()
flush_events()
-- (A build that has an element ready or sent now is not done: no need to ask.)
local has_ready = {}
for _, r in ipairs(ready) do has_ready[r[1]] = true end
-- (A dependent not sent, being finished already, says nothing.)
for _, r in ipairs(sent) do
  if r[3] ~= 0 or r[4] ~= '' then has_ready[r[1]] = true end
end
for b, _ in pairs(touched) do
  if not has_ready[b] then update_build_status(b, now, ttl) end
end
return cjson.encode({ready = ready, sent = sent, stopped = stopped, released = released})
