-- release.lua: the call did not happen; refund everything the reservation took.
--
-- KEYS[1]  config version                                q:{tag}:config_version
-- KEYS[2]  lease key               q:{tag}:r:<id>
-- KEYS[3]  index of held leases    q:{tag}:leases
-- KEYS[4]  usage event stream      q:{tag}:events
-- ARGV[1]  JSON: version (of the plan; {stale = true} when older, {lost = true} when the
--          store lost its data: see plan_check; absent with kd), tenant,
--          features (a narrowed key's feature ids, or empty), or instead of both kd (the
--          API key's digest, when the plan cannot be loaded: see owns in lib.lua), maxlen,
--          retention_ms, clock, extra (event fields: upstream_status, latency_ms),
--          report = {st, hd} (the provider's answer; see bp_settle in pressure.lua)
--          part (on a partitioned store: split limits refund at their part now, allot.lua)
--
-- Returns JSON: {result = {...}, spread = pool (after a provider 429, for the pool's other
-- partitions)} (a repeated release returns the same result),
-- {missing = true}, or {conflict = state} (already committed, or expired: an expired lease
-- was charged in full because the call may have happened; commit it with its usage instead).

local req = cjson.decode(ARGV[1])
local now = clock(req)
local halt = plan_check(KEYS[1], req.version)
if halt then return cjson.encode({[halt] = true}) end
local lease = load_lease(KEYS[2], req, KEYS[3], KEYS[4], now)
if not lease then return cjson.encode({missing = true}) end
if lease.st == 'released' then return cjson.encode({result = lease.res}) end
if lease.st ~= 'held' then return cjson.encode({conflict = lease.st}) end
local nothing = {in_ = 0, cached = 0, out = 0, cost = 0, requests = 0, hash = 'release',
                 extra = req.extra}
allot_refresh(lease.ck, req.part) -- allot.lua: the partition's part of split limits now
local pressure = bp_settle(lease, req.report, now, KEYS[4], req.maxlen) -- pressure.lua
local result = settle(KEYS[2], lease, nothing, 'released', KEYS[3], KEYS[4], req.maxlen,
                      req.retention_ms, now)
bp_settled(lease, pressure, req.report, now, KEYS[4], req.maxlen)
return cjson.encode({result = result, spread = bp_spread(lease, req.report)})
