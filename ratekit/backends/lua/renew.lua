-- renew: extend the leases of calls still in flight, and keep the account's keys
-- alive while they are (and those of the tenants they belong to). Run by each holder
-- every third of the lease ttl.
--
-- KEYS[1]      the account's state, KEYS[2] its leases (see _window.lua)
-- KEYS[3..]    only with tenants: each tenant's state and leases, two keys a tenant
-- ARGV[1]      "<now> <wall>" (s), or "" for the server's TIME
-- ARGV[2]      key ttl (ms)
-- ARGV[3]      lease ttl (s)
-- ARGV[4..]    one per tenant: "<its key ttl (ms)> <its lease ids to renew...>"; then
--              the lease ids to renew (every one, the tenants' included)
-- Returns how many of them were still live (a lapsed lease is not revived).

local key_ttl_ms = tonumber(ARGV[2])
local tenant_count = (#KEYS - 2) / 2
read(ACCOUNT, {'raw', 'off', 'ex', 'lex', 'nl', 'cool'})
local now = clock(ARGV[1])
local expiry = fmt(now + tonumber(ARGV[3]))

-- Extends the leases `ids` of state s that are still there; how many were.
local function extend(s, ids, first)
  if #ids < first then
    return 0
  end
  local args = {s.leases, 'XX', 'CH'}
  for i = first, #ids do
    args[#args + 1] = expiry
    args[#args + 1] = ids[i]
  end
  return redis.call('ZADD', unpack(args))
end

local renewed = extend(ACCOUNT, ARGV, 4 + tenant_count)
finish(ACCOUNT, now, key_ttl_ms, ARGV[1])
for i = 1, tenant_count do
  local s = state(KEYS[1 + 2 * i], KEYS[2 + 2 * i])
  local packed = {}
  for value in string.gmatch(ARGV[3 + i], '%S+') do
    packed[#packed + 1] = value
  end
  read(s, {'ex', 'lex', 'nl'})
  extend(s, packed, 2)
  finish(s, now, tonumber(packed[1]), ARGV[1])
end
return renewed
