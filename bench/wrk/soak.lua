-- Soak mix: every reserve is followed by its commit, its release or nothing (the lease is left
-- to expire), in turn. A granted reserve (201) queues the follow-up, which the thread's next
-- request sends; a commit and a release both answer 200 and say which in their `status`.
-- Counts answers by status class, and what the driver asked for, to compare with the ledger.
-- Environment: BENCH_LUA_DIR, BENCH_COMMIT_BODY, plus what common.lua reads.
COUNTERS = {"reserved", "committed", "released", "abandoned", "s2xx", "s4xx", "s5xx", "other"}
dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")

local commit_body = os.getenv("BENCH_COMMIT_BODY") or "{}"
local queue, head, tail = {}, 1, 0
reserved, committed, released, abandoned = 0, 0, 0, 0
s2xx, s4xx, s5xx, other = 0, 0, 0, 0

function request()
  if head <= tail then
    local item = queue[head]
    queue[head] = nil
    head = head + 1
    local path = "/api/v1/reservations/" .. item.id .. "/" .. item.action
    if item.action == "commit" then return wrk.format(nil, path, nil, commit_body) end
    return wrk.format(nil, path, nil, "{}")
  end
  return wrk.format(nil, "/api/v1/reservations")
end

local function follow(body)
  reserved = reserved + 1
  local id = body:match('"id"%s*:%s*"([^"]+)"')
  local turn = reserved % 3
  if turn == 2 or not id then
    abandoned = abandoned + 1
    return
  end
  tail = tail + 1
  queue[tail] = {id = id, action = turn == 0 and "commit" or "release"}
end

function response(status, headers, body)
  if status == 201 then
    follow(body)
  elseif status == 200 then
    local state = body:match('"status"%s*:%s*"(%a+)"')
    if state == "committed" then committed = committed + 1 end
    if state == "released" then released = released + 1 end
  end
  if status >= 200 and status < 300 then s2xx = s2xx + 1
  elseif status >= 400 and status < 500 then s4xx = s4xx + 1
  elseif status >= 500 then s5xx = s5xx + 1
  else other = other + 1 end
end
