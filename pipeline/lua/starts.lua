-- The stage starts one worker process recorded since its last flush, in one
-- move (issue 16: a start is no script of its own). Each record is the
-- latest stage an element started in that process (earlier ones of the
-- same flush are coalesced into it). ARGV[1] a JSON list of records
-- {b, e, attempt, stage, host, worker, holder, at (when the stage started),
-- first (when the first coalesced stage started), take (true: a message
-- received but not started, see take.lua: only its holder is recorded),
-- note (true: no start, only its notes), notes (changes to merge into the
-- info, as note.lua: what the stage noted, its remote operation ...)}. A record of a message
-- that is stale by now (an older attempt, an earlier stage, an element that
-- finished meanwhile) writes nothing.
-- Per build in the batch: one HMGET of the infos, one HSET of them, one HSET
-- of the states that become running, one XADD of the stage events.
-- Returns JSON {stale: the stale records' "build\telement", orphans: the
-- remote operations stale records name that nobody will cancel: their
-- element was cancelled (a cancel, or a failure with on-error terminate)
-- before this flush recorded the operation, so the canceller could not see
-- it; the worker process that started it cancels it.}
local records = cjson.decode(ARGV[1])
local builds, order = {}, {}
for _, r in ipairs(records) do
  if not builds[r.b] then
    builds[r.b] = {}
    table.insert(order, r.b)
  end
  table.insert(builds[r.b], r)
end
local stale, orphans = {}, {}
for _, b in ipairs(order) do
  local rs = builds[b]
  local names = {}
  for i, r in ipairs(rs) do names[i] = r.e end
  local raw = hmget_all(bkey(b, 'info'), names)
  local infos, states, events = {}, {}, {}
  for i, r in ipairs(rs) do
    local info = raw[i] and cjson.decode(raw[i]) or nil
    local attempt = tonumber(r.attempt)
    local st = info and info_current(info, attempt, r.stage)
    if not st then
      table.insert(stale, b .. '\t' .. r.e)
      local op = type(r.notes) == 'table' and r.notes['operation'] or nil
      if present(op) and info and info['operation'] ~= op
          and redis.call('HGET', bkey(b, 'state'), r.e) == 'cancelled' then
        table.insert(orphans, op)
      end
    elseif r.take or r.note then
      if r.take then
        -- A message received and not started yet (prefetched, a countdown):
        -- its holder, and a sign of life for the reconciler.
        info['holder'] = r.holder
        info['taken_at'] = tonumber(r.at)
      end
    else
      local at = tonumber(r.at)
      info['holder'] = r.holder
      info['taken_at'] = info['taken_at'] or at
      info['host'] = r.host
      info['worker'] = r.worker
      info['stage_at'] = at
      local hosts = info['hosts']
      if type(hosts) ~= 'table' then hosts = {} end
      local seen = false
      for _, h in ipairs(hosts) do if h == r.host then seen = true end end
      if not seen then table.insert(hosts, r.host) end
      info['hosts'] = hosts
      if not present(info['started']) then info['started'] = tonumber(r.first) or at end
      if info['stage'] ~= r.stage then
        table.insert(events, {event = 'stage', element = r.e, stage = r.stage, attempt = attempt,
                              host = r.host, worker = r.worker, time = at})
      end
      info['stage'] = r.stage
      -- (queued -> running: both live, so no count changes.)
      if st ~= 'running' then
        table.insert(states, r.e)
        table.insert(states, 'running')
      end
    end
    if st then
      -- What the stage noted (note.lua's changes: a remote operation's name
      -- is an event).
      if type(r.notes) == 'table' then
        for k, v in pairs(r.notes) do
          if k == 'operation' and present(v) and v ~= info['operation'] then
            table.insert(events, {event = 'operation', element = r.e, operation = v,
                                  stage = info['stage'], attempt = attempt, time = tonumber(r.at)})
          end
          info[k] = v
        end
      end
      table.insert(infos, r.e)
      table.insert(infos, cjson.encode(info))
    end
  end
  hset_all(bkey(b, 'info'), infos)
  hset_all(bkey(b, 'state'), states)
  emit_many(b, events)
end
return cjson.encode({stale = stale, orphans = orphans})
