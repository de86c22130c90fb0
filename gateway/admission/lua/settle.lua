-- settle: the real token count replaces the estimate in the key's window (refund or debt).
-- Nothing to do once the grant has left the window. A refund may let a waiter in.
-- ARGV[4..]: lease, key, tokens
local wake, mine = -1, {}
if settle_cost(ARGV[4], ARGV[5], tonumber(ARGV[6])) then wake, mine = dispatch() end
return {'ok', wake, {}, mine}
