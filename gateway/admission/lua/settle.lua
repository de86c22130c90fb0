-- settle: the real token count replaces the estimate in the key's window (refund or debt).
-- Nothing to do once the grant has left the window. A refund may let a waiter in.
-- ARGV[4..]: lease, key, tokens
local lease, key, tokens = ARGV[4], ARGV[5], tonumber(ARGV[6])
local r = rate(key)
local old = redis.call('HGET', K.cost(key), lease)
local wake, mine = -1, {}
if old then
  old = tonumber(old)
  r.sum = r.sum + tokens - old
  redis.call('HSET', K.cost(key), lease, tokens, '=sum', r.sum)
  if tokens < old then wake, mine = dispatch() end
end
return {'ok', wake, {}, mine}
