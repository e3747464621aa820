-- Merge changes into an element's info. ARGV[1] build, ARGV[2] element,
-- ARGV[3] changes JSON, ARGV[4] now. Returns 1, or 0 if the element does not
-- exist. A new remote operation name of an unfinished element is an event.
local b, e, changes, now = ARGV[1], ARGV[2], cjson.decode(ARGV[3]), tonumber(ARGV[4])
local st = redis.call('HGET', bkey(b, 'state'), e)
if not st then return 0 end
local info = get_info(b, e)
local operation = changes['operation']
if operation and operation ~= cjson.null and operation ~= info['operation']
    and not TERMINAL[st] then
  emit(b, {event = 'operation', element = e, operation = operation,
           stage = info['stage'], attempt = info['attempt'], time = now})
end
for k, v in pairs(changes) do info[k] = v end
put_info(b, e, info)
return 1
