-- sent: the request of one admission left its process now: what the admission
-- recorded counts from now, as the provider counts it from its arrival (on its
-- tenant's own windows too, if it has one). One round trip, sent only when the
-- request left in a later slice than it was admitted in.
--
-- KEYS[1]      the account's state (see _window.lua)
-- KEYS[2]      only with a tenant: the tenant's state
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
-- ARGV[8..11]  only with a tenant: its four arguments (see parse_tenants)
-- ARGV[12]     only with a tenant: the slice index of the admission per tenant window
-- Returns the slice index per window from now on, the account's then its tenant's
-- (unchanged when the lease has ended or lapsed: a settled call is not moved).

local key_ttl_ms = tonumber(ARGV[2])
local windows = parse_specs(ARGV[4], ACCOUNT)
local reserved = parse_amounts(ARGV[5])
local result = {}
local indexes = parse_amounts(ARGV[6])
local tenant_indexes = {}
if #KEYS > 1 then
  tenant_indexes = parse_amounts(ARGV[12])
end
for _, list in ipairs({indexes, tenant_indexes}) do
  for _, index in ipairs(list) do
    result[#result + 1] = fmt(index)
  end
end
-- A list of this call's own (base_fields' is shared): the lease is read with them.
local base, at = base_fields(windows)
local fields = {unpack(base)}
if ARGV[3] ~= '-' then
  fields[#fields + 1] = lease_field(ARGV[3])
end
read(ACCOUNT, fields, at)
if ARGV[3] ~= '-' and not known(ACCOUNT, lease_field(ARGV[3])) then
  return result
end
local now, wall = clock(ARGV[1])
prepare_all(ACCOUNT, windows, now, wall)
local sent_at = math.min(tonumber(ARGV[7]) or now, now)

-- Moves what `list`'s windows recorded at the admission to the slice of sent_at; the
-- new indexes go to result from `at` on.
local function move(list, list_indexes, at)
  for i, w in ipairs(list) do
    local index = list_indexes[i]
    local moved = move_to(w, index, reserved[w.position], sent_at)
    if moved ~= index then
      result[at + i] = fmt(moved)
    end
  end
end

move(windows, indexes, 0)
finish(ACCOUNT, now, key_ttl_ms, ARGV[1])
if #KEYS > 1 then
  local t = parse_tenants(KEYS, ARGV, 8, now, wall)[1]
  move(t.windows, tenant_indexes, #windows)
  finish(t.s, now, t.ttl_ms, ARGV[1])
end
return result
