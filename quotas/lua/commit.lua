-- commit.lua: record the actual usage of a reservation and refund what it did not use.
--
-- KEYS[1]  config version                                q:{tag}:config_version
-- KEYS[2]  lease key               q:{tag}:r:<id>
-- KEYS[3]  index of held leases    q:{tag}:leases
-- KEYS[4]  usage event stream      q:{tag}:events
-- ARGV[1]  JSON: version (of the plan; {stale = true} when older, {lost = true} when the
--          store lost its data: see plan_check; absent with kd), tenant,
--          features (a narrowed key's feature ids, or empty), or instead of both kd (the
--          API key's digest, when the plan cannot be loaded: see owns in lib.lua), maxlen,
--          retention_ms, clock, usage = {in_, cached, out, cost (nano-USD),
--          requests (1), hash (of the commit body), extra (event fields: finish_reason,
--          upstream_status, latency_ms)}, report = {st (the provider's status),
--          hd (its stated limits by metric: {l, r})} (see bp_settle in pressure.lua)
--          part (on a partitioned store: split limits refund at their part now, allot.lua)
--
-- The limit keys touched are the ones the lease recorded at reserve time; they carry the same
-- hash tag as KEYS[2], so the script stays within one Cluster slot.
--
-- Returns JSON: {result = {...}, spread = pool (after a provider 429, for the pool's other
-- partitions)} (also for a repeated identical commit; a commit after expiry
-- is accepted and says lease_expired = true), {missing = true}, or
-- {conflict = state} (released, or committed with another body), or
-- {conflict = 'scheduled', wait_ms} before a scheduled reservation's start.

local req = cjson.decode(ARGV[1])
local now = clock(req)
local halt = plan_check(KEYS[1], req.version)
if halt then return cjson.encode({[halt] = true}) end
local lease = load_lease(KEYS[2], req, KEYS[3], KEYS[4], now)
if not lease then return cjson.encode({missing = true}) end
if lease.st == 'committed' then
  if same_body(lease.hash, req.usage.hash) then return cjson.encode({result = lease.res}) end
  return cjson.encode({conflict = 'committed'})
end
if lease.st == 'released' then return cjson.encode({conflict = 'released'}) end
-- a scheduled reservation's call may not have gone before its start
if lease.sa and now < lease.sa then
  return cjson.encode({conflict = 'scheduled', wait_ms = lease.sa - now})
end
allot_refresh(lease.ck, req.part) -- allot.lua: the partition's part of split limits now
local pressure = bp_settle(lease, req.report, now, KEYS[4], req.maxlen) -- pressure.lua
local result = settle(KEYS[2], lease, req.usage, 'committed', KEYS[3], KEYS[4], req.maxlen,
                      req.retention_ms, now)
bp_settled(lease, pressure, req.report, now, KEYS[4], req.maxlen)
return cjson.encode({result = result, spread = bp_spread(lease, req.report)})
