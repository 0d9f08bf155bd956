-- rebuild.lua: put calendar budgets and open leases back after Redis lost them, or repair a
-- budget that drifted from the ledger. One script, so a reservation sees either none of it or
-- all of it.
--
-- KEYS[1]   index of held leases by expiry (zset)           q:{tag}:leases
-- KEYS[2..] budget counters to adjust, one per ARGV adjust entry, in order
-- ARGV[1]   JSON:
--   adjust = [{by, expire_at}]: add `by` units (a delta, not a value: whatever reservations
--            did since the caller looked is kept) and expire the key as reserve.lua does;
--   leases = [{key, id, lease (JSON text), e (expiry ms), px (key lifetime ms),
--              slots = [concurrency counter keys]}]: a lease is written only where none exists,
--            and then takes its concurrency slots. Lease and counter keys carry the same hash
--            tag as KEYS[1], like the keys commit.lua reads from a lease.
--
-- Returns JSON: {adjusted, restored, present (leases that already existed)}.

local req = cjson.decode(ARGV[1])
local adjusted, restored, present = 0, 0, 0

for i, change in ipairs(req.adjust or {}) do
  local key = KEYS[i + 1]
  if change.by ~= 0 then
    redis.call('INCRBY', key, int(change.by))
    adjusted = adjusted + 1
  end
  if redis.call('EXISTS', key) == 1 then redis.call('PEXPIREAT', key, int(change.expire_at)) end
end

for _, item in ipairs(req.leases or {}) do
  if redis.call('EXISTS', item.key) == 1 then
    present = present + 1
  else
    redis.call('SET', item.key, item.lease, 'PX', int(item.px))
    redis.call('ZADD', KEYS[1], int(item.e), item.id)
    for _, slot in ipairs(item.slots or {}) do redis.call('INCR', slot) end
    restored = restored + 1
  end
end

return cjson.encode({adjusted = adjusted, restored = restored, present = present})
