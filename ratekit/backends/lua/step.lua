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
-- The step of a task that calls in a loop takes a short way (`quick`): one call's
-- lease ended with nothing to settle, the next one's admitted at once. It runs the
-- same helpers in the same order as the two scripts, without their generality (several
-- calls, refunds, holds, credits, slices to drop, refusals, waiters to tell), and
-- gives way to them, having written nothing, as soon as any of that comes up.

-- The reply of the quick way, or nil (nothing written) where the scripts must run.
local function quick()
  -- One settle of one lease that records nothing more (no refund, no usage other than
  -- the reservation, no count from the provider, no later slice) and one demand with
  -- a lease or none (no credit), on the same windows.
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
  for i = 1, #specs do
    if specs[i].take ~= 0 then
      return nil  -- held until settled: settle.lua's
    end
  end
  local base, at = base_fields({specs = specs}, 'wait')
  local fields = {unpack(base)}
  local ended_field = lease_field(ended)
  fields[#fields + 1] = ended_field
  read(ACCOUNT, fields, at)
  local now, wall = clock(ARGV[2])
  local ended_at = num(ACCOUNT, ended_field)
  if not ended_at or now < (num(ACCOUNT, 'cool') or 0) or now < (num(ACCOUNT, 'wait') or 0) then
    return nil  -- a lease that lapsed, a pause, a caller to tell of the release
  end
  local windows = parse_specs(ARGV[18], ACCOUNT)
  local demand = parse_amounts(ARGV[19])
  for i = 1, #windows do
    local w = windows[i]
    prepare(w, now, wall, nil)
    local amount = demand[w.position]
    if w.drop_until or (amount > 0 and wait_s(w, amount) > 0) then
      return nil  -- slices to drop, or the demand waits
    end
  end
  end_lease(ACCOUNT, ended, ended_at)
  local cap = tonumber(ARGV[15])
  if cap and lease_count(ACCOUNT) >= cap then
    return nil
  end
  local reply = {1, fmt(now)}
  for i = 1, #windows do
    local w = windows[i]
    local amount = demand[w.position]
    if amount > 0 then
      record(w, amount)
    end
    reply[#reply + 1] = index_text(w, slice_index(w))
  end
  if lease_id ~= '-' then
    take_lease(ACCOUNT, lease_id, now + tonumber(ARGV[17]))
  end
  finish(ACCOUNT, now, tonumber(ARGV[14]), ARGV[13])
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
