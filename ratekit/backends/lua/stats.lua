-- stats: what counts now on each window and how many calls are in flight (of the
-- account, and of one tenant when one is named).
--
-- KEYS[1]      the account's state (see _window.lua)
-- KEYS[2]      only with a tenant: the tenant's state
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

-- The leases of state s that have not lapsed: every one before lmin, else counted
-- (a lease lapsed but not yet reclaimed is not in flight).
local function in_flight(s)
  local count = lease_count(s)
  if count == 0 or now < (num(s, 'lmin') or -math.huge) then
    return count
  end
  count = 0
  for _, expiry in pairs(leases_of(s)) do
    if expiry > now then
      count = count + 1
    end
  end
  return count
end

-- Appends the calls in flight of state s and the usage of its `list` of windows.
local function report(s, list)
  reply[#reply + 1] = in_flight(s)
  for _, w in ipairs(list) do
    reply[#reply + 1] = fmt(w.total + w.held)
    reply[#reply + 1] = fmt(w.held)
  end
end

report(ACCOUNT, windows)
finish(ACCOUNT, now, key_ttl_ms, ARGV[1])
if #KEYS > 1 then
  local t = parse_tenants(KEYS, ARGV, 4, now, wall)[1]
  report(t.s, t.windows)
  finish(t.s, now, t.ttl_ms, ARGV[1])
end
return reply
