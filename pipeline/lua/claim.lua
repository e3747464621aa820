-- Claim an artifact URI for building, or wait on its current builder.
-- ARGV[1] claimant "build\telement", ARGV[2] artifact URI, ARGV[3] claim TTL seconds.
-- Returns the owner ("" when the claimant now owns it).
return claim_uri(ARGV[1], ARGV[2], tonumber(ARGV[3]))
