-- Record a send: the next attempt number, the task ids; state -> queued.
-- ARGV[1] build, ARGV[2] element, ARGV[3] task ids JSON, ARGV[4] now.
-- Returns the new attempt, or 0 when the element must not be sent (finished,
-- cancelled, still waiting for dependencies).
return queue_element(ARGV[1], ARGV[2], cjson.decode(ARGV[3]), tonumber(ARGV[4]))
