-- Shared by every admission script: loaded after the keyspace (K, rendered from keys.py) and before
-- the script's own body. Every time is the Redis server's clock in ms (TIME); replicas send and
-- receive durations only. ARGV[1..3] of every script: window (ms), lease TTL (ms), caller's replica.
--
-- A ticket (t) is what a request asks for: t.k key, t.c token cost, t.r rpm, t.t tpm,
-- t.m max concurrency (nil: no limit), t.b {{backend, slots, weight}, ...} in the router's order
-- (the first is its pick), t.o replica, t.s "backend=slots,..." (its backends as one string).

local WINDOW = tonumber(ARGV[1])
local TTL = tonumber(ARGV[2])
local ME = ARGV[3]
local NOW
do
  local time = redis.call('TIME')
  NOW = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000
end

local function opt(s)
  if s == nil or s == '' then return nil end
  return tonumber(s)
end

-- one argument's tab-separated fields (empty ones kept): a request or a release in one argument
-- costs the replica far less to send than its fields one by one
local function fields(s)
  local parts, at = {}, 1
  while true do
    local tab = string.find(s, '\t', at, true)
    if not tab then
      parts[#parts + 1] = string.sub(s, at)
      return parts
    end
    parts[#parts + 1] = string.sub(s, at, tab - 1)
    at = tab + 1
  end
end

-- cost, rpm, tpm, concurrency at args[at..at+3], then backend/slots/weight triples to the end
local function read_ticket(key, args, at)
  local t = {k = key, c = tonumber(args[at]), r = opt(args[at + 1]), t = opt(args[at + 2]),
             m = opt(args[at + 3]), o = ME, b = {}}
  local sig = {}
  for i = at + 4, #args, 3 do
    t.b[#t.b + 1] = {args[i], tonumber(args[i + 1]), tonumber(args[i + 2])}
    sig[#sig + 1] = args[i] .. '=' .. args[i + 1]
  end
  t.s = table.concat(sig, ',')
  return t
end

local function decode_ticket(raw)
  return cjson.decode(string.sub(raw, string.find(raw, '\n', 1, true) + 1))
end

local function earliest(zset)
  local first = redis.call('ZRANGE', zset, 0, 0, 'WITHSCORES')
  if first[2] then return tonumber(first[2]) end
  return nil
end

-- ---------------------------------------------------------------- a key's sliding window

local rates = {}  -- key -> {n = grants in the window, sum = their tokens}, trimmed once per script

local function rate(key)
  local r = rates[key]
  if r then return r end
  local log, cost = K.log(key), K.cost(key)
  local edge = NOW - WINDOW
  local old = redis.call('ZRANGEBYSCORE', log, '-inf', edge)
  local n = redis.call('ZCARD', log) - #old
  local sum = 0
  if n == 0 then
    if #old > 0 then redis.call('DEL', log, cost) end
  else
    sum = tonumber(redis.call('HGET', cost, '=sum') or '0')
    if #old > 0 then
      -- the running total stays exact: what leaves the window is subtracted, entry by entry
      for i = 1, #old do
        sum = sum - tonumber(redis.call('HGET', cost, old[i]) or '0')
        redis.call('HDEL', cost, old[i])
      end
      redis.call('ZREMRANGEBYSCORE', log, '-inf', edge)
      redis.call('HSET', cost, '=sum', sum)
    end
  end
  r = {n = n, sum = sum}
  rates[key] = r
  return r
end

-- {grants in the window, their tokens, ms until the oldest leaves it}: the x-ratelimit-* numbers
local function usage(key, t)
  if not (t.r or t.t) then return {0, 0, 0} end
  local r = rate(key)
  if r.n == 0 then return {0, 0, 0} end
  return {r.n, r.sum, math.ceil(earliest(K.log(key)) + WINDOW - NOW)}
end

-- ---------------------------------------------------------------- leases: running requests

local counts = {}  -- zset name -> live members, expired ones dropped once per script

local function live(zset)
  local n = counts[zset]
  if n == nil then
    redis.call('ZREMRANGEBYSCORE', zset, '-inf', NOW)
    n = redis.call('ZCARD', zset)
    counts[zset] = n
  end
  return n
end

local function hold(zset, lease)
  live(zset)
  redis.call('ZADD', zset, NOW + TTL, lease)
  redis.call('PEXPIRE', zset, TTL)
  counts[zset] = nil
end

local function drop(zset, lease)
  counts[zset] = nil
  return redis.call('ZREM', zset, lease)
end

-- The router's pick (the first) when it has a free slot: its order carries the session's
-- affinity and the weights. Else the free backend least loaded against slots * weight, ties in
-- the router's order. (_free_slot in memory.py is the same rule; a weight missing, from a ticket
-- stored by an older replica, counts as 1.)
local function free_slot(backends)
  local best, best_load = nil, math.huge
  for i = 1, #backends do
    local b = backends[i]
    local used = live(K.slots(b[1]))
    if used < b[2] then
      if i == 1 then return b[1] end
      local load = used / (b[2] * (b[3] or 1))
      if load < best_load then best, best_load = b[1], load end
    end
  end
  return best
end

-- what stops the key from starting this request now (nil: nothing)
local function blocked(key, t)
  if t.r or t.t then
    local r = rate(key)
    if t.r and r.n >= t.r then return 'rpm' end
    if t.t and r.sum + t.c > t.t then return 'tpm' end
  end
  if t.m and live(K.run(key)) >= t.m then return 'concurrency' end
  return nil
end

-- the moment (server ms) the key's own limit would let this request pass, if one can tell
local function unblocked_at(key, t, reason)
  if reason == 'rpm' then
    local r = rate(key)
    local at = redis.call('ZRANGE', K.log(key), r.n - t.r, r.n - t.r, 'WITHSCORES')
    if at[2] then return tonumber(at[2]) + WINDOW end
  elseif reason == 'tpm' then
    local excess = rate(key).sum + t.c - t.t
    local log = redis.call('ZRANGE', K.log(key), 0, -1, 'WITHSCORES')
    for i = 1, #log, 2 do
      excess = excess - tonumber(redis.call('HGET', K.cost(key), log[i]) or '0')
      if excess <= 0 then return tonumber(log[i + 1]) + WINDOW end
    end
  elseif reason == 'concurrency' then
    return earliest(K.run(key))
  end
  return nil
end

-- {reason, grants, tokens, reset ms, retry-after ms}
local function refusal(key, t, reason)
  local u = usage(key, t)
  local retry = 1000
  if reason == 'rpm' or reason == 'tpm' then
    local at = unblocked_at(key, t, reason)
    if at then retry = math.max(1, math.ceil(at - NOW)) end
  end
  return {reason, u[1], u[2], u[3], retry}
end

-- ---------------------------------------------------------------- granting

local function vtime(name)
  return tonumber(redis.call('GET', name) or '0')
end

-- take the slot, the key's concurrency and its window; advance the fair-queuing clocks.
-- Returns the grant as the replica reads it, and the key's new virtual time.
local function grant(lease, key, t, backend)
  hold(K.slots(backend), lease)
  if t.m then hold(K.run(key), lease) end
  if t.r or t.t then
    local r = rate(key)
    r.n, r.sum = r.n + 1, r.sum + t.c
    redis.call('ZADD', K.log(key), NOW, lease)
    redis.call('HSET', K.cost(key), lease, t.c, '=sum', r.sum)
    redis.call('PEXPIRE', K.log(key), WINDOW + 1000)
    redis.call('PEXPIRE', K.cost(key), WINDOW + 1000)
  end
  local start = math.max(vtime(K.vt(key)), vtime(K.vnow))
  local vt = start + math.max(t.c, 1)
  redis.call('SET', K.vnow, start, 'PX', TTL)
  redis.call('SET', K.vt(key), vt, 'PX', TTL)
  local u = usage(key, t)
  return {'g', lease, backend, key, u[1], u[2], u[3]}, vt
end

-- a grant ('g') or a move ('m') for the calling replica goes back in the reply; any other
-- replica's goes to its list
local function deliver(fields, owner, mine)
  local message = table.concat(fields, '\t')
  if owner == ME then
    mine[#mine + 1] = message
  else
    local list = K.notify(owner)
    redis.call('RPUSH', list, message)
    redis.call('PEXPIRE', list, TTL)
  end
end

-- ---------------------------------------------------------------- the queue

local function enqueue(entry, key, t, priority)
  redis.call('ZADD', K.queue, NOW + TTL, entry)
  redis.call('HSET', K.tickets, entry, t.s .. '\n' .. cjson.encode(t))
  local kq = K.kq(key)
  if redis.call('EXISTS', kq) == 0 then
    -- a newly backlogged key starts at the queue's virtual time, not behind its own past
    local vt = math.max(vtime(K.vt(key)), vtime(K.vnow))
    redis.call('SET', K.vt(key), vt, 'PX', TTL)
    redis.call('ZADD', K.fair, vt, key)
  end
  -- priority first (-100..100), then arrival (server ms, < 1e13)
  redis.call('ZADD', kq, -priority * 1e13 + NOW, entry)
  for _, name in ipairs({K.queue, K.tickets, K.fair, kq}) do redis.call('PEXPIRE', name, TTL) end
end

local function unqueue(entry, key)
  redis.call('ZREM', K.queue, entry)
  redis.call('HDEL', K.tickets, entry)
  local kq = K.kq(key)
  redis.call('ZREM', kq, entry)
  if redis.call('EXISTS', kq) == 0 then redis.call('ZREM', K.fair, key) end
end

-- entries whose replica stopped renewing them (killed, or cut off from Redis)
local function drop_expired()
  local gone = redis.call('ZRANGEBYSCORE', K.queue, '-inf', NOW)
  for i = 1, #gone do
    local raw = redis.call('HGET', K.tickets, gone[i])
    if raw then
      unqueue(gone[i], decode_ticket(raw).k)
    else
      redis.call('ZREM', K.queue, gone[i])
    end
  end
end

-- Failovers waiting for a slot go first: they were admitted already. A mover keeps its current
-- slot until it moves; one whose current slot expired (its replica died) is dropped.
-- Returns the backend lists of those still waiting.
local function serve_movers(mine)
  local stuck = {}
  local movers = redis.call('ZRANGE', K.movers, 0, -1)
  for i = 1, #movers do
    local lease = movers[i]
    local raw = redis.call('HGET', K.moves, lease)
    local m = raw and cjson.decode(raw)
    local held = m and redis.call('ZSCORE', K.slots(m.cur), lease)
    if not held or tonumber(held) <= NOW then
      redis.call('ZREM', K.movers, lease)
      redis.call('HDEL', K.moves, lease)
    else
      local backend = free_slot(m.b)
      if backend then
        drop(K.slots(m.cur), lease)
        hold(K.slots(backend), lease)
        redis.call('ZREM', K.movers, lease)
        redis.call('HDEL', K.moves, lease)
        deliver({'m', lease, backend, m.k, 0, 0, 0}, m.o, mine)
      else
        stuck[#stuck + 1] = m.b
      end
    end
  end
  return stuck
end

-- the earliest lease expiry among these backends' slots
local function slot_wake(wake, backends)
  for _, b in ipairs(backends) do
    local at = earliest(K.slots(b[1]))
    if at and (wake == nil or at < wake) then wake = at end
  end
  return wake
end

local function in_ms(wake)
  if wake == nil then return -1 end
  return math.max(1, math.ceil(wake - NOW))
end

-- the earlier of two in_ms answers (-1: never)
local function sooner(a, b)
  if a < 0 then return b end
  if b < 0 then return a end
  return math.min(a, b)
end

-- Grant every waiter that can run now, fairest first (start-time fair queuing: the key with the
-- smallest virtual time; within a key, priority then arrival; a key held by its own limit is
-- skipped). Returns the ms until something may change without an event (a window or a lease
-- expiring; -1: nothing), and the grants for the calling replica.
-- The real token count replaces a grant's estimate in its key's window; true for a refund.
local function settle_cost(lease, key, tokens)
  local old = redis.call('HGET', K.cost(key), lease)
  if not old then return false end  -- the grant has left the window
  old = tonumber(old)
  local r = rate(key)
  r.sum = r.sum + tokens - old
  redis.call('HSET', K.cost(key), lease, tokens, '=sum', r.sum)
  return tokens < old
end

-- A finished request: its slot and its key's concurrency go back; with its real token count
-- (not '') that count replaces the estimate in the key's window. Releasing twice is harmless.
local function release_lease(lease, key, backend, tokens)
  if tokens ~= '' then settle_cost(lease, key, tonumber(tokens)) end
  drop(K.slots(backend), lease)
  drop(K.run(key), lease)
end

-- The releases a replica gathered: ARGV[at] says how many, then one argument each:
-- lease, key, backend, tokens, tab-separated. Returns where the next argument starts.
local function release_batch(at)
  local n = tonumber(ARGV[at])
  for i = 1, n do
    local f = fields(ARGV[at + i])
    release_lease(f[1], f[2], f[3], f[4])
  end
  return at + 1 + n
end

local function dispatch()
  local mine = {}
  local wake
  if redis.call('EXISTS', K.movers) == 1 then
    for _, backends in ipairs(serve_movers(mine)) do wake = slot_wake(wake, backends) end
  end
  if redis.call('EXISTS', K.queue) == 0 then return in_ms(wake), mine end
  drop_expired()
  local tickets = {}  -- entry -> {s = sig, raw = stored} until decoded, then the ticket; false: gone
  local heads, full
  while true do
    local granted = false
    heads, full = {}, {}  -- keys held by a limit {key, t, reason}; sig -> backends without a slot
    local fair = redis.call('ZRANGE', K.fair, 0, -1)
    for i = 1, #fair do
      local key = fair[i]
      local kq = K.kq(key)
      local entries = redis.call('ZRANGE', kq, 0, -1)
      if #entries == 0 then redis.call('ZREM', K.fair, key) end
      for j = 1, #entries do
        local entry = entries[j]
        local t = tickets[entry]
        if t == nil then
          local raw = redis.call('HGET', K.tickets, entry)
          t = raw and {s = string.sub(raw, 1, string.find(raw, '\n', 1, true) - 1), raw = raw} or false
          tickets[entry] = t
        end
        if not t then
          redis.call('ZREM', kq, entry)
          redis.call('ZREM', K.queue, entry)
        elseif j > 1 and full[t.s] then
          -- the key's first request was not held by a limit, and this one's backends are full
        else
          if t.raw then
            local sig = t.s
            t = decode_ticket(t.raw)
            t.s = sig
            tickets[entry] = t
          end
          local reason = blocked(key, t)
          if reason then
            heads[#heads + 1] = {key, t, reason}
            break  -- the key's own limit holds every one of its requests
          end
          local backend = free_slot(t.b)
          if backend then
            unqueue(entry, key)
            local fields, vt = grant(entry, key, t, backend)
            if redis.call('EXISTS', kq) == 1 then redis.call('ZADD', K.fair, vt, key) end
            deliver(fields, t.o, mine)
            tickets[entry] = false
            granted = true
            break
          end
          full[t.s] = t.b  -- another of its requests may be for a backend with room
        end
      end
      if granted then break end
    end
    if not granted then break end
  end
  for _, head in ipairs(heads) do
    local at = unblocked_at(head[1], head[2], head[3])
    if at and (wake == nil or at < wake) then wake = at end
  end
  for _, backends in pairs(full) do wake = slot_wake(wake, backends) end
  return in_ms(wake), mine
end
