-- release: the request is over; its slot and concurrency go back, and the queue moves.
-- ARGV[4..]: lease, key, backend
local lease, key, backend = ARGV[4], ARGV[5], ARGV[6]
drop(K.slots(backend), lease)
drop(K.run(key), lease)
local wake, mine = dispatch()
return {'ok', wake, {}, mine}
