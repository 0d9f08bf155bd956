-- pressure.lua: following the provider. Prepended, after lib.lua, to every script.
--
-- A pool option (reserve) and the lease it grants carry `bp`, the pool's settings
-- (quotas.engine.types.Pressure): k (the state's key), ad (1: adaptive), fl (floor share),
-- dc (decrease factor), cd (cooldown ms), rc (recovery ms, floor to full), bw (breaker
-- window ms, 0: no breaker), bn (fewest calls in the window), br (failure ratio that opens),
-- bo (open ms).
--
-- State: one hash per pool, q:{tag}:bp:<pool id>:
--   s  the adaptive share of the configured per-minute limits (absent: 1)
--   t  when the share last moved or a call last failed (recovery counts from it)
--   d  when it was last decreased (at most one decrease per cooldown)
--   o  the breaker's open-until time (absent or 0: closed; past: half-open)
--   p  when the next half-open probe may go through
--   n<i> f<i> e<i>  the breaker's window: ten slots of bw/10 ms, calls and failures of
--       slot number e<i> (i = e<i> mod 10)
--   l:<metric>  the configured amount a provider's lower stated limit was reported for
--
-- Each change of the share or the breaker is a usage event of its own (`adapted`,
-- `breaker_opened`, `breaker_closed`, `provider_limit`), written by the decision's script.

local BP_SLOTS = 10
local PROBE_EVERY_MS = 1000

-- The breaker states that changed this reserve's decision, for its answer.
local bp_notes = {}

-- Write the fields of a pool's state that a script changed (`set`), if any.
local function bp_store(key, set)
  local flat = flat_fields(set)
  if #flat > 0 then redis.call('HSET', key, unpack(flat)) end
end

local function bp_event(stream, maxlen, kind, pool, now, fields)
  fields.type, fields.pool, fields.at_ms = kind, pool, now
  emit(stream, maxlen, fields)
end

-- A pool's effective capacity for a configured one at `share` (never below one unit, but
-- a partition's part of a split limit that holds nothing stays nothing).
local function bp_scaled(cap, share)
  if share >= 1 or cap <= 0 then return cap end
  return math.max(1, math.floor(cap * share))
end

-- A pool limit's depth (`cap`) and refill (`rate`, when a burst sets the depth apart) at
-- `share` of their configured values (`cd` or `cfg`, and `cfg`).
local function bp_rescale(check, share)
  check.cap = bp_scaled(check.cd or check.cfg, share)
  if check.rate then check.rate = bp_scaled(check.cfg, share) end
end

-- Reserve: whether a pool option may be tried, and its per-minute limits scaled by the
-- pool's share. Returns nil, or the refusal of an open breaker (or a half-open one whose
-- probe for this second has gone). Reads one hash; writes nothing.
local function bp_gate(option, now)
  local bp = option.bp
  if not bp then return nil end
  if option.gate then return option.gate.refusal end -- a second decide() after a reap
  local got = redis.call('HMGET', bp.k, 's', 'o', 'p')
  local share = 1
  if bp.ad == 1 then share = tonumber(got[1]) or 1 end
  option.gate = {share = share}
  for _, check in ipairs(option.checks) do
    if check.pl == 1 and check.kind == 'b' then
      -- cfg: the configured amount; cd: the configured depth when a burst sets it
      check.cfg, check.cd = check.rate or check.cap, check.rate and check.cap
      bp_rescale(check, share)
      if check.floor then check.floor = math.floor(check.floor * math.min(1, share)) end
      -- the line holds the same minutes of the effective capacity (line.lua)
      if check.lq then check.lq = math.floor(check.lq * math.min(1, share)) end
    end
  end
  local open_until = tonumber(got[2]) or 0
  if bp.bw == 0 or open_until == 0 then return nil end
  local retry, state = open_until - now, 'open'
  if retry <= 0 then
    state = 'half_open'
    retry = (tonumber(got[3]) or 0) - now
    if retry <= 0 then
      option.probe = true
      return nil
    end
  end
  local refusal = {granted = false, reason = 'upstream_unavailable', pool = option.pool,
                   retry_ms = retry, now_ms = now}
  option.gate.refusal = refusal
  bp_notes[#bp_notes + 1] = {pool = option.pool, state = state, retry_ms = retry}
  return refusal
end

-- Reserve, once granted on `option`: a half-open probe takes the second's turn. Returns the
-- answer's `breaker` member ('' when no breaker changed the decision).
local function bp_granted(option, now)
  if option.probe then
    redis.call('HSET', option.bp.k, 'p', int(now + PROBE_EVERY_MS))
    bp_notes[#bp_notes + 1] = {pool = option.pool, state = 'half_open', probe = true}
  end
  if #bp_notes == 0 then return '' end
  return ',"breaker":' .. cjson.encode(bp_notes)
end

local function bp_failed(status)
  return status == 0 or status >= 500
end

-- The breaker's part of a report: count the call in the window; open when enough failed;
-- a half-open breaker closes on a success and opens again on a failure.
local function bp_breaker(bp, h, set, status, pool, now, stream, maxlen)
  local failed = bp_failed(status)
  local open_until = tonumber(h.o) or 0
  if open_until > now then return end -- open: reports of calls made before do not count
  local slot_ms = bp.bw / BP_SLOTS
  local slot = math.floor(now / slot_ms)
  if open_until > 0 then
    set.p = 0
    if failed then
      set.o = now + bp.bo
      bp_event(stream, maxlen, 'breaker_opened', pool, now,
               {until_ms = now + bp.bo, reason = 'probe_failed'})
    else
      set.o = 0
      bp_event(stream, maxlen, 'breaker_closed', pool, now, {})
    end
    for i = 0, BP_SLOTS - 1 do set['e' .. i] = 0 end -- a new window after a state change
    return
  end
  local here = slot % BP_SLOTS
  local calls, failures = 0, 0
  for i = 0, BP_SLOTS - 1 do
    local e = tonumber(h['e' .. i])
    local n, f = 0, 0
    if e and e > slot - BP_SLOTS and e <= slot then
      n, f = tonumber(h['n' .. i]) or 0, tonumber(h['f' .. i]) or 0
    end
    if i == here then
      if e ~= slot then n, f = 0, 0 end
      n = n + 1
      if failed then f = f + 1 end
      set['e' .. i], set['n' .. i], set['f' .. i] = slot, n, f
    end
    calls, failures = calls + n, failures + f
  end
  if failed and calls >= bp.bn and failures >= bp.br * calls then
    set.o, set.p = now + bp.bo, 0
    for i = 0, BP_SLOTS - 1 do set['e' .. i] = 0 end
    bp_event(stream, maxlen, 'breaker_opened', pool, now,
             {until_ms = now + bp.bo, calls = calls, failures = failures})
  end
end

-- The adaptive share's part of a report (AIMD): a provider 429 multiplies the share by the
-- decrease factor, at most once per cooldown and never below the floor; a success adds back
-- the time since the share last moved or a call last failed, at (1 - floor) per recovery
-- time, never above 1. Returns the share now.
local function bp_adapt(bp, h, set, status, pool, now, stream, maxlen)
  local share = tonumber(h.s) or 1
  local since = tonumber(h.t) or now
  local new = share
  if status == 429 then
    local last = tonumber(h.d)
    if last and now - last < bp.cd then return share end
    new = math.max(bp.fl, share * bp.dc)
    set.d, set.t = now, now
  elseif status >= 200 and status < 300 then
    if share >= 1 then return share end
    new = math.min(1, share + math.max(0, now - since) * (1 - bp.fl) / bp.rc)
    set.t = now
  else
    set.t = now -- no recovery across failures
    return share
  end
  if new ~= share then
    set.s = new
    -- every decrease, and each tenth of the way back, is an event (not every success)
    if new < share or new >= 1 or math.floor(new * 10) > math.floor(share * 10) then
      bp_event(stream, maxlen, 'adapted', pool, now,
               {share = string.format('%.4f', new), was = string.format('%.4f', share),
                cause = status == 429 and 'provider_429' or 'recovery'})
    end
  end
  return new
end

-- Header sync: the provider's `remaining` lowers the pool's bucket of that metric to at most
-- it (never raises it: the provider's number counts consumers outside the platform); a
-- stated `limit` below the configured amount is an event once per configured amount.
-- Lower a pool bucket's level to at most `remaining` (never raise it). The level only: the
-- line (capacity promised to callers in line.lua) stays owed.
local function bp_lower(check, remaining, now)
  local key = bucket_key(check)
  local level, line = bucket_read(key, check.cap, now, check.rate)
  if remaining < level then
    bucket_store(key, check.cap, math.max(0, remaining), now, line, check.rate)
  end
end

local function bp_sync(lease, limits, h, set, now, stream, maxlen)
  for _, check in ipairs(lease.ck) do
    local stated = check.cfg and check.kind == 'b' and limits[check.m]
    if stated then
      -- a limit split across partitions (allot.lua) takes its part of what remains
      local part = 1
      if check.al and check.whole and check.whole > 0 then part = check.al / check.whole end
      if stated.r then bp_lower(check, math.floor(stated.r * part), now) end
      local configured = check.whole or check.cfg
      local seen = 'l:' .. check.m
      if stated.l and stated.l < configured and tonumber(h[seen]) ~= configured then
        set[seen] = configured
        bp_event(stream, maxlen, 'provider_limit', lease.pool, now,
                 {metric = check.m, limit = stated.l, configured = configured})
      end
    end
  end
end

-- Commit and release, before the settlement: take the caller's report (`report` = {st, hd})
-- into the pool's share and breaker, and bring the lease's pool limits to the pool's
-- effective capacity, so the refund lands in the bucket as it is now. One HGETALL; returns
-- what `bp_settled` finishes with.
local function bp_settle(lease, report, now, stream, maxlen)
  local bp = lease.bp
  if not bp then return nil end
  local raw = redis.call('HGETALL', bp.k)
  local h = {}
  for i = 1, #raw, 2 do h[raw[i]] = raw[i + 1] end
  local set = {}
  local share = 1
  if bp.ad == 1 then share = tonumber(h.s) or 1 end
  local status = report and report.st
  if status then
    if bp.bw > 0 then bp_breaker(bp, h, set, status, lease.pool, now, stream, maxlen) end
    if bp.ad == 1 then share = bp_adapt(bp, h, set, status, lease.pool, now, stream, maxlen) end
  end
  for _, check in ipairs(lease.ck) do
    if check.cfg and check.kind == 'b' then bp_rescale(check, share) end
  end
  return {h = h, set = set}
end

-- Commit and release: the pool whose other partitions should hear of a provider 429 this
-- report carries (quotas/reservations.py spreads it: spread.lua), or nil.
local function bp_spread(lease, report)
  if lease.bp and report and report.st == 429 then return lease.pool end
  return nil
end

-- Commit and release, after the settlement (whose refund the provider's `remaining` already
-- counts): header sync, then the pool's state written back in at most one HSET.
--
-- A provider 429 says the account has nothing left now, whatever its headers state (in an
-- incident they keep stating the tier): the pool's per-minute buckets are emptied, so the
-- release's refund does not admit the next call at once; they refill at the pool's
-- effective rate.
local function bp_settled(lease, state, report, now, stream, maxlen)
  if not state then return end
  local set = state.set
  if report and report.st == 429 then
    for _, check in ipairs(lease.ck) do
      if check.cfg and check.kind == 'b' then bp_lower(check, 0, now) end
    end
  end
  if report and report.hd then
    bp_sync(lease, report.hd, state.h, set, now, stream, maxlen)
  end
  bp_store(lease.bp.k, set)
end
