-- POST /api/v2/sales/batch: 50 store-months of 28 days each. Eight bodies:
-- four disjoint groups of 50 stores, two values each, so that every batch
-- updates rows and concurrent batches mostly touch different rows.
local bodies = {}
for b = 1, 8 do
  local v = (b % 2) + 1
  local group = math.floor((b - 1) / 2)
  local recs = {}
  for i = 1, 50 do
    local days = {}
    for d = 1, 28 do
      days[#days + 1] = string.format('"%d":{"sales":%d,"customers":%d}', d, 1000 + v * 7 + d, 40 + v)
    end
    recs[#recs + 1] = string.format('{"storeId":%d,"year":2026,"month":%d,"dailyData":{%s}}',
                                    group * 50 + i, ((i - 1) % 6) + 1, table.concat(days, ","))
  end
  bodies[b] = '{"mode":"replace","salesDataArray":[' .. table.concat(recs, ",") .. ']}'
end
local n = 0
request = function()
  n = n + 1
  -- Passing a header table replaces wrk.headers (the -H Authorization): merge.
  local h = {}
  for k, v in pairs(wrk.headers) do h[k] = v end
  h["Content-Type"] = "application/json"
  return wrk.format("POST", "/api/v2/sales/batch", h, bodies[(n % 8) + 1])
end
