-- peek.lua: read a reservation for its tenant, expiring it first if its time is up.
--
-- KEYS[1]  config version                                q:{tag}:config_version
-- KEYS[2]  lease key               q:{tag}:r:<id>
-- KEYS[3]  index of held leases    q:{tag}:leases
-- KEYS[4]  usage event stream      q:{tag}:events
-- ARGV[1]  JSON: version (of the plan; {stale = true} when older, {lost = true} when the
--          store lost its data: see plan_check; absent with kd), tenant, features
--          (or instead of both kd, the API key's digest: see owns in lib.lua),
--          maxlen, retention_ms, clock
--
-- Returns JSON: {lease = {...}, now_ms} or {missing = true}.

local req = cjson.decode(ARGV[1])
local now = clock(req)
local halt = plan_check(KEYS[1], req.version)
if halt then return cjson.encode({[halt] = true}) end
local lease = load_lease(KEYS[2], req, KEYS[3], KEYS[4], now)
if not lease then return cjson.encode({missing = true}) end
return cjson.encode({lease = lease, now_ms = now})
