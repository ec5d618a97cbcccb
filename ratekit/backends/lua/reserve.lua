-- reserve: admit demands in order, each on the concurrency cap and every window at
-- once, until one does not fit, and say how long that one waits. One round trip for
-- the head of a queue and the callers behind it.
--
-- KEYS[1]      the account's state, KEYS[2] its leases (see _window.lua)
-- ARGV[1]      "<now> <wall>" (s), or "" for the server's TIME
-- ARGV[2]      key ttl (ms): how long an idle account's keys outlive their last write
-- ARGV[3]      concurrency cap, or "" for none
-- ARGV[4]      the lease id of each demand, apart by spaces; "-" for a demand that
--              takes no lease (no slot, nothing held, nothing to settle)
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
--
-- Commands, admitting one demand with a slot on 3 windows: TIME, HMGET, ZADD, HSET
-- (and an HMGET when a slice stops counting, PEXPIREs when the keys' ttl runs short).

local key_ttl_ms = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local lease_ids = {}
for id in string.gmatch(ARGV[4], '%S+') do
  lease_ids[#lease_ids + 1] = id
end
local lease_ttl_s = tonumber(ARGV[5])
local windows = parse_specs(ARGV[6])
local n = #windows
local demands = {}
for packed in string.gmatch(ARGV[7], '[^|]+') do
  demands[#demands + 1] = parse_amounts(packed)
end
read(base_fields(windows, {'wait'}))
local now, wall = clock(ARGV[1])
prepare_all(windows, now, wall)

-- A refusal: records that a caller waits (so releases are announced) and bounds a
-- wait for a release by the oldest lease; appended to what was admitted before it.
local function refuse(reply, wait, dimension)
  if wait == math.huge then
    local oldest = redis.call('ZRANGE', LEASES, 0, 0, 'WITHSCORES')
    if oldest[2] then
      wait = tonumber(oldest[2]) - now
    end
  end
  local until_s = now + math.min(wait, lease_ttl_s)
  if until_s > (num('wait') or 0) then
    put('wait', until_s)
  end
  reply[#reply + 1] = fmt(wait)
  reply[#reply + 1] = dimension
  return reply
end

-- Whether demand fits now: 0 and -1 if it does, else its wait and dimension.
local function check(demand, in_flight)
  if cap and in_flight >= cap then
    return math.huge, 0
  end
  local worst_s, worst = 0, -1
  for i = 1, n do
    local w = windows[i]
    local amount = demand[w.position]
    if amount > 0 then
      local wait = wait_s(w, amount)
      if wait > worst_s then
        worst_s, worst = wait, i
      end
    end
  end
  return worst_s, worst
end

local function answer(reply)
  finish(now, key_ttl_ms, ARGV[1])
  return reply
end

local reply = {0, fmt(now)}
local paused_until = num('cool')
if paused_until and now < paused_until then
  return answer(refuse(reply, paused_until - now, -1))
end

local in_flight = 0
if cap then
  in_flight = lease_count()
end
local reclaimed = false
for j = 1, #demands do
  local demand = demands[j]
  local wait, dimension = check(demand, in_flight)
  if dimension ~= -1 and not reclaimed then
    -- Lapsed leases are looked for only when something refuses: they matter then.
    reclaimed = true
    if reclaim(windows, now) then
      if cap then
        in_flight = lease_count()
      end
      wait, dimension = check(demand, in_flight)
    end
  end
  if dimension ~= -1 then
    return answer(refuse(reply, wait, dimension))
  end
  local lease_id = lease_ids[j]
  for i = 1, n do
    local w = windows[i]
    local amount = demand[w.position]
    if amount > 0 then
      if w.take == 0 then
        record(w, amount)
      else
        hold(w, lease_id, amount)
      end
    end
    reply[#reply + 1] = fmt(slice_index(w))
  end
  if lease_id ~= '-' then
    local count = lease_count()
    redis.call('ZADD', LEASES, now + lease_ttl_s, lease_id)
    if count == 0 then
      -- A new sorted set: give it its ttl now (finish renews it from then on).
      local set_ms = math.ceil(key_ttl_ms * 1.125)
      redis.call('PEXPIRE', LEASES, set_ms)
      put('lex', now + set_ms / 1000)
    end
    put('nl', count + 1)
    in_flight = in_flight + 1
  end
  reply[1] = j
end
return answer(reply)
