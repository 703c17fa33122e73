-- POST /api/v2/sales/batch: 50 store-months of 28 days each, alternating
-- between two values so every batch updates rows.
local bodies = {}
for v = 1, 2 do
  local recs = {}
  for i = 1, 50 do
    local days = {}
    for d = 1, 28 do
      days[#days + 1] = string.format('"%d":{"sales":%d,"customers":%d}', d, 1000 + v * 7 + d, 40 + v)
    end
    recs[#recs + 1] = string.format('{"storeId":%d,"year":2026,"month":%d,"dailyData":{%s}}',
                                    ((i - 1) % 200) + 1, ((i - 1) % 6) + 1, table.concat(days, ","))
  end
  bodies[v] = '{"mode":"replace","salesDataArray":[' .. table.concat(recs, ",") .. ']}'
end
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", "/api/v2/sales/batch", {["Content-Type"] = "application/json"}, bodies[(n % 2) + 1])
end
