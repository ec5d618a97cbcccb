-- The step's quick way (see step.lua), after the window helpers: loaded as a function
-- library, built once like them. One call ends (settled with what it used, not
-- refunded) and the next is admitted at once, on rolling windows that do not pace.
-- It reads and writes the state's fields directly (one HMGET, TIME, one HSET, one
-- HDEL), where settle.lua and reserve.lua go through the state, window and lease
-- helpers: a third less server time or more. It restates their rules for this one
-- case (the clock; a slice's expiry; the room in a window; recording into a slice;
-- holding until settled and what a settle then counts; the leases' count and earliest
-- expiry; the key's ttl), and tests/test_redis_steps.py holds it to them: the same
-- state, ttl, replies and releases told as settle.lua then reserve.lua, over random
-- runs. Anything else (several calls, a refund, the provider's own count, a request
-- counted from its end, pacing, calendar days, credits, slices to drop, a slice it
-- has not read, refusals, a lease already reclaimed or settled, a pause, a caller to
-- tell) it leaves to the scripts, having written nothing.

-- What the call that runs writes: fields and values in order (numbers, formatted
-- when written), how many, and where each field is in it (a field set again keeps its
-- place); and whether it found it must give way. Set by quick_run, let go by quick_step.
local QUICK_SETS, QUICK_N, QUICK_AT, QUICK_FAILED

local function quick_set(field, value)
  local at = QUICK_AT[field]
  if at then
    QUICK_SETS[at] = value
    return
  end
  QUICK_SETS[QUICK_N + 1], QUICK_SETS[QUICK_N + 2] = field, value
  QUICK_AT[field] = QUICK_N + 2
  QUICK_N = QUICK_N + 2
end

-- Adds `delta` to slice `index` of window v (see add_to): v is the window as it stands,
-- {w = its spec, total, held, lo, hi, hv, and `read`, `amount`: the one older slice read
-- (the ended call's admission slice) and what it holds, or nil}. Any other slice below
-- hi was not read: the scripts read it (QUICK_FAILED).
local function quick_add(v, index, delta)
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
    current = index == v.read and v.amount or nil
    if current == nil then
      QUICK_FAILED = true
      return
    end
  end
  local w = v.w
  local amount = math.max(current + delta, 0)
  v.total = math.max(v.total + (amount - current), 0)
  if index == v.read then
    v.amount = amount
  end
  quick_set(slice_field(w, index), amount)
  local moved = not v.lo or index > v.hi
  if not v.lo then
    v.lo, v.hi = index, index
    quick_set(w.f_lo, index)
  elseif index < v.lo then
    v.lo = index
    quick_set(w.f_lo, index)
  end
  if index >= v.hi then
    v.hi, v.hv = index, amount
    if moved then
      quick_set(w.f_hi, index)
    end
    quick_set(w.f_hv, amount)
  end
  quick_set(w.f_t, v.total)
end

local function quick_held(v, held)
  v.held = held
  quick_set(v.w.f_h, held)
end

-- The quick way's plan for `specs` (made once, kept with them), or false where a window
-- is not rolling or paces: `fields`, what it reads (the account's eight, then per
-- window its total, held, lo, hi, hv, and for a window that holds until settled two
-- places for the ended call's hold and admission slice, then one for its lease: the
-- places rewritten by each step); `at`, where each window's fields start; `holds`,
-- whether any window holds.
local QUICK_ACCOUNT = {'raw', 'off', 'ex', 'cool', 'wait', 'nl', 'lmin', 'lexact'}

local function quick_plan(specs)
  local plan = specs.quick
  if plan ~= nil then
    return plan
  end
  local fields, at, holds = {unpack(QUICK_ACCOUNT)}, {}, false
  for i, w in ipairs(specs) do
    if w.calendar or w.pacing then
      specs.quick = false
      return false
    end
    local n = #fields
    at[i] = n
    fields[n + 1], fields[n + 2], fields[n + 3] = w.f_t, w.f_h, w.f_lo
    fields[n + 4], fields[n + 5] = w.f_hi, w.f_hv
    if w.take ~= 0 then
      fields[n + 6], fields[n + 7] = '', ''
      holds = true
    end
  end
  fields[#fields + 1] = ''
  plan = {fields = fields, at = at, holds = holds}
  specs.quick = plan
  return plan
end

-- See quick_step.
local function quick_run(keys, args)
  if args[1] ~= '11' or #args ~= 19 or args[6] ~= '0' or args[11] ~= '' or args[12] ~= '-'
    or args[7] ~= args[18] then
    return nil
  end
  local ended, lease_id = args[4], args[16]
  if ended == '-' or ended == lease_id or string.find(ended, '|', 1, true)
    or lease_id == '+' or lease_id == '' or string.find(lease_id, '%s')
    or string.find(args[19], '|', 1, true) then
    return nil
  end
  local specs = specs_of(args[18])
  local plan = quick_plan(specs)
  if not plan then
    return nil
  end
  local fields, at, windows = plan.fields, plan.at, #specs
  local admitted
  if plan.holds then
    admitted = {}
    for text in string.gmatch(args[10], '%S+') do
      admitted[#admitted + 1] = tonumber(text)
    end
    if #admitted ~= windows then
      return nil
    end
    for i = 1, windows do
      local w = specs[i]
      if w.take ~= 0 then
        if not admitted[i] then
          return nil
        end
        fields[at[i] + 6] = hold_field(w, ended)
        fields[at[i] + 7] = slice_field(w, admitted[i])
      end
    end
  end
  local ended_field = lease_field(ended)
  fields[#fields] = ended_field
  local key = keys[1]
  local got = redis.call('HMGET', key, unpack(fields))
  local ended_at = tonumber(got[#fields])
  if not ended_at then
    return nil  -- reclaimed once it lapsed, or settled before
  end
  -- The clock (see clock).
  local given = args[2]
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
  local cap = tonumber(args[15])
  if cap and count >= cap then
    return nil
  end
  QUICK_SETS, QUICK_N, QUICK_AT, QUICK_FAILED = {}, 0, {}, false
  local drops = {ended_field}

  -- Each window brought to now (nothing to drop), then the ended call settled on it
  -- (see settle.lua's settle: a window that records at admission has nothing to do; one
  -- that held frees the hold and counts the usage now, and a "safe" one the rest of the
  -- reservation in the admission's slice while that counts).
  local reserved, used
  if plan.holds then
    reserved, used = parse_amounts(args[8]), parse_amounts(args[9])
  end
  local brought = {}
  for i = 1, windows do
    local w, a = specs[i], at[i]
    local lo = tonumber(got[a + 3])
    if lo and expiry_s(w, lo) <= now then
      return nil  -- a slice stopped counting: dropped by the scripts
    end
    local v = {
      w = w,
      total = lo and (tonumber(got[a + 1]) or 0) or 0,
      held = math.max(tonumber(got[a + 2]) or 0, 0),
      lo = lo,
      hi = tonumber(got[a + 4]),
      hv = tonumber(got[a + 5]) or 0,
      read = nil,
      amount = nil,
    }
    brought[i] = v
    if w.take ~= 0 then
      local amount, real = reserved[w.position], used[w.position]
      local index = admitted[i]
      v.read, v.amount = index, tonumber(got[a + 7]) or 0
      if amount > 0 or real > 0 then
        local freed = tonumber(got[a + 6])
        if freed then
          drops[#drops + 1] = fields[a + 6]
          local held = v.held - freed
          quick_held(v, held < w.limit * EPSILON and 0 or held)
        end
        if w.take == 2 and amount > real
          and expiry_s(w, index) > now then
          quick_add(v, index, amount - real)
        end
        if real > 0 then
          quick_add(v, math.floor(now / w.slice_s), real)
        end
      end
    end
  end
  if QUICK_FAILED then
    return nil
  end

  -- The next call: room on every window, then taken (recorded, or held until settled).
  local demand = parse_amounts(args[19])
  for i = 1, windows do
    local v = brought[i]
    local amount = demand[v.w.position]
    if amount > 0 and v.total + v.held + amount > v.w.limit * (1 + EPSILON) then
      return nil  -- it waits
    end
  end
  local reply = {1, fmt(now)}
  for i = 1, windows do
    local v = brought[i]
    local w = v.w
    local amount = demand[w.position]
    local index = math.floor(now / w.slice_s)
    if amount > 0 then
      if w.take == 0 then
        quick_add(v, index, amount)
      else
        quick_set(hold_field(w, lease_id), amount)
        quick_held(v, v.held + amount)
      end
    end
    reply[i + 2] = index_text(w, index)
  end
  if QUICK_FAILED then
    return nil
  end

  -- The ended lease, then the new one (see end_lease, take_lease).
  local lmin, lexact = tonumber(got[7]), tonumber(got[8])
  if count > 0 and ended_at <= (lmin or -math.huge) and lexact == 1 then
    lexact = 0
    quick_set('lexact', 0)
  end
  local leases = count
  if lease_id ~= '-' then
    local expiry = now + tonumber(args[17])
    quick_set(lease_field(lease_id), expiry)
    leases = count + 1
    if count == 0 or (lmin and expiry < lmin) then
      quick_set('lmin', expiry)
      if lexact ~= 1 then
        quick_set('lexact', 1)
      end
    end
  end
  quick_set('nl', leases)
  quick_set('raw', raw)
  if offset ~= 0 then
    quick_set('off', offset)
  end
  -- The key's ttl (see finish).
  local ttl_s = tonumber(args[14]) / 1000
  local want = math.max(now + ttl_s, (cool or 0) + 1)
  local step = ttl_s / 8
  local alive = args[13] ~= '' or (tonumber(got[3]) or -math.huge) < want
  if alive then
    quick_set('ex', want + step)
  end
  for i = 2, QUICK_N, 2 do
    QUICK_SETS[i] = fmt(QUICK_SETS[i])
  end
  redis.call('HSET', key, unpack(QUICK_SETS, 1, QUICK_N))
  redis.call('HDEL', key, unpack(drops))
  if alive then
    redis.call('PEXPIRE', key, math.ceil((want - now + step) * 1000))
  end
  return {1, reply}
end

-- The step's reply by the quick way, or nil (nothing written) where the scripts must
-- run; `keys` and `args` are the step's (see step.lua). It keeps nothing of the call.
local function quick_step(keys, args)
  local reply = quick_run(keys, args)
  QUICK_SETS, QUICK_AT = nil, nil
  return reply
end
