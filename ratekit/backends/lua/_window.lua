-- Shared window helpers, prepended to every script by ratekit/backends/_scripts.py.
-- The same rules as ratekit/_window.py, run against the same table of cases.
--
-- A rolling window is a hash: "s:<slice index>" -> amount recorded in that slice,
-- "held" -> the amount held by calls in flight, "pace" -> earliest instant of the
-- next admission (pacing). A calendar-day window keeps "day" -> local day number
-- and "total" -> amount of that day instead of slices. Each window has a second
-- hash, its holds: lease id -> amount held by that call, so that reading a window
-- costs O(slices) however many calls are in flight. Amounts are in the rate's
-- unit, times in seconds.
--
-- Two clocks, as in ratekit/_clock.py: rolling windows, pacing, leases and the
-- cooldown run on the account's clock (`now`, see account_clock), calendar days on
-- the wall clock (`wall`, Unix seconds). parse_specs gives each window its own
-- reading as w.now, so the helpers below never mix the two.

local EPSILON = 1e-12

local function fmt(x)
  return string.format('%.17g', x)
end

-- Extends `key`'s ttl to at least `ttl_ms`; never shortens it (a long cooldown).
local function keep_alive(key, ttl_ms)
  local pttl = redis.call('PTTL', key)
  if pttl ~= -2 and pttl < ttl_ms then
    redis.call('PEXPIRE', key, ttl_ms)
  end
end

-- The account's clock. `given` is "<now> <wall>" handed by a single-process client
-- (tests with a fake clock), or "" for the server's TIME, shared by every pod.
-- Returns now (rolling windows, pacing, leases, cooldown) and wall (calendar days).
--
-- `now` never goes back, kept in the hash at `key` ("raw": the last reading,
-- "offset": added to every reading):
-- - TIME stepped back (an operator, NTP): the step is added to the offset, so the
--   account's clock resumes from where it was and runs on at the normal rate: pacing
--   and windows neither stall nor restart. A forward step cannot be told from idle
--   time and is taken as it comes (windows expire that much early).
-- - A given instant older than the last one (calls of one process that reach the
--   server out of order): the last one stands; monotonic readings never step.
-- The clock key outlives every other key of the account (ttl at least `ttl_ms`).
local function account_clock(key, given, ttl_ms)
  local raw, wall
  local state = redis.call('HMGET', key, 'raw', 'offset')
  local last, offset = tonumber(state[1]), tonumber(state[2]) or 0
  if given ~= '' then
    local mono_text, wall_text = string.match(given, '^(%S+) (%S+)$')
    raw, wall = tonumber(mono_text), tonumber(wall_text)
    if last and raw < last then
      raw = last
    end
  else
    local t = redis.call('TIME')
    raw = tonumber(t[1]) + tonumber(t[2]) / 1000000
    wall = raw
    if last and raw < last then
      offset = offset + (last - raw)
    end
  end
  redis.call('HSET', key, 'raw', fmt(raw), 'offset', fmt(offset))
  keep_alive(key, ttl_ms)
  return raw + offset, wall
end

