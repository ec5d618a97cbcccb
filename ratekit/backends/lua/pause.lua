-- pause: refuse every admission of the account until a provider's cooldown ends.
-- A longer pause already in force stands.
--
-- KEYS[1]      cooldown: until when the account is paused (s, account clock)
-- KEYS[2]      clock (see account_clock)
-- ARGV[1]      "<now> <wall>" (s), or "" for the server's TIME
-- ARGV[2]      key ttl (ms), for the clock key
-- ARGV[3]      the cooldown (s)
-- Returns the seconds the pause lasts from now.

local now = account_clock(KEYS[2], ARGV[1], tonumber(ARGV[2]))
local until_s = now + tonumber(ARGV[3])
local known = tonumber(redis.call('GET', KEYS[1])) or 0
if until_s > known then
  local ttl_ms = math.ceil((until_s - now) * 1000) + 1000
  redis.call('SET', KEYS[1], fmt(until_s), 'PX', ttl_ms)
  -- The clock outlives the cooldown: its instant is on the account's clock.
  keep_alive(KEYS[2], ttl_ms)
  known = until_s
end
return fmt(known - now)
