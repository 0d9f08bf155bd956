-- reserve.lua: check every applicable limit and debit all of them or none.
--
-- KEYS[1]  config version                                q:{tag}:config_version
-- KEYS[2]  lease key of the new reservation             q:{tag}:r:<id>
-- KEYS[3]  index of held leases by expiry (zset)        q:{tag}:leases
-- KEYS[4]  usage event stream                           q:{tag}:events
-- KEYS[5]  idempotency key (a per-request dummy if none) q:{tag}:idem:<tenant>:<key>
-- KEYS[6..] every limit key the options below may touch (buckets, budget periods, counters)
-- ARGV[1]  JSON object:
--   version (of the compiled plan), id, ttl_ms, retention_ms, maxlen, lease_prefix, clock,
--   idempotency = {hash} (of the request body; absent without an idempotency key),
--   in_ (input tokens), out (max output tokens), min_out (smallest acceptable grant),
--   cost = {a, b} (nano-USD for `out` output tokens: a + b * out),
--   lease = {tenant, feature, prices = {i, c, o} (nano-USD per input, cached input and
--            output token, to price the commit), meta (usage event fields),
--            kd (digest of the API key, which alone may settle it when the plan cannot be
--            loaded; see `owns` in lib.lua)},
--   options = [{pool, checks = [check]}] in the order to try, where
--     check = {id, kind = 'b' bucket | 'p' budget | 'c' concurrency | 'g' guarantee,
--              enf = 'hard' | 'soft' | 'shadow',
--              m = metric (sets the amount: tokens = in_ + out, cost_usd = cost, ...),
--              cap, k = key (or periods = [{k, start, stop}] for 'p'),
--              floor (capacity kept for higher priority classes),
--              guards = [{k, cap}] (other features' guarantees, kept unless spent),
--              lq (most a minute bucket's line may hold; absent: never scheduled),
--              pl = 1 (a pool's own minute limit: scaled by the pool's adaptive share),
--              rate (a bucket whose depth `cap` is a burst: its refill per minute)},
--   and bp (the pool's adaptation and breaker settings; see pressure.lua),
--   max_wait (ms; absent: refuse rather than schedule; see line.lua),
--   part (on a partitioned store: this partition, whose allotments scale the checks that
--         carry sp = 1, limits shared with other partitions; see allot.lua)
--
-- KEYS[last] on a partitioned store: the partition's allotments (part.k)
--
-- Returns JSON, one of:
--   {granted = true, lease, limits = [{id, cap, remaining, reset_ms}]}: the lease as stored
--    (its `r.out` the output tokens granted, `soft` the ids of soft or shadow limits it went
--    over; with an idempotency key, `limits` too and the key's name `ik`; scheduled: `sa`,
--    the start, from which the lease runs)
--   {granted = false, reason = 'rate_limited' | 'budget_exhausted' | 'concurrency',
--    limit, retry_ms (absent when the request can never fit), remaining, cap, needed, now_ms}
--   {granted = false, reason = 'upstream_unavailable', pool, retry_ms, now_ms}: the pool's
--    breaker is open (a grant's `breaker` lists the pools whose breaker changed it)
--   {conflict = true}                  idempotency key reused with another body
--   {stale = true}                     the plan is older than the configuration
--   {lost = true}                      the store lost its data (see plan_check in lib.lua)
--   {existing = lease, now_ms}         idempotency key replayed: the first reservation

local req = cjson.decode(ARGV[1])
local now = clock(req)
local lease_key, index_key, stream, idem_key = KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local halt = plan_check(KEYS[1], req.version)
if halt then return cjson.encode({[halt] = true}) end

if req.idempotency then
  local seen = redis.call('HMGET', idem_key, 'id', 'hash')
  if seen[1] then
    if seen[2] ~= req.idempotency.hash then return cjson.encode({conflict = true}) end
    local raw = redis.call('GET', req.lease_prefix .. seen[1])
    if raw then return cjson.encode({existing = lease_view(cjson.decode(raw)), now_ms = now}) end
  end
end

-- The amount a check takes is linear in the output tokens granted: a + ceil(b * out).
local function shape(check)
  local m = check.m
  if m == 'tokens' then check.a, check.b = req.in_, 1
  elseif m == 'input_tokens' then check.a, check.b = req.in_, 0
  elseif m == 'output_tokens' then check.a, check.b = 0, 1
  elseif m == 'cost_usd' then check.a, check.b = req.cost.a, req.cost.b
  else check.a, check.b = 1, 0 end
end

-- Whether `need`, which never fits this partition's part of a split limit, would fit the
-- whole amount: the rebalancer moves units to the partitions that ask (allot.lua).
local function short_here(check, need)
  return check.sp and check.al < check.whole and need <= check.whole
end

-- Milliseconds until `need` fits in a check that refused, or nil when it never will.
local function retry_ms(check, need)
  if check.kind == 'p' then
    if need > check.cap then
      if short_here(check, need) then return req.part.r end
      return nil
    end
    return check.reset_ms - now
  end
  if check.kind == 'c' then return nil end
  -- the most this caller can ever have: capacity less protected shares and others' guarantees
  if check.growth <= 0 or need > check.most then
    if short_here(check, need) then return req.part.r end
    return nil
  end
  return math.ceil((need - check.headroom + check.line) * 60000 / check.growth)
end

local function refusal(check, need)
  local reason = 'rate_limited'
  if check.kind == 'p' then reason = 'budget_exhausted' end
  if check.kind == 'c' then reason = 'concurrency' end
  return {granted = false, reason = reason, limit = check.id, remaining = check.headroom,
          cap = allot_whole_cap(check, check.cap), needed = need,
          retry_ms = retry_ms(check, need), now_ms = now}
end

local function later(a, b)
  return (a.retry_ms or math.huge) > (b.retry_ms or math.huge)
end

-- Whether a concurrency limit refused, in any option tried (see the reap at the end).
local short_of_slots = false

-- The largest grant of output tokens every hard check of an option admits, or nil and the
-- refusal (the limit to wait longest for: retrying earlier would still be refused).
local function fit(option)
  allot_apply(option.checks, req.part) -- allot.lua: this partition's part of shared limits
  local closed = bp_gate(option, now) -- pressure.lua: breaker, adaptive share
  if closed then return nil, closed end
  local out, worst = req.out, nil
  for _, check in ipairs(option.checks) do
    shape(check)
    if not check.asked then
      check.asked = true
      allot_want(check, amount_for(check, req.out), req.part)
    end
    observe(check, now)
    if check.enf == 'hard' and check.kind ~= 'g' then
      local need = amount_for(check, req.min_out)
      if need > check.headroom then
        local r = refusal(check, need)
        if check.kind == 'c' then short_of_slots = true end
        if worst == nil or later(r, worst) then worst = r end
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

-- The first option that fits and its grant, or the refusal to retry soonest.
local function decide()
  local best = nil
  for _, option in ipairs(req.options) do
    local out, refused = fit(option)
    if out then return option, out, nil end
    if best == nil or later(best, refused) then best = refused end
  end
  return nil, nil, best
end

-- Debit one check, noting what it took.
local function debit(check, out)
  local amount = amount_for(check, out)
  check.amt = amount
  if check.kind == 'b' then
    bucket_store(check.k, check.cap, check.level - (check.take or amount), now,
                 check.queue or check.line, check.rate)
  elseif check.kind == 'g' then
    -- use drains a guarantee only as far as it holds
    check.took = math.max(0, math.min(check.level, amount))
    bucket_store(check.k, check.cap, check.level - check.took, now)
  elseif check.kind == 'p' then
    -- a period's counter outlives the period by two days, for late commits to land in it
    redis.call('SET', check.k, int(check.used + amount), 'PXAT', int(check.reset_ms + 172800000))
  else
    redis.call('INCR', check.k)
  end
end

-- A check's entry in the answer's `limits`, once debited.
local function describe(check)
  local d = {id = check.id, cap = allot_whole_cap(check, check.rate or check.cap),
             cfg = allot_whole_cap(check, check.cfg)}
  if check.kind == 'p' then
    d.remaining, d.reset_ms = check.cap - check.used - check.amt, check.reset_ms
  elseif check.kind == 'c' then
    d.remaining = check.cap - check.used - 1
  else
    local level = check.level - (check.take or check.amt) - (check.queue or check.line)
    d.remaining = math.floor(level)
    local per = check.rate or check.cap
    d.reset_ms = now
    if per > 0 then d.reset_ms = now + math.ceil((check.cap - level) * 60000 / per) end
  end
  return d
end

-- Debit every check of the option (soft and shadow ones too), write the lease, tell the
-- ledger.
local function grant(option, out, start)
  local soft, limits, recorded = {}, {}, {}
  for _, check in ipairs(option.checks) do
    if check.enf ~= 'hard' and amount_for(check, out) > check.headroom then
      soft[#soft + 1] = check.id
    end
    debit(check, out)
    if check.kind ~= 'g' then limits[#limits + 1] = describe(check) end
    recorded[#recorded + 1] = {k = check.k, kind = check.kind, m = check.m, cap = check.cap,
                               amt = check.amt, took = check.took, cfg = check.cfg,
                               cd = check.cd, rate = check.rate, al = check.al,
                               whole = check.whole, id = check.al and check.id}
  end
  local expires = (start or now) + req.ttl_ms
  local cost = amount_for(req.cost, out)
  local meta = req.lease.meta
  meta.pool = option.pool
  local lease = {id = req.id, st = 'held', tenant = req.lease.tenant,
                 feature = req.lease.feature, kd = req.lease.kd, ttl_ms = req.ttl_ms,
                 prices = req.lease.prices,
                 meta = meta, pool = option.pool, created = now, e = expires, ck = recorded,
                 soft = soft, r = {in_ = req.in_, out = out, cost = cost}, sa = start,
                 bp = option.bp}
  local keep_ms = int(req.ttl_ms + req.retention_ms)
  if req.idempotency then
    -- a replay of the request answers as this call does; an extension keeps the key (`ik`)
    -- as long as the lease
    lease.limits, lease.ik = limits, idem_key
    redis.call('HSET', idem_key, 'id', req.id, 'hash', req.idempotency.hash)
    redis.call('PEXPIRE', idem_key, keep_ms)
  end
  local lease_json = cjson.encode(lease)
  redis.call('SET', lease_key, lease_json, 'PX', keep_ms)
  redis.call('ZADD', index_key, int(expires), req.id)
  local ev = event_base(lease, 'reserved', now)
  ev.granted_output_tokens, ev.expires_ms = out, expires
  if start then ev.start_ms, ev.wait_ms = start, start - now end
  emit(stream, req.maxlen, ev)
  -- the answer holds the lease as written rather than the same values encoded again
  return '{"granted":true,"lease":' .. lease_json .. ',"limits":' .. cjson.encode(limits)
    .. bp_granted(option, now) .. '}'
end

local function refuse(refused)
  local ev = {type = 'refused', rid = req.id, at_ms = now, reason = refused.reason,
              limit = refused.limit, reserved_input_tokens = req.in_,
              reserved_output_tokens = req.out}
  for name, value in pairs(req.lease.meta) do ev[name] = value end
  emit(stream, req.maxlen, ev)
  return cjson.encode(refused)
end

local option, out, refused = decide()
-- A lease past its expiry holds its concurrency slot until it is expired (the reaper runs
-- every two seconds): a request short of a slot expires the due leases first.
if not option and short_of_slots
    and reap(index_key, stream, req.maxlen, req.retention_ms, req.lease_prefix, now, 16) > 0 then
  option, out, refused = decide()
end
if option then return grant(option, out) end
if req.max_wait then
  local start
  option, out, start = line_decide(req.options, req.out, now, req.max_wait)
  if option then return grant(option, out, start) end
end
return refuse(refused)
