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
-- The step of a task that calls in a loop takes a quick way when it can: see
-- _quick.lua.

local answer = quick_step(KEYS, ARGV)
if answer then
  return answer
end

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
