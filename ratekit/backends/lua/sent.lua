-- sent: the request of one admission left its process now: what the admission
-- recorded counts from now, as the provider counts it from its arrival. One round
-- trip, sent only when the request left in a later slice than it was admitted in.
--
-- KEYS[1]      the account's state, KEYS[2] its leases (see _window.lua)
-- ARGV[1]      "<now> <wall>" (s), or "" for the server's TIME
-- ARGV[2]      key ttl (ms)
-- ARGV[3]      lease id ("-": the admission took none)
-- ARGV[4]      window specs (see parse_specs)
-- ARGV[5]      what was reserved: "requests tokens cost"
-- ARGV[6]      the slice index of the admission per window, apart by spaces
-- ARGV[7]      when the request left, on the account's clock (s), as the client
--              reckons it from its own clock since the admission; the server's now
--              if later ("": now). Not the script's own now: the round trip that
--              carries this script comes after the request left.
-- Returns the slice index per window from now on (unchanged when the lease has
-- ended or lapsed: a settled call is not moved).

local key_ttl_ms = tonumber(ARGV[2])
local windows = parse_specs(ARGV[4])
local reserved = parse_amounts(ARGV[5])
local indexes = parse_amounts(ARGV[6])
local result = {}
for i = 1, #windows do
  result[i] = fmt(indexes[i])
end
if ARGV[3] ~= '-' and not redis.call('ZSCORE', LEASES, ARGV[3]) then
  return result
end
read(base_fields(windows, {}))
local now, wall = clock(ARGV[1])
prepare_all(windows, now, wall)
local sent_at = math.min(tonumber(ARGV[7]) or now, now)
for i, w in ipairs(windows) do
  local amount, index = reserved[w.position], indexes[i]
  if not w.calendar and (w.take == 0 or w.take == 2) then
    local moved = math.floor(sent_at / w.slice_s)
    if moved > index then
      if w.take == 0 and amount > 0 then
        -- Counted from now even if its slice expired meanwhile: the provider counts it.
        refund(w, index, amount)
        add_to(w, moved, amount)
      end
      result[i] = fmt(moved)
    end
  end
end
finish(now, key_ttl_ms, ARGV[1])
return result
