-- reserve.lua: check every applicable limit and debit all of them or none.
--
-- KEYS[1]  config version                                q:{tag}:config_version
-- KEYS[2]  lease key of the new reservation            q:{tag}:r:<id>
-- KEYS[3]  index of held leases by expiry (zset)        q:{tag}:leases
-- KEYS[4]  usage event stream                           q:{tag}:events
-- KEYS[5]  idempotency key (a per-request dummy if none) q:{tag}:idem:<tenant>:<key>
-- KEYS[6..] every limit key the plan below may touch (buckets, budget periods, counters)
-- ARGV[1]  JSON request:
--   version (of the compiled plan), id, ttl_ms, retention_ms, maxlen, lease_prefix,
--   clock, idem_hash,
--   in_ (input tokens), out (max output tokens), min_out (smallest acceptable grant),
--   cost = {a, b} (nano-USD for `out`), meta (event fields: only when ARGV[3..] does not
--   hold them), options: [{pool, checks: [check]}] in the order to try, where
--   check = {id, kind = 'b' bucket | 'p' budget | 'c' concurrency | 'g' guarantee,
--            m = metric (sets the amount: tokens = in_ + out,
--                cost_usd = cost.a + cost.b * out, ...),
--            k = key (or periods = [{k, start, stop}] for 'p'), cap,
--            floor (capacity kept for higher priority classes),
--            guards = [{k, cap}] (other features' guarantees, kept unless spent),
--            enf = 'hard' | 'soft' | 'shadow'}
-- ARGV[2]  the members of the new lease's JSON that the request alone decides, written as
--          they are: `"id":..,"tenant":..,"feature":..,"ttl_ms":..,"prices":{i, c, o}`
--          (nano-USD per input, cached input and output token, to price the commit) and
--          `"meta":{` with the meta fields and a comma after them if any; the script closes
--          meta with the pool it grants from
-- ARGV[3..] the meta fields of the usage events, name, value, ... as XADD writes them, none
--          named as a field the event sets itself; absent (and `meta` in ARGV[1]) otherwise
--
-- Returns JSON, one of:
--   {granted = true, id, pool, out, expires_ms, now_ms, limits = [...], soft = [limit ids]}
--   {granted = false, reason = 'rate_limited' | 'budget_exhausted' | 'concurrency',
--    limit, retry_ms (absent when the request can never fit), remaining, cap, now_ms}
--   {conflict = true}                  idempotency key reused with another body
--   {stale = true}                     the plan is older than the configuration
--   {existing = lease}                 idempotency key replayed: the first reservation,
--                                      whose `reply` is the first answer

local req = cjson.decode(ARGV[1])
local now = clock(req)
local lease_key, index_key, stream, idem_key = KEYS[2], KEYS[3], KEYS[4], KEYS[5]
if stale(KEYS[1], req.version) then return cjson.encode({stale = true}) end

reap(index_key, stream, req.maxlen, req.retention_ms, req.lease_prefix, now, 16)

if req.idem_hash ~= '' then
  local seen = redis.call('HMGET', idem_key, 'id', 'hash')
  if seen[1] then
    if seen[2] ~= req.idem_hash then return cjson.encode({conflict = true}) end
    local raw = redis.call('GET', req.lease_prefix .. seen[1])
    if raw then return cjson.encode({existing = cjson.decode(raw), now_ms = now}) end
  end
end

-- Amount a check takes is linear in the output tokens granted: a + ceil(b * out).
local function shape(check)
  local m = check.m
  if m == 'tokens' then check.a, check.b = req.in_, 1
  elseif m == 'input_tokens' then check.a, check.b = req.in_, 0
  elseif m == 'output_tokens' then check.a, check.b = 0, 1
  elseif m == 'cost_usd' then check.a, check.b = req.cost.a, req.cost.b
  else check.a, check.b = 1, 0 end
end

-- Milliseconds until `need` fits in a check that refused, or nil when it never will.
local function retry_ms(check, need)
  if check.kind == 'p' then
    if need > check.cap then return nil end
    return check.reset_ms - now
  end
  if check.kind == 'c' then return nil end
  -- the most this caller can ever have: capacity less protected shares and others' guarantees
  if check.growth <= 0 or need > check.most then return nil end
  return math.ceil((need - check.headroom) * 60000 / check.growth)
end

local function refusal(check, need)
  local reason = 'rate_limited'
  if check.kind == 'p' then reason = 'budget_exhausted' end
  if check.kind == 'c' then reason = 'concurrency' end
  return {granted = false, reason = reason, limit = check.id, remaining = check.headroom,
          cap = check.cap, needed = need, retry_ms = retry_ms(check, need), now_ms = now}
end

-- Largest grant of output tokens every hard check admits, or nil and the refusal.
local function fit(option)
  local out = req.out
  local worst = nil
  for _, check in ipairs(option.checks) do
    shape(check)
    observe(check, now)
    if check.enf == 'hard' and check.kind ~= 'g' then
      local need = amount_for(check, req.min_out)
      if need > check.headroom then
        local r = refusal(check, need)
        -- wait for the slowest limit: retrying earlier would still be refused
        if worst == nil or (r.retry_ms or math.huge) > (worst.retry_ms or math.huge) then
          worst = r
        end
      elseif check.b > 0 then
        local fits = math.min(req.out, math.floor((check.headroom - check.a) / check.b))
        -- the charge rounds up (a + ceil(b * out)); step back where rounding would overshoot
        while fits > req.min_out and amount_for(check, fits) > check.headroom do
          fits = fits - 1
        end
        out = math.min(out, fits)
      end
    end
  end
  if worst then return nil, worst end
  return math.max(out, req.min_out), nil
end

local function debit(check, out)
  local amount = amount_for(check, out)
  check.amt = amount
  if check.kind == 'b' then
    bucket_store(check.k, check.cap, check.level - amount, now)
  elseif check.kind == 'g' then
    check.took = math.max(0, math.min(check.level, amount))
    bucket_store(check.k, check.cap, check.level - check.took, now)
  else
    redis.call('INCRBY', check.k, int(amount))
    if check.kind == 'p' then redis.call('PEXPIREAT', check.k, check.reset_ms + 172800000) end
  end
end

local function describe(check)
  local d = {id = check.id, cap = check.cap}
  if check.kind == 'p' then
    d.remaining, d.reset_ms = check.cap - check.used - check.amt, check.reset_ms
  elseif check.kind == 'c' then
    d.remaining = check.cap - check.used - 1
  else
    local level = check.level - (check.took or check.amt)
    d.remaining = math.floor(level)
    d.reset_ms = now + math.ceil((check.cap - level) * 60000 / check.cap)
  end
  return d
end

local function grant(option, out)
  local soft, limits, recorded = {}, {}, {}
  for _, check in ipairs(option.checks) do
    if check.enf ~= 'hard' and amount_for(check, out) > check.headroom then
      soft[#soft + 1] = check.id
    end
    debit(check, out)
    if check.kind ~= 'g' then limits[#limits + 1] = describe(check) end
    recorded[#recorded + 1] = {k = check.k, kind = check.kind, m = check.m, cap = check.cap,
                               amt = check.amt, took = check.took}
  end
  local expires = now + req.ttl_ms
  local cost = amount_for(req.cost, out)
  local pool = option.pool
  local reply = cjson.encode({granted = true, id = req.id, pool = pool, out = out,
                              expires_ms = expires, now_ms = now, limits = limits, soft = soft,
                              cost = cost})
  -- the lease: what this script decides, then ARGV[2] (id to meta) and the pool in meta
  local own = cjson.encode({st = 'held', pool = pool, created = now, e = expires, ck = recorded,
                            soft = soft, r = {in_ = req.in_, out = out, cost = cost}})
  local reply_member = ''
  if req.idem_hash ~= '' then
    -- a replay of the same request answers exactly as the first time
    reply_member = ',"reply":' .. reply
    redis.call('HSET', idem_key, 'id', req.id, 'hash', req.idem_hash)
    redis.call('PEXPIRE', idem_key, req.ttl_ms + req.retention_ms)
  end
  local lease = string.sub(own, 1, -2) .. reply_member .. ',' .. ARGV[2] .. '"pool":'
                .. cjson.encode(pool) .. '}}'
  redis.call('SET', lease_key, lease, 'PX', req.ttl_ms + req.retention_ms)
  redis.call('ZADD', index_key, expires, req.id)
  if req.meta then
    local ev = {type = 'reserved', rid = req.id, at_ms = now, created_ms = now,
                reserved_input_tokens = req.in_, reserved_output_tokens = out,
                reserved_cost_nusd = cost}
    for name, value in pairs(req.meta) do ev[name] = value end
    ev.pool = pool
    if #soft > 0 then ev.would_refuse = table.concat(soft, ',') end
    ev.granted_output_tokens = out
    ev.expires_ms = expires
    emit(stream, req.maxlen, ev)
    return reply
  end
  -- the same fields, the meta ones from ARGV[3..] (none of them named as these are)
  local at, granted = field_text(now), field_text(out)
  if #soft > 0 then
    xadd(stream, req.maxlen, 'type', 'reserved', 'rid', req.id, 'at_ms', at, 'created_ms', at,
         'reserved_input_tokens', field_text(req.in_), 'reserved_output_tokens', granted,
         'reserved_cost_nusd', field_text(cost), 'granted_output_tokens', granted,
         'expires_ms', field_text(expires), 'pool', pool,
         'would_refuse', table.concat(soft, ','), unpack(ARGV, 3))
  else
    xadd(stream, req.maxlen, 'type', 'reserved', 'rid', req.id, 'at_ms', at, 'created_ms', at,
         'reserved_input_tokens', field_text(req.in_), 'reserved_output_tokens', granted,
         'reserved_cost_nusd', field_text(cost), 'granted_output_tokens', granted,
         'expires_ms', field_text(expires), 'pool', pool, unpack(ARGV, 3))
  end
  return reply
end

local best = nil
for _, option in ipairs(req.options) do
  local out, refused = fit(option)
  if out then return grant(option, out) end
  if best == nil or (refused.retry_ms or math.huge) < (best.retry_ms or math.huge) then
    best = refused
  end
end

if req.meta then
  local ev = {type = 'refused', rid = req.id, at_ms = now, reason = best.reason,
              limit = best.limit, reserved_input_tokens = req.in_,
              reserved_output_tokens = req.out}
  for name, value in pairs(req.meta) do ev[name] = value end
  emit(stream, req.maxlen, ev)
else
  xadd(stream, req.maxlen, 'type', 'refused', 'rid', req.id, 'at_ms', field_text(now),
       'reason', best.reason, 'limit', field_text(best.limit),
       'reserved_input_tokens', field_text(req.in_),
       'reserved_output_tokens', field_text(req.out), unpack(ARGV, 3))
end
return cjson.encode(best)
