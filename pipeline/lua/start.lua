-- A stage task begins: only for the current attempt of an unfinished element
-- of a running build. ARGV[1] build, ARGV[2] element, ARGV[3] attempt,
-- ARGV[4] stage, ARGV[5] host, ARGV[6] worker instance, ARGV[7] now,
-- ARGV[8] heartbeat deadline, ARGV[9] holder "instance#epoch", ARGV[10] the
-- delivery: "task id:retry number" ("" counts none). Returns how often this
-- delivery has begun (1 the first time), or 0 when the task is stale (an older
-- attempt or an earlier stage: a copy).
-- Issue 16: one read (the info) and one write (the info; the state too on
-- the attempt's first stage). No heartbeat: the stage's start time
-- ("stage_at") stands for one until the stage has run a heartbeat interval
-- (beat.lua); only a start without a holder (an older worker) writes one.
local b, e, attempt, stage, host, worker, now, deadline, holder, delivery =
  ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8],
  ARGV[9], ARGV[10] or ''
local info, old_state = current_from_info(b, e, attempt, stage)
if not info then return 0 end
-- Redis keeps no delivery count, and a message comes back when the worker
-- that held it died: counted here, in the info the move writes anyway, not
-- in a key of its own (issue 16: three commands less per stage). Only the
-- current delivery's count is kept (the chain only moves forward).
local deliveries = 1
if delivery ~= '' then
  local last = info['delivery']
  if type(last) == 'table' and last['id'] == delivery then
    deliveries = (tonumber(last['count']) or 0) + 1
  end
  info['delivery'] = {id = delivery, count = deliveries}
end
if holder ~= '' then
  info['holder'] = holder
  info['taken_at'] = info['taken_at'] or now
end
info['host'] = host
info['worker'] = worker
info['stage_at'] = now
local hosts = info['hosts']
if type(hosts) ~= 'table' then hosts = {} end
local seen = false
for _, h in ipairs(hosts) do if h == host then seen = true end end
if not seen then table.insert(hosts, host) end
info['hosts'] = hosts
if not info['started'] then info['started'] = now end
-- An event when a stage starts, not when it resumes (execute re-queues
-- itself to follow its operation; a transient error retries the stage).
local new_stage = info['stage'] ~= stage
info['stage'] = stage
if holder == '' then
  redis.call('ZADD', bkey(b, 'heartbeat'), deadline, e)
  info['beat'] = 1
end
put_info(b, e, info)
if new_stage then
  emit(b, {event = 'stage', element = e, stage = stage, attempt = attempt, host = host,
           worker = worker, time = now})
end
if old_state ~= 'running' then
  redis.call('HSET', bkey(b, 'state'), e, 'running')
  count_state(b, e, old_state, 'running')
end
return deliveries
