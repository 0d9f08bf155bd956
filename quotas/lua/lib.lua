-- lib.lua: shared functions, prepended to every script by quotas/engine/scripts.py.
--
-- State kept in Redis (every key carries the deployment's hash tag, so one decision's keys
-- live in one Cluster slot):
--   bucket (minute limits, guarantees): string "level:t" (t: last refill in ms); a missing
--     key is a full bucket, so keys expire once they would have refilled.
--   budget (hour/day/month limits): string counter of units used in one calendar period; the
--     key names the period, so a new period starts from zero with no reset job.
--   concurrency: string counter of held reservations.
--   lease: string, JSON of the reservation (state, what every limit was debited, metadata,
--     `kd`: a digest of the API key that made it) while held or expired (a commit after
--     expiry still needs all of it). Once committed or released it is replaced by a compact
--     record (`settled_record`), which answers replays and reads; `lease_view` turns either
--     back into the lease as the callers read it.
--
-- Amounts are integers in engine units: tokens, requests, nano-USD.

-- Integers as Redis arguments: tostring() would write large ones as 1e+15.
local function int(x)
  return string.format('%.0f', x)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The decision's clock (`clock` in the headers): Redis TIME, plus `clock_offset_ms`, or a
-- fixed `clock_ms`; tests move or stop it, production sends neither.
local function clock(req)
  if req.clock_ms then return req.clock_ms end
  return now_ms() + (req.clock_offset_ms or 0)
end

-- Level of a token bucket of depth `cap` refilling `rate` (default: cap) per 60 s, at `now`,
-- and its line: capacity promised to scheduled callers (line.lua), "level:t:line". The
-- refill repays the line first; the level grows only once the line is clear.
local function bucket_read(key, cap, now, rate)
  local raw = redis.call('GET', key)
  if not raw then return cap, 0 end
  local level, at, line = string.match(raw, '^([^:]*):([^:]*):?(.*)$')
  local grown = (now - tonumber(at)) * (rate or cap) / 60000
  line = tonumber(line) or 0
  if line > 0 then
    local repaid = math.min(line, math.max(0, grown))
    line, grown = line - repaid, grown - repaid
  end
  level = tonumber(level) + grown
  if level > cap then level = cap end
  return level, line
end

local function bucket_level(key, cap, now, rate)
  return (bucket_read(key, cap, now, rate))
end

local function bucket_store(key, cap, level, now, line, rate)
  line = line or 0
  if level >= cap and line <= 0 then
    redis.call('DEL', key)
    return
  end
  -- a bucket left alone refills; once it would be full the key can go (with a margin, so
  -- that a clock that is stopped or moved in tests keeps its keys)
  local per = rate or cap
  if per <= 0 then per = 1 end -- a partition's empty allotment (allot.lua)
  local ttl = math.ceil((cap - level + line) * 60000 / per) + 300000
  local text = string.format('%.17g:%s', level, int(now))
  if line > 0 then text = text .. string.format(':%.17g', line) end
  redis.call('SET', key, text, 'PX', int(ttl))
end

local function counter(key)
  return tonumber(redis.call('GET', key) or '0')
end

-- Round a charge up to a whole unit, ignoring the binary noise of prices like 12.3 per token
-- (12.3 * 10500 is 129150.00000000001 in floating point, not a unit more).
local function ceil_units(x)
  return math.ceil(x - 1e-6)
end

-- Amount a check takes for `out` output tokens: linear in out (a + b * out).
local function amount_for(check, out)
  if check.b == 0 then return check.a end
  return check.a + ceil_units(check.b * out)
end

-- Actual amount of a metric once usage is known.
local function actual_for(check, usage)
  local m = check.m
  if m == 'tokens' then return usage.in_ + usage.out end
  if m == 'input_tokens' then return usage.in_ end
  if m == 'output_tokens' then return usage.out end
  if m == 'cost_usd' then return usage.cost end
  if m == 'requests' then return usage.requests end
  return 0
end

-- The key of a recorded bucket or guarantee as it is named now. Buckets were hashes under
-- `b:<id>` / `g:<id>`; a lease written then still names those, but the bucket in force is
-- the string under `tb:<id>` / `tg:<id>` (reading the old hash with GET is an error, and the
-- old keys expire by themselves).
local function bucket_key(check)
  local head, kind, id = string.match(check.k, '^(.*):([bg]):(%d+)$')
  if head then return head .. ':t' .. kind .. ':' .. id end
  return check.k
end

-- Apply `delta` units of usage (positive: charge, negative: refund) to one recorded check.
local function adjust(check, delta, now)
  if delta == 0 then return end
  if check.kind == 'b' then
    local key = bucket_key(check)
    local level, line = bucket_read(key, check.cap, now, check.rate)
    -- a refund shortens the line first: the callers in it may go earlier
    local back = math.min(line, math.max(0, -delta))
    level = math.min(check.cap, level - delta - back)
    bucket_store(key, check.cap, level, now, line - back, check.rate)
  elseif check.kind == 'g' then
    -- use drains the guarantee first, so a refund fills the shared part first: the guarantee
    -- gets back only what was taken from it beyond the actual use
    local actual = check.amt + delta
    local back = math.max(0, check.took - math.max(0, actual))
    if back > 0 then
      local key = bucket_key(check)
      local level = math.min(check.cap, bucket_level(key, check.cap, now) + back)
      bucket_store(key, check.cap, level, now)
    end
  elseif check.kind == 'p' then
    redis.call('INCRBY', check.k, int(delta))
  end
