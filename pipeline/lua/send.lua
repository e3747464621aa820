-- Everything a send of an element's chain records, in one move (issue 16:
-- one script instead of claim, then queue or wait_on): claim its artifact
-- URI; when another build builds it, wait on that one; else record the send
-- (the next attempt, the task ids; state -> queued).
-- ARGV[1] build, ARGV[2] element, ARGV[3] artifact URI, ARGV[4] claim TTL
-- seconds, ARGV[5] task ids JSON, ARGV[6] now.
-- Returns {attempt, owner}: attempt 0 and the owner when it waits on another
-- build (owner "" when it is not active any more); the new attempt and ""
-- when its chain is to be sent; 0 and "" when it must not be sent.
local b, e, uri, ttl, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[6])
local owner = claim_uri(b .. '\t' .. e, uri, ttl)
if owner ~= '' then
  if wait_on_owner(b, e, owner, now) == 0 then return {0, ''} end
  return {0, owner}
end
return {queue_element(b, e, cjson.decode(ARGV[5]), now), ''}
