-- release: the request is over; its slot and concurrency go back, and the queue moves.
-- ARGV[4..]: lease, key, backend[, tokens] -- with tokens, settled in the same round trip.
local lease, key, backend = ARGV[4], ARGV[5], ARGV[6]
if ARGV[7] then settle_cost(lease, key, tonumber(ARGV[7])) end
drop(K.slots(backend), lease)
drop(K.run(key), lease)
local wake, mine = dispatch()
return {'ok', wake, {}, mine}
