-- spread.lua: a provider 429 that another partition's tenant reported, heard on this one.
--
-- The provider's account is shared by every partition whose tenants use the pool: a 429
-- reported on one (commit or release, bp_settle) is applied on each other as if reported
-- here, so they slow down together instead of each meeting the provider's 429s itself. The
-- adaptive share is decreased (once per cooldown, as for any report) and the pool's buckets
-- here are emptied (bp_settled's rule); the breaker and header sync stay each partition's.
--
-- KEYS[1]  the pool's backpressure state here (bp.k)   KEYS[2]  usage event stream
-- KEYS[3..] the pool's per-minute buckets here, and the partition's allotments
-- ARGV[1]  JSON: pool, bp (Pressure.as_lua), checks (the pool's own per-minute limits
--          here, as inspect takes them), part, clock, maxlen
--
-- Returns the share now (a number as text).

local req = cjson.decode(ARGV[1])
local now = clock(req)
local bp = req.bp
local raw = redis.call('HGETALL', bp.k)
local h = {}
for i = 1, #raw, 2 do h[raw[i]] = raw[i + 1] end
local set = {}
local share = tonumber(h.s) or 1
if bp.ad == 1 then share = bp_adapt(bp, h, set, 429, req.pool, now, KEYS[2], req.maxlen) end
allot_apply(req.checks, req.part)
for _, check in ipairs(req.checks) do
  check.cfg, check.cd = check.rate or check.cap, check.rate and check.cap -- as bp_gate
  bp_rescale(check, share)
  bp_lower(check, 0, now)
end
bp_store(bp.k, set)
return string.format('%.6f', share)
