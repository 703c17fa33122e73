-- One store-month with fields=, a distinct query per request so that every
-- request misses the cache and goes to Postgres. Undeclared parameters are a
-- 400 and the cache key is the parsed parameters, so the buster is a real
-- filter that matches every row: maxTotalSales far above any total. It
-- counts per wrk thread and carries the thread's number and the run's start
-- time: wrk's threads (and successive runs) draw the same random numbers,
-- and a buster from those alone would repeat, making some requests hits.
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("thread_no", threads)
end

local n = 0
local run = 0
function init(args)
  run = os.time() % 100000
  math.randomseed(run * 16 + thread_no)
end

request = function()
  n = n + 1
  local store = math.random(1, 200)
  local month = math.random(1, 12)
  local path = string.format("/api/v2/sales?storeId=%d&year=2025&month=%d&fields=storeId,year,month,totalSales&maxTotalSales=1%05d%02d%09d",
                             store, month, run, thread_no, n)
  return wrk.format("GET", path)
end
