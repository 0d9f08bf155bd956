-- trim.lua: drop the usage events that every consumer group has acknowledged, and no others.
--
-- KEYS[1]  usage event stream                           q:{tag}:events
-- ARGV[1]  JSON: {} (nothing)
--
-- Returns the number of entries removed. A stream without groups is left alone: nobody has
-- read it yet. Within one script, no group can be created or read between the look and the trim.

local stream = KEYS[1]
if redis.call('EXISTS', stream) == 0 then return 0 end

local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

local function before(a, b)
  local ams, aseq = parse(a)
  local bms, bseq = parse(b)
  return ams < bms or (ams == bms and aseq < bseq)
end

-- The oldest entry a group still needs: its oldest pending one, else the one after the last
-- it was given.
local function needed(info)
  local pending = redis.call('XPENDING', stream, info['name'])
  if pending[1] > 0 then return pending[2] end
  local ms, seq = parse(info['last-delivered-id'])
  return string.format('%.0f-%.0f', ms, seq + 1)
end

local keep = nil
for _, flat in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local info = {}
  for i = 1, #flat, 2 do info[flat[i]] = flat[i + 1] end
  local id = needed(info)
  if keep == nil or before(id, keep) then keep = id end
end
if keep == nil then return 0 end
return redis.call('XTRIM', stream, 'MINID', keep)
