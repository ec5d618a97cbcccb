-- pause: refuse every admission of the account until a provider's cooldown ends, or
-- until an account taken out (its quota or balance spent) is tried again. A longer
-- pause already in force stands; an account out stays out while its pause lasts,
-- however that pause is lengthened.
--
-- KEYS[1]      the account's state (see _window.lua)
-- ARGV[1]      "<now> <wall>" (s), or "" for the server's TIME
-- ARGV[2]      key ttl (ms)
-- ARGV[3]      the pause (s)
-- ARGV[4]      "1": the account is out (reserve names the dimension "out"), "0": a
--              cooldown
-- ARGV[5]      the account's channel: "pause" is published there, so that every
--              process stops admitting from its credit at once (see reserve.lua)
-- Returns the seconds the pause lasts from now.

read(ACCOUNT, {'raw', 'off', 'ex', 'cool', 'out'})
local now = clock(ARGV[1])
local until_s = now + tonumber(ARGV[3])
local known = num(ACCOUNT, 'cool') or 0
local was_out = num(ACCOUNT, 'out') == 1
local out = tonumber(ARGV[4]) == 1 or (was_out and now < known)
if out ~= was_out then
  put(ACCOUNT, 'out', out and 1 or 0)
end
if until_s > known then
  put(ACCOUNT, 'cool', until_s)
  known = until_s
end
-- The state outlives the cooldown: its instant is on the account's clock.
finish(ACCOUNT, now, tonumber(ARGV[2]), ARGV[1])
if ARGV[5] and known > now then
  redis.call('PUBLISH', ARGV[5], 'pause')
end
return fmt(known - now)
