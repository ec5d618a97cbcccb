-- stats: what counts now on each window and how many calls are in flight.
--
-- KEYS[1]      leases (see reserve.lua)
-- KEYS[1 + i]  window i, KEYS[1 + n + i] its holds (see _window.lua)
-- KEYS[2n + 2] waiting, KEYS[2n + 3] cooldown (unused here)
-- KEYS[2n + 4] clock (see account_clock)
-- ARGV[1]      "<now> <wall>" (s), or "" for the server's TIME
-- ARGV[2]      key ttl (ms), for the clock key and a new day's window
-- ARGV[3]      window specs (see parse_specs)
-- Returns {calls in flight, then per window: used, held}.

local n = (#KEYS - 4) / 2
local key_ttl_ms = tonumber(ARGV[2])
local now, wall = account_clock(KEYS[2 * n + 4], ARGV[1], key_ttl_ms)
local windows = parse_specs(ARGV[3], now, wall, key_ttl_ms)
sync_calendars(windows)
local reply = {redis.call('ZCOUNT', KEYS[1], '(' .. fmt(now), '+inf')}
for i = 1, n do
  local w = windows[i]
  load(w)
  reply[#reply + 1] = fmt(w.total + w.held)
  reply[#reply + 1] = fmt(w.held)
end
return reply
