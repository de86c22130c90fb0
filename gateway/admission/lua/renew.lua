-- renew: one call per replica every lease_ttl/3 keeps all its leases and queue entries alive.
-- A replica that stops calling (killed) loses them within the TTL; nothing else sweeps.
-- Answers the leases already gone (expired before renewal), and dispatches when it has waiters.
-- ARGV[4..]: n, then n x (lease, backend, key); m, then m x (entry, key)
local expiry = NOW + TTL
local lost = {}
local i = 5
for _ = 1, tonumber(ARGV[4]) do
  local lease, backend, key = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  i = i + 3
  local slots = K.slots(backend)
  local score = redis.call('ZSCORE', slots, lease)
  if score and tonumber(score) > NOW then
    redis.call('ZADD', slots, 'XX', expiry, lease)
    redis.call('PEXPIRE', slots, TTL)
    local run = K.run(key)
    if redis.call('ZSCORE', run, lease) then
      redis.call('ZADD', run, 'XX', expiry, lease)
      redis.call('PEXPIRE', run, TTL)
    end
  else
    lost[#lost + 1] = lease
  end
end
if redis.call('EXISTS', K.movers) == 1 then  -- failovers waiting: alive while their leases are
  redis.call('PEXPIRE', K.movers, TTL)
  redis.call('PEXPIRE', K.moves, TTL)
end
local waiting = tonumber(ARGV[i])
i = i + 1
for _ = 1, waiting do
  local entry, key = ARGV[i], ARGV[i + 1]
  i = i + 2
  local score = redis.call('ZSCORE', K.queue, entry)
  if score and tonumber(score) > NOW then
    redis.call('ZADD', K.queue, 'XX', expiry, entry)
    redis.call('PEXPIRE', K.kq(key), TTL)
    redis.call('PEXPIRE', K.vt(key), TTL)
  end
end
local wake, mine = -1, {}
if waiting > 0 then
  for _, name in ipairs({K.queue, K.tickets, K.fair, K.vnow}) do redis.call('PEXPIRE', name, TTL) end
  wake, mine = dispatch()
end
return {'ok', wake, lost, mine}
