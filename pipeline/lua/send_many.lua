-- Send many elements in one move (issue 16: what send.lua does for one, with
-- one read and one write per build for all, and one event entry).
-- ARGV[1] now, ARGV[2] claim TTL seconds, ARGV[3] a JSON list of
-- [build, element, task ids]. Returns a JSON list, in the same order, of
-- [build, element, attempt, owner, spec JSON, task ids] (see send_elements).
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local builds, order = {}, {}
for _, item in ipairs(cjson.decode(ARGV[3])) do
  local b = item[1]
  if not builds[b] then
    builds[b] = {}
    table.insert(order, b)
  end
  table.insert(builds[b], {e = item[2], ids = item[3]})
end
local out = {}
for _, b in ipairs(order) do
  local events = {}
  for _, r in ipairs(send_elements(b, builds[b], now, ttl, events, false)) do
    table.insert(out, {b, r[1], r[2], r[3], r[4], r[5]})
  end
  emit_many(b, events)
end
return cjson.encode(out)
