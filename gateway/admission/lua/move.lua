-- move: failover. Take a free slot among the candidates (never the current backend; chosen as
-- a ticket's are, see free_slot: the first when free) and give the current one back. With none free, wait for one ahead of every queued
-- request (it was admitted already), keeping the current slot meanwhile: dispatch moves it and
-- tells its replica ('m'). `stop` ends such a wait: answers where the lease is now.
-- ARGV[4..]: lease, key, current backend, mode (move|stop), then backend/slots/weight triples
local lease, key, current, mode = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local backends = {}
for i = 8, #ARGV, 3 do
  if ARGV[i] ~= current then
    backends[#backends + 1] = {ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])}
  end
end
if mode == 'stop' then
  if redis.call('ZREM', K.movers, lease) == 1 then
    redis.call('HDEL', K.moves, lease)
    return {'stayed', -1, {current}, {}}
  end
  for _, b in ipairs(backends) do
    if redis.call('ZSCORE', K.slots(b[1]), lease) then return {'moved', -1, {b[1]}, {}} end
  end
  return {'stayed', -1, {current}, {}}
end
local backend = free_slot(backends)
if backend then
  drop(K.slots(current), lease)
  hold(K.slots(backend), lease)
  local wake, mine = dispatch()
  return {'moved', wake, {backend}, mine}
end
redis.call('ZADD', K.movers, NOW, lease)
redis.call('HSET', K.moves, lease, cjson.encode({k = key, cur = current, b = backends, o = ME}))
redis.call('PEXPIRE', K.movers, TTL)
redis.call('PEXPIRE', K.moves, TTL)
local wake, mine = dispatch()
return {'waiting', wake, {}, mine}
