-- One POST, the same each time: wrk sends its prebuilt request, the cheapest way to drive it.
-- Environment: BENCH_LUA_DIR plus what common.lua reads.
dofile(os.getenv("BENCH_LUA_DIR") .. "/common.lua")
