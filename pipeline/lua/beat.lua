-- A stage still runs after a heartbeat interval: its element's heartbeat
-- deadline (B:heartbeat), only while the element runs (a late beat of a
-- finished element adds nothing). The first beat of a stage marks the info
-- ("beat"), so that the move that ends it removes the entry.
-- ARGV[1] build, ARGV[2] element, ARGV[3] deadline. Returns 1, or 0 when the
-- element does not run.
local b, e, deadline = ARGV[1], ARGV[2], ARGV[3]
if redis.call('HGET', bkey(b, 'state'), e) ~= 'running' then return 0 end
if redis.call('ZADD', bkey(b, 'heartbeat'), deadline, e) == 1 then
  local info = get_info(b, e)
  info['beat'] = 1
  put_info(b, e, info)
end
return 1
