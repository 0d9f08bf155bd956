-- snapshot.lua: some counters and the usage events a consumer group has not acknowledged, at
-- one instant. The ledger compares them with its own sums: an event still in the stream is in
-- the counters but maybe not yet in the ledger, so the caller applies it on top.
--
-- KEYS[1]   usage event stream                          q:{tag}:events
-- KEYS[2..] counters to read (budget periods, concurrency counters)
-- ARGV[1]   JSON: group (the ledger's consumer group)
--
-- Returns JSON: {values = [counter or false], entries = [[id, [field, value, ...]], ...]}:
-- every entry from the group's oldest unacknowledged one (every entry when the group does not
-- exist yet) to the end of the stream.

local req = cjson.decode(ARGV[1])
local stream = KEYS[1]

-- First id the group has not acknowledged: its oldest pending entry, else the one after the
-- last it was given.
local function unacked_from(group)
  if redis.call('EXISTS', stream) == 0 then return nil end
  for _, flat in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local info = {}
    for i = 1, #flat, 2 do info[flat[i]] = flat[i + 1] end
    if info['name'] == group then
      local pending = redis.call('XPENDING', stream, group)
      if pending[1] > 0 then return pending[2] end
      return '(' .. info['last-delivered-id']
    end
  end
  return '-'
end

local values = {}
for i = 2, #KEYS do
  values[i - 1] = redis.call('GET', KEYS[i]) or false
end
local start = unacked_from(req.group)
local entries = {}
if start then entries = redis.call('XRANGE', stream, start, '+') end
return cjson.encode({values = values, entries = entries})
