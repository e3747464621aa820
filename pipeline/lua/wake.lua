-- Repair: make ready the elements of a build that still wait although no
-- dependency is left (their pending count is 0 or less). No move leaves one
-- so, but a script that fails keeps the writes it made before the error: a
-- finish that failed half-way has counted its dependents down and made none
-- ready. (A count below 0: the same finish made again, its element sent
-- again as lost.) ARGV[1] build, ARGV[2] now, ARGV[3] a JSON list of
-- element names (the caller found them waiting). Returns a JSON list of
-- those made ready.
local b, now = ARGV[1], tonumber(ARGV[2])
local names = cjson.decode(ARGV[3])
local out = {}
if #names == 0 or redis.call('HGET', bkey(b, 'meta'), 'status') ~= 'running' then
  return cjson.encode(out)
end
local counts = hmget_all(bkey(b, 'pending'), names)
local stuck = {}
for i, e in ipairs(names) do
  if counts[i] and tonumber(counts[i]) <= 0 then table.insert(stuck, e) end
end
local ready = {}
-- (CHECK: only those still waiting, read in this move.)
make_ready(b, stuck, now, ready, true)
for _, r in ipairs(ready) do table.insert(out, r[2]) end
return cjson.encode(out)
