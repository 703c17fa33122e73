#!/usr/bin/env python3
"""POST /api/v2/sales/batch by records per call (1, 10, 100, 1,000 months of
28 days), inserting new store-months and then updating the same ones, each
call timed from sending the body to the last byte of the answer, beside the
time the server itself spent in the call's statement
(`sales.batch_upsert_impl(sales.parse_json(body), ...)`, read from its
/metrics), the floor a call cannot go below.

    bench_api_batch.py URL TOKEN DATABASE [--calls N]

Prints a table (median of N calls per cell, N at most 15: each call takes a
year of its own from 2040 on) and the target line for 1,000 records
(<= 50 ms).
"""

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import time
import urllib.parse

SIZES = [1, 10, 100, 1000]
STORES = 200  # the bench database's stores (scripts/bench_common.sh)


def body(keys, value):
    recs = []
    for store, year, month in keys:
        days = {
            str(d): {"sales": 1000 + value * 7 + d, "customers": 40 + value, "transactions": 30 + d}
            for d in range(1, 29)
        }
        recs.append({"storeId": store, "year": year, "month": month, "dailyData": days})
    return json.dumps({"mode": "replace", "salesDataArray": recs, "atomic": True}).encode()


def keys_for(year, n):
    """n store-months of one year: consecutive (store, month) slots."""
    return [((i % STORES) + 1, year, (i // STORES) % 12 + 1) for i in range(n)]


def post(conn, path, token, data):
    started = time.perf_counter()
    conn.request(
        "POST",
        path,
        body=data,
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
        },
    )
    r = conn.getresponse()
    answer = r.read()
    elapsed = time.perf_counter() - started
    if r.status != 200:
        raise SystemExit(f"POST {path}: {r.status} {answer[:300]!r}")
    return elapsed, json.loads(answer)


def psql(database, script):
    env = dict(os.environ, PGPASSWORD="pg_sales_dev")
    return subprocess.run(
        ["psql", "-X", "-q", "-h", "127.0.0.1", "-U", "sales_app", "-d", database, "-At"],
        input=script,
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout


def statement_seconds(conn):
    """The server's own total time in the batch statement so far (its
    `db_query_duration_seconds` for `batch_upsert`, from /metrics)."""
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    m = re.search(r'^db_query_duration_seconds_sum\{statement="batch_upsert"\} ([0-9.e+-]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("token")
    ap.add_argument("database")
    ap.add_argument("--calls", type=int, default=5)
    a = ap.parse_args()
    if not 1 <= a.calls <= 15:
        ap.error("--calls: 1 to 15")
    u = urllib.parse.urlparse(a.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    # Each call inserts into a year of its own (2040 to 2099 at 15 calls),
    # emptied first; the warm-up writes 2039.
    psql(a.database, "DELETE FROM sales.monthly_sales WHERE year >= 2039;\n")
    year = 2040
    # Warm-up, not counted: the first calls on a server's connections plan
    # the statements afresh.
    for v in range(10):
        post(conn, "/api/v2/sales/batch", a.token, body(keys_for(2039, 1), v))
    print(f"== POST /api/v2/sales/batch by records per call (28 days each; median of {a.calls} calls)")
    print(
        f"{'records':>8} {'insert ms':>10} {'update ms':>10} {'statement ms':>13} "
        f"{'statement/API':>11} {'us/record (update)':>19}"
    )
    result = {}
    for n in SIZES:
        inserts, updates, floors = [], [], []
        for c in range(a.calls):
            keys = keys_for(year, n)
            year += 1
            t, out = post(conn, "/api/v2/sales/batch", a.token, body(keys, 1))
            assert out.get("inserted") == n, out
            inserts.append(t)
            before = statement_seconds(conn)
            t, out = post(conn, "/api/v2/sales/batch", a.token, body(keys, 2))
            assert out.get("updated") == n, out
            updates.append(t)
            floors.append(statement_seconds(conn) - before)
        ins, upd, flo = (statistics.median(x) * 1000 for x in (inserts, updates, floors))
        result[n] = (ins, upd, flo)
        print(f"{n:>8} {ins:>10.1f} {upd:>10.1f} {flo:>13.1f} {flo / upd:>11.2f} {upd * 1000 / n:>19.0f}")
    ins, upd, flo = result[1000]
    print()
    print(
        f"1,000 records through the API: insert {ins:.1f} ms, update {upd:.1f} ms "
        f"(target <= 50 ms); the update's statement alone {flo:.1f} ms"
    )


if __name__ == "__main__":
    main()
