-- A page of 200 full records, cache-busted (every request reads Postgres).
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", string.format("/api/v2/sales?limit=200&bust=%d-%d", n, math.random(1, 1000000000)))
end
