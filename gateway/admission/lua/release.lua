-- release: finished requests (the replica gathers them; see release_batch); their slots and
-- concurrency go back, and the queue moves.
-- ARGV[4..]: how many, then one argument each: lease, key, backend, tokens ('' when unknown),
-- tab-separated
release_batch(4)
local wake, mine = dispatch()
return {'ok', wake, {}, mine}
