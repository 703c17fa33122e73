-- One store-month with fields=, a distinct query string per request so that
-- every request misses the cache and goes to Postgres.
local n = 0
request = function()
  n = n + 1
  local store = math.random(1, 200)
  local month = math.random(1, 12)
  local path = string.format("/api/v2/sales?storeId=%d&year=2025&month=%d&fields=storeId,year,month,totalSales&bust=%d-%d",
                             store, month, n, math.random(1, 1000000000))
  return wrk.format("GET", path)
end
