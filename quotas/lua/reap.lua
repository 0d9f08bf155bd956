-- reap.lua: expire held reservations whose time is up (run by the lease reaper every few
-- seconds; a reserve short of a concurrency slot also reaps a few).
--
-- KEYS[1]  config version                                q:{tag}:config_version
-- KEYS[2]  index of held leases    q:{tag}:leases
-- KEYS[3]  usage event stream      q:{tag}:events
-- ARGV[1]  JSON: lease_prefix (q:{tag}:r:), maxlen, retention_ms, clock, batch
--
-- Returns the number of leases expired or cleared from the index.

local req = cjson.decode(ARGV[1])
local now = clock(req)
return reap(KEYS[2], KEYS[3], req.maxlen, req.retention_ms, req.lease_prefix, now, req.batch)
