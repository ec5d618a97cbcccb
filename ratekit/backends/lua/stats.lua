-- stats: what counts now on each window and how many calls are in flight.
--
-- KEYS[1]      leases (see reserve.lua)
-- KEYS[1 + i]  window i (see _window.lua)
-- ARGV[1]      now (s), or "" for the server's TIME
-- ARGV[2]      window count n, then 8 values per window (see read_spec)
-- Returns {calls in flight, then per window: used, held}.

local now = server_now(ARGV[1])
local n = tonumber(ARGV[2])
local reply = {redis.call('ZCOUNT', KEYS[1], '(' .. fmt(now), '+inf')}
for i = 1, n do
  local w = read_spec(KEYS[1 + i], 2 + (i - 1) * 8)
  load(w, now)
  reply[#reply + 1] = fmt(w.total + w.held)
  reply[#reply + 1] = fmt(w.held)
end
return reply
