-- reserve: admit demands in order, each on the concurrency cap and every window at
-- once (and on its tenant's own, if it has one), until one does not fit, and say how
-- long that one waits. One round trip for the head of a queue and the callers behind
-- it.
--
-- KEYS[1]      the account's state (see _window.lua)
-- KEYS[2..]    only with tenants: each tenant's state
-- ARGV[1]      "<now> <wall>" (s), or "" for the server's TIME
-- ARGV[2]      key ttl (ms): how long an idle account's key outlives its last write
-- ARGV[3]      concurrency cap, or "" for none
-- ARGV[4]      the lease id of each demand, apart by spaces; "-" for a demand that
--              takes no lease (no slot, nothing held, nothing to settle, on the
--              account and on its tenant); "+" for a credit: requests a process draws
--              ahead of its own calls (see credit), taken like "-" or skipped
-- ARGV[5]      lease ttl (s): a holder that stops renewing frees its slot after this
-- ARGV[6]      window specs (see parse_specs)
-- ARGV[7]      the demands, in the order they are served: "requests tokens cost", apart
--              by "|"
-- ARGV[8]      only with tenants: the tenant of each demand, apart by spaces: 0 for
--              none, i for the tenant of KEYS[1 + i]
-- ARGV[9..]    only with tenants: four per tenant (see parse_tenants)
-- Returns {k, now, then for each of the k demands admitted the slice index per window
--         (the account's n, then its tenant's; "-" for each window of a credit
--         skipped), then, when k is less than the demands,
--         wait (s) and dimension of the first one refused}: dimension 0 is
--         concurrency, i window i, -1 the cooldown ("out" for an account taken out,
--         see pause.lua); -2 its tenant's concurrency, -2 - i
--         its tenant's window i. A tenant's own limits are checked first: a demand
--         they refuse is refused by them, whatever the account says.
--         A wait that only a release can end is bounded by the oldest lease (the
--         account's, or its tenant's): a holder that died frees its slot and holds
--         when that lease lapses.
--
-- Commands, admitting one demand with a slot on 3 windows: TIME, HMGET, HSET (and an
-- HMGET when a slice stops counting, a PEXPIRE when the key's ttl runs short); a
-- tenant adds its own HMGET, HSET. A refusal adds an HSCAN of the leases when one may
-- have lapsed, or when it waits for the earliest and that is not known (see
-- _window.lua's reclaim and earliest_expiry).

local key_ttl_ms = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local lease_ids = {}
for id in string.gmatch(ARGV[4], '%S+') do
  lease_ids[#lease_ids + 1] = id
end
local lease_ttl_s = tonumber(ARGV[5])
local windows = parse_specs(ARGV[6], ACCOUNT)
local n = #windows
local demands = {}
for packed in string.gmatch(ARGV[7], '[^|]+') do
  demands[#demands + 1] = parse_amounts(packed)
end
read(ACCOUNT, base_fields(windows, 'wait'))
local now, wall = clock(ARGV[1])
prepare_all(ACCOUNT, windows, now, wall)
-- Both stay false without tenants (no tables made for nothing).
local tenants, tenant_of = false, false
if #KEYS > 1 then
  tenants, tenant_of = parse_tenants(KEYS, ARGV, 9, now, wall), {}
  for index in string.gmatch(ARGV[8], '%S+') do
    tenant_of[#tenant_of + 1] = tenants[tonumber(index)] or false
  end
end

-- A refusal: records that a caller waits (so releases are announced) and bounds a
-- wait for a release by the oldest lease of state s (whose windows are `list`);
-- appended to what was admitted before it.
local function refuse(reply, wait, dimension, s, list)
  if wait == math.huge then
    local oldest = earliest_expiry(s, list, now)
    if oldest then
      wait = oldest - now
    end
  end
  local until_s = now + math.min(wait, lease_ttl_s)
  if until_s > (num(ACCOUNT, 'wait') or 0) then
    put(ACCOUNT, 'wait', until_s)
  end
  reply[#reply + 1] = fmt(wait)
  reply[#reply + 1] = dimension
  return reply
end

-- Whether demand fits now under `limit` calls in flight (nil: no cap) and `list`'s
-- windows: 0 and -1 if it does, else its wait and dimension.
local function check(demand, limit, in_flight, list)
  if limit and in_flight >= limit then
    return math.huge, 0
  end
  local worst_s, worst = 0, -1
  for i = 1, #list do
    local w = list[i]
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

-- Takes `demand` from each of `list`'s windows; appends the slice index of each.
local function take(demand, list, lease_id, reply)
  for i = 1, #list do
    local w = list[i]
    local amount = demand[w.position]
    if amount > 0 then
      if w.take == 0 then
        record(w, amount)
      else
        hold(w, lease_id, amount)
      end
    end
    reply[#reply + 1] = index_text(w, slice_index(w))
  end
end

-- Whether tenant t admits demand now (its lapsed leases reclaimed once, if it does
-- not): -1 if it does, else its wait and dimension.
local function check_tenant(t, demand)
  if t.in_flight == nil then
    t.in_flight = t.cap and lease_count(t.s) or 0
  end
  local wait, dimension = check(demand, t.cap, t.in_flight, t.windows)
  if dimension ~= -1 and not t.reclaimed then
    t.reclaimed = true
    if reclaim(t.s, t.windows, now) then
      t.in_flight = t.cap and lease_count(t.s) or 0
      wait, dimension = check(demand, t.cap, t.in_flight, t.windows)
    end
  end
  return wait, -2 - dimension
end

local function answer(reply)
  finish(ACCOUNT, now, key_ttl_ms, ARGV[1])
  if tenants then
    for _, t in ipairs(tenants) do
      finish(t.s, now, t.ttl_ms, ARGV[1])
    end
  end
  return reply
end

local reply = {0, fmt(now)}
local paused_until = num(ACCOUNT, 'cool')
if not (paused_until and now < paused_until) then
  paused_until = nil
end

-- A credit (lease id "+", never with tenants): the requests one process draws ahead
-- to admit its own next calls itself, in this slice (ratekit/backends/redis.py's
-- _Credit), taken as a demand without a lease. It is optional: skipped (its indexes
-- "-", never a refusal, nothing recorded) while some caller waits or the account is
-- paused, and unless it fits twice over: a credit never takes the last half of any
-- window's room.
local function credit(demand, reply)
  local twice = {2 * demand[1], 2 * demand[2], 2 * demand[3]}
  local _, dimension = check(twice, nil, 0, windows)
  if paused_until or dimension ~= -1 or now < (num(ACCOUNT, 'wait') or 0) then
    for _ = 1, n do
      reply[#reply + 1] = '-'
    end
    return
  end
  take(demand, windows, '-', reply)
end

local in_flight = 0
if cap then
  in_flight = lease_count(ACCOUNT)
end
local reclaimed = false
for j = 1, #demands do
  local demand = demands[j]
  if lease_ids[j] == '+' then
    credit(demand, reply)
    reply[1] = j
  else
    local t = tenant_of and tenant_of[j]
    if t then
      local wait, dimension = check_tenant(t, demand)
      if dimension ~= -1 then
        return answer(refuse(reply, wait, dimension, t.s, t.windows))
      end
    end
    if paused_until then
      -- "out": the pause is an account taken out, not a cooldown (see pause.lua).
      local paused = num(ACCOUNT, 'out') == 1 and 'out' or -1
      return answer(refuse(reply, paused_until - now, paused, ACCOUNT, windows))
    end
    local wait, dimension = check(demand, cap, in_flight, windows)
    if dimension ~= -1 and not reclaimed then
      -- Lapsed leases are looked for only when something refuses: they matter then.
      reclaimed = true
      if reclaim(ACCOUNT, windows, now) then
        if cap then
          in_flight = lease_count(ACCOUNT)
        end
        wait, dimension = check(demand, cap, in_flight, windows)
      end
    end
    if dimension ~= -1 then
      return answer(refuse(reply, wait, dimension, ACCOUNT, windows))
    end
    local lease_id = lease_ids[j]
    local expiry = now + lease_ttl_s
    take(demand, windows, lease_id, reply)
    if lease_id ~= '-' then
      take_lease(ACCOUNT, lease_id, expiry)
      in_flight = in_flight + 1
    end
    if t then
      take(demand, t.windows, lease_id, reply)
      if t.slot then
        take_lease(t.s, lease_id, expiry)
        t.in_flight = t.in_flight + 1
      end
    end
    reply[1] = j
  end
end
return answer(reply)
