-- allot.lua: limits shared across partitions. Prepended after lib.lua to every script.
--
-- On a Redis Cluster the state is split into partitions (quotas/engine/partitions.py). A
-- limit that tenants of several partitions share (one with no tenant: a pool's own limit,
-- or a limit of every tenant) holds, on each partition, an allotment: whole units of its
-- amount (tokens or requests per minute, units per period, slots). The allotments of a limit
-- add up to at most its amount, so the partitions together never admit more than it does.
-- The rebalancer (quotas/allotments.py) moves units toward the partitions that ask for
-- them; until it first runs, the amount is split evenly.
--
-- State: one hash per partition, q:{tag.i}:allot:
--   <limit id>   "units:amount": the units allotted, of the amount they were allotted from
--                 (an amount lowered since scales them down: units * new / old, rounded
--                 down; a raised one leaves them as they are until the rebalancer hands out
--                 the new units, so that parts stored against different amounts never add
--                 up past the new one)
--   w<limit id>  units asked on this partition since the rebalancer last read them
--   e<limit id>  units asked per minute, smoothed over the rebalancer's reads
--
-- A request carries `part` = {i (this partition), n (partitions), k (the hash), r (ms
-- between rebalances: the retry given while this partition holds nothing of a limit)}; a
-- split check carries `sp` = 1.

-- The even split of `amount` over the partitions: this partition's units.
local function allot_even(amount, part)
  local units = math.floor(amount / part.n)
  if part.i < amount % part.n then units = units + 1 end
  return units
end

-- The units a stored allotment gives of `amount` (nil: none stored, the even split).
local function allot_units(raw, amount, part)
  if not raw then return allot_even(amount, part) end
  local units, from = string.match(raw, '^([^:]*):(.*)$')
  units, from = tonumber(units), tonumber(from)
  if from == amount then return units end
  if from <= 0 then return allot_even(amount, part) end
  return math.min(units, math.floor(units * amount / from))
end

-- The amount a check's allotment is a share of: a bucket's refill per minute, a budget's or
-- a concurrency limit's cap.
local function allot_amount(check)
  if check.kind == 'b' then return check.rate or check.cap end
  return check.cap
end

-- Scale a check to `units` of its amount: depth, refill, protected floor and line bound
-- alike. `whole` keeps the amount, for the answer's `cap`.
local function allot_scale(check, units)
  local amount = allot_amount(check)
  check.whole, check.al = amount, units
  if amount <= 0 then return end
  if check.kind == 'b' then
    local cap = check.cap
    check.cap = math.floor(cap * units / amount)
    if check.rate then check.rate = units end
    if check.floor then check.floor = math.floor(check.floor * units / amount) end
    if check.lq then check.lq = math.floor(check.lq * units / amount) end
  else
    check.cap = units
  end
end

-- The whole limit's figure for one of this partition's (`value` at its allotment: its depth,
-- its refill, the refill at the pool's adaptive share; nil stays nil): what an answer names
-- as the limit's cap and configured amount.
local function allot_whole_cap(check, value)
  if not value or not check.whole then return value end
  if check.al <= 0 then return check.whole end
  return math.floor(check.whole * value / check.al + 0.5)
end

-- Reserve and inspect: scale the split checks among `checks` to this partition's
-- allotments. One HMGET; writes nothing.
local function allot_apply(checks, part)
  if not part then return end
  local split = {}
  for _, check in ipairs(checks) do
    if check.sp and not check.al then split[#split + 1] = check end
  end
  if #split == 0 then return end
  local ids = {}
  for i, check in ipairs(split) do ids[i] = tostring(check.id) end
  local got = redis.call('HMGET', part.k, unpack(ids))
  for i, check in ipairs(split) do
    allot_scale(check, allot_units(got[i] or nil, allot_amount(check), part))
  end
end

-- Reserve: count what a split check was asked for, for the rebalancer.
local function allot_want(check, amount, part)
  if check.sp and part and amount > 0 then
    redis.call('HINCRBY', part.k, 'w' .. check.id, int(amount))
  end
end

-- At a settlement: a lease's split bucket, recorded at its partition's part when reserved,
-- brought to the part the partition holds now (the rebalancer may have moved units since), so
-- that the refund lands, and the refill runs, at the current depth and rate. Checks recorded
-- without their limit's id (leases made before ids were recorded) stay as they are.
local function allot_refresh(checks, part)
  if not part then return end
  for _, check in ipairs(checks) do
    if check.id and check.kind == 'b' and check.al and check.al > 0 and check.whole then
      local raw = redis.call('HGET', part.k, tostring(check.id)) or nil
      local units = allot_units(raw, check.whole, part)
      if units ~= check.al then
        local function scaled(value)
          if value then return math.floor(value * units / check.al) end
          return nil
        end
        check.cap, check.rate = scaled(check.cap), scaled(check.rate)
        check.cfg, check.cd = scaled(check.cfg), scaled(check.cd)
        check.al = units
      end
    end
  end
end
