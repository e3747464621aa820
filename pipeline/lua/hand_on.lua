-- A stage ended and its holder hands the element on to the next message (the
-- chain's next stage, or its own re-queue), which no one holds yet.
-- ARGV[1] build, ARGV[2] element, ARGV[3] attempt, ARGV[4] holder, ARGV[5] now.
-- Returns 1, or 0 when this holder no longer holds the element.
local b, e, attempt, holder, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local info = current_message(b, e, attempt, nil)
if not info or info['holder'] ~= holder then return 0 end
info['holder'] = nil
info['worker'] = nil
info['handed_at'] = now
put_info(b, e, info)
redis.call('ZREM', bkey(b, 'heartbeat'), e)
return 1
