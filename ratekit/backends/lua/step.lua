-- step: the settles of an account's calls that ended, then the reserves of its calls
-- that begin, in one run: what settle.lua then reserve.lua would do sent back to back
-- at the same instant (neither with a tenant), for a call's worth of commands. The
-- state is read once (the reserves read only what the settles did not), the clock
-- once, and written once: the settles' finish is held back for the reserves' to
-- write both. Commands, a settle and a reserve of 4 dimensions: TIME, HMGET, HSET,
-- HDEL.
--
-- KEYS[1]        the account's state, as both scripts take it (see _window.lua)
-- ARGV[1]        n: how many of the arguments after it are the settles'
-- ARGV[2..n+1]   the settles' arguments (see settle.lua)
-- ARGV[n+2..]    the reserves' arguments (see reserve.lua), with the same clock
--                argument as the settles'
-- Returns {the settles' reply, the reserves' reply}.
--
-- The step of a task that calls in a loop takes a quick way (`quick`): one call's
-- lease ends with nothing to settle and the next call is admitted at once, on rolling
-- windows that record at admission. It reads and writes the state's fields directly
-- (one HMGET, TIME, one HSET, one HDEL), where the two scripts go through the state,
-- window and lease helpers of _window.lua: about a third less server time. It restates
-- their rules for this one case (the clock, a slice's expiry, the room in a window,
-- recording in the newest slice, the leases' count and earliest expiry, the key's ttl),
-- and tests/test_redis_steps.py holds it to them: the same state, ttl, replies and
-- releases told as settle.lua then reserve.lua, over random runs. Anything else
-- (several calls, refunds, usage that differs, holds, pacing, calendar days, credits,
-- slices to drop, refusals, a lease that lapsed, a pause, a caller to tell) it leaves to
-- the scripts, having written nothing.

