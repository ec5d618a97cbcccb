-- stats: what counts now on each window and how many calls are in flight (of the
-- account, and of one tenant when one is named).
--
-- KEYS[1]      the account's state, KEYS[2] its leases (see _window.lua)
-- KEYS[3]      only with a tenant: the tenant's state, KEYS[4] its leases
-- ARGV[1]      "<now> <wall>" (s), or "" for the server's TIME
-- ARGV[2]      key ttl (ms)
-- ARGV[3]      window specs (see parse_specs)
-- ARGV[4..7]   only with a tenant: its four arguments (see parse_tenants)
-- Returns {calls in flight, then per window: used, held}, then the same of the tenant.

local key_ttl_ms = tonumber(ARGV[2])
local windows = parse_specs(ARGV[3], ACCOUNT)
read(ACCOUNT, base_fields(windows))
local now, wall = clock(ARGV[1])
prepare_all(ACCOUNT, windows, now, wall)
local reply = {}

-- Appends the calls in flight of state s and the usage of its `list` of windows.
local function report(s, list)
  reply[#reply + 1] = redis.call('ZCOUNT', s.leases, '(' .. fmt(now), '+inf')
  for _, w in ipairs(list) do
    reply[#reply + 1] = fmt(w.total + w.held)
    reply[#reply + 1] = fmt(w.held)
  end
end

report(ACCOUNT, windows)
finish(ACCOUNT, now, key_ttl_ms, ARGV[1])
if #KEYS > 2 then
  local t = parse_tenants(KEYS, ARGV, 4, now, wall)[1]
  report(t.s, t.windows)
  finish(t.s, now, t.ttl_ms, ARGV[1])
end
return reply
