-- A stage ended and its holder hands the element on: no one holds it until a
-- worker takes its next message. The tasks hand on only when that message
-- could not be published (a refused publish: the reconciler then sends the
-- element again once its message is found in no queue); a chain's next stage
-- and a stage's re-queue go to the holder's own queue, so it holds on.
-- ARGV[1] build, ARGV[2] element, ARGV[3] attempt, ARGV[4] holder, ARGV[5] now.
-- Returns 1, or 0 when this holder no longer holds the element.
local b, e, attempt, holder, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local info = current_from_info(b, e, attempt, nil)
if not info or info['holder'] ~= holder then return 0 end
info['holder'] = nil
info['worker'] = nil
info['handed_at'] = now
drop_heartbeat(b, e, info)
put_info(b, e, info)
return 1
