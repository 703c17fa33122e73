-- A page of 200 full records, cache-busted (every request reads Postgres)
-- with a filter that matches every row; the buster carries the thread's
-- number and the run's start time (see miss.lua: wrk's threads draw the
-- same random numbers).
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("thread_no", threads)
end

local n = 0
local run = 0
function init(args)
  run = os.time() % 100000
end

request = function()
  n = n + 1
  return wrk.format("GET", string.format("/api/v2/sales?limit=200&maxTotalSales=1%05d%02d%09d", run, thread_no, n))
end
