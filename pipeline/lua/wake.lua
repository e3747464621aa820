-- Repair a build left waiting with nothing live. No move leaves one so, but
-- a script that fails keeps the writes it made before the error: a finish
-- that failed half-way has counted its dependents down and made none ready
-- (their count is 0; below 0: the same finish made again, its element sent
-- again as lost), or marked its element and lost the rest (a dependent's
-- count left above 0, a failure's dependents not skipped).
-- ARGV[1] build, ARGV[2] now, ARGV[3] a JSON list of element names the
-- caller found waiting: made ready when their kept count is 0 or less.
-- ARGV[4] (optional) a JSON list of waiting elements whose dependencies the
-- caller found all built or cached: their count is set to 0 and they are made
-- ready. ARGV[5] (optional) a JSON list of [element, why]: waiting elements a
-- failed, skipped or cancelled dependency leaves nothing to wait for: they
-- are skipped (and the build ends if nothing else is left). ARGV[6] the TTL
-- of a build that ends. Each acts only on an element still waiting.
-- Returns a JSON list of those made ready.
local b, now = ARGV[1], tonumber(ARGV[2])
local names = cjson.decode(ARGV[3])
local recounted = cjson.decode(ARGV[4] or '[]')
local skips = cjson.decode(ARGV[5] or '[]')
local out = {}
if redis.call('HGET', bkey(b, 'meta'), 'status') ~= 'running' then
  return cjson.encode(out)
end
local stuck = {}
if #names > 0 then
  local counts = hmget_all(bkey(b, 'pending'), names)
  for i, e in ipairs(names) do
    if counts[i] and tonumber(counts[i]) <= 0 then table.insert(stuck, e) end
  end
end
local recount = {}
for _, e in ipairs(recounted) do
  recount[e] = true
  table.insert(stuck, e)
end
local ready = {}
-- (CHECK: only those still waiting, read in this move.)
make_ready(b, stuck, now, ready, true)
local zeros = {}
for _, r in ipairs(ready) do
  table.insert(out, r[2])
  if recount[r[2]] then
    table.insert(zeros, r[2])
    table.insert(zeros, 0)
  end
end
hset_all(bkey(b, 'pending'), zeros)
if #skips > 0 then
  local skip_names = {}
  for i, s in ipairs(skips) do skip_names[i] = s[1] end
  local states = hmget_all(bkey(b, 'state'), skip_names)
  local stopped, released = {}, {}
  for i, s in ipairs(skips) do
    -- (A waiting element never claimed its artifact URI: nothing released.)
    if states[i] == 'waiting' then stop_element(b, s[1], 'skipped', s[2], now, stopped, released) end
  end
  if #stopped > 0 then update_build_status(b, now, tonumber(ARGV[6])) end
end
return cjson.encode(out)
