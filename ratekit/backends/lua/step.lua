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
-- The step of a task that calls in a loop takes a quick way (`quick`): one call ends
-- (settled with what it used, not refunded) and the next is admitted at once, on
-- rolling windows that do not pace. It reads and writes the state's fields directly
-- (one HMGET, TIME, one HSET, one HDEL), where the two scripts go through the state,
-- window and lease helpers of _window.lua: a third less server time or more. It
-- restates their rules for this one case (the clock; a slice's expiry; the room in a
-- window; recording into a slice; holding until settled and what a settle then
-- counts; the leases' count and earliest expiry; the key's ttl), and
-- tests/test_redis_steps.py holds it to them: the same state, ttl, replies and
-- releases told as settle.lua then reserve.lua, over random runs. Anything else
-- (several calls, a refund, the provider's own count, a request counted from its end,
-- pacing, calendar days, credits, slices to drop, a slice it has not read, refusals,
-- a lease that lapsed, a pause, a caller to tell) it leaves to the scripts, having
-- written nothing.

-- Where the quick way reads a window's fields in its HMGET (see quick_fields).
local QUICK_BASE, QUICK_WINDOW = 8, 7

-- The fields the quick way reads for `specs` (made once, kept with them: the list's
-- per-call places are rewritten by each step), or false where a window is not rolling
-- or paces. The account's eight, then per window its total, held, lo, hi, hv, and two
-- places for the ended call's hold and admission slice, then one for its lease.
local function quick_fields(specs)
  local fields = specs.quick
  if fields ~= nil then
    return fields
  end
  fields = {'raw', 'off', 'ex', 'cool', 'wait', 'nl', 'lmin', 'lexact'}
  for _, w in ipairs(specs) do
    if w.calendar or w.pacing then
      fields = false
      break
    end
    local n = #fields
    fields[n + 1], fields[n + 2], fields[n + 3] = w.f_t, w.f_h, w.f_lo
    fields[n + 4], fields[n + 5], fields[n + 6], fields[n + 7] = w.f_hi, w.f_hv, '', ''
  end
  if fields then
    fields[#fields + 1] = ''
  end
  specs.quick = fields
  return fields
end

-- The reply of the quick way, or nil (nothing written) where the scripts must run.
local function quick()
  if ARGV[1] ~= '11' or #ARGV ~= 19 or ARGV[6] ~= '0' or ARGV[11] ~= '' or ARGV[12] ~= '-'
    or ARGV[7] ~= ARGV[18] then
    return nil
  end
  local ended, lease_id = ARGV[4], ARGV[16]
  if ended == '-' or ended == lease_id or string.find(ended, '|', 1, true)
    or lease_id == '+' or string.find(lease_id, ' ', 1, true)
    or string.find(ARGV[19], '|', 1, true) then
    return nil
  end
  local specs = specs_of(ARGV[18])
  local fields = quick_fields(specs)
  if not fields then
    return nil
  end
  local windows = #specs
  local admitted = {}
  for text in string.gmatch(ARGV[10], '%S+') do
    admitted[#admitted + 1] = tonumber(text)
  end
  if #admitted ~= windows then
    return nil
  end
  for i = 1, windows do
    local w, at = specs[i], QUICK_BASE + QUICK_WINDOW * (i - 1)
    if not admitted[i] then
      return nil
    end
    fields[at + 6] = w.id .. '|h|' .. ended
    fields[at + 7] = w.id .. '|' .. fmt(admitted[i])
  end
  local ended_field = 'l|' .. ended
  fields[#fields] = ended_field
  local key = KEYS[1]
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
  local count = math.max((tonumber(got[6]) or 0) - 1, 0)
  local cap = tonumber(ARGV[15])
  if cap and count >= cap then
    return nil
  end

  -- What the step writes: fields and values (a field set twice: the last one), and the
  -- fields it drops (never one it sets).
  local sets, n, drops = {}, 0, {ended_field}
  -- A window as it stands (see prepare): w, total, held, lo, hi, hv, and the slices
  -- whose amount is known (index -> amount).
  local state, failed = {}, false

  -- See add_to: adds `delta` to slice `index` of window v.
  local function add_to(v, index, delta)
    if delta == 0 then
      return
    end
    local current
    if v.hi and index == v.hi then
      current = v.hv
    elseif v.hi and index > v.hi then
      current = 0
    elseif not v.lo then
      current = 0
    else
      current = v.known[index]
      if current == nil then
        failed = true  -- a slice not read: the scripts read it
        return
      end
    end
    local w = v.w
    local amount = math.max(current + delta, 0)
    v.total = math.max(v.total + (amount - current), 0)
    v.known[index] = amount
    sets[n + 1], sets[n + 2] = w.id .. '|' .. fmt(index), fmt(amount)
    n = n + 2
    local moved = not v.lo or index > v.hi
    if not v.lo then
      v.lo, v.hi = index, index
      sets[n + 1], sets[n + 2] = w.f_lo, fmt(index)
      n = n + 2
    elseif index < v.lo then
      v.lo = index
      sets[n + 1], sets[n + 2] = w.f_lo, fmt(index)
      n = n + 2
    end
    if index >= v.hi then
      v.hi, v.hv = index, amount
      if moved then
        sets[n + 1], sets[n + 2] = w.f_hi, fmt(index)
        n = n + 2
      end
      sets[n + 1], sets[n + 2] = w.f_hv, fmt(amount)
      n = n + 2
    end
    sets[n + 1], sets[n + 2] = w.f_t, fmt(v.total)
    n = n + 2
  end

  local function set_held(v, held)
    v.held = held
    sets[n + 1], sets[n + 2] = v.w.f_h, fmt(held)
    n = n + 2
  end

  -- Each window brought to now (nothing to drop), then the ended call settled on it
  -- (see settle.lua's settle: what a held window held is freed, and the usage counted).
  local reserved, used = parse_amounts(ARGV[8]), parse_amounts(ARGV[9])
  for i = 1, windows do
    local w, at = specs[i], QUICK_BASE + QUICK_WINDOW * (i - 1)
    local lo = tonumber(got[at + 3])
    local v = {
      w = w,
      total = lo and (tonumber(got[at + 1]) or 0) or 0,
      held = math.max(tonumber(got[at + 2]) or 0, 0),
      lo = lo,
      hi = tonumber(got[at + 4]),
      hv = tonumber(got[at + 5]) or 0,
      known = {[admitted[i]] = tonumber(got[at + 7]) or 0},
    }
    if lo and (lo + 1) * w.slice_s + w.period_s + w.margin_s <= now then
      return nil  -- a slice stopped counting: dropped by the scripts
    end
    state[i] = v
    local amount, real = reserved[w.position], used[w.position]
    if w.take ~= 0 and (amount > 0 or real > 0) then
      local hold = tonumber(got[at + 6])
      if hold then
        drops[#drops + 1] = fields[at + 6]
        local held = v.held - hold
        set_held(v, held < w.limit * EPSILON and 0 or held)
      end
      if w.take == 2 and amount > real
        and (admitted[i] + 1) * w.slice_s + w.period_s + w.margin_s > now then
        add_to(v, admitted[i], amount - real)
      end
      if real > 0 then
        add_to(v, math.floor(now / w.slice_s), real)
      end
    end
  end
  if failed then
    return nil
  end

  -- The next call: room on every window, then taken (recorded, or held until settled).
  local demand = parse_amounts(ARGV[19])
  for i = 1, windows do
    local v = state[i]
    local amount = demand[v.w.position]
    if amount > 0 and v.total + v.held + amount > v.w.limit * (1 + EPSILON) then
      return nil  -- it waits
    end
  end
  local reply = {1, fmt(now)}
  for i = 1, windows do
    local v = state[i]
    local w = v.w
    local amount = demand[w.position]
    local index = math.floor(now / w.slice_s)
    if amount > 0 then
      if w.take == 0 then
        add_to(v, index, amount)
      else
        sets[n + 1], sets[n + 2] = w.id .. '|h|' .. lease_id, fmt(amount)
        n = n + 2
        set_held(v, v.held + amount)
      end
    end
    reply[i + 2] = fmt(index)
  end
  if failed then
    return nil
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
  redis.call('HDEL', key, unpack(drops))
  if alive then
    redis.call('PEXPIRE', key, math.ceil((want - now + step) * 1000))
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
