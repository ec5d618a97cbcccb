-- renew: extend the leases of calls still in flight, and keep the account's keys
-- alive while they are. Run by each holder every third of the lease ttl.
--
-- KEYS[1]      leases (see reserve.lua)
-- KEYS[1 + i]  window i, KEYS[1 + n + i] its holds (see _window.lua)
-- KEYS[2n + 2] waiting, KEYS[2n + 3] cooldown (see reserve.lua)
-- KEYS[2n + 4] clock (see account_clock)
-- ARGV[1]      "<now> <wall>" (s), or "" for the server's TIME
-- ARGV[2]      key ttl (ms)
-- ARGV[3]      lease ttl (s)
-- ARGV[4..]    lease ids to renew
-- Returns how many of them were still live (a lapsed lease is not revived).

local key_ttl_ms = tonumber(ARGV[2])
local now = account_clock(KEYS[#KEYS], ARGV[1], key_ttl_ms)
local expiry = now + tonumber(ARGV[3])
local renewed = 0
for i = 4, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
    renewed = renewed + 1
  end
end
-- Extended, never shortened: a cooldown may be set to outlast the windows.
for i = 1, #KEYS do
  keep_alive(KEYS[i], key_ttl_ms)
end
return renewed
