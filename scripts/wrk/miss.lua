-- One store-month with fields=, a distinct query per request so that every
-- request misses the cache and goes to Postgres. Undeclared parameters are a
-- 400 and the cache key is the parsed parameters, so the buster is a real
-- filter that matches every row: maxTotalSales far above any total.
local n = 0
request = function()
  n = n + 1
  local store = math.random(1, 200)
  local month = math.random(1, 12)
  local path = string.format("/api/v2/sales?storeId=%d&year=2025&month=%d&fields=storeId,year,month,totalSales&maxTotalSales=1%09d%09d",
                             store, month, n, math.random(1, 1000000000))
  return wrk.format("GET", path)
end
