-- settle: end admissions: record each call's real usage (or hand everything back),
-- free its lease and announce the release; the same on its tenant's own windows, if
-- it has one. One round trip for the settles of one account posted together.
--
-- KEYS[1]      the account's state (see _window.lua)
-- KEYS[2]      only with a tenant: the tenant's state
-- ARGV[1]      "<now> <wall>" (s), or "" for the server's TIME
-- ARGV[2]      key ttl (ms)
-- ARGV[3]      lease id ("-": the admission took none; only a refund is sent then)
-- ARGV[4]      channel to publish the release on
-- ARGV[5]      1 to refund (the call was never sent), 0 to settle
-- ARGV[6]      window specs (see parse_specs)
-- ARGV[7]      what was reserved: "requests tokens cost"
-- ARGV[8]      what was really used: "requests tokens cost"
-- ARGV[9]      the slice index of the admission per window, apart by spaces
-- ARGV[10]     the tokens the provider counted at arrival when its answer told, else ""
--              (replaces the token estimate where the reservation is kept)
-- ARGV[11]     "-", or for a call whose request was never said to leave (sent.lua) and
--              that ended in a later slice than its admission's: the instant of its
--              end on the account's clock, as the client reckons it ("": now), which
--              what it recorded counts from (the request had arrived by then)
-- ARGV[12..15] only with a tenant: its four arguments (see parse_tenants)
-- ARGV[16]     only with a tenant: the slice index of the admission per tenant window
-- ARGV[17]     only with a tenant: its name, told with the release
-- Several admissions without tenants are settled in one run, in order, as if each
-- were settled alone at the same instant: ARGV[3], [5], [7], [8], [9], [10] and [11]
-- then hold one value per admission, apart by "|".
-- Returns 1 if the lease was still live, 0 if it had lapsed (its holds were freed);
-- for several admissions, a list of those.
--
-- Commands, settling one admission on 3 windows: TIME, HMGET (the leases and holds
-- with the rest), HSET, HDEL (the lease and its holds), and a PUBLISH while some
-- caller waits; a tenant adds its own HMGET, HSET, HDEL.

-- `packed`'s fields apart by "|", empty ones kept.
local function split(packed)
  local fields = {}
  for field in string.gmatch(packed .. '|', '([^|]*)|') do
    fields[#fields + 1] = field
  end
  return fields
end

local key_ttl_ms = tonumber(ARGV[2])
local lease_ids = split(ARGV[3])
local many = #lease_ids > 1
local refunds = many and split(ARGV[5]) or {ARGV[5]}
local reserves = many and split(ARGV[7]) or {ARGV[7]}
local uses = many and split(ARGV[8]) or {ARGV[8]}
local slices = many and split(ARGV[9]) or {ARGV[9]}
local counts = many and split(ARGV[10]) or {ARGV[10]}
local lefts = many and split(ARGV[11]) or {ARGV[11]}
local windows = parse_specs(ARGV[6], ACCOUNT)
-- A list of this call's own (base_fields' is shared): the leases and holds are read
-- with them.
local base, at = base_fields(windows, 'wait')
local fields = {unpack(base)}
for _, id in ipairs(lease_ids) do
  if id ~= '-' then
    fields[#fields + 1] = lease_field(id)
    for _, w in ipairs(windows) do
      if w.take ~= 0 then
        fields[#fields + 1] = hold_field(w, id)
      end
    end
  end
end
read(ACCOUNT, fields, at)
local now, wall = clock(ARGV[1])
prepare_all(ACCOUNT, windows, now, wall)

-- The admission being settled (set for each in turn): left is the instant its request
-- counts from when it was never said to leave (see ARGV[11]), else nil.
local lease_id, refunding, reserved, used, counted, left

-- Ends the lease of the admission on state s: 1 if it was there, else 0.
local function free(s)
  if lease_id == '-' then
    return 1
  end
  local expiry = num(s, lease_field(lease_id))
  if not expiry then
    return 0
  end
  end_lease(s, lease_id, expiry)
  return 1
end

-- Settles (or refunds) the admission on `list`'s windows, whose slice indexes are
-- `indexes`; `live` says whether this is the lease's first end.
--
-- A refund takes back what was recorded only while the lease is live: a lease
-- already gone was settled before (this settle is sent again after its reply was
-- lost) or lapsed, and what it recorded stays counted (never less than was sent).
-- An admission without a lease is refunded once by its client and never resent.
local function settle(list, indexes, live)
  if left and live == 1 then
    -- Counted from its end first (a lease gone was settled or reclaimed before).
    for i, w in ipairs(list) do
      indexes[i] = move_to(w, indexes[i], reserved[w.position], left)
    end
  end
  for i, w in ipairs(list) do
    local amount, real, index = reserved[w.position], used[w.position], indexes[i]
    -- What the reservation was, as the provider counted it when it said (tokens only;
    -- a settle sent again after its lease went is not corrected twice).
    local kept = amount
    if counted and w.position == 2 and not refunding and live == 1 then
      kept = counted
    end
    if w.take == 0 then
      if refunding and amount > 0 and live == 1 then
        refund(w, index, amount)
      elseif amount > 0 and kept < amount then
        refund(w, index, amount - kept)
      elseif amount > 0 and kept > amount then
        add_to_slice(w, index, kept - amount)
      end
    elseif amount > 0 or real > 0 or kept > 0 then
      -- Held (also an estimate of 0): the real usage is recorded now, as the provider does.
      unhold(w, lease_id)
      if not refunding then
        if w.take == 2 and kept > real then
          -- Until the admission's slice expires count max(reserved, real): the
          -- remainder there, the real usage now.
          add_to_slice(w, index, kept - real)
        end
        record(w, real)
      end
    end
  end
end

local lives = {}
local announce = false
for k = 1, #lease_ids do
  lease_id, refunding = lease_ids[k], refunds[k] == '1'
  reserved, used = parse_amounts(reserves[k]), parse_amounts(uses[k])
  counted = tonumber(counts[k])
  left = nil
  if lefts[k] ~= '-' and not refunding then
    left = math.min(tonumber(lefts[k]) or now, now)
  end
  local live = free(ACCOUNT)
  settle(windows, parse_amounts(slices[k]), live)
  lives[k] = live
  announce = announce or lease_id ~= '-' or refunding
end
finish(ACCOUNT, now, key_ttl_ms, ARGV[1])
local notice = table.concat(lease_ids, ' ')
if #KEYS > 1 then
  local live = lives[1]
  local t = parse_tenants(KEYS, ARGV, 12, now, wall)[1]
  if lease_id ~= '-' then
    local holds = {t.slot and lease_field(lease_id) or nil}
    for _, w in ipairs(t.windows) do
      if w.take ~= 0 then
        holds[#holds + 1] = hold_field(w, lease_id)
      end
    end
    read(t.s, holds)
  end
  -- A tenant whose calls take no lease of its own ends with the account's.
  local own = live
  if t.slot then
    own = free(t.s)
  end
  settle(t.windows, parse_amounts(ARGV[16]), own)
  finish(t.s, now, t.ttl_ms, ARGV[1])
  notice = lease_id .. '\n' .. ARGV[17]
end
-- Announce the release only while some caller waits: nobody listens otherwise. An
-- admission without a lease frees something only when it is refunded.
if announce and now < (num(ACCOUNT, 'wait') or 0) then
  redis.call('PUBLISH', ARGV[4], notice)
end
if many then
  return lives
end
return lives[1]
