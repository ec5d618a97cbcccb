-- renew: extend the leases of calls still in flight, and keep the account's keys
-- alive while they are. Run by each holder every third of the lease ttl.
--
-- KEYS[1]      the account's state, KEYS[2] its leases (see _window.lua)
-- ARGV[1]      "<now> <wall>" (s), or "" for the server's TIME
-- ARGV[2]      key ttl (ms)
-- ARGV[3]      lease ttl (s)
-- ARGV[4..]    lease ids to renew
-- Returns how many of them were still live (a lapsed lease is not revived).

local key_ttl_ms = tonumber(ARGV[2])
read({'raw', 'off', 'ex', 'lex', 'nl', 'cool'})
local now = clock(ARGV[1])
local expiry = fmt(now + tonumber(ARGV[3]))
local args = {LEASES, 'XX', 'CH'}
for i = 4, #ARGV do
  args[#args + 1] = expiry
  args[#args + 1] = ARGV[i]
end
local renewed = 0
if #ARGV >= 4 then
  renewed = redis.call('ZADD', unpack(args))
end
finish(now, key_ttl_ms, ARGV[1])
return renewed
