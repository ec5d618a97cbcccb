-- reserve: admit one demand on the concurrency cap and every window at once, or on
-- none, and say how long to wait. One round trip per admission.
--
-- KEYS[1]      leases: sorted set, lease id -> expiry (s); one lease per call in flight
-- KEYS[1 + i]  window i (see _window.lua)
-- KEYS[n + 2]  waiting: until when some caller is known to wait (s); settles publish
--              their release only while someone waits
-- KEYS[n + 3]  cooldown: until when the account is paused after a provider's 429 (s)
-- ARGV[1]      now (s), or "" for the server's TIME
-- ARGV[2]      concurrency cap, or "" for none
-- ARGV[3]      lease id of this admission
-- ARGV[4]      lease ttl (s): a holder that stops renewing frees its slot after this
-- ARGV[5]      key ttl (ms): how long an idle account's keys outlive their last write
-- ARGV[6]      window specs (see parse_specs)
-- ARGV[7]      the demand: "requests tokens cost"
-- Returns {1, now, slice index per window} when admitted, or
--         {0, wait (s), dimension} when refused: dimension 0 is concurrency, i window i,
--         -1 the cooldown.
--         A wait that only a release can end is bounded by the oldest lease: a holder
--         that died frees its slot and holds when that lease lapses.

local now = server_now(ARGV[1])
local cap = tonumber(ARGV[2])
local lease_id = ARGV[3]
local lease_ttl_s = tonumber(ARGV[4])
local key_ttl_ms = tonumber(ARGV[5])
local windows = parse_specs(ARGV[6])
local demand = parse_amounts(ARGV[7])
local n = #windows
local leases = KEYS[1]
local waiting = KEYS[n + 2]

-- Leases that lapsed belong to holders that died: free their slots and holds.
local dead = redis.call('ZRANGEBYSCORE', leases, '-inf', now)
if #dead > 0 then
  for i = 1, n do
    for _, id in ipairs(dead) do
      redis.call('HDEL', KEYS[1 + i], 'h:' .. id)
    end
  end
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
end

-- Refuses: records that a caller waits (so releases are announced) and bounds a
-- wait for a release by the oldest lease.
local function refuse(wait, dimension)
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
  return {0, fmt(wait), dimension}
end

local paused_until = tonumber(redis.call('GET', KEYS[n + 3]))
if paused_until and now < paused_until then
  return refuse(paused_until - now, -1)
end

if cap and redis.call('ZCARD', leases) >= cap then
  return refuse(math.huge, 0)
end

local worst_s, worst = 0, -1
for i = 1, n do
  local w = windows[i]
  w.amount = demand[w.position]
  if w.amount > 0 then
    load(w, now)
    local wait = wait_s(w, now, w.amount)
    if wait > worst_s then
      worst_s, worst = wait, i
    end
  end
end
if worst ~= -1 then
  return refuse(worst_s, worst)
end

local reply = {1, fmt(now)}
for i = 1, n do
  local w = windows[i]
  if w.amount > 0 then
    if w.take == 0 then
      record(w, now, w.amount)
    else
      redis.call('HSET', w.key, 'h:' .. lease_id, fmt(w.amount))
    end
    redis.call('PEXPIRE', w.key, key_ttl_ms)
  end
  reply[#reply + 1] = fmt(slice_index(w, now))
end
redis.call('ZADD', leases, now + lease_ttl_s, lease_id)
redis.call('PEXPIRE', leases, key_ttl_ms)
return reply
