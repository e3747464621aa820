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
    redis.call('HSET', bkey(b, 'state'), e, 'cancelled')
    count_state(b, e, st, 'cancelled')
    redis.call('ZREM', bkey(b, 'heartbeat'), e)
    local info = get_info(b, e)
    info['finished'] = now
    put_info(b, e, info)
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
end
redis.call('HSET', bkey(b, 'meta'), 'status', 'cancelled', 'finished', now)
redis.call('SREM', PREFIX .. ':active', b)
expire_build(b, ttl)
return cjson.encode({stopped = stopped, released = released})
