-- A page of 200 full records, cache-busted (every request reads Postgres)
-- with a filter that matches every row (see miss.lua).
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", string.format("/api/v2/sales?limit=200&maxTotalSales=1%09d%09d", n, math.random(1, 1000000000)))
end
