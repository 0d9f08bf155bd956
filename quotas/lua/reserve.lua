-- reserve.lua: check every applicable limit and debit all of them or none.
--
-- KEYS[1]  config version                                q:{tag}:config_version
-- KEYS[2]  lease key of the new reservation            q:{tag}:r:<id>
-- KEYS[3]  index of held leases by expiry (zset)        q:{tag}:leases
-- KEYS[4]  usage event stream                           q:{tag}:events
-- KEYS[5]  idempotency key (a per-request dummy if none) q:{tag}:idem:<tenant>:<key>
-- KEYS[6..] every limit key the plan below may touch (buckets, budget periods, counters)
-- ARGV[1]  the request, a flat JSON array (one decode, no nested tables but meta):
--   [1] version (of the compiled plan; false: none), [2] id, [3] ttl_ms, [4] retention_ms,
--   [5] maxlen, [6] lease_prefix, [7] clock_ms (false: Redis TIME), [8] clock_offset_ms,
--   [9] idem_hash ('' without an idempotency key), [10] in_ (input tokens),
--   [11] out (max output tokens), [12] min_out (smallest acceptable grant),
--   [13], [14] cost a, b (nano-USD for `out` output tokens: a + b * out),
--   [15] meta (event fields, an object: only when ARGV[3..] does not hold them; else false),
--   [16] the number of pool options, then each option in the order to try:
--     pool, number of checks, then each check:
--       kind ('b' bucket | 'p' budget | 'c' concurrency | 'g' guarantee),
--       enf ('hard' | 'soft' | 'shadow'),
--       m (metric: sets the amount, tokens = in_ + out, cost_usd = a + b * out, ...),
--       id, cap, floor (capacity kept for higher priority classes; 0: none),
--       the head of its entry in the answer's `limits`, `{"id":..,"cap":..,"remaining":`,
--       the head of its entry in the lease's `ck`, `{"kind":..,"m":..,"cap":..,"k":..,"amt":`
--         (no "k" for 'p': the script adds the period's), the numbers in both written as
--         cjson writes them (14 significant digits),
--       k (its key; false for 'p'),
--       number of periods (for 'p'), then each period: k, start, stop,
--       number of guards (other features' guarantees, kept unless spent), then each: k, cap
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

-- The script is one straight body with two small helpers: every function defined here is a
-- closure made again on every call, and capturing its upvalues costs more than the call.

local A = cjson.decode(ARGV[1])
local id, ttl_ms, retention_ms, maxlen, lease_prefix = A[2], A[3], A[4], A[5], A[6]
local idem_hash, in_, req_out, min_out, cost_a, cost_b = A[9], A[10], A[11], A[12], A[13], A[14]
local meta = A[15]
local huge = math.huge
local now = A[7]
if not now then now = now_ms() + A[8] end
local lease_key, index_key, stream, idem_key = KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local version = A[1]
if version == false then version = nil end
if stale(KEYS[1], version) then return cjson.encode({stale = true}) end

reap(index_key, stream, maxlen, retention_ms, lease_prefix, now, 16)

if idem_hash ~= '' then
  local seen = redis.call('HMGET', idem_key, 'id', 'hash')
  if seen[1] then
    if seen[2] ~= idem_hash then return cjson.encode({conflict = true}) end
    local raw = redis.call('GET', lease_prefix .. seen[1])
    if raw then return cjson.encode({existing = cjson.decode(raw), now_ms = now}) end
  end
end

-- A number as cjson writes it (14 significant digits; NaN and infinity refused).
local function json_number(x)
  if short_whole(x) then return format('%d', x) end
  if x - x ~= 0 then error('Cannot serialise number: must not be NaN or Inf') end
  return format('%.14g', x)
end

-- The same, and as an event's field_text writes it (the same text for short whole numbers).
local function texts(x)
  if short_whole(x) then
    local text = format('%d', x)
    return text, text
  end
  return json_number(x), field_text(x)
end

-- Try the pool options in order; the first whose hard limits all admit is granted.
local at = 17  -- where the option being read starts in A
local pool, checks, out, best = nil, nil, nil, nil
for _ = 1, A[16] do
  pool, checks = A[at], {}
  -- Its checks, as tables of what the decision needs (`c`: where the check starts in A; its
  -- periods and guards are read from A).
  local c = at + 2
  for i = 1, A[at + 1] do
    local g = c + 10 + 3 * A[c + 9]
    checks[i] = {c = c, kind = A[c], cap = A[c + 4], k = A[c + 8], a = 0, b = 0, level = 0,
                 used = 0, headroom = 0, growth = 0, most = 0, reset_ms = false, amt = 0,
                 took = false, remaining = 0}
    c = g + 1 + 2 * A[g]
  end
  at = c
  -- The largest grant of output tokens every hard check admits, or the refusal.
  out = req_out
  local worst = nil
  for i = 1, #checks do
    local check = checks[i]
    c = check.c
    local kind, cap, m = check.kind, check.cap, A[c + 2]
    -- the amount a check takes is linear in the output tokens granted: a + ceil(b * out)
    if m == 'tokens' then check.a, check.b = in_, 1
    elseif m == 'input_tokens' then check.a, check.b = in_, 0
    elseif m == 'output_tokens' then check.a, check.b = 0, 1
    elseif m == 'cost_usd' then check.a, check.b = cost_a, cost_b
    else check.a, check.b = 1, 0 end
    -- its current state (lib.lua's observe)
    if kind == 'p' then
      local k, reset = check.k, nil
      for base = c + 10, c + 9 + 3 * A[c + 9], 3 do
        if now >= A[base + 1] and now < A[base + 2] then k, reset = A[base], A[base + 2] end
      end
      if not k then k = nil end
      check.k, check.reset_ms = k, reset
      check.used = counter(k)
      check.headroom = cap - check.used
    elseif kind == 'c' then
      check.used = counter(check.k)
      check.headroom = cap - check.used
    else
      check.level = bucket_level(check.k, cap, now)
      local floor_kept = A[c + 5]
      local kept_all, growth, reserved = floor_kept, cap, 0
      local g = c + 10 + 3 * A[c + 9]
      for base = g + 1, g + 2 * A[g], 2 do
        local guard_cap = A[base + 1]
        local kept = bucket_level(A[base], guard_cap, now)
        kept_all = kept_all + kept
        reserved = reserved + guard_cap
        -- a guarantee still refilling takes its share of the refill; a full one takes none
        if kept < guard_cap then growth = growth - guard_cap end
      end
      check.headroom = check.level - kept_all
      check.growth = growth
      check.most = cap - floor_kept - reserved
    end
    if A[c + 1] == 'hard' and kind ~= 'g' then
      local need = amount_for(check, min_out)
      if need > check.headroom then
        -- when the same request would fit, if ever: a budget at its reset, a bucket once it
        -- refilled; never past the most the caller can have (capacity less protected shares
        -- and others' guarantees), never for concurrency
        local retry, reason = nil, 'rate_limited'
        if kind == 'p' then
          reason = 'budget_exhausted'
          if not (need > cap) then retry = check.reset_ms - now end
        elseif kind == 'c' then
          reason = 'concurrency'
        elseif not (check.growth <= 0 or need > check.most) then
          retry = math.ceil((need - check.headroom) * 60000 / check.growth)
        end
        local r = {granted = false, reason = reason, limit = A[c + 3], remaining = check.headroom,
                   cap = cap, needed = need, retry_ms = retry, now_ms = now}
        -- wait for the slowest limit: retrying earlier would still be refused
        if worst == nil or (r.retry_ms or huge) > (worst.retry_ms or huge) then
          worst = r
        end
      elseif check.b > 0 then
        local fits = math.min(req_out, floor((check.headroom - check.a) / check.b))
        -- the charge rounds up (a + ceil(b * out)); step back where rounding would overshoot
        while fits > min_out and amount_for(check, fits) > check.headroom do
          fits = fits - 1
        end
        out = math.min(out, fits)
      end
    end
  end
  if not worst then break end
  if best == nil or (worst.retry_ms or huge) < (best.retry_ms or huge) then
    best = worst
  end
  checks = nil
end

if checks then
  -- Granted: debit every check (soft and shadow ones too), noting what the answer says.
  out = math.max(out, min_out)
  local soft = {}
  local now_text = num_text(now)
  for i = 1, #checks do
    local check = checks[i]
    local amount = amount_for(check, out)
    if A[check.c + 1] ~= 'hard' and amount > check.headroom then
      soft[#soft + 1] = A[check.c + 3]
    end
    check.amt = amount
    local kind, cap, k = check.kind, check.cap, check.k
    if kind == 'b' or kind == 'g' then
      -- lib.lua's bucket_store; use drains a guarantee only as far as it holds
      local taken = amount
      if kind == 'g' then
        taken = math.max(0, math.min(check.level, amount))
        check.took = taken
      end
      local level = check.level - taken
      if level >= cap then
        redis.call('DEL', k)
      else
        redis.call('HSET', k, 'v', num_text(level), 't', now_text)
        redis.call('PEXPIRE', k, as_arg(math.ceil((cap - level) * 60000 / cap) + 300000))
      end
      if kind == 'b' then
        check.remaining = floor(level)
        check.reset_ms = now + math.ceil((cap - level) * 60000 / cap)
      end
    else
      redis.call('INCRBY', k, int(amount))
      if kind == 'p' then
        redis.call('PEXPIREAT', k, as_arg(check.reset_ms + 172800000))
        check.remaining = cap - check.used - amount
      else
        check.remaining = cap - check.used - 1
      end
    end
  end
  -- The answer and the lease as cjson wrote them from tables (members in another order),
  -- each the concatenation of one list of parts: once everything is debited (a number
  -- cjson refuses raises here, as it did), before anything else is written.
  local expires = now + ttl_ms
  local cost = cost_a
  if cost_b ~= 0 then cost = cost_a + ceil_units(cost_b * out) end
  local pool_json = cjson.encode(pool)
  local now_json, at_text = texts(now)
  local out_json, granted = texts(out)
  local expires_json, expires_text = texts(expires)
  local cost_json, cost_text = texts(cost)
  local in_json, in_text = texts(in_)
  local reply = {'{"granted":true,"id":', cjson.encode(id), ',"pool":', pool_json, ',"out":',
                 out_json, ',"expires_ms":', expires_json, ',"now_ms":', now_json,
                 ',"limits":', '{}'}
  local lease = {'{"st":"held","pool":', pool_json, ',"created":', now_json, ',"e":',
                 expires_json, ',"r":{"in_":', in_json, ',"out":', out_json, ',"cost":',
                 cost_json, '},"ck":', '{}'}
  -- each entry: a separator, the head the engine wrote, then what the script decided
  local rn, ln = 11, 13
  for i = 1, #checks do
    local check = checks[i]
    local kind, c = check.kind, check.c
    if kind ~= 'g' then
      local remaining, reset, tail = check.remaining, check.reset_ms, nil
      if kind == 'c' then
        tail = json_number(remaining) .. '}'
      elseif short_whole(remaining) and short_whole(reset) then
        tail = format('%d,"reset_ms":%d}', remaining, reset)
      else
        tail = json_number(remaining) .. ',"reset_ms":' .. json_number(reset) .. '}'
      end
      reply[rn + 1], reply[rn + 2], reply[rn + 3] = rn == 11 and '[' or ',', A[c + 6], tail
      rn = rn + 3
    end
    local amt, took, tail = check.amt, check.took, nil
    if took then
      tail = json_number(amt) .. ',"took":' .. json_number(took) .. '}'
    elseif kind == 'p' then
      tail = json_number(amt) .. ',"k":' .. cjson.encode(check.k) .. '}'
    elseif short_whole(amt) then
      tail = format('%d}', amt)
    else
      tail = json_number(amt) .. '}'
    end
    lease[ln + 1], lease[ln + 2], lease[ln + 3] = ln == 13 and '[' or ',', A[c + 7], tail
    ln = ln + 3
  end
  -- an empty list is written {} (the part in place), a list closed with ]
  if rn > 11 then rn = rn + 1; reply[rn] = ']' else rn = rn + 1 end
  if ln > 13 then ln = ln + 1; lease[ln] = ']' else ln = ln + 1 end
  local soft_json = '{}'
  if #soft > 0 then
    local ids = {}
    for i, limit in ipairs(soft) do ids[i] = json_number(limit) end
    soft_json = '[' .. table.concat(ids, ',') .. ']'
  end
  reply[rn + 1], reply[rn + 2], reply[rn + 3], reply[rn + 4], reply[rn + 5] =
    ',"soft":', soft_json, ',"cost":', cost_json, '}'
  reply = table.concat(reply, '', 1, rn + 5)
  local reply_member = ''
  local keep_ms = as_arg(ttl_ms + retention_ms)
  if idem_hash ~= '' then
    -- a replay of the same request answers exactly as the first time
    reply_member = ',"reply":' .. reply
    redis.call('HSET', idem_key, 'id', id, 'hash', idem_hash)
    redis.call('PEXPIRE', idem_key, keep_ms)
  end
  -- the lease: what this script decides, then ARGV[2] (id to meta) and the pool in meta
  lease[ln + 1], lease[ln + 2], lease[ln + 3], lease[ln + 4], lease[ln + 5], lease[ln + 6],
    lease[ln + 7], lease[ln + 8] =
    ',"soft":', soft_json, reply_member, ',', ARGV[2], '"pool":', pool_json, '}}'
  redis.call('SET', lease_key, table.concat(lease, '', 1, ln + 8), 'PX', keep_ms)
  redis.call('ZADD', index_key, short_whole(expires) and expires_json or expires, id)
  if meta then
    local ev = {type = 'reserved', rid = id, at_ms = now, created_ms = now,
                reserved_input_tokens = in_, reserved_output_tokens = out,
                reserved_cost_nusd = cost}
    for name, value in pairs(meta) do ev[name] = value end
    ev.pool = pool
    if #soft > 0 then ev.would_refuse = table.concat(soft, ',') end
    ev.granted_output_tokens = out
    ev.expires_ms = expires
    emit(stream, maxlen, ev)
    return reply
  end
  -- the same fields, the meta ones from ARGV[3..] (none of them named as these are)
  if #soft > 0 then
    xadd(stream, maxlen, 'type', 'reserved', 'rid', id, 'at_ms', at_text,
         'created_ms', at_text, 'reserved_input_tokens', in_text,
         'reserved_output_tokens', granted, 'reserved_cost_nusd', cost_text,
         'granted_output_tokens', granted, 'expires_ms', expires_text, 'pool', pool,
         'would_refuse', table.concat(soft, ','), unpack(ARGV, 3))
  else
    xadd(stream, maxlen, 'type', 'reserved', 'rid', id, 'at_ms', at_text,
         'created_ms', at_text, 'reserved_input_tokens', in_text,
         'reserved_output_tokens', granted, 'reserved_cost_nusd', cost_text,
         'granted_output_tokens', granted, 'expires_ms', expires_text, 'pool', pool,
         unpack(ARGV, 3))
  end
  return reply
end

if meta then
  local ev = {type = 'refused', rid = id, at_ms = now, reason = best.reason,
              limit = best.limit, reserved_input_tokens = in_,
              reserved_output_tokens = req_out}
  for name, value in pairs(meta) do ev[name] = value end
  emit(stream, maxlen, ev)
else
  xadd(stream, maxlen, 'type', 'refused', 'rid', id, 'at_ms', field_text(now),
       'reason', best.reason, 'limit', field_text(best.limit),
       'reserved_input_tokens', field_text(in_),
       'reserved_output_tokens', field_text(req_out), unpack(ARGV, 3))
end
return cjson.encode(best)
