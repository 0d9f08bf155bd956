-- extend.lua: move the expiry of a held reservation (long calls and streams).
--
-- KEYS[1]  config version                                q:{tag}:config_version
-- KEYS[2]  lease key               q:{tag}:r:<id>
-- KEYS[3]  index of held leases    q:{tag}:leases
-- KEYS[4]  usage event stream      q:{tag}:events
-- ARGV[1]  JSON: version (of the plan; {stale = true} when older, {lost = true} when the
--          store lost its data: see plan_check; absent with kd), tenant, features
--          (or instead of both kd, the API key's digest: see owns in lib.lua),
--          maxlen, retention_ms, clock, ttl_ms (from now)
--
-- Returns JSON: {lease = {...}}, {missing = true}, or {conflict = state} when the
-- reservation is no longer held (committed, released or already expired). The lease and its
-- idempotency key (`ik`, when it has one) are kept ttl_ms + retention_ms from now. An
-- extension appends an `extended` event with the new `expires_ms`, so that the ledger knows
-- the expiry a rebuild must restore.

local req = cjson.decode(ARGV[1])
local now = clock(req)
local halt = plan_check(KEYS[1], req.version)
if halt then return cjson.encode({[halt] = true}) end
local lease = load_lease(KEYS[2], req, KEYS[3], KEYS[4], now)
if not lease then return cjson.encode({missing = true}) end
if lease.st ~= 'held' then return cjson.encode({conflict = lease.st}) end
-- a scheduled reservation's lease runs from its start
lease.e = math.max(now, lease.sa or now) + req.ttl_ms
lease.ttl_ms = req.ttl_ms
local keep_ms = int(req.ttl_ms + req.retention_ms)
redis.call('SET', KEYS[2], cjson.encode(lease), 'PX', keep_ms)
redis.call('ZADD', KEYS[3], int(lease.e), lease.id)
-- a replay of the reserve with its idempotency key answers the first answer as long as the
-- lease lasts
if lease.ik then redis.call('PEXPIRE', lease.ik, keep_ms) end
local ev = event_base(lease, 'extended', now)
ev.expires_ms = lease.e
emit(KEYS[4], req.maxlen, ev)
return cjson.encode({lease = lease, now_ms = now})
