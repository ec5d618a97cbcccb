-- renew: extend the leases of calls still in flight, and keep the account's keys
-- alive while they are. Run by each holder every third of the lease ttl.
--
-- KEYS[1]      leases (see reserve.lua)
-- KEYS[2..]    the windows of the account (their ttl is extended)
-- ARGV[1]      now (s), or "" for the server's TIME
-- ARGV[2]      lease ttl (s)
-- ARGV[3]      key ttl (ms)
-- ARGV[4..]    lease ids to renew
-- Returns how many of them were still live (a lapsed lease is not revived).

local now = server_now(ARGV[1])
local expiry = now + tonumber(ARGV[2])
local key_ttl_ms = tonumber(ARGV[3])
local renewed = 0
for i = 4, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
    renewed = renewed + 1
  end
end
for i = 1, #KEYS do
  redis.call('PEXPIRE', KEYS[i], key_ttl_ms)
end
return renewed