-- Parses the window specs the client packs into one argument: per window
-- "limit period_s slice_s margin_s pacing take position zone", windows apart by "|".
-- pacing is 1 or 0; take is 0 (recorded at admission), 1 (held, "usage") or 2 (held,
-- "safe"); position picks the window's unit in an amounts triple (0 requests,
-- 1 tokens, 2 money). zone is "-" for a rolling window; for a calendar day it is
-- three fields "before switch_at after": the zone's UTC offset (s) before and after
-- its daylight-saving transition nearest the client's clock, at Unix instant
-- switch_at (equal offsets when there is none), so that each script picks the
-- offset of its own instant. With n windows, window i's key is KEYS[1 + i] and its
-- holds' KEYS[1 + n + i] (their ttl, when a script creates them, key_ttl_ms); its
-- reading of the clock, w.now, is `wall` for a calendar day and `now` otherwise.
local function parse_specs(packed, now, wall, key_ttl_ms)
  local windows = {}
  local n = 0
  for _ in string.gmatch(packed, '[^|]+') do
    n = n + 1
  end
  for chunk in string.gmatch(packed, '[^|]+') do
    local f = {}
    for value in string.gmatch(chunk, '%S+') do
      f[#f + 1] = value
    end
    local w = {
      key = KEYS[1 + #windows + 1],
      holds = KEYS[1 + n + #windows + 1],
      limit = tonumber(f[1]),
      period_s = tonumber(f[2]),
      slice_s = tonumber(f[3]),
      margin_s = tonumber(f[4]),
      pacing = f[5] == '1',
      take = tonumber(f[6]),
      position = tonumber(f[7]) + 1,
      calendar = f[8] ~= '-',
      now = now,
      key_ttl_ms = key_ttl_ms,
    }
    if w.calendar then
      w.offset_before, w.switch_at, w.offset_after = tonumber(f[8]), tonumber(f[9]), tonumber(f[10])
      w.now = wall
    end
    windows[#windows + 1] = w
  end
  return windows
end

-- An amounts triple "requests tokens cost" (one argument) as a Lua array.
local function parse_amounts(packed)
  local amounts = {}
  for value in string.gmatch(packed, '%S+') do
    amounts[#amounts + 1] = tonumber(value)
  end
  return amounts
end

-- Calendar days ------------------------------------------------------------------

-- The local day number (days since 1970-01-01 in the zone) at Unix instant `t`.
local function local_day(w, t)
  local offset = w.offset_after
  if t < w.switch_at then
    offset = w.offset_before
  end
  return math.floor((t + offset) / 86400)
end

-- The Unix instant at which local day `day` starts (its midnight).
local function day_start(w, day)
  local local_s = day * 86400
  if local_s - w.offset_after >= w.switch_at then
    return local_s - w.offset_after
  end
  return local_s - w.offset_before
end

-- The day the window counts in now, kept in the window's "day" field: a new day
-- starts at 0; a wall clock stepped back stays on the day already reached (its
-- count is all there is), as the memory backend's CalendarWindow does.
local function current_day(w)
  local today = local_day(w, w.now)
  local stored = tonumber(redis.call('HGET', w.key, 'day'))
  if stored and stored >= today then
    return stored
  end
  redis.call('HSET', w.key, 'day', fmt(today), 'total', '0')
  if not stored then
    redis.call('PEXPIRE', w.key, w.key_ttl_ms)
  end
  return today
end

-- Moves every calendar-day window to the day of the wall clock now (first thing in
-- each script, so that a refusal or a settle reads the clock as an admission does).
local function sync_calendars(windows)
  for _, w in ipairs(windows) do
    if w.calendar then
      current_day(w)
    end
  end
end

-- Rolling windows ----------------------------------------------------------------

local function expiry_s(w, index)
  return (index + 1) * w.slice_s + w.period_s + w.margin_s
end

-- The slice (or day) an amount recorded now lands in.
local function slice_index(w)
  if w.calendar then
    return current_day(w)
  end
  return math.floor(w.now / w.slice_s)
end

-- Loads a window's live state: w.slices (index -> amount), w.indexes (sorted),
-- w.total, w.held, w.pace, and w.day for a calendar day; drops slices that stopped
-- counting.
local function load(w)
  local now = w.now
  local fields = redis.call('HGETALL', w.key)
  w.slices, w.indexes, w.total, w.held, w.pace = {}, {}, 0, 0, -math.huge
  local stale, day, day_total = {}, nil, 0
  for i = 1, #fields, 2 do
    local name, value = fields[i], tonumber(fields[i + 1])
    local kind = string.sub(name, 1, 2)
    if kind == 's:' then
      local index = tonumber(string.sub(name, 3))
      if expiry_s(w, index) <= now then
        stale[#stale + 1] = name
      else
        w.slices[index] = value
        w.indexes[#w.indexes + 1] = index
        w.total = w.total + value
      end
    elseif name == 'held' then
      w.held = math.max(value, 0)
    elseif name == 'pace' then
      w.pace = value
    elseif name == 'day' then
      day = value
    elseif name == 'total' then
      day_total = value
    end
  end
  if #stale > 0 then
    redis.call('HDEL', w.key, unpack(stale))
  end
  table.sort(w.indexes)
  if w.calendar then
    -- sync_calendars ran first: the stored day is the current one.
    w.day = day
    w.total = day_total
  end
end

-- Seconds from now until `amount` more fits; 0 when it fits now, inf when only a
-- release of held amounts can make room. Needs load(w).
local function wait_s(w, amount)
  local now = w.now
  local ceiling = w.limit * (1 + EPSILON)
  local used = w.total + w.held
  local pace_wait = 0
  if w.pacing then
    pace_wait = w.pace - now
  end
  if used + amount <= ceiling then
    return math.max(pace_wait, 0)
  end
  local excess = used + amount - ceiling
  if excess > w.total then
    return math.huge
  end
  if w.calendar then
    return math.max(day_start(w, w.day + 1) - now, 0)
  end
  local freed = 0
  for _, index in ipairs(w.indexes) do
    freed = freed + w.slices[index]
    if freed >= excess then
      return math.max(expiry_s(w, index) - now, pace_wait)
    end
  end
  -- Only float drift lands here: by the newest slice's expiry all of it is gone.
  return math.max(expiry_s(w, w.indexes[#w.indexes]) - now, pace_wait)
end

-- Counts `amount` now (in the current slice, or the current day).
local function record(w, amount)
  if amount <= 0 then
    return
  end
  local now = w.now
  if w.calendar then
    current_day(w)
    redis.call('HINCRBYFLOAT', w.key, 'total', fmt(amount))
    return
  end
  if w.pacing then
    local pace = tonumber(redis.call('HGET', w.key, 'pace')) or -math.huge
    -- The schedule may lag now by one request's spacing (see ratekit/_window.py).
    local one_s = w.period_s / w.limit
    local next_s = math.max(pace, now - one_s) + amount * one_s
    redis.call('HSET', w.key, 'pace', fmt(next_s))
  end
  redis.call('HINCRBYFLOAT', w.key, 's:' .. fmt(slice_index(w)), fmt(amount))
end

-- After record(w, amount) on a loaded window: the same in w's loaded state, so that
-- the next demand of one reserve sees it.
local function counted(w, amount)
  if not w.slices then
    return
  end
  w.total = w.total + amount
  if w.calendar then
    return
  end
  local index = slice_index(w)
  if w.slices[index] then
    w.slices[index] = w.slices[index] + amount
  else
    w.slices[index] = amount
    w.indexes[#w.indexes + 1] = index
  end
  if w.pacing then
    w.pace = tonumber(redis.call('HGET', w.key, 'pace')) or w.pace
  end
end

-- Adds `amount` to the older slice (or day) `index` if it still counts.
local function add_to_slice(w, index, amount)
  if amount <= 0 then
    return
  end
  if w.calendar then
    if index == current_day(w) then
      record(w, amount)
    end
    return
  end
  if expiry_s(w, index) <= w.now then
    return
  end
  redis.call('HINCRBYFLOAT', w.key, 's:' .. fmt(index), fmt(amount))
end

-- Takes back up to `amount` recorded in slice (or day) `index`, if it still counts.
local function refund(w, index, amount)
  if w.calendar then
    if index ~= current_day(w) then
      return
    end
    local total = tonumber(redis.call('HGET', w.key, 'total')) or 0
    redis.call('HSET', w.key, 'total', fmt(math.max(total - amount, 0)))
    return
  end
  if expiry_s(w, index) <= w.now then
    return
  end
  local field = 's:' .. fmt(index)
  local current = tonumber(redis.call('HGET', w.key, field))
  if current then
    redis.call('HSET', w.key, field, fmt(math.max(current - amount, 0)))
  end
end

-- Holds ------------------------------------------------------------------------

-- Holds `amount` for the call of `lease_id` until its settle (or its lease lapses).
local function hold(w, lease_id, amount)
  redis.call('HSET', w.holds, lease_id, fmt(amount))
  redis.call('HINCRBYFLOAT', w.key, 'held', fmt(amount))
  redis.call('PEXPIRE', w.holds, w.key_ttl_ms)
end

-- Stops holding what the call of `lease_id` held, if anything; a total that float
-- drift leaves just above zero is zero (as in the memory backend).
local function unhold(w, lease_id)
  local amount = tonumber(redis.call('HGET', w.holds, lease_id))
  if not amount then
    return
  end
  redis.call('HDEL', w.holds, lease_id)
  local held = tonumber(redis.call('HINCRBYFLOAT', w.key, 'held', fmt(-amount)))
  if held < w.limit * EPSILON then
    redis.call('HSET', w.key, 'held', '0')
  end
end
