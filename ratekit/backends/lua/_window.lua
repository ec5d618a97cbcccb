-- Shared window helpers, prepended to every script by ratekit/backends/_scripts.py.
-- The same rules as ratekit/_window.py, run against the same table of cases.
--
-- A rolling window is a hash: "s:<slice index>" -> amount recorded in that slice,
-- "h:<lease id>" -> amount held by a call in flight, "pace" -> earliest instant of
-- the next admission (pacing). A calendar-day window keeps "day" -> day number and
-- "total" -> amount of that day instead of slices. Amounts are in the rate's unit,
-- times in seconds.

local EPSILON = 1e-12

local function fmt(x)
  return string.format('%.17g', x)
end

local function server_now(override)
  local now = tonumber(override)
  if now then
    return now
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- Parses the window specs the client packs into one argument: per window
-- "limit period_s slice_s margin_s pacing take position offset_s", windows apart
-- by "|". pacing is 1 or 0; take is 0 (recorded at admission), 1 (held, "usage")
-- or 2 (held, "safe"); position picks the window's unit in an amounts triple
-- (0 requests, 1 tokens, 2 money); offset_s is the calendar day's UTC offset, or
-- "-" for a rolling window. Window i's key is KEYS[1 + i].
local function parse_specs(packed)
  local windows = {}
  for chunk in string.gmatch(packed, '[^|]+') do
    local f = {}
    for value in string.gmatch(chunk, '%S+') do
      f[#f + 1] = value
    end
    windows[#windows + 1] = {
      key = KEYS[1 + #windows + 1],
      limit = tonumber(f[1]),
      period_s = tonumber(f[2]),
      slice_s = tonumber(f[3]),
      margin_s = tonumber(f[4]),
      pacing = f[5] == '1',
      take = tonumber(f[6]),
      position = tonumber(f[7]) + 1,
      offset_s = tonumber(f[8]),
    }
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

local function expiry_s(w, index)
  return (index + 1) * w.slice_s + w.period_s + w.margin_s
end

local function slice_index(w, now)
  if w.offset_s then
    return math.floor((now + w.offset_s) / 86400)
  end
  return math.floor(now / w.slice_s)
end

-- Loads a window's live state at `now`: w.slices (index -> amount), w.indexes
-- (sorted), w.total, w.held, w.pace; drops slices that stopped counting.
local function load(w, now)
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
    elseif kind == 'h:' then
      w.held = w.held + value
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
  if w.offset_s then
    w.day = slice_index(w, now)
    w.total = (day == w.day) and day_total or 0
  end
end

-- Seconds from `now` until `amount` more fits; 0 when it fits now, inf when only a
-- release of held amounts can make room.
local function wait_s(w, now, amount)
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
  if w.offset_s then
    return (w.day + 1) * 86400 - w.offset_s - now
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

-- Counts `amount` at `now` (in the current slice, or the current day).
local function record(w, now, amount)
  if amount <= 0 then
    return
  end
  if w.offset_s then
    local day = slice_index(w, now)
    local stored = tonumber(redis.call('HGET', w.key, 'day'))
    local total = 0
    if stored == day then
      total = tonumber(redis.call('HGET', w.key, 'total')) or 0
    end
    redis.call('HSET', w.key, 'day', fmt(day), 'total', fmt(total + amount))
    return
  end
  if w.pacing then
    local pace = tonumber(redis.call('HGET', w.key, 'pace')) or -math.huge
    -- The schedule may lag now by one request's spacing (see ratekit/_window.py).
    local one_s = w.period_s / w.limit
    local next_s = math.max(pace, now - one_s) + amount * one_s
    redis.call('HSET', w.key, 'pace', fmt(next_s))
  end
  redis.call('HINCRBYFLOAT', w.key, 's:' .. fmt(slice_index(w, now)), fmt(amount))
end

-- Adds `amount` to the older slice (or day) `index` if it still counts at `now`.
local function add_to_slice(w, now, index, amount)
  if amount <= 0 then
    return
  end
  if w.offset_s then
    if index == slice_index(w, now) then
      record(w, now, amount)
    end
    return
  end
  if expiry_s(w, index) <= now then
    return
  end
  redis.call('HINCRBYFLOAT', w.key, 's:' .. fmt(index), fmt(amount))
end

-- Takes back up to `amount` recorded in slice (or day) `index`, if it still counts.
local function refund(w, now, index, amount)
  if w.offset_s then
    if index ~= slice_index(w, now) then
      return
    end
    local total = tonumber(redis.call('HGET', w.key, 'total')) or 0
    redis.call('HSET', w.key, 'total', fmt(math.max(total - amount, 0)))
    return
  end
  if expiry_s(w, index) <= now then
    return
  end
  local field = 's:' .. fmt(index)
  local current = tonumber(redis.call('HGET', w.key, field))
  if current then
    redis.call('HSET', w.key, field, fmt(math.max(current - amount, 0)))
  end
end
