-- Shared by the bench scripts (loaded with dofile). Sets the request shape every scenario uses
-- (POST, JSON, bearer key) from the environment, collects each thread so that done() can sum
-- the threads' counters, and prints one line, `BENCH_JSON {...}`, that the harness parses.
-- Environment: BENCH_KEY (API key), BENCH_BODY (JSON body).

wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY") or "{}"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "none")

COUNTERS = COUNTERS or {}
THREADS = {}

function setup(thread)
  table.insert(THREADS, thread)
end

local function counters_json(extra)
  local parts = {}
  for name, value in pairs(extra or {}) do
    table.insert(parts, string.format('"%s":%d', name, value))
  end
  for _, name in ipairs(COUNTERS) do
    local total = 0
    for _, thread in ipairs(THREADS) do
      total = total + (thread:get(name) or 0)
    end
    table.insert(parts, string.format('"%s":%d', name, total))
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

-- The summary line from wrk's summary and the run's duration and percentiles, in µs;
-- `extra`, counters of the whole run by name, beside the threads' summed COUNTERS.
function bench_json(summary, duration_us, p50_us, p99_us, extra)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},"counters":%s}\n',
    summary.requests, duration_us, p50_us, p99_us,
    e.connect, e.read, e.write, e.status, e.timeout, counters_json(extra)))
end

function done(summary, latency, requests)
  bench_json(summary, summary.duration, latency:percentile(50), latency:percentile(99))
end