end

local function free_slot(check)
  if check.kind == 'c' then
    local held = redis.call('DECR', check.k)
    if held <= 0 then redis.call('DEL', check.k) end
  end
end

-- An event field's value as XADD gets it: whole numbers without exponent or fraction.
local function field_text(value)
  if type(value) == 'number' and value == math.floor(value) then return int(value) end
  return tostring(value)
end

-- A table's fields as a command takes them: name, value, name, value...
local function flat_fields(fields)
  local flat = {}
  for name, value in pairs(fields) do
    flat[#flat + 1] = name
    flat[#flat + 1] = field_text(value)
  end
  return flat
end

-- One usage event, its fields from a table.
local function emit(stream, maxlen, fields)
  local flat = flat_fields(fields)
  if maxlen > 0 then
    redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(flat))
  else
    -- uncapped: the ledger trims the stream below what every consumer has acknowledged
    redis.call('XADD', stream, '*', unpack(flat))
  end
end

local function event_base(lease, kind, now)
  local ev = {type = kind, rid = lease.id, at_ms = now, created_ms = lease.created,
              reserved_input_tokens = lease.r.in_, reserved_output_tokens = lease.r.out,
              reserved_cost_nusd = lease.r.cost}
  for name, value in pairs(lease.meta) do ev[name] = value end
  if lease.soft and #lease.soft > 0 then ev.would_refuse = table.concat(lease.soft, ',') end
  return ev
end

-- Expire a held lease: charged as reserved (the call may have happened), slot freed.
local function expire_lease(lease_key, lease, index_key, stream, maxlen, retention_ms, now)
  for _, check in ipairs(lease.ck) do free_slot(check) end
  lease.st = 'expired'
  lease.done = now
  redis.call('SET', lease_key, cjson.encode(lease), 'PX', int(retention_ms))
  redis.call('ZREM', index_key, lease.id)
  emit(stream, maxlen, event_base(lease, 'expired', now))
end

-- Expire up to `limit` leases whose time is up; returns how many.
local function reap(index_key, stream, maxlen, retention_ms, lease_prefix, now, limit)
  local due = redis.call('ZRANGEBYSCORE', index_key, '-inf', int(now), 'LIMIT', 0, limit)
  for _, rid in ipairs(due) do
    local lease_key = lease_prefix .. rid
    local raw = redis.call('GET', lease_key)
    local lease = raw and cjson.decode(raw)
    if lease and lease.st == 'held' then
      expire_lease(lease_key, lease, index_key, stream, maxlen, retention_ms, now)
    else
      redis.call('ZREM', index_key, rid)
    end
  end
  return #due
end

-- A settlement's answer, from the lease and its usage `u` = {in, cached, out, cost}: what
-- settle returns, and what a settled record gives again to a replay or a read.
local function settled_result(lease, u, late, outcome, now)
  return {id = lease.id, status = outcome, lease_expired = late, now_ms = now,
          input_tokens = u[1], cached_input_tokens = u[2], output_tokens = u[3],
          cost_nusd = u[4],
          refunded = {input_tokens = lease.r.in_ - u[1], output_tokens = lease.r.out - u[3],
                      cost_nusd = lease.r.cost - u[4]}}
end

-- What a settled reservation must still answer, and no more (a third of the lease's bytes):
-- owner (tenant, feature) for the ownership check, the commit body's hash for a replay, the
-- usage `u` and `x` (1: committed after expiry) to give the result again, the key's digest
-- `kd` (see `owns`), and what a GET and an idempotent reserve replay show (pool, reserved
-- `r`, times, `soft`, `limits`, and the meta fields the API reads). The checks, prices and
-- the events' meta are dropped: nothing is charged or emitted for it again.
local SHOWN_META = {'feature', 'model', 'priority', 'estimated', 'metadata'}
-- A record keeps 16 hex digits (64 bits) of the commit body's hash: enough to tell a replay
-- from another body, at a quarter of the bytes.
local HASH_KEPT = 16

-- Whether a commit body's hash is the one a settled lease recorded (in full before records
-- kept a prefix).
local function same_body(recorded, hash)
  return recorded == hash or recorded == string.sub(hash, 1, HASH_KEPT)
end

local function settled_record(lease, u, late, outcome, hash, now)
  local meta = {}
  for _, name in ipairs(SHOWN_META) do meta[name] = lease.meta[name] end
  local record = {id = lease.id, st = outcome, tenant = lease.tenant, feature = lease.feature,
                  kd = lease.kd, pool = lease.pool, created = lease.created, e = lease.e,
                  done = now, r = lease.r, u = u, meta = meta, soft = lease.soft,
                  limits = lease.limits}
  if outcome == 'committed' then record.hash = string.sub(hash, 1, HASH_KEPT) end
  if late then record.x = 1 end
  return record
end

-- The lease as callers read it: a settled record gets its result back.
local function lease_view(lease)
  if lease.u then
    lease.res = settled_result(lease, lease.u, lease.x == 1, lease.st, lease.done)
  end
  return lease
end

-- Settle a lease with its actual usage: refund (or charge) the difference in every limit it
-- touched, free its slot, record it. Returns the result, which a repeated call returns again.
local function settle(lease_key, lease, usage, outcome, index_key, stream, maxlen, retention_ms,
                      now)
  local late = lease.st == 'expired'
  if usage.cost == nil then
    -- priced with the model's prices as they were when the reservation was made
    local p = lease.prices
    local fresh = math.max(0, usage.in_ - usage.cached)
    usage.cost = ceil_units(fresh * p.i + usage.cached * p.c + usage.out * p.o)
  end
  for _, check in ipairs(lease.ck) do
    if check.kind == 'c' then
      if not late then free_slot(check) end
    else
      adjust(check, actual_for(check, usage) - check.amt, now)
    end
  end
  local u = {usage.in_, usage.cached, usage.out, usage.cost}
  local record = settled_record(lease, u, late, outcome, usage.hash, now)
  redis.call('SET', lease_key, cjson.encode(record), 'PX', int(retention_ms))
  redis.call('ZREM', index_key, lease.id)
  local ev = event_base(lease, outcome, now)
  ev.input_tokens, ev.cached_input_tokens, ev.output_tokens = usage.in_, usage.cached, usage.out
  ev.cost_nusd = usage.cost
  ev.lease_expired = late and 1 or 0
  for name, value in pairs(usage.extra or {}) do ev[name] = value end
  emit(stream, maxlen, ev)
  return settled_result(lease, u, late, outcome, now)
end

-- Whether a lease is the caller's: it belongs to the caller's tenant (and, for a key narrowed
-- to some features, to one of those). A caller whose plan could not be loaded sends `kd`, the
-- digest of its API key, instead: only the key that made the reservation, as its lease
-- recorded, may act on it (a lease without a digest is no one's in that mode).
local function owns(lease, req)
  if req.kd then return lease.kd == req.kd end
  if lease.tenant ~= req.tenant then return false end
  if req.features and #req.features > 0 then
    for _, f in ipairs(req.features) do
      if f == lease.feature then return true end
    end
    return false
  end
  return true
end

-- Load a lease for a caller: nil unless it exists and is the caller's (`owns`). Expires it
-- lazily when due.
local function load_lease(lease_key, req, index_key, stream, now)
  local raw = redis.call('GET', lease_key)
  if not raw then return nil end
  local lease = cjson.decode(raw)
  if not owns(lease, req) then return nil end
  if lease.st == 'held' and lease.e <= now then
    expire_lease(lease_key, lease, index_key, stream, req.maxlen, req.retention_ms, now)
  end
  return lease_view(lease)
end

-- Whether the caller's plan may decide here, from the one version key: nil when it may;
-- 'stale' when the configuration has moved on (the caller reloads and asks again); 'lost'
-- when the key is gone while the plan has a version: the store lost its data (a restart
-- without persistence, FLUSHALL, a failover), every counter reads zero, and nothing is
-- decided until the rebuild from the ledger writes the key back. A plan newer than the key
-- may decide: on a partitioned store the other partitions' keys follow the home one's a
-- moment after it moves (quotas/store.py), and a plan read from it is the newer one.
local function plan_check(version_key, version)
  if version == nil then return nil end
  local stored = redis.call('GET', version_key)
  if not stored then
    if version ~= 0 then return 'lost' end
    return nil
  end
  if tonumber(stored) > version then return 'stale' end
  return nil
end

-- Current state of one check: how much it holds now (level for buckets, used for budgets).
local function observe(check, now)
  if check.kind == 'p' then
    for _, period in ipairs(check.periods) do
      if now >= period.start and now < period.stop then
        check.k, check.reset_ms = period.k, period.stop
      end
    end
    check.used = counter(check.k)
    check.headroom = check.cap - check.used
  elseif check.kind == 'c' then
    check.used = counter(check.k)
    check.headroom = check.cap - check.used
  else
    check.level, check.line = bucket_read(check.k, check.cap, now, check.rate)
    local floor = check.floor or 0
    local growth, reserved = check.rate or check.cap, 0
    for _, guard in ipairs(check.guards or {}) do
      local kept = bucket_level(guard.k, guard.cap, now)
      floor = floor + kept
      reserved = reserved + guard.cap
      -- a guarantee still refilling takes its share of the refill; a full one takes none
      if kept < guard.cap then growth = growth - guard.cap end
    end
    check.headroom = check.level - floor
    check.growth = growth
    check.most = check.cap - (check.floor or 0) - reserved
  end
end
