-- Recompute a build's status. ARGV[1] build, ARGV[2] now, ARGV[3] TTL.
update_build_status(ARGV[1], tonumber(ARGV[2]), ARGV[3])
return redis.call('HGET', bkey(ARGV[1], 'meta'), 'status')
