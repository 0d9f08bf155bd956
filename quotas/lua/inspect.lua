-- inspect.lua: the current state of some limits, for usage pages; changes nothing.
--
-- KEYS[1..]  the limit keys named below
-- ARGV[1]    JSON: clock, checks = [{id, kind, cap, k | periods, guards}] as for
--            reserve.lua
--
-- Returns JSON: [{id, used, remaining, reset_ms}] in the order given.

local req = cjson.decode(ARGV[1])
local now = clock(req)
local states = {}
allot_apply(req.checks, req.part)
for i, check in ipairs(req.checks) do
  observe(check, now)
  local state = {id = check.id, now_ms = now}
  if check.kind == 'b' or check.kind == 'g' then
    -- capacity promised to callers in line (line.lua) is as good as used
    local level = check.level - (check.line or 0)
    state.used = check.cap - level
    state.remaining = level
    local per = check.rate or check.cap
    state.reset_ms = now
    if per > 0 then state.reset_ms = now + math.ceil((check.cap - level) * 60000 / per) end
  else
    state.used = check.used
    state.remaining = check.cap - check.used
    state.reset_ms = check.reset_ms
  end
  states[i] = state
end
return cjson.encode(states)
