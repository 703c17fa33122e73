//! Redis Cluster: the cache over three local `redis-server --cluster-enabled
//! yes` nodes joined by `redis-cli --cluster create`. Hits and misses, and tag
//! invalidation when the entry and its tags live in different slots (on
//! different nodes): an API write, a plain SQL UPDATE (through the relay),
//! a multi-store list, and an admin clear.

use sales_e2e::{eventually, month, relay_caught_up, user_token, Api, TestDb};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Cluster nodes on loopback, each in its own temporary directory; killed
/// and removed on drop.
struct RedisCluster {
    ports: Vec<u16>,
    dirs: Vec<PathBuf>,
    children: Vec<Option<Child>>,
    node_timeout_ms: u32,
}

/// A port `p` such that `p` and the cluster bus port `p + 10000` are both free
/// (chosen below the kernel's ephemeral range so outgoing connections do not
/// take them meanwhile).
fn cluster_port(taken: &[u16]) -> u16 {
    use rand::Rng;
    for _ in 0..1000 {
        let p: u16 = rand::thread_rng().gen_range(12000..22000);
        if taken.iter().any(|t| t.abs_diff(p) < 3) {
            continue;
        }
        let a = std::net::TcpListener::bind(("127.0.0.1", p));
        let b = std::net::TcpListener::bind(("127.0.0.1", p + 10000));
        if a.is_ok() && b.is_ok() {
            return p;
        }
    }
    panic!("no free port pair for a cluster node");
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits (bounded) until `what` holds.
fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl RedisCluster {
    /// `masters` primaries and `replicas` replicas of each.
    fn start(masters: usize, replicas: usize) -> Self {
        let mut c = RedisCluster {
            ports: Vec::new(),
            dirs: Vec::new(),
            children: Vec::new(),
            // Short with replicas, so that one takes over quickly.
            node_timeout_ms: if replicas > 0 { 2000 } else { 5000 },
        };
        for _ in 0..masters * (1 + replicas) {
            let port = cluster_port(&c.ports);
            let dir = std::env::temp_dir()
                .join(format!("pgs_rcluster_{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&dir).unwrap();
            c.ports.push(port);
            c.dirs.push(dir);
            c.children.push(None);
            c.spawn(c.ports.len() - 1);
        }
        let nodes: Vec<String> = c.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        c.wait_ok(&(0..c.ports.len()).collect::<Vec<_>>());
        // Replicas synchronised (one that never was may not take over).
        for &p in &c.ports {
            wait_for(&format!("replica {p} never synchronised"), 30, || {
                let r = redis_cli(p, &["info", "replication"]);
                r.contains("role:master") || r.contains("master_link_status:up")
            });
        }
        c
    }

    /// Starts node `i` (again: with its directory, so its cluster
    /// configuration and any snapshot saved there) and waits for it.
    fn spawn(&mut self, i: usize) {
        let (port, dir) = (self.ports[i], &self.dirs[i]);
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes", "--cluster-config-file"])
            .arg(dir.join("nodes.conf"))
            .args([
                "--cluster-node-timeout",
                &self.node_timeout_ms.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.children[i] = Some(child);
        wait_for(&format!("cluster node {port} did not start"), 10, || {
            redis_cli(port, &["ping"]).trim() == "PONG"
        });
    }

    /// Kills node `i` at once (no shutdown save).
    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until each of `nodes` says the cluster is whole.
    fn wait_ok(&self, nodes: &[usize]) {
        for &i in nodes {
            let p = self.ports[i];
            wait_for(&format!("cluster_state never became ok on {p}"), 30, || {
                redis_cli(p, &["cluster", "info"]).contains("cluster_state:ok")
            });
        }
    }

    /// The node (index) serving `key`'s slot: the one that does not answer
    /// MOVED.
    fn owner(&self, key: &str) -> usize {
        self.serving(key)
            .unwrap_or_else(|| panic!("no node serves {key}"))
    }

    fn serving(&self, key: &str) -> Option<usize> {
        (0..self.ports.len()).find(|&i| {
            self.children[i].is_some() && {
                let r = redis_cli(self.ports[i], &["exists", key]);
                matches!(r.trim(), "0" | "1")
            }
        })
    }

    fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The keys each node holds under `prefix`.
    fn keys_by_node(&self, prefix: &str) -> Vec<Vec<String>> {
        self.ports
            .iter()
            .map(|&p| {
                redis_cli(p, &["--scan", "--pattern", &format!("{prefix}:*")])
                    .lines()
                    .map(str::to_string)
                    .filter(|l| !l.is_empty())
                    .collect()
            })
            .collect()
    }

    /// The value of `key`, from the node that holds its slot.
    fn get(&self, key: &str) -> Option<String> {
        self.ports.iter().find_map(|&p| {
            let v = redis_cli(p, &["get", key]);
            let v = v.trim();
            (!v.is_empty() && !v.starts_with("MOVED")).then(|| v.to_string())
        })
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

async fn stats(admin: &Api) -> Value {
    let (st, body) = admin.get("/api/admin/cache/stats").await;
    assert_eq!(st, 200, "{body}");
    body
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"))
}

/// GETs `path` and says whether it was a hit, with the body.
async fn probe(admin: &Api, path: &str) -> (bool, Value) {
    let before = stats(admin).await;
    let (st, body) = admin.get(path).await;
    assert_eq!(st, 200, "{path}: {body}");
    let after = stats(admin).await;
    let hit = n(&after, "hits") > n(&before, "hits");
    assert_ne!(
        hit,
        n(&after, "misses") > n(&before, "misses"),
        "exactly one of hit or miss"
    );
    (hit, body)
}

fn total_of(body: &Value, store: i64) -> f64 {
    body["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter(|r| r["storeId"].as_i64() == Some(store))
        .map(|r| r["totalSales"].as_f64().unwrap())
        .sum()
}

/// The cluster test's settings: entries outlive every wait of the test, so
/// a value read fresh was invalidated, not expired.
const LONG_LIVED: [(&str, &str); 3] = [
    ("REDIS_TIMEOUT", "1s"),
    ("CACHE_TTL", "300"),
    ("CACHE_L1_TTL", "300"),
];

#[tokio::test]
async fn cache_over_redis_cluster_invalidates_across_slots() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3, 0))
        .await
        .unwrap();
    let db = TestDb::new().await;
    let stores = db.stores(3).await;
    let (a, b, c) = (stores[0], stores[1], stores[2]);
    let mut cfg = db.config(&LONG_LIVED);
    cfg.redis_url = None;
    cfg.redis_cluster_urls = cluster.urls();
    let server = sales_server::Server::bind(cfg).await.expect("bind").spawn();
    let (_, token) = user_token(&db, &server, "admin@example.com", "admin", &[]).await;
    let admin = Api::new(&server, Some(&token));

    let st = stats(&admin).await;
    assert_eq!(st["backend"], "redis-cluster", "{st}");
    // An instance waits up to 2 s for Redis as it starts, then starts
    // degraded and recovers once every primary answers (on a busy machine,
    // with the 1 s timeout here, that can take longer).
    sales_e2e::eventually(
        std::time::Duration::from_secs(30),
        "the cluster cache healthy",
        || async {
            let (_, health) = Api::new(&server, None).get("/health").await;
            (stats(&admin).await["healthy"] == true && health["status"] == "ok").then_some(())
        },
    )
    .await;

    let recs: Vec<Value> = stores
        .iter()
        .flat_map(|&s| (1..=3).map(move |m| month(s, 2024, m, 28, s as f64)))
        .collect();
    let (st, body) = admin
        .post("/api/v2/sales/batch", &json!({"salesDataArray": recs}))
        .await;
    assert_eq!(st, 200, "{body}");
    relay_caught_up(&db, &server).await;

    // Entries with different tags: one store-month, another month of the
    // same store, another store's month, a two-store list (two tags) and a
    // cross-store list (sales:all).
    let a2 = format!("/api/v2/sales?storeId={a}&year=2024&month=2&fields=storeId,totalSales");
    let a3 = format!("/api/v2/sales?storeId={a}&year=2024&month=3&fields=storeId,totalSales");
    let b2 = format!("/api/v2/sales?storeId={b}&year=2024&month=2&fields=storeId,totalSales");
    let ab = format!(
        "/api/v2/sales?storeId={a},{b}&year=2024&month=2&fields=storeId,totalSales&limit=200"
    );
    let all = "/api/v2/sales?year=2024&month=2&fields=storeId,totalSales&limit=200".to_string();
    let summary = "/api/v2/sales/summary?groupBy=store".to_string();
    for p in [&a2, &a3, &b2, &ab, &all, &summary] {
        let (hit, _) = probe(&admin, p).await;
        assert!(!hit, "first read of {p} is a miss");
        // The relay may still be applying the batch's invalidation.
        sales_e2e::warm(&admin, p).await;
        let (hit, _) = probe(&admin, p).await;
        assert!(hit, "a read of {p} after it was warm is a hit");
    }
    let (_, body) = probe(&admin, &a2).await;
    assert_eq!(total_of(&body, a), 28.0 * a as f64);

    // Entries and tag counters are spread over the nodes (different slots).
    let keys = cluster.keys_by_node(&db.name);
    let used = keys.iter().filter(|k| !k.is_empty()).count();
    assert!(used >= 2, "keys on one node only: {keys:?}");

    // An API write to store A, month 2.
    let (st, body) = admin
        .post("/api/v2/sales/batch", &json!({"salesDataArray": [{"storeId": a, "year": 2024, "month": 2, "dailyData": {"1": {"sales": 1000}}}]}))
        .await;
    assert_eq!(st, 200, "{body}");
    let want = 27.0 * a as f64 + 1000.0;
    // The writer reads its own write at once from every entry that depends on it.
    for p in [&a2, &ab, &all] {
        let (hit, body) = probe(&admin, p).await;
        assert!(!hit, "{p} was invalidated by the write");
        assert_eq!(total_of(&body, a), want, "{p}: {body}");
    }
    let (hit, body) = probe(&admin, &summary).await;
    assert!(!hit, "summary invalidated");
    let row = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"].as_str().and_then(|k| k.parse::<i64>().ok()) == Some(a))
        .cloned()
        .unwrap();
    assert_eq!(
        row["totalSales"].as_f64().unwrap(),
        want + 2.0 * 28.0 * a as f64,
        "{row}"
    );
    // Unrelated entries survive (also the relay's own bump for the write).
    relay_caught_up(&db, &server).await;
    for p in [&a3, &b2] {
        let (hit, _) = probe(&admin, p).await;
        assert!(hit, "{p} survives a write to store {a} month 2");
    }
    // The counters the write bumped live in different slots.
    let t_month = format!("{}:t:store:{a}:2024-02", db.name);
    let t_store = format!("{}:t:store:{a}", db.name);
    let t_all = format!("{}:t:sales:all", db.name);
    for t in [&t_month, &t_store, &t_all] {
        let v: u64 = cluster
            .get(t)
            .unwrap_or_else(|| panic!("{t} missing"))
            .parse()
            .unwrap();
        assert!(v >= 1, "{t} = {v}");
    }
    let slots: std::collections::BTreeSet<String> = [&t_month, &t_store, &t_all]
        .iter()
        .map(|t| {
            redis_cli(cluster.ports[0], &["cluster", "keyslot", t])
                .trim()
                .to_string()
        })
        .collect();
    assert_eq!(slots.len(), 3, "three different slots: {slots:?}");

    // A plain SQL UPDATE of store B month 2: the relay invalidates.
    sqlx::query("UPDATE sales.monthly_sales SET daily_data = '{\"1\": {\"sales\": 7}}' WHERE store_id = $1 AND year = 2024 AND month = 2")
        .bind(b)
        .execute(&db.pool)
        .await
        .unwrap();
    for p in [&b2, &ab, &all] {
        eventually(
            Duration::from_secs(30),
            "fresh value after a SQL update",
            || async {
                let (_, body) = admin.get(p).await;
                (total_of(&body, b) == 7.0).then_some(())
            },
        )
        .await;
    }
    relay_caught_up(&db, &server).await;
    admin.get(&b2).await;
    let (hit, body) = probe(&admin, &b2).await;
    assert!(hit, "the fresh value is cached again");
    assert_eq!(total_of(&body, b), 7.0);
    let (_, body) = probe(&admin, &all).await;
    assert_eq!(total_of(&body, a), want, "store {a} unchanged");
    assert_eq!(total_of(&body, c), 28.0 * c as f64, "store {c} unchanged");

    // A second instance shares the cluster cache and its invalidations.
    let mut cfg = db.config(&LONG_LIVED);
    cfg.redis_url = None;
    cfg.redis_cluster_urls = cluster.urls();
    let two = sales_server::Server::bind(cfg).await.expect("bind").spawn();
    let admin2 = Api::new(&two, Some(&token));
    relay_caught_up(&db, &two).await;
    let (hit, body) = probe(&admin2, &a3).await;
    assert!(hit, "instance two hits what instance one stored: {body}");
    let (st, _) = admin2
        .post("/api/v2/sales/batch", &json!({"mode": "replace", "salesDataArray": [{"storeId": a, "year": 2024, "month": 3, "dailyData": {"1": {"sales": 5}}}]}))
        .await;
    assert_eq!(st, 200);
    eventually(
        Duration::from_secs(30),
        "instance one sees instance two's write",
        || async {
            let (_, body) = admin.get(&a3).await;
            (total_of(&body, a) == 5.0).then_some(())
        },
    )
    .await;

    // Admin clear: everything misses once.
    let (st, body) = admin.post("/api/admin/cache/clear", &json!({})).await;
    assert_eq!(st, 200, "{body}");
    for p in [&a2, &b2, &all] {
        let (hit, _) = probe(&admin, p).await;
        assert!(!hit, "{p} misses after clear");
    }
    let st = stats(&admin).await;
    assert_eq!(n(&st, "errors"), 0, "no cluster errors: {st}");
    two.stop().await;
    server.stop().await;
    drop(cluster);
}

/// A server on `cluster` with entries kept long (a stale one would stay),
/// every read going to Redis (none answered from the in-process first
/// level, which serves what it verified for `CACHE_L1_TTL`).
async fn cluster_server(db: &TestDb, cluster: &RedisCluster) -> sales_server::RunningServer {
    let mut cfg = db.config(&[
        ("REDIS_TIMEOUT", "1s"),
        ("CACHE_TTL", "600s"),
        ("CACHE_L1_TTL", "0"),
    ]);
    cfg.redis_url = None;
    cfg.redis_cluster_urls = cluster.urls();
    sales_server::Server::bind(cfg).await.expect("bind").spawn()
}

/// On `server`: a store with one month written (28 days of 10, through the
/// API, the relay caught up) and that month's list read and cached. The
/// admin's client, the store and the list's path.
async fn cached_month(db: &TestDb, server: &sales_server::RunningServer) -> (Api, i64, String) {
    let s = db.stores(1).await[0];
    let (_, token) = user_token(db, server, "admin@example.com", "admin", &[]).await;
    let admin = Api::new(server, Some(&token));
    let (st, body) = admin
        .post(
            "/api/v2/sales/batch",
            &json!({"salesDataArray": [month(s, 2024, 1, 28, 10.0)]}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    relay_caught_up(db, server).await;
    let path = format!("/api/v2/sales?storeId={s}&year=2024&month=1&fields=storeId,totalSales");
    sales_e2e::warm(&admin, &path).await;
    (admin, s, path)
}

/// A node that restarts from a snapshot taken before an invalidation has
/// that tag counter's older value again: the entry cached before it would
/// match it and be served (for as long as it lives). Each primary's
/// `run_id` is watched, as a single Redis's is: a restarted one makes every
/// entry stale.
#[tokio::test]
async fn a_node_restarted_from_an_older_snapshot_leaves_nothing_stale() {
    let mut cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3, 0))
        .await
        .unwrap();
    let db = TestDb::new().await;
    let server = cluster_server(&db, &cluster).await;
    let (admin, s, path) = cached_month(&db, &server).await;
    assert_eq!(total_of(&admin.get(&path).await.1, s), 280.0);

    let tag = format!("{}:t:store:{s}:2024-01", db.name);
    let node = cluster.owner(&tag);
    let saved = cluster.get(&tag).expect("the tag's counter");
    assert_eq!(redis_cli(cluster.ports[node], &["save"]).trim(), "OK");
    // Changed by plain SQL: the relay bumps the tag (not read since).
    sqlx::query(
        "UPDATE sales.monthly_sales SET daily_data = '{\"1\": {\"sales\": 7}}' WHERE store_id = $1",
    )
    .bind(s)
    .execute(&db.pool)
    .await
    .unwrap();
    eventually(Duration::from_secs(10), "the relay's bump", || async {
        (cluster.get(&tag).as_deref() != Some(saved.as_str())).then_some(())
    })
    .await;

    let cluster = tokio::task::spawn_blocking(move || {
        cluster.kill(node);
        cluster.spawn(node);
        cluster.wait_ok(&[0, 1, 2]);
        cluster
    })
    .await
    .unwrap();
    assert_eq!(
        cluster.get(&tag).as_deref(),
        Some(saved.as_str()),
        "the node came back with the snapshot's counter"
    );
    // Never the old value (the node is not used again before its restart
    // is handled), and the cache serves again: the new value from it.
    // (Reliable, not only likely: a restarted primary answers CLUSTERDOWN
    // for its first seconds, so the probe finds the cluster not whole, and
    // no read uses it, before it sees the new run_id.)
    eventually(
        Duration::from_secs(20),
        "a hit of the value written",
        || async {
            let r = admin.req(reqwest::Method::GET, &path).send().await.ok()?;
            assert_eq!(r.status(), 200);
            let hit = r.headers().get("x-cache").is_some_and(|v| v == "hit");
            let body: Value = r.json().await.ok()?;
            assert_eq!(total_of(&body, s), 7.0, "hit {hit}: {body}");
            hit.then_some(())
        },
    )
    .await;
    server.stop().await;
}

/// A primary killed: its replica takes over, and the instance's cache
/// comes back (its connection made again when the cluster stays not
/// wholly reachable through it), with what was cached before made stale.
#[tokio::test]
async fn a_replica_taking_over_brings_the_cache_back() {
    let mut cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3, 1))
        .await
        .unwrap();
    let db = TestDb::new().await;
    let server = cluster_server(&db, &cluster).await;
    let (admin, s, path) = cached_month(&db, &server).await;
    let anon = Api::new(&server, None);

    // Changed by hand with no event (nothing invalidates it): only a
    // replaced primary, which may have lost the newest bumps, makes every
    // entry stale.
    sqlx::raw_sql(&format!(
        "BEGIN; SET LOCAL session_replication_role = replica;
         UPDATE sales.monthly_sales SET daily_data = '{{\"1\": {{\"sales\": 9}}}}', total_sales = 9
         WHERE store_id = {s};
         COMMIT;"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    // The primary of the entry's tag goes away.
    let tag = format!("{}:t:store:{s}:2024-01", db.name);
    let node = cluster.owner(&tag);
    let others: Vec<usize> = (0..cluster.ports.len()).filter(|&i| i != node).collect();
    let key = tag.clone();
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.kill(node);
        wait_for("a replica took over", 30, || {
            cluster.serving(&key).is_some()
        });
        cluster.wait_ok(&others);
        cluster
    })
    .await
    .unwrap();
    assert_ne!(cluster.owner(&tag), node, "a replica took over");
    // Reads answer all along, never the entry cached before, and hit the
    // cache again.
    eventually(Duration::from_secs(30), "cache hits again", || async {
        let r = admin.req(reqwest::Method::GET, &path).send().await.ok()?;
        assert_eq!(r.status(), 200);
        let hit = r.headers().get("x-cache").is_some_and(|v| v == "hit");
        let body: Value = r.json().await.ok()?;
        assert_eq!(total_of(&body, s), 9.0, "hit {hit}: {body}");
        hit.then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "health ok again", || async {
        let (_, health) = anon.get("/health").await;
        (health["status"] == "ok").then_some(())
    })
    .await;
    server.stop().await;
    drop(cluster);
}
