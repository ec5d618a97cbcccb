-- settle: end one admission: record the call's real usage (or hand everything
-- back), free its lease and announce the release. One round trip.
--
-- KEYS[1]      leases (see reserve.lua)
-- KEYS[1 + i]  window i (see _window.lua)
-- KEYS[n + 2]  waiting (see reserve.lua)
-- ARGV[1]      now (s), or "" for the server's TIME
-- ARGV[2]      lease id
-- ARGV[3]      channel to publish the release on
-- ARGV[4]      1 to refund (the call was never sent), 0 to settle
-- ARGV[5]      window specs (see parse_specs)
-- ARGV[6]      what was reserved: "requests tokens cost"
-- ARGV[7]      what was really used: "requests tokens cost"
-- ARGV[8]      the slice index of the admission per window, apart by spaces
-- Returns 1 if the lease was still live, 0 if it had lapsed (its holds were freed).

local now = server_now(ARGV[1])
local lease_id = ARGV[2]
local refunding = ARGV[4] == '1'
local windows = parse_specs(ARGV[5])
local reserved = parse_amounts(ARGV[6])
local used = parse_amounts(ARGV[7])
local indexes = parse_amounts(ARGV[8])
local n = #windows

local live = redis.call('ZREM', KEYS[1], lease_id)
for i = 1, n do
  local w = windows[i]
  local amount, real, index = reserved[w.position], used[w.position], indexes[i]
  if w.take == 0 then
    if refunding and amount > 0 then
      refund(w, now, index, amount)
    end
  elseif amount > 0 or real > 0 then
    redis.call('HDEL', w.key, 'h:' .. lease_id)
    if not refunding then
      if w.take == 2 and amount > real then
        -- Until the admission's slice expires count max(reserved, real): the
        -- remainder there, the real usage now.
        add_to_slice(w, now, index, amount - real)
      end
      record(w, now, real)
    end
  end
end
-- No PEXPIRE here: reserve gave every key a ttl of a period, a slice, the margin
-- and two leases, and holders renew it while their calls are in flight.
-- Announce the release only while some caller waits: nobody listens otherwise.
if now < (tonumber(redis.call('GET', KEYS[n + 2])) or 0) then
  redis.call('PUBLISH', ARGV[3], lease_id)
end
return live
