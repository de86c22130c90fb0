-- acquire: the one round trip of the common case. Grant at once when nobody waits and nothing
-- holds the key; else refuse (queue full, or the request may not wait), or queue it and dispatch
-- (which may grant it in the same call, if it is the fairest). Releases this replica gathered
-- since its last call ride along and go first, so a busy replica needs no round trip for them.
-- ARGV[4..]: entry, key, priority, may wait (1|0), max depth, releases (see release_batch), then
-- the ticket (see read_ticket)
local entry, key = ARGV[4], ARGV[5]
local priority, may_wait, max_depth = tonumber(ARGV[6]), ARGV[7] == '1', tonumber(ARGV[8])
local t = read_ticket(key, release_batch(9))
drop_expired()
local wake, mine = -1, {}
if ARGV[9] ~= '0' then wake, mine = dispatch() end  -- what the releases freed goes to the queue first
local depth = redis.call('ZCARD', K.queue)
if depth == 0 and not blocked(key, t) then
  local backend = free_slot(t.b)
  if backend then
    local fields = grant(entry, key, t, backend)
    return {'granted', wake, fields, mine}
  end
end
if depth >= max_depth then
  return {'refused', wake, refusal(key, t, 'queue_full'), mine}
end
if not may_wait then
  return {'refused', wake, refusal(key, t, blocked(key, t) or 'capacity'), mine}
end
enqueue(entry, key, t, priority)
local later, more = dispatch()
for _, grant_message in ipairs(more) do mine[#mine + 1] = grant_message end
return {'queued', later, {}, mine}
