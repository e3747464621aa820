-- Merge changes into an element's info. ARGV[1] build, ARGV[2] element,
-- ARGV[3] changes JSON. Returns 1, or 0 if the element does not exist.
local b, e, changes = ARGV[1], ARGV[2], cjson.decode(ARGV[3])
if not redis.call('HGET', bkey(b, 'state'), e) then return 0 end
local info = get_info(b, e)
for k, v in pairs(changes) do info[k] = v end
put_info(b, e, info)
return 1
