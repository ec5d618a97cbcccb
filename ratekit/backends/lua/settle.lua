-- settle: end one admission: record the call's real usage (or hand everything
-- back), free its lease and announce the release. One round trip.
--
-- KEYS[1]      leases (see reserve.lua)
-- KEYS[1 + i]  window i (see _window.lua)
-- KEYS[n + 2]  waiting (see reserve.lua)
-- ARGV[1]      now (s), or "" for the server's TIME
-- ARGV[2]      lease id
-- ARGV[3]      key ttl (ms)
-- ARGV[4]      channel to publish the release on
-- ARGV[5]      1 to refund (the call was never sent), 0 to settle
-- ARGV[6]      window count n, then 8 values per window (see read_spec) where take is
--              0 (recorded at admission), 1 (held, "usage") or 2 (held, "safe") and
--              amount is the reserved amount, then 2 more: slice index, real amount
-- Returns 1 if the lease was still live, 0 if it had lapsed (its holds were freed).

local now = server_now(ARGV[1])
local lease_id = ARGV[2]
local key_ttl_ms = tonumber(ARGV[3])
local refunding = ARGV[5] == '1'
local n = tonumber(ARGV[6])

local live = redis.call('ZREM', KEYS[1], lease_id)
for i = 1, n do
  local base = 6 + (i - 1) * 10
  local w = read_spec(KEYS[1 + i], base)
  local index = tonumber(ARGV[base + 9])
  local real = tonumber(ARGV[base + 10])
  if w.take == 0 then
    if refunding then
      refund(w, now, index, w.amount)
    end
  else
    redis.call('HDEL', w.key, 'h:' .. lease_id)
    if not refunding then
      if w.take == 2 and w.amount > real then
        -- Until the admission's slice expires count max(reserved, real): the
        -- remainder there, the real usage now.
        add_to_slice(w, now, index, w.amount - real)
      end
      record(w, now, real)
    end
  end
  redis.call('PEXPIRE', w.key, key_ttl_ms)
end
-- Announce the release only while some caller waits: nobody listens otherwise.
if now < (tonumber(redis.call('GET', KEYS[n + 2])) or 0) then
  redis.call('PUBLISH', ARGV[4], lease_id)
end
return live
