-- Wait on another build's element: state -> queued, info.waiting_on = owner.
-- ARGV[1] build, ARGV[2] element, ARGV[3] owner, ARGV[4] now. Returns 1, or 0
-- if not active.
local b, e, owner, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local st = redis.call('HGET', bkey(b, 'state'), e)
if st ~= 'ready' and st ~= 'queued' and st ~= 'running' then return 0 end
local info = get_info(b, e)
info['waiting_on'] = owner
put_info(b, e, info)
redis.call('HSET', bkey(b, 'state'), e, 'queued')
count_state(b, e, st, 'queued')
emit(b, {event = 'waiting', element = e, waiting_on = owner, time = now})
return 1
