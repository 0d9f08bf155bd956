-- line.lua: scheduled admission, prepended after lib.lua (quotas/engine/scripts.py).
--
-- A reserve that says `max_wait` (ms) and is short only of per-minute buckets may take its
-- place in line instead of being refused. A bucket keeps, beside its level, a line: capacity
-- promised to callers in line, which the refill repays before the level grows again
-- (`bucket_read` in lib.lua). A scheduled caller takes what the level holds above its floor
-- now and adds the rest to the line; it may start once the refill has repaid the line up to
-- and including it: start = now + line * 60 s / rate (the refill per minute: the bucket's
-- capacity, or its amount when a burst sets the depth apart). Each unit of capacity, in the
-- level or from the refill, is thus given once, and never before it exists: promises never
-- over-admit a bucket, whichever node makes them. A pool's adaptive share scales its
-- buckets' depth, refill and line bound (pressure.lua) before any promise, so new promises
-- follow the effective capacity; promises already given keep their start (docs/engine.md).
--
-- The level is not drained below the caller's floor, so a class with protected headroom
-- still finds it, and is admitted at once from it whatever lower classes wait in line. The
-- line is first come, first served for everyone else: the level only grows once the line is
-- clear, so no later caller of a class that is short overtakes it.
--
-- A check may join a line only when the plan gives it one (`lq`, the most the line may
-- hold, in the bucket's units: the pool's `line_minutes` of its capacity); past it, or past
-- `max_wait`, the caller is refused as without a wait. Budgets and concurrency are never
-- scheduled: a caller short of one is refused.

-- When an option, refused now, could start if it waited in line: the start (ms), or nil.
-- Notes on each short check what it takes from the level (`take`) and the line it leaves
-- (`queue`), for `debit`.
local function line_start(option, out, now, max_wait)
  -- an open pool is skipped before any promise; a half-open one sends its probe now or not
  -- at all (pressure.lua)
  if option.gate and (option.gate.refusal or option.probe) then return nil end
  local start = now
  for _, check in ipairs(option.checks) do
    if check.enf == 'hard' and check.kind ~= 'g' then
      local need = amount_for(check, out)
      if need > check.headroom then
        -- a call larger than the bucket's depth (a burst) never fits, in line or not
        if check.kind ~= 'b' or not check.lq or need > check.most then return nil end
        local take = math.max(0, check.headroom)
        local queue = check.line + need - take
        if queue > check.lq then return nil end
        check.take, check.queue = take, queue
        start = math.max(start, now + math.ceil(queue * 60000 / (check.rate or check.cap)))
      end
    end
  end
  if start - now > max_wait then return nil end
  return start
end

-- The first option whose line is short enough to wait in, its grant and start; nil if none.
-- The options were observed by the refused attempt to admit now.
local function line_decide(options, out, now, max_wait)
  for _, option in ipairs(options) do
    local start = line_start(option, out, now, max_wait)
    if start then return option, out, start end
  end
  return nil
end
