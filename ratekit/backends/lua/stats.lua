-- stats: what counts now on each window and how many calls are in flight.
--
-- KEYS[1]      leases (see reserve.lua)
-- KEYS[1 + i]  window i (see _window.lua)
-- ARGV[1]      now (s), or "" for the server's TIME
-- ARGV[2]      window specs (see parse_specs)
-- Returns {calls in flight, then per window: used, held}.

local now = server_now(ARGV[1])
local windows = parse_specs(ARGV[2])
local reply = {redis.call('ZCOUNT', KEYS[1], '(' .. fmt(now), '+inf')}
for i = 1, #windows do
  local w = windows[i]
  load(w, now)
  reply[#reply + 1] = fmt(w.total + w.held)
  reply[#reply + 1] = fmt(w.held)
end
return reply
