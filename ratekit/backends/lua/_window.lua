-- Shared window helpers, prepended to every script by ratekit/backends/_scripts.py.
-- The same rules as ratekit/_window.py, run against the same table of cases.
--
-- An account is one key: KEYS[1], its state (a hash). A tenant with limits of its own
-- (ratekit/_tenants.py) is one more key of the same shape under the account's hash
-- tag, given after the account's; a script that serves tenants names them in its
-- header. The state hash holds:
--
--   raw, off      the account's clock (see clock)
--   cool          until when the account is paused after a provider's 429
--   wait          until when some caller is known to wait (releases are announced
--                 only then)
--   ex            until when the state is known to live (see finish)
--   l|<lease>     lease's expiry on the account's clock: one lease per call in flight
--                 that has a slot or something to settle (see take_lease)
--   nl            how many leases the hash holds (set again by a scan of them, see
--                 scan_leases)
--   lmin          no lease expires before it: the earliest expiry, or a bound below it
--                 (absent while leases are: nothing known; left as it was once nl is
--                 0, when it means nothing)
--   lexact        1 while lmin is the earliest expiry itself, else only a bound
--   (raw, off, cool and wait are the account's alone: a tenant runs on the
--   account's clock and is paused with it; the rest are kept by both)
--   <w>|t         window w's running total: the sum of its live slices (a calendar
--                 day: the day's total)
--   <w>|lo, |hi   the oldest and newest slice index that may hold an amount
--   <w>|hv        the amount of slice hi (so recording into the newest slice needs
--                 no read of its own)
--   <w>|<index>   the amount recorded in slice index
--   <w>|h         the amount held by calls in flight
--   <w>|h|<lease> the amount held by the call of lease
--   <w>|p         pacing: the earliest instant of the next admission
--   <w>|d         a calendar day's local day number
--
-- <w> names a window by its unit, period, slices and zone (not its limit), so that
-- changed limits keep counting what was used. A script reads the fields it needs
-- in one HMGET (read), works on them in Lua, and writes what changed in one HSET
-- and one HDEL (flush): an admission costs a fixed handful of commands however
-- many slices or calls are live (and as much again for each tenant served). Slices
-- are dropped once, when they stop counting.
--
-- A state is a Lua table: its key, and the fields as read so far and as changed by
-- this script (see state). Each window keeps the state it lives in (w.s), so that
-- every helper below works on the account's windows and on a tenant's alike.
--
-- Two clocks, as in ratekit/_clock.py: rolling windows, pacing, leases and the
-- cooldown run on the account's clock (`now`), calendar days on the wall clock
-- (`wall`, Unix seconds). parse_specs gives each window its own reading as w.now.

local EPSILON = 1e-12

-- string.format and math.floor, taken by begin: a library's text, run when it is
-- loaded, may read no global but redis (functions look them up when they run).
local format, floor
-- The last two numbers formatted, and their text; fmt_old is the one replaced next.
-- NaN to start: equal to nothing (not even a nil passed by mistake, which must fail).
local fmt_a, fmt_a_text, fmt_b, fmt_b_text, fmt_old = 0 / 0, nil, 0 / 0, nil, 1

-- x as '%.17g' writes it: the form every stored number and reply has. An integer
-- below 1e15 takes '%d' (the same text, at half the cost), and the last two numbers
-- formatted are kept (a value written twice in one call is formatted once). Zero
-- takes neither shortcut, so that -0 stays "-0".
local function fmt(x)
  if x == fmt_a then
    return fmt_a_text
  elseif x == fmt_b then
    return fmt_b_text
  end
  local text
  if x == floor(x) and x < 1e15 and x > -1e15 and x ~= 0 then
    text = format('%d', x)
  else
    text = format('%.17g', x)
    if x == 0 then
      return text
    end
  end
  if fmt_old == 1 then
    fmt_a, fmt_a_text, fmt_old = x, text, 2
  else
    fmt_b, fmt_b_text, fmt_old = x, text, 1
  end
  return text
end

-- No field placed: the `at` of a state whose first read was not of a list made once.
local NOWHERE = {}

-- A state (hash `key`), as read so far and as changed by this script.
-- The fields read first, when read as a list made once (see specs_of), stay in
-- HMGET's reply as it came: first[at[name]] (text, or false when absent); any other
-- field read is in values (the same). changes holds what this script changed: a
-- number for a field set (formatted when flush writes it), false for a field dropped.
-- A field is looked up in changes, then values, then first.
local function state(key)
  return {key = key, first = false, at = NOWHERE, values = {}, changes = {}}
end

-- The account's state (KEYS[1]) of the call that runs: set by begin, the
-- first thing each call does. Loaded as a function library (see _scripts.py), these
-- helpers are built once and serve every call, so nothing of one call may stay here
-- for the next: what a call keeps lives in tables it makes (begin's state included).
local ACCOUNT
-- The clock's reading in the call that runs (false until clock is read), and whether
-- finish is held back (a step's settles: its reserves write for both, see step.lua).
local READ_NOW, READ_WALL, HOLD
-- The account's windows of the call that runs, and the specs they were parsed from
-- (see parse_specs): a step's reserves go on with its settles' windows.
local CALL_WINDOWS, CALL_SPECS

local function begin(keys)
  format, floor = string.format, math.floor
  ACCOUNT = state(keys[1])
  READ_NOW, HOLD = false, false
  CALL_WINDOWS, CALL_SPECS = false, false
end

-- Holds finish back (true) or lets it write again (false): see step.lua.
local function hold_finish(held)
  HOLD = held
end

-- Field `name` of state s as known (see state): nil when not read yet.
local function known(s, name)
  local value = s.changes[name]
  if value == nil then
    value = s.values[name]
    if value == nil then
      local i = s.at[name]
      if i then
        return s.first[i]
      end
    end
  end
  return value
end

-- Reads `names` (those not read yet) of state s with one HMGET. `at`, when `names`
-- starts with a list made once, gives their positions (at[name] = i): the first read
-- of a state then keeps the reply as it came (see state) instead of copying it.
local function read(s, names, at)
  local values = s.values
  local wanted = names
  if at and s.at == at then
    -- The list made once was read first (a step's settles, then its reserves): only
    -- names after it may be new.
    wanted = {}
    for i = #names, 1, -1 do
      local name = names[i]
      if at[name] == i then
        break
      end
      if known(s, name) == nil then
        wanted[#wanted + 1] = name
      end
    end
  elseif at and not s.first and next(values) == nil then
    local got = redis.call('HMGET', s.key, unpack(names))
    s.first, s.at = got, at
    -- The names after the list made once, if any, are kept in values.
    for i = #names, 1, -1 do
      local name = names[i]
      if at[name] == i then
        break
      end
      values[name] = got[i]
    end
    return
  elseif s.first or next(values) ~= nil then
    wanted = {}
    for _, name in ipairs(names) do
      if known(s, name) == nil then
        wanted[#wanted + 1] = name
      end
    end
  end
  if #wanted == 0 then
    return
  end
  local got = redis.call('HMGET', s.key, unpack(wanted))
  for i = 1, #wanted do
    values[wanted[i]] = got[i] or false
  end
end

-- A field's value as a number (nil when absent); read first when it was not.
local function num(s, name)
  -- known(s, name), written out: the helper called most.
  local value = s.changes[name]
  if value == nil then
    value = s.values[name]
    if value == nil then
      local i = s.at[name]
      if i then
        value = s.first[i]
      else
        read(s, {name})
        value = s.values[name]
      end
    end
  end
  return tonumber(value)
end

-- Sets a field to a number, formatted when written (flush): a field set several times
-- in one call is formatted once.
local function put(s, name, value)
  if value == nil then
    error('put: no value for ' .. name)
  end
  s.changes[name] = value
end

local function drop(s, name)
  s.changes[name] = false
end

-- Writes every change of state s: one HSET, one HDEL. The changes stay as they are
-- (what is read after still sees them): finish, the only caller, is the last step of
-- a state, once.
local function flush(s)
  local pairs_, n, names = {}, 0, nil
  for name, value in pairs(s.changes) do
    if value then
      pairs_[n + 1], pairs_[n + 2] = name, fmt(value)
      n = n + 2
    else
      names = names or {}
      names[#names + 1] = name
    end
  end
  if n > 0 then
    redis.call('HSET', s.key, unpack(pairs_, 1, n))
  end
  if names then
    redis.call('HDEL', s.key, unpack(names))
  end
end

-- The account's clock. `given` is "<now> <wall>" handed by a single-process client
-- (tests with a fake clock), or "" for the server's TIME, shared by every pod.
-- Returns now (rolling windows, pacing, leases, cooldown) and wall (calendar days).
-- Needs read(ACCOUNT, {'raw', 'off'}).
--
-- `now` never goes back:
-- - TIME stepped back (an operator, NTP): the step is added to the offset, so the
--   account's clock resumes from where it was and runs on at the normal rate: pacing
--   and windows neither stall nor restart. A forward step cannot be told from idle
--   time and is taken as it comes (windows expire that much early).
-- - A given instant older than the last one (calls of one process that reach the
--   server out of order): the last one stands; monotonic readings never step.
local function clock(given)
  if READ_NOW then
    return READ_NOW, READ_WALL  -- once per call: step.lua runs two operations
  end
  local raw, wall
  local last, offset = num(ACCOUNT, 'raw'), num(ACCOUNT, 'off') or 0
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
  put(ACCOUNT, 'raw', raw)
  if offset ~= 0 then
    put(ACCOUNT, 'off', offset)
  end
  READ_NOW, READ_WALL = raw + offset, wall
  return READ_NOW, READ_WALL
end

-- Writes every change of state s (flush), then keeps its key alive for `ttl_ms` from
-- `now` (the account's also past the cooldown's end): a PEXPIRE only when what was
-- set last is about to run short, so most calls send none. With a given clock (a fake
-- one) every call sends it. A tenant's state that holds nothing and got nothing is
-- left unmade. The last thing a script that writes does, for each state (nothing
-- while held back: hold_finish).
local function finish(s, now, ttl_ms, given)
  if HOLD then
    return
  end
  local ttl_s = ttl_ms / 1000
  local want = now + ttl_s
  if s == ACCOUNT then
    want = math.max(want, (num(s, 'cool') or 0) + 1)
  elseif next(s.changes) == nil and not num(s, 'ex') then
    return
  end
  local known = num(s, 'ex') or -math.huge
  local step = ttl_s / 8
  local set_ms = math.ceil((want - now + step) * 1000)
  local alive = given ~= '' or known < want
  if alive then
    put(s, 'ex', want + step)
  end
  flush(s)
  if alive then
    redis.call('PEXPIRE', s.key, set_ms)
  end
end

-- Window specs ---------------------------------------------------------------------

-- Parses the window specs the client packs into one argument: per window
-- "id limit period_s slice_s margin_s pacing take position zone", windows apart by
-- "|". id names the window's fields; pacing is 1 or 0; take is 0 (recorded at
-- admission), 1 (held, "usage") or 2 (held, "safe"); position picks the window's
-- unit in an amounts triple (0 requests, 1 tokens, 2 money). zone is "-" for a
-- rolling window; for a calendar day it is three fields "before switch_at after":
-- the zone's UTC offset (s) before and after its daylight-saving transition nearest
-- the client's clock, at Unix instant switch_at (equal offsets when there is none),
-- so that each script picks the offset of its own instant. The windows live in state s.
local SPEC = '^%s*(%S+)%s+(%S+)%s+(%S+)%s+(%S+)%s+(%S+)%s+(%S+)%s+(%S+)%s+(%S+)%s+(%S+)%s*(%S*)%s*(%S*)'

-- One window's spec as parsed: read only but for spec.memo, texts made from it (every
-- call's window is a table of its own that reads the spec's fields through its
-- metatable, spec.window).
local function parse_spec(chunk)
  local id, limit, period_s, slice_s, margin_s, pacing, take, position, zone, switch_at, after =
    string.match(chunk, SPEC)
  local calendar, paced = zone ~= '-', pacing == '1'
  local spec = {
    id = id,
    limit = tonumber(limit),
    period_s = tonumber(period_s),
    slice_s = tonumber(slice_s),
    margin_s = tonumber(margin_s),
    pacing = paced,
    -- One digit each: compared, not parsed.
    take = take == '0' and 0 or take == '1' and 1 or tonumber(take),
    position = position == '0' and 1 or position == '1' and 2 or tonumber(position) + 1,
    calendar = calendar,
    f_t = id .. '|t', f_h = id .. '|h',
    f_lo = not calendar and id .. '|lo' or nil,
    f_hi = not calendar and id .. '|hi' or nil,
    f_hv = not calendar and id .. '|hv' or nil,
    f_p = paced and id .. '|p' or nil,
    f_d = calendar and id .. '|d' or nil,
  }
  if calendar then
    spec.offset_before, spec.switch_at, spec.offset_after = tonumber(zone), tonumber(switch_at), tonumber(after)
  end
  spec.window = {__index = spec}
  -- Texts made for the spec's windows (see index_text): the one part that changes.
  spec.memo = {index = nil, index_text = nil, field_index = nil, field = nil}
  return spec
end

-- Parsed specs by their packed text, so that a library's call finds its windows'
-- specs parsed by an earlier one (a script's, run afresh each call, parses each
-- time). Emptied when full: an account's specs change only with its limits.
local SPEC_CACHE_SIZE = 256
local parsed_specs, parsed_count = {}, 0

-- The fields every script reads at its start for windows of `specs` (a window's
-- pacing field only when it paces: no script reads it otherwise), after `names`.
local function with_windows(names, specs)
  local n = #names
  for _, w in ipairs(specs) do
    names[n + 1], names[n + 2] = w.f_t, w.f_h
    n = n + 2
    if w.calendar then
      names[n + 1] = w.f_d
      n = n + 1
    else
      names[n + 1], names[n + 2], names[n + 3] = w.f_lo, w.f_hi, w.f_hv
      n = n + 3
    end
    if w.pacing then
      names[n + 1] = w.f_p
      n = n + 1
    end
  end
  return names
end

-- Each name's position in list `names` (the last one's, for a name given twice).
local function positions(names)
  local at = {}
  for i, name in ipairs(names) do
    at[name] = i
  end
  return at
end

-- The window specs of one packed text, parsed (cached: read only). Also made once
-- with them, the lists of fields a script reads first (read only too): `account`, the
-- account's (see base_fields), `waits`, those and 'wait', `tenant`, a tenant's; and,
-- when step.lua first needs it, `quick`, the list its quick way reads (its last place
-- rewritten by each step).
local function specs_of(packed)
  local specs = parsed_specs[packed]
  if specs then
    return specs
  end
  specs = {}
  for chunk in string.gmatch(packed, '[^|]+') do
    specs[#specs + 1] = parse_spec(chunk)
  end
  specs.account = with_windows({'raw', 'off', 'ex', 'nl', 'lmin', 'lexact', 'cool'}, specs)
  specs.waits = with_windows({'raw', 'off', 'ex', 'nl', 'lmin', 'lexact', 'cool', 'wait'}, specs)
  specs.tenant = with_windows({'ex', 'nl', 'lmin', 'lexact'}, specs)
  for _, list in ipairs({'account', 'waits', 'tenant'}) do
    specs[list .. '_at'] = positions(specs[list])
  end
  if parsed_count >= SPEC_CACHE_SIZE then
    parsed_specs, parsed_count = {}, 0
  end
  parsed_specs[packed] = specs
  parsed_count = parsed_count + 1
  return specs
end

-- The windows of the window specs the client packs into one argument, each a new
-- table (a call's own: prepare and the rest write into it; its spec's fields are read
-- through its metatable). The windows live in state s; `windows.specs` is their specs.
local function parse_specs(packed, s)
  if s == ACCOUNT and CALL_SPECS == packed then
    -- The same call's, already brought to now (prepare_all) and kept as it changed
    -- them since: a step's reserves take its settles' windows.
    return CALL_WINDOWS
  end
  local specs = specs_of(packed)
  local windows = {specs = specs}
  for i = 1, #specs do
    windows[i] = setmetatable({
      s = s,
      -- Set by prepare and the rest: named here so that the table is made at its full
      -- size at once.
      now = nil, held = nil, pace = nil, total = nil, lo = nil, hi = nil, hv = nil,
      day = nil, drop_until = nil,
    }, specs[i].window)
  end
  if s == ACCOUNT then
    CALL_WINDOWS, CALL_SPECS = windows, packed
  end
  return windows
end

-- The account's fields every script reads at its start, for `windows` (see
-- with_windows), plus the field `extra`: nil, or 'wait'. A list made once (read
-- only), and its positions (see read).
local function base_fields(windows, extra)
  local specs = windows.specs
  if extra == 'wait' then
    return specs.waits, specs.waits_at
  end
  assert(extra == nil, 'base_fields: no list made with ' .. tostring(extra))
  return specs.account, specs.account_at
end

-- A tenant's fields every script reads at its start, for its `windows`: a list made
-- once (read only), and its positions (see read).
local function tenant_fields(windows)
  local specs = windows.specs
  return specs.tenant, specs.tenant_at
end

-- An amounts triple "requests tokens cost" (one argument) as a Lua array.
local function parse_amounts(packed)
  local requests, tokens, cost = string.match(packed, '^(%S+) (%S+) (%S+)$')
  if requests then
    -- "0" is the most common amount: taken without a parse.
    return {
      requests == '0' and 0 or tonumber(requests),
      tokens == '0' and 0 or tonumber(tokens),
      cost == '0' and 0 or tonumber(cost),
    }
  end
  local amounts = {}
  for value in string.gmatch(packed, '%S+') do
    amounts[#amounts + 1] = tonumber(value)
  end
  return amounts
end

-- A slice index as text, and a slice's field. The last of each made is kept with the
-- window's spec (w.memo), across calls: an admission names its slice twice, in the
-- field it writes and in the reply, and most calls name the newest slice, as the call
-- before. A text depends on the spec and the index alone: nothing of one call shapes
-- the next.
local function index_text(w, index)
  local memo = w.memo
  if memo.index ~= index or index == 0 then
    memo.index, memo.index_text = index, fmt(index)
  end
  return memo.index_text
end

local function slice_field(w, index)
  local memo = w.memo
  if memo.field_index ~= index or index == 0 then
    local field = w.id .. '|' .. index_text(w, index)
    memo.field_index, memo.field = index, field
    return field
  end
  return memo.field
end

local function hold_field(w, lease_id)
  return w.id .. '|h|' .. lease_id
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

-- Rolling windows ----------------------------------------------------------------

local function expiry_s(w, index)
  return (index + 1) * w.slice_s + w.period_s + w.margin_s
end

-- The slice (or day) an amount recorded now lands in.
local function slice_index(w)
  if w.calendar then
    return w.day
  end
  return math.floor(w.now / w.slice_s)
end

-- Brings window w to now, after the base fields were read: a calendar window moves
-- to today (a new day starts at 0; a wall clock stepped back stays on the day
-- already reached, as the memory backend's CalendarWindow does); a rolling window
-- drops the slices that stopped counting (`expired`, a list made when first needed
-- and returned, collects the fields to read for that, read by the caller in one
-- HMGET for every window, then `expire` finishes). Sets w.total, w.held, w.pace,
-- w.lo, w.hi, w.hv.
local function prepare(w, now, wall, expired)
  local s = w.s
  w.held = math.max(num(s, w.f_h) or 0, 0)
  w.pace = w.pacing and num(s, w.f_p) or -math.huge
  w.total = num(s, w.f_t) or 0
  if w.calendar then
    w.now = wall
    local today = local_day(w, wall)
    local stored = num(s, w.f_d)
    if stored and stored >= today then
      w.day = stored
    else
      w.day = today
      w.total = 0
      put(s, w.f_d, today)
      put(s, w.f_t, 0)
    end
    return expired
  end
  w.now = now
  w.lo, w.hi, w.hv = num(s, w.f_lo), num(s, w.f_hi), num(s, w.f_hv) or 0
  w.drop_until = nil
  if not w.lo then
    w.total = 0
    return expired
  end
  -- The newest slice that no longer counts: expiry_s(index) <= now.
  local last = math.floor((now - w.period_s - w.margin_s) / w.slice_s) - 1
  while expiry_s(w, last + 1) <= now do
    last = last + 1
  end
  while last >= w.lo and expiry_s(w, last) > now do
    last = last - 1
  end
  if last < w.lo then
    return expired
  end
  w.drop_until = math.min(last, w.hi)
  if last < w.hi then
    expired = expired or {}
    for index = w.lo, w.drop_until do
      expired[#expired + 1] = slice_field(w, index)
    end
  end
  return expired
end

-- Finishes `prepare` once the expired slices' fields were read.
local function expire(w)
  if w.calendar or not w.drop_until then
    return
  end
  local s = w.s
  local everything = w.drop_until >= w.hi
  for index = w.lo, w.drop_until do
    local field = slice_field(w, index)
    if not everything then
      w.total = w.total - (num(s, field) or 0)
    end
    drop(s, field)
  end
  if everything then
    w.total, w.lo, w.hi, w.hv = 0, nil, nil, 0
    drop(s, w.f_lo)
    drop(s, w.f_hi)
    drop(s, w.f_hv)
  else
    w.lo = w.drop_until + 1
    put(s, w.f_lo, w.lo)
  end
  put(s, w.f_t, math.max(w.total, 0))
  w.drop_until = nil
end

-- Reads and brings every window of state s to now: the base fields are read; at most
-- one more HMGET for the slices that stopped counting.
local function prepare_all(s, windows, now, wall)
  if windows.now == now then
    return  -- brought to this instant before in this call (see parse_specs)
  end
  windows.now = now
  local expired
  for _, w in ipairs(windows) do
    expired = prepare(w, now, wall, expired)
  end
  if expired then
    read(s, expired)
  end
  for _, w in ipairs(windows) do
    expire(w)
  end
end

-- The live slices of w, oldest first, as {index, amount} pairs (one HMGET; only
-- refusals and statistics need them).
local function live_slices(w)
  local slices = {}
  if w.calendar or not w.lo then
    return slices
  end
  local names = {}
  for index = w.lo, w.hi do
    names[#names + 1] = slice_field(w, index)
  end
  read(w.s, names)
  for index = w.lo, w.hi do
    local amount = num(w.s, slice_field(w, index))
    if amount and amount > 0 then
      slices[#slices + 1] = {index, amount}
    end
  end
  return slices
end

-- Seconds from now until `amount` more fits; 0 when it fits now, inf when only a
-- release of held amounts can make room.
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
  local slices = live_slices(w)
  for _, entry in ipairs(slices) do
    freed = freed + entry[2]
    if freed >= excess then
      return math.max(expiry_s(w, entry[1]) - now, pace_wait)
    end
  end
  -- Only float drift lands here: by the newest slice's expiry all of it is gone.
  return math.max(expiry_s(w, w.hi or math.floor(now / w.slice_s)) - now, pace_wait)
end

-- Adds `delta` (positive or negative) to slice `index` of a rolling window, which
-- still counts; keeps total, lo, hi and hv.
local function add_to(w, index, delta)
  if delta == 0 then
    return
  end
  local s = w.s
  local field = slice_field(w, index)
  local current
  if w.hi and index == w.hi then
    current = w.hv
  elseif w.hi and index > w.hi then
    current = 0
  elseif not w.lo then
    current = 0
  else
    current = num(s, field) or 0
  end
  local amount = math.max(current + delta, 0)
  w.total = math.max(w.total + (amount - current), 0)
  put(s, field, amount)
  -- hi is written only when it moves (w.hi is what the hash holds).
  local moved = not w.lo or index > w.hi
  if not w.lo then
    w.lo, w.hi = index, index
    put(s, w.f_lo, index)
  elseif index < w.lo then
    w.lo = index
    put(s, w.f_lo, index)
  end
  if index >= w.hi then
    w.hi, w.hv = index, amount
    if moved then
      put(s, w.f_hi, index)
    end
    put(s, w.f_hv, amount)
  end
  put(s, w.f_t, w.total)
end

-- Counts `amount` now (in the current slice, or the current day).
local function record(w, amount)
  if amount <= 0 then
    return
  end
  if w.calendar then
    w.total = w.total + amount
    put(w.s, w.f_t, w.total)
    return
  end
  if w.pacing then
    -- The schedule may lag now by one request's spacing (see ratekit/_window.py).
    local one_s = w.period_s / w.limit
    w.pace = math.max(w.pace, w.now - one_s) + amount * one_s
    put(w.s, w.f_p, w.pace)
  end
  add_to(w, slice_index(w), amount)
end

-- Adds `amount` to the older slice (or day) `index` if it still counts.
local function add_to_slice(w, index, amount)
  if amount <= 0 then
    return
  end
  if w.calendar then
    if index == w.day then
      record(w, amount)
    end
    return
  end
  if expiry_s(w, index) <= w.now then
    return
  end
  add_to(w, index, amount)
end

-- Takes back up to `amount` recorded in slice (or day) `index`, if it still counts.
local function refund(w, index, amount)
  if amount <= 0 then
    return
  end
  if w.calendar then
    if index == w.day then
      w.total = math.max(w.total - amount, 0)
      put(w.s, w.f_t, w.total)
    end
    return
  end
  if expiry_s(w, index) <= w.now or not w.lo or index < w.lo or index > w.hi then
    return
  end
  add_to(w, index, -amount)
end

-- Counts what window w recorded for an admission in slice `index` (`amount`, taken as
-- w.take says) from instant `at_s` instead, if that is in a later slice: the request it
-- stands for left then (sent.lua), or was never said to leave and had arrived by its
-- end (settle.lua). Counted then even if slice `index` expired meanwhile: the provider
-- counts it from its arrival. A calendar day keeps the admission's day; a window that
-- holds until settle records nothing before it. Returns the slice it counts in.
local function move_to(w, index, amount, at_s)
  if w.calendar or w.take == 1 then
    return index
  end
  local moved = math.floor(at_s / w.slice_s)
  if moved <= index then
    return index
  end
  if w.take == 0 and amount > 0 then
    refund(w, index, amount)
    add_to(w, moved, amount)
  end
  return moved
end

-- Holds and leases -----------------------------------------------------------------

-- Holds `amount` for the call of `lease_id` until its settle (or its lease lapses).
local function hold(w, lease_id, amount)
  put(w.s, hold_field(w, lease_id), amount)
  w.held = w.held + amount
  put(w.s, w.f_h, w.held)
end

-- Stops holding what the call of `lease_id` held, if anything; a total that float
-- drift leaves just above zero is zero (as in the memory backend).
local function unhold(w, lease_id)
  local s = w.s
  local field = hold_field(w, lease_id)
  local amount = num(s, field)
  if not amount then
    return
  end
  drop(s, field)
  w.held = w.held - amount
  if w.held < w.limit * EPSILON then
    w.held = 0
  end
  put(s, w.f_h, w.held)
end

-- A lease's field in its state, which holds its expiry.
local function lease_field(lease_id)
  return 'l|' .. lease_id
end

-- How many leases state s holds, live or not yet reclaimed.
local function lease_count(s)
  return num(s, 'nl') or 0
end

-- `expiry`, no later than any lease's of state s, is the earliest: lmin, exactly.
local function set_earliest(s, expiry)
  put(s, 'lmin', expiry)
  if num(s, 'lexact') ~= 1 then
    put(s, 'lexact', 1)
  end
end

-- Adds `lease_id` to the leases of state s, until `expiry` (a field of the state: its
-- ttl is the state's, see finish).
local function take_lease(s, lease_id, expiry)
  local count = lease_count(s)
  put(s, lease_field(lease_id), expiry)
  put(s, 'nl', count + 1)
  local earliest = num(s, 'lmin')
  -- With leases but no lmin, nothing is known of their expiries: it stays so.
  if count == 0 or (earliest and expiry < earliest) then
    set_earliest(s, expiry)
  end
end

-- Moves lease `lease_id` of state s, until now live until `old`, to `expiry` (renewed).
local function move_lease(s, lease_id, old, expiry)
  put(s, lease_field(lease_id), expiry)
  local earliest = num(s, 'lmin')
  if not earliest then
    return
  end
  if expiry < earliest then
    set_earliest(s, expiry)
  elseif old <= earliest and expiry > earliest and num(s, 'lexact') == 1 then
    -- The earliest may have moved on: lmin stays below every expiry, as a bound.
    put(s, 'lexact', 0)
  end
end

-- Ends lease `lease_id` of state s, live until `expiry` (settled).
local function end_lease(s, lease_id, expiry)
  drop(s, lease_field(lease_id))
  local count = math.max(lease_count(s) - 1, 0)
  put(s, 'nl', count)
  -- The last lease gone, lmin means nothing: it is left for the next to set.
  if count > 0 and expiry <= (num(s, 'lmin') or -math.huge) and num(s, 'lexact') == 1 then
    put(s, 'lexact', 0)
  end
end

-- The leases of state s as they stand, this call's changes included: lease id ->
-- expiry. One HSCAN of the lease fields (more for a hash too large for one reply).
local function leases_of(s)
  local leases, cursor = {}, '0'
  repeat
    local reply = redis.call('HSCAN', s.key, cursor, 'MATCH', 'l|*', 'COUNT', 1000)
    cursor = reply[1]
    local items = reply[2]
    for i = 1, #items, 2 do
      leases[string.sub(items[i], 3)] = tonumber(items[i + 1])
    end
  until cursor == '0'
  for name, value in pairs(s.changes) do
    if string.sub(name, 1, 2) == 'l|' then
      leases[string.sub(name, 3)] = value or nil
    end
  end
  return leases
end

local function by_expiry(a, b)
  return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2])
end

-- Scans the leases of state s: those lapsed by now belong to holders that died, and
-- their slots and the holds of s's `windows` are freed (in the order they lapsed);
-- the rest are counted again (a count that drifted is put right) and lmin set to
-- their earliest expiry, exactly. Returns whether anything changed.
local function scan_leases(s, windows, now)
  local dead, live, earliest = {}, 0, nil
  for id, expiry in pairs(leases_of(s)) do
    if expiry <= now then
      dead[#dead + 1] = {expiry, id}
    else
      live = live + 1
      if not earliest or expiry < earliest then
        earliest = expiry
      end
    end
  end
  local changed = #dead > 0 or live ~= lease_count(s)
  if #dead > 0 then
    table.sort(dead, by_expiry)
    local names = {}
    for _, w in ipairs(windows) do
      if w.take ~= 0 then
        for _, entry in ipairs(dead) do
          names[#names + 1] = hold_field(w, entry[2])
        end
      end
    end
    read(s, names)
    for _, w in ipairs(windows) do
      if w.take ~= 0 then
        for _, entry in ipairs(dead) do
          unhold(w, entry[2])
        end
      end
    end
    for _, entry in ipairs(dead) do
      drop(s, lease_field(entry[2]))
    end
  end
  put(s, 'nl', live)
  if earliest then
    set_earliest(s, earliest)
  end
  return changed
end

-- Reclaims the leases of state s that lapsed (see scan_leases): scans them only once
-- now has reached lmin, before which none can have. Returns whether anything changed.
local function reclaim(s, windows, now)
  if lease_count(s) == 0 or now < (num(s, 'lmin') or -math.huge) then
    return false
  end
  return scan_leases(s, windows, now)
end

-- The earliest expiry of the leases of state s (nil: none): lmin, once the leases are
-- scanned when it is only a bound.
local function earliest_expiry(s, windows, now)
  if lease_count(s) == 0 then
    return nil
  end
  if num(s, 'lexact') ~= 1 or not num(s, 'lmin') then
    scan_leases(s, windows, now)
    if lease_count(s) == 0 then
      return nil
    end
  end
  return num(s, 'lmin')
end

-- Tenants ------------------------------------------------------------------------

-- The tenants a script serves, from its `keys` and `args` (KEYS, ARGV): KEYS[2] is the
-- first one's state, and so on; ARGV from `first` on holds per tenant its key ttl
-- (ms), its concurrency cap ("" for none), whether its calls take a lease of its own
-- (1 or 0) and its window specs. Each is read and brought to now.
local function parse_tenants(keys, args, first, now, wall)
  local tenants = {}
  for i = 1, #keys - 1 do
    local at = first + (i - 1) * 4
    local s = state(keys[1 + i])
    local t = {
      s = s,
      ttl_ms = tonumber(args[at]),
      cap = tonumber(args[at + 1]),
      slot = args[at + 2] == '1',
      windows = parse_specs(args[at + 3], s),
    }
    read(s, tenant_fields(t.windows))
    prepare_all(s, t.windows, now, wall)
    tenants[i] = t
  end
  return tenants
end
