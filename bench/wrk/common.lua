-- Shared by the bench scripts (loaded with dofile). Sets the request shape every scenario uses
-- (POST, JSON, bearer key) from the environment, collects each thread so that done() can sum
-- the threads' counters, and prints one line, `BENCH_JSON {...}`, that the harness parses.
-- Environment: BENCH_KEY (API key), BENCH_BODY (JSON body).

wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY") or "{}"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "none")

COUNTERS = COUNTERS or {}
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

local function counters_json()
  local parts = {}
  for _, name in ipairs(COUNTERS) do
    local total = 0
    for _, thread in ipairs(threads) do
      total = total + (thread:get(name) or 0)
    end
    table.insert(parts, string.format('"%s":%d', name, total))
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},"counters":%s}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout, counters_json()))
end