-- The reply of the quick way, or nil (nothing written) where the scripts must run.
local function quick()
  if ARGV[1] ~= '11' or #ARGV ~= 19 or ARGV[6] ~= '0' or ARGV[11] ~= '' or ARGV[12] ~= '-'
    or ARGV[8] ~= ARGV[9] or ARGV[7] ~= ARGV[18] then
    return nil
  end
  local ended, lease_id = ARGV[4], ARGV[16]
  if ended == '-' or string.find(ended, '|', 1, true) or lease_id == '+'
    or string.find(lease_id, ' ', 1, true) or string.find(ARGV[19], '|', 1, true) then
    return nil
  end
  local specs = specs_of(ARGV[18])
  if specs.quick == nil then
    -- Made once per specs: the fields read, a place for the ended lease's last; false
    -- where a window is not rolling, paces, or holds until settled.
    local fields = {'raw', 'off', 'ex', 'cool', 'wait', 'nl', 'lmin', 'lexact'}
    for _, w in ipairs(specs) do
      if w.calendar or w.pacing or w.take ~= 0 then
        fields = false
        break
      end
      for _, name in ipairs({w.f_t, w.f_h, w.f_lo, w.f_hi, w.f_hv}) do
        fields[#fields + 1] = name
      end
    end
    if fields then
      fields[#fields + 1] = false
    end
    specs.quick = fields
  end
  if not specs.quick then
    return nil
  end
  local key = KEYS[1]
  local ended_field = 'l|' .. ended
  local fields = specs.quick
  fields[#fields] = ended_field  -- the list's last place is the ended lease's
  local got = redis.call('HMGET', key, unpack(fields))
  local ended_at = tonumber(got[#fields])
  if not ended_at then
    return nil  -- lapsed, or settled before
  end
  -- The clock (see clock).
  local given = ARGV[2]
  local last, offset = tonumber(got[1]), tonumber(got[2]) or 0
  local raw
  if given ~= '' then
    raw = tonumber(string.match(given, '^(%S+) %S+$'))
    if last and raw < last then
      raw = last
    end
  else
    local t = redis.call('TIME')
    raw = tonumber(t[1]) + tonumber(t[2]) / 1000000
    if last and raw < last then
      offset = offset + (last - raw)
    end
  end
  local now = raw + offset
  local cool, waiting = tonumber(got[4]), tonumber(got[5])
  if now < (cool or 0) or now < (waiting or 0) then
    return nil  -- paused, or a caller to tell of the release
  end
  local demand = parse_amounts(ARGV[19])
  local count = math.max((tonumber(got[6]) or 0) - 1, 0)
  local cap = tonumber(ARGV[15])
  if cap and count >= cap then
    return nil
  end
  -- Each window: nothing to drop, room for the demand, recorded in its newest slice.
  local sets, n = {}, 0
  local indexes = {}
  for i = 1, #specs do
    local w = specs[i]
    local at = 8 + 5 * (i - 1)
    local total, held = tonumber(got[at + 1]) or 0, math.max(tonumber(got[at + 2]) or 0, 0)
    local lo, hi, hv = tonumber(got[at + 3]), tonumber(got[at + 4]), tonumber(got[at + 5]) or 0
    if not lo then
      total = 0
    elseif (lo + 1) * w.slice_s + w.period_s + w.margin_s <= now then
      return nil  -- a slice stopped counting: dropped by the scripts
    end
    local index = math.floor(now / w.slice_s)
    local amount = demand[w.position]
    if amount > 0 then
      if total + held + amount > w.limit * (1 + EPSILON) then
        return nil  -- it waits
      end
      local current
      if hi and index == hi then
        current = hv
      elseif hi and index > hi then
        current = 0
      elseif not lo then
        current = 0
      else
        return nil  -- an older slice: read by the scripts
      end
      local value = math.max(current + amount, 0)
      total = math.max(total + (value - current), 0)
      sets[n + 1], sets[n + 2] = w.id .. '|' .. fmt(index), fmt(value)
      n = n + 2
      local moved = not lo or index > hi
      if not lo then
        lo, hi = index, index
        sets[n + 1], sets[n + 2] = w.f_lo, fmt(index)
        n = n + 2
      end
      if index >= hi then
        if moved then
          sets[n + 1], sets[n + 2] = w.f_hi, fmt(index)
          n = n + 2
        end
        sets[n + 1], sets[n + 2] = w.f_hv, fmt(value)
        n = n + 2
      end
      sets[n + 1], sets[n + 2] = w.f_t, fmt(total)
      n = n + 2
    end
    indexes[i] = index
  end
  -- The ended lease, then the new one (see end_lease, take_lease).
  local lmin, lexact = tonumber(got[7]), tonumber(got[8])
  if count > 0 and ended_at <= (lmin or -math.huge) and lexact == 1 then
    lexact = 0
    sets[n + 1], sets[n + 2] = 'lexact', '0'
    n = n + 2
  end
  local leases = count
  if lease_id ~= '-' then
    local expiry = now + tonumber(ARGV[17])
    sets[n + 1], sets[n + 2] = 'l|' .. lease_id, fmt(expiry)
    n = n + 2
    leases = count + 1
    if count == 0 or (lmin and expiry < lmin) then
      sets[n + 1], sets[n + 2] = 'lmin', fmt(expiry)
      n = n + 2
      if lexact ~= 1 then
        sets[n + 1], sets[n + 2] = 'lexact', '1'
        n = n + 2
      end
    end
  end
  sets[n + 1], sets[n + 2], sets[n + 3], sets[n + 4] = 'nl', fmt(leases), 'raw', fmt(raw)
  n = n + 4
  if offset ~= 0 then
    sets[n + 1], sets[n + 2] = 'off', fmt(offset)
    n = n + 2
  end
  -- The key's ttl (see finish).
  local ttl_s = tonumber(ARGV[14]) / 1000
  local want = math.max(now + ttl_s, (cool or 0) + 1)
  local step = ttl_s / 8
  local alive = ARGV[13] ~= '' or (tonumber(got[3]) or -math.huge) < want
  if alive then
    sets[n + 1], sets[n + 2] = 'ex', fmt(want + step)
    n = n + 2
  end
  redis.call('HSET', key, unpack(sets, 1, n))
  if ended ~= lease_id then
    redis.call('HDEL', key, ended_field)
  end
  if alive then
    redis.call('PEXPIRE', key, math.ceil((want - now + step) * 1000))
  end
  local reply = {1, fmt(now)}
  for i = 1, #specs do
    reply[i + 2] = fmt(indexes[i])
  end
  return {1, reply}
end

local answer = quick()
if answer then
  return answer
end
begin(KEYS)  -- afresh: the quick way read, and changed, nothing that stays

local n = tonumber(ARGV[1])
local ends, begins = {}, {}
for i = 2, n + 1 do
  ends[#ends + 1] = ARGV[i]
end
for i = n + 2, #ARGV do
  begins[#begins + 1] = ARGV[i]
end
hold_finish(true)
local ended = settle_body(KEYS, ends)
hold_finish(false)
return {ended, reserve_body(KEYS, begins)}
