-- acquire: the one round trip of the common case. Grant at once when nobody waits and nothing
-- holds the key; else refuse (queue full, or the request may not wait), or queue it and dispatch
-- (which may grant it in the same call, if it is the fairest).
-- ARGV[4..]: entry, key, priority, may wait (1|0), max depth, then the ticket (see read_ticket)
local entry, key = ARGV[4], ARGV[5]
local priority, may_wait, max_depth = tonumber(ARGV[6]), ARGV[7] == '1', tonumber(ARGV[8])
local t = read_ticket(key, 9)
drop_expired()
local depth = redis.call('ZCARD', K.queue)
if depth == 0 and not blocked(key, t) then
  local backend = free_slot(t.b)
  if backend then
    local fields = grant(entry, key, t, backend)
    return {'granted', -1, fields, {}}
  end
end
if depth >= max_depth then
  return {'refused', -1, refusal(key, t, 'queue_full'), {}}
end
if not may_wait then
  return {'refused', -1, refusal(key, t, blocked(key, t) or 'capacity'), {}}
end
enqueue(entry, key, t, priority)
local wake, mine = dispatch()
return {'queued', wake, {}, mine}
