-- Cancel a running build: active elements -> cancelled; give up the URIs they
-- claimed and leave the waiter sets they were in. A finished build stays as it
-- is. ARGV[1] build, ARGV[2] now, ARGV[3] TTL.
-- Returns JSON {"stopped": [info + element ...], "released": ["build\telement" ...]}.
local b, now, ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local stopped, released = {}, {}
if redis.call('HGET', bkey(b, 'meta'), 'status') ~= 'running' then
  return cjson.encode({stopped = stopped, released = released})
end
local states = redis.call('HGETALL', bkey(b, 'state'))
for i = 1, #states, 2 do
  local e, st = states[i], states[i + 1]
  if not TERMINAL[st] then
    stop_element(b, e, 'cancelled', nil, now, stopped, released)
  end
end
end_build(b, 'cancelled', now, ttl)
return cjson.encode({stopped = stopped, released = released})
