-- Reserve, then commit: each 201 from a reserve queues its id, and the thread's next request
-- commits the oldest queued id, so reserves and commits alternate and every decision counts
-- as one request. Reservation ids may be strings or numbers.
-- Environment: BENCH_LUA_DIR, BENCH_COMMIT_BODY, plus what common.lua reads.
COUNTERS = {"reserved", "committed", "failed"}
dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")

local commit_body = os.getenv("BENCH_COMMIT_BODY") or "{}"
local held, head, tail = {}, 1, 0
reserved, committed, failed = 0, 0, 0

function request()
  if head <= tail then
    local id = held[head]
    held[head] = nil
    head = head + 1
    return wrk.format(nil, "/api/v1/reservations/" .. id .. "/commit", nil, commit_body)
  end
  return wrk.format(nil, "/api/v1/reservations")
end

function response(status, headers, body)
  -- Only a reserve answers 201 and only a commit answers 200.
  if status == 201 then
    reserved = reserved + 1
    tail = tail + 1
    held[tail] = body:match('"id"%s*:%s*"([^"]+)"') or body:match('"id"%s*:%s*(%d+)')
  elseif status == 200 then
    committed = committed + 1
  else
    failed = failed + 1
  end
end
