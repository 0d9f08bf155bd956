-- Open-loop load at a fixed rate, wrk2's method in wrk's Lua (wrk2 is not in Debian).
--
-- Run with one connection per thread (wrk -tN -cN): each thread's Lua state then belongs to
-- one connection, which sends on a schedule of its own, every Nth instant of one schedule at
-- BENCH_RATE requests/s. A latency counts from the instant its request was due, so a server
-- that stalls shows in the tail instead of slowing the generator down (no coordinated
-- omission): a connection still waiting for an answer when its next request falls due sends
-- it late, and that lateness is counted. wrk's timers tick in whole milliseconds, so a request
-- may leave up to 2 ms early; its latency then counts from when it left. wrk opens a
-- connection before its request falls due; the server hands it to a worker only once the
-- request has arrived (TCP_DEFER_ACCEPT, config/gunicorn.py), so that no sync worker sits idle
-- on it meanwhile. `due` in the summary: the requests due by the end; those never sent or
-- answered by then are not in the percentiles.
-- Environment: BENCH_LUA_DIR, BENCH_RATE, BENCH_THREADS, plus what common.lua reads.
dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock, bench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local clock = ffi.new("bench_timespec")

local function now_us()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, clock)
  return tonumber(clock.tv_sec) * 1000000 + tonumber(clock.tv_nsec) / 1000
end

local RATE = tonumber(os.getenv("BENCH_RATE"))
local THREAD_COUNT = tonumber(os.getenv("BENCH_THREADS"))
-- The first instant due, 100 ms on so that every thread has started; the threads' own Lua
-- states learn it (and their place in the schedule) in setup().
local START_US = now_us() + 100000

local common_setup = setup
function setup(thread)
  common_setup(thread)
  thread:set("start_us", START_US)
  thread:set("offset", #THREADS - 1)
end

-- Per thread, that is per connection: its next instant, and the latencies it measured.
local due_us, sent_us, next_slot = 0, 0, 0
latencies, answered = {}, 0

function delay()
  due_us = start_us + (next_slot * THREAD_COUNT + offset) * 1000000 / RATE
  next_slot = next_slot + 1
  local wait_ms = (due_us - now_us()) / 1000
  return wait_ms > 0 and math.floor(wait_ms) or 0
end

function request()
  sent_us = now_us()
  return wrk.format()
end

function response(status, headers, body)
  answered = answered + 1
  latencies[answered] = now_us() - math.min(sent_us, due_us)
end

function done(summary, latency, requests)
  local all = {}
  for _, thread in ipairs(THREADS) do
    for _, value in ipairs(thread:get("latencies")) do
      all[#all + 1] = value
    end
  end
  table.sort(all)
  local function percentile(q)
    return #all > 0 and all[math.min(#all, math.floor(q * #all) + 1)] or 0
  end
  local elapsed_us = now_us() - START_US
  local due = math.floor(elapsed_us * RATE / 1000000)
  bench_json(summary, elapsed_us, percentile(0.50), percentile(0.99), {due = due})
end
