-- held.lua: the reservations held now, for the admin's usage pages; changes nothing.
--
-- KEYS[1]  index of held leases    q:{tag}:leases
-- ARGV[1]  JSON: lease_prefix (q:{tag}:r:), clock, and what to match: tenant (id),
--          feature (id), pool (as in the lease), each optional; show (how many to return),
--          scan (how many held leases to look at, soonest expiry first)
--
-- Returns JSON: {count, waiting, scanned, complete, leases = [{id, tenant, feature, model,
-- pool, input_tokens, output_tokens, cost_nusd, created_ms, expires_ms, start_ms}], now_ms}.
-- `count` counts every match among the scanned leases, `waiting` those scheduled to start
-- later (line.lua; `start_ms` is their start); `complete` says whether every held lease was
-- scanned.

local req = cjson.decode(ARGV[1])
local now = clock(req)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf', 'LIMIT', 0, req.scan)
local shown, count, waiting = {}, 0, 0
for _, rid in ipairs(ids) do
  local raw = redis.call('GET', req.lease_prefix .. rid)
  if raw then
    local lease = cjson.decode(raw)
    if lease.st == 'held'
        and (req.tenant == nil or lease.tenant == req.tenant)
        and (req.feature == nil or lease.feature == req.feature)
        and (req.pool == nil or lease.pool == req.pool) then
      count = count + 1
      if lease.sa and lease.sa > now then waiting = waiting + 1 end
      if #shown < req.show then
        shown[#shown + 1] = {id = lease.id, tenant = lease.meta.tenant,
                             feature = lease.meta.feature, model = lease.meta.model,
                             pool = lease.pool, input_tokens = lease.r.in_,
                             output_tokens = lease.r.out, cost_nusd = lease.r.cost,
                             created_ms = lease.created, expires_ms = lease.e,
                             start_ms = lease.sa}
      end
    end
  end
end
local total = redis.call('ZCOUNT', KEYS[1], now, '+inf')
return cjson.encode({count = count, waiting = waiting, scanned = #ids, complete = #ids >= total,
                     leases = shown, now_ms = now})
