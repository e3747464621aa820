-- Record a send: the next attempt number, the task ids; state -> queued.
-- ARGV[1] build, ARGV[2] element, ARGV[3] task ids JSON, ARGV[4] now.
-- Returns the new attempt, or 0 when the element must not be sent (finished,
-- cancelled, still waiting for dependencies).
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
info['holder'] = nil
info['handed_at'] = nil
info['taken_at'] = nil
info['delivery'] = nil
put_info(b, e, info)
redis.call('HSET', bkey(b, 'state'), e, 'queued')
count_state(b, e, st, 'queued')
emit(b, {event = 'queued', element = e, attempt = attempt, time = now})
redis.call('ZREM', bkey(b, 'heartbeat'), e)
return attempt
