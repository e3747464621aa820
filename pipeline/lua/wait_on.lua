-- Wait on another build's element: state -> queued, info.waiting_on = owner.
-- ARGV[1] build, ARGV[2] element, ARGV[3] owner, ARGV[4] now. Returns 1, or 0
-- if not active.
return wait_on_owner(ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]))
