-- Claim an artifact URI for building, or wait on its current builder.
-- ARGV[1] claimant "build\telement", ARGV[2] artifact URI, ARGV[3] claim TTL seconds.
-- Returns the owner ("" when the claimant now owns it).
local me, uri, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local owner = redis.call('GET', PREFIX .. ':claim:' .. uri)
if owner and owner ~= me then
  local b, element = split(owner)
  local st = redis.call('HGET', bkey(b, 'state'), element)
  if st == 'queued' or st == 'running' or st == 'ready' then
    redis.call('SADD', PREFIX .. ':waiters:' .. uri, me)
    redis.call('EXPIRE', PREFIX .. ':waiters:' .. uri, ttl)
    return owner
  end
end
redis.call('SET', PREFIX .. ':claim:' .. uri, me, 'EX', ttl)
return ''
