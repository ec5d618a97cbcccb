-- stats: what counts now on each window and how many calls are in flight.
--
-- KEYS[1]      the account's state, KEYS[2] its leases (see _window.lua)
-- ARGV[1]      "<now> <wall>" (s), or "" for the server's TIME
-- ARGV[2]      key ttl (ms)
-- ARGV[3]      window specs (see parse_specs)
-- Returns {calls in flight, then per window: used, held}.

local key_ttl_ms = tonumber(ARGV[2])
local windows = parse_specs(ARGV[3])
read(base_fields(windows, {}))
local now, wall = clock(ARGV[1])
prepare_all(windows, now, wall)
local reply = {redis.call('ZCOUNT', LEASES, '(' .. fmt(now), '+inf')}
for _, w in ipairs(windows) do
  reply[#reply + 1] = fmt(w.total + w.held)
  reply[#reply + 1] = fmt(w.held)
end
finish(now, key_ttl_ms, ARGV[1])
return reply
