-- acquire: the one round trip of the common case, for every request this replica admits at that
-- moment (those that arrived while its previous acquire was on its way go together), each as if
-- it had its own call, in order. Per request: grant at once when nobody waits and nothing holds
-- the key; else refuse (queue full, or the request may not wait), or queue it and dispatch (which
-- may grant it in the same call, if it is the fairest). Releases this replica gathered since its
-- last call ride along and go first, so a busy replica needs no round trip for them.
-- ARGV[4..]: max depth, max per key, releases (see release_batch), the number of requests, then one
-- argument per request: entry, key, priority, the most it may wait (ms; 0: it may not), then the
-- ticket (see read_ticket), tab-separated.
-- Answers {'batch', wake ms, {{status, grant | refusal | {}} per request}, grants for this replica};
-- a grant as its message (tab-separated, as `deliver` sends it).
local max_depth, max_per_key = tonumber(ARGV[4]), tonumber(ARGV[5])
local at = release_batch(6)
drop_expired()
local wake, mine = -1, {}
if ARGV[6] ~= '0' then wake, mine = dispatch() end  -- what the releases freed goes to the queue first

local function admit(entry, key, priority, max_wait, t)
  local depth = redis.call('ZCARD', K.queue)
  if depth == 0 and not blocked(key, t) then
    local backend = free_slot(t.b)
    if backend then
      local granted = grant(entry, key, t, backend)
      return {'granted', table.concat(granted, '\t')}
    end
  end
  if depth >= max_depth then
    return {'refused', refusal(key, t, 'queue_full')}
  end
  if max_wait <= 0 then
    return {'refused', refusal(key, t, blocked(key, t) or 'capacity')}
  end
  if redis.call('ZCARD', K.kq(key)) >= max_per_key then
    return {'refused', refusal(key, t, 'key_queue_full')}
  end
  if blocked(key, t) == 'rpm' then
    -- The key's window frees later than it may wait: told now, with the real wait, not after
    -- max_wait in a queue place. (Only rpm: tokens can come back early, when a request settles.)
    local at = unblocked_at(key, t, 'rpm')
    if at and at - NOW > max_wait then return {'refused', refusal(key, t, 'rpm')} end
  end
  enqueue(entry, key, t, priority)
  local later, more = dispatch()
  for _, grant_message in ipairs(more) do mine[#mine + 1] = grant_message end
  wake = sooner(wake, later)
  return {'queued', {}}
end

local answers = {}
for i = 1, tonumber(ARGV[at]) do
  local f = fields(ARGV[at + i])
  answers[i] = admit(f[1], f[2], tonumber(f[3]), tonumber(f[4]), read_ticket(f[2], f, 5))
end
return {'batch', wake, answers, mine}
