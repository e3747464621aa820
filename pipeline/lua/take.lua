-- A worker received a stage message (it may start it later: prefetch, a
-- countdown): record it as the message's holder. ARGV[1] build, ARGV[2]
-- element, ARGV[3] attempt, ARGV[4] stage, ARGV[5] holder "instance#epoch",
-- ARGV[6] now. Returns 1, or 0 when the message is stale.
local b, e, attempt, stage, holder, now =
  ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], tonumber(ARGV[6])
local info = current_from_info(b, e, attempt, stage)
if not info then return 0 end
info['holder'] = holder
info['taken_at'] = now
put_info(b, e, info)
return 1
