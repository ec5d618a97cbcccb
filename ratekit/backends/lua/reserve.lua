-- reserve: admit demands in order, each on the concurrency cap and every window at
-- once, until one does not fit, and say how long that one waits. One round trip for
-- the head of a queue and the callers behind it.
--
-- KEYS[1]      leases: sorted set, lease id -> expiry (s, account clock); one lease
--              per call in flight
-- KEYS[1 + i]  window i, KEYS[1 + n + i] its holds (see _window.lua)
-- KEYS[2n + 2] waiting: until when some caller is known to wait (s); settles publish
--              their release only while someone waits
-- KEYS[2n + 3] cooldown: until when the account is paused after a provider's 429 (s)
-- KEYS[2n + 4] clock: the account's clock (see account_clock)
-- ARGV[1]      "<now> <wall>" (s), or "" for the server's TIME
-- ARGV[2]      key ttl (ms): how long an idle account's keys outlive their last write
-- ARGV[3]      concurrency cap, or "" for none
-- ARGV[4]      the lease id of each demand, apart by spaces
-- ARGV[5]      lease ttl (s): a holder that stops renewing frees its slot after this
-- ARGV[6]      window specs (see parse_specs)
-- ARGV[7]      the demands, in the order they are served: "requests tokens cost", apart
--              by "|"
-- Returns {k, now, then the slice index per window of each of the k demands admitted
--         (k x n values), then, when k is less than the demands, wait (s) and
--         dimension of the first one refused}: dimension 0 is concurrency, i window i,
--         -1 the cooldown.
--         A wait that only a release can end is bounded by the oldest lease: a holder
--         that died frees its slot and holds when that lease lapses.

local n = (#KEYS - 4) / 2
local key_ttl_ms = tonumber(ARGV[2])
local now, wall = account_clock(KEYS[2 * n + 4], ARGV[1], key_ttl_ms)
local cap = tonumber(ARGV[3])
local lease_ids = {}
for id in string.gmatch(ARGV[4], '%S+') do
  lease_ids[#lease_ids + 1] = id
end
local lease_ttl_s = tonumber(ARGV[5])
local windows = parse_specs(ARGV[6], now, wall, key_ttl_ms)
local demands = {}
for packed in string.gmatch(ARGV[7], '[^|]+') do
  demands[#demands + 1] = parse_amounts(packed)
end
local leases = KEYS[1]
local waiting = KEYS[2 * n + 2]
sync_calendars(windows)

-- Leases that lapsed belong to holders that died: free their slots and holds.
local dead = redis.call('ZRANGEBYSCORE', leases, '-inf', now)
if #dead > 0 then
  for i = 1, n do
    for _, id in ipairs(dead) do
      unhold(windows[i], id)
    end
  end
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
end

-- A refusal: records that a caller waits (so releases are announced) and bounds a
-- wait for a release by the oldest lease; appended to what was admitted before it.
local function refuse(reply, wait, dimension)
  if wait == math.huge then
    local oldest = redis.call('ZRANGE', leases, 0, 0, 'WITHSCORES')
    if oldest[2] then
      wait = tonumber(oldest[2]) - now
    end
  end
  local until_s = now + math.min(wait, lease_ttl_s)
  local known = tonumber(redis.call('GET', waiting)) or 0
  if until_s > known then
    redis.call('SET', waiting, fmt(until_s), 'PX', key_ttl_ms)
  end
  reply[#reply + 1] = fmt(wait)
  reply[#reply + 1] = dimension
  return reply
end

local reply = {0, fmt(now)}
local paused_until = tonumber(redis.call('GET', KEYS[2 * n + 3]))
if paused_until and now < paused_until then
  return refuse(reply, paused_until - now, -1)
end

local in_flight = 0
if cap then
  in_flight = redis.call('ZCARD', leases)
end
local loaded = {}
for j = 1, #demands do
  local demand = demands[j]
  if cap and in_flight >= cap then
    return refuse(reply, math.huge, 0)
  end
  local worst_s, worst = 0, -1
  for i = 1, n do
    local w = windows[i]
    local amount = demand[w.position]
    if amount > 0 then
      if not loaded[i] then
        load(w)
        loaded[i] = true
      end
      local wait = wait_s(w, amount)
      if wait > worst_s then
        worst_s, worst = wait, i
      end
    end
  end
  if worst ~= -1 then
    return refuse(reply, worst_s, worst)
  end
  for i = 1, n do
    local w = windows[i]
    local amount = demand[w.position]
    if amount > 0 then
      if w.take == 0 then
        record(w, amount)
        counted(w, amount)
      else
        hold(w, lease_ids[j], amount)
        w.held = w.held + amount
      end
      redis.call('PEXPIRE', w.key, key_ttl_ms)
    end
    reply[#reply + 1] = fmt(slice_index(w))
  end
  redis.call('ZADD', leases, now + lease_ttl_s, lease_ids[j])
  redis.call('PEXPIRE', leases, key_ttl_ms)
  in_flight = in_flight + 1
  reply[1] = j
end
return reply
