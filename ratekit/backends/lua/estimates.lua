-- estimates: one pod's learned token-estimate factors in, the fleet's out. The
-- factors a pod learned from its answers (see ratekit/_calibration.py) are kept per
-- model and pod for a while; every pod takes the largest fresh one of each model.
--
-- KEYS[1]      the account's estimates: hash, "<model>\n<pod>" -> "<factor> <until>"
-- ARGV[1]      this pod's id
-- ARGV[2]      how long a pod's factor stays fresh without being sent again (s)
-- ARGV[3..]    model, factor, model, factor...
-- Returns model, factor, model, factor...: the largest fresh factor of each model.

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local ttl = tonumber(ARGV[2])
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i] .. '\n' .. ARGV[1], ARGV[i + 1] .. ' ' .. fmt(now + ttl))
end
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 1000))
local fields = redis.call('HGETALL', KEYS[1])
local best, stale = {}, {}
for j = 1, #fields, 2 do
  local model = string.match(fields[j], '^(.*)\n')
  local factor, until_s = string.match(fields[j + 1], '^(%S+) (%S+)$')
  factor, until_s = tonumber(factor), tonumber(until_s)
  if model == nil or factor == nil or until_s == nil or until_s <= now then
    stale[#stale + 1] = fields[j]  -- gone stale, or not ours to read: dropped
  elseif best[model] == nil or factor > best[model] then
    best[model] = factor
  end
end
if #stale > 0 then
  redis.call('HDEL', KEYS[1], unpack(stale))
end
local reply = {}
for model, factor in pairs(best) do
  reply[#reply + 1] = model
  reply[#reply + 1] = fmt(factor)
end
return reply
