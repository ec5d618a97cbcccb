-- renew: extend the leases of calls still in flight, and keep the account's key alive
-- while they are (and those of the tenants they belong to). Run by each holder every
-- third of the lease ttl.
--
-- KEYS[1]      the account's state (see _window.lua)
-- KEYS[2..]    only with tenants: each tenant's state
-- ARGV[1]      "<now> <wall>" (s), or "" for the server's TIME
-- ARGV[2]      key ttl (ms)
-- ARGV[3]      lease ttl (s)
-- ARGV[4..]    one per tenant: "<its key ttl (ms)> <its lease ids to renew...>"; then
--              the lease ids to renew (every one, the tenants' included)
-- Returns how many of them were still live (a lease settled or reclaimed is not
-- revived).
--
-- Commands: TIME, HMGET (the leases with the rest), HSET; a tenant adds its own HMGET,
-- HSET.

local key_ttl_ms = tonumber(ARGV[2])
local tenant_count = #KEYS - 1
local lease_ttl_s = tonumber(ARGV[3])

-- The fields read first of state s, `names`, then the leases `ids` from `first` on.
local function fields(names, ids, first)
  for i = first, #ids do
    names[#names + 1] = lease_field(ids[i])
  end
  return names
end

-- Extends the leases `ids` (from `first` on) of state s that are still there until
-- `expiry`; how many were.
local function extend(s, ids, first, expiry)
  local renewed = 0
  for i = first, #ids do
    local old = num(s, lease_field(ids[i]))
    if old then
      move_lease(s, ids[i], old, expiry)
      renewed = renewed + 1
    end
  end
  return renewed
end

local own = 4 + tenant_count
read(ACCOUNT, fields({'raw', 'off', 'ex', 'nl', 'lmin', 'lexact', 'cool'}, ARGV, own))
local now = clock(ARGV[1])
local expiry = now + lease_ttl_s
local renewed = extend(ACCOUNT, ARGV, own, expiry)
finish(ACCOUNT, now, key_ttl_ms, ARGV[1])
for i = 1, tenant_count do
  local s = state(KEYS[1 + i])
  local packed = {}
  for value in string.gmatch(ARGV[3 + i], '%S+') do
    packed[#packed + 1] = value
  end
  read(s, fields({'ex', 'nl', 'lmin', 'lexact'}, packed, 2))
  extend(s, packed, 2, expiry)
  finish(s, now, tonumber(packed[1]), ARGV[1])
end
return renewed
