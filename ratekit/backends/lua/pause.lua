-- pause: refuse every admission of the account until a provider's cooldown ends.
-- A longer pause already in force stands.
--
-- KEYS[1]      cooldown: until when the account is paused (s)
-- ARGV[1]      now (s), or "" for the server's TIME
-- ARGV[2]      the cooldown (s)
-- Returns the seconds the pause lasts from now.

local now = server_now(ARGV[1])
local until_s = now + tonumber(ARGV[2])
local known = tonumber(redis.call('GET', KEYS[1])) or 0
if until_s > known then
  redis.call('SET', KEYS[1], fmt(until_s), 'PX', math.ceil((until_s - now) * 1000) + 1000)
  known = until_s
end
return fmt(known - now)
