-- dispatch: a replica's timer, at the moment a window or a lease was due to free something.
local wake, mine = dispatch()
return {'ok', wake, {}, mine}
