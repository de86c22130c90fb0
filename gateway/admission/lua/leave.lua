-- leave: a waiter timed out, its client left, or it was cancelled. Out of the queue; if it was
-- granted in the same instant, the grant goes back at once (no slot leaked). Answers what holds
-- the key now, for the refusal.
-- ARGV[4..]: entry, key, then the ticket (see read_ticket)
local entry, key = ARGV[4], ARGV[5]
local t = read_ticket(key, ARGV, 6)
local status = 'gone'
if redis.call('ZSCORE', K.queue, entry) then
  unqueue(entry, key)
  status = 'left'
else
  local freed = 0
  for _, b in ipairs(t.b) do freed = freed + drop(K.slots(b[1]), entry) end
  drop(K.run(key), entry)
  if freed > 0 then status = 'released' end
end
local wake, mine = dispatch()
return {status, wake, refusal(key, t, blocked(key, t) or 'capacity'), mine}
