-- Is a stage message stale (an older attempt, an earlier stage, a finished
-- element, a stopped build)? ARGV[1] build, ARGV[2] element, ARGV[3] attempt,
-- ARGV[4] stage. Returns 1 (stale) or 0 (current).
if current_message(ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]) then return 0 end
return 1
