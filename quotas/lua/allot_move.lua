-- allot_move.lua: the rebalancer's side of allot.lua, on one partition.
--
-- KEYS[1]   the partition's allotments (part.k); KEYS[2..] the keys of the checks below
-- ARGV[1]   JSON: part, clock, checks = [check as for reserve.lua, sp = 1], and either
--   read = true: for each check, its units here, the amount they are of, the units asked
--     per minute (smoothed: half the last reading, half the asks since it, at most the
--     amount) and the units
--     that cannot be given away (a budget's use in its period, a concurrency limit's held
--     slots; 0 for a bucket); the asks are reset
--   units = {<limit id> = units}: move each check to those units and answer the units it
--     holds now. A budget or concurrency limit keeps at least what is used. A bucket is
--     brought to the moment first at its old size, so that the refill until now counts at
--     the old rate and from now on at the new one; its level is cut to the new depth.
--
-- `fence` (both): the round's number (0: none). A read records the highest seen; a move of
-- a round older than that (one that stalled past its lock while a newer round ran) applies
-- nothing and answers "superseded", so two rounds never both give.
--
-- Returns JSON: [{id, units, amount, want, used}] (read) or {<limit id> = units} (units).

local req = cjson.decode(ARGV[1])
local now = clock(req)
local part = req.part
local fence = tonumber(req.fence) or 0
local fenced = tonumber(redis.call('HGET', part.k, 'fence') or '0')
if fence > 0 and fence < fenced then return cjson.encode('superseded') end
if fence > fenced then redis.call('HSET', part.k, 'fence', fence) end

local function sized(check, units)
  local copy = {}
  for name, value in pairs(check) do copy[name] = value end
  allot_scale(copy, units)
  return copy
end

if req.read then
  local read_at = tonumber(redis.call('HGET', part.k, 'read_at') or '')
  local out = {}
  for i, check in ipairs(req.checks) do
    local amount = allot_amount(check)
    local units = allot_units(redis.call('HGET', part.k, tostring(check.id)) or nil, amount,
                              part)
    local asked = tonumber(redis.call('HGET', part.k, 'w' .. check.id) or '0')
    local smoothed = tonumber(redis.call('HGET', part.k, 'e' .. check.id) or '')
    -- the first reading counts the asks since a rebalancer's period
    local since = part.r
    if read_at then since = now - read_at end
    -- asks past the whole amount (refused callers asking again) count as the amount
    local rate = 0
    if since > 0 then rate = math.min(amount, asked * 60000 / since) end
    if smoothed then smoothed = smoothed / 2 + rate / 2 else smoothed = rate end
    redis.call('HDEL', part.k, 'w' .. check.id)
    redis.call('HSET', part.k, 'e' .. check.id, string.format('%.17g', smoothed))
    local used = 0
    if check.kind == 'p' or check.kind == 'c' then
      local here = sized(check, units)
      observe(here, now)
      used = math.max(0, here.used)
    end
    out[i] = {id = check.id, units = units, amount = amount, want = smoothed, used = used}
  end
  redis.call('HSET', part.k, 'read_at', int(now))
  return cjson.encode(out)
end

local applied = {}
for _, check in ipairs(req.checks) do
  local target = req.units[tostring(check.id)]
  if target then
    local amount = allot_amount(check)
    local units = allot_units(redis.call('HGET', part.k, tostring(check.id)) or nil, amount,
                              part)
    local old = sized(check, units)
    observe(old, now)
    if check.kind == 'p' or check.kind == 'c' then
      target = math.max(target, old.used)
    elseif check.kind == 'b' then
      local new = sized(check, target)
      bucket_store(check.k, new.cap, math.min(old.level, new.cap), now, old.line, new.rate)
    end
    redis.call('HSET', part.k, tostring(check.id), int(target) .. ':' .. int(amount))
    applied[tostring(check.id)] = target
  end
end
return cjson.encode(applied)
