-- Count one delivery of a task message (issue 16: one call, not MULTI INCR
-- EXPIRE EXEC). ARGV[1] task id, ARGV[2] retry number, ARGV[3] TTL seconds.
-- Returns how often that message was delivered.
local key = PREFIX .. ':delivery:' .. ARGV[1] .. ':' .. ARGV[2]
local count = redis.call('INCR', key)
redis.call('EXPIRE', key, ARGV[3])
return count
