//! Test harness: every test gets its own database (with the extension and all
//! migrations) on the real Postgres cluster, its own Redis key prefix, and,
//! when it needs one, its own server on a free port.

pub mod bare_db;
pub mod private_pg;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor};
use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

pub use sales_server::config::Config;
pub use sales_server::RunningServer;

/// The cluster the tests use (same as `make test` sets up).
pub fn base_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| sales_server::config::DEFAULT_DATABASE_URL.to_string())
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

pub const TEST_JWT_SECRET: &str = "test-secret-test-secret-test-secret-0123456789";

/// Path of the server binary built by `make test` (debug profile).
pub fn server_bin() -> std::path::PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug/sales-server")
}

/// A database of its own, dropped when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    /// Creates `pgs_test_<random>`, installs the extension and runs migrations.
    pub async fn new() -> Self {
        let name = format!("pgs_test_{}", uuid::Uuid::new_v4().simple());
        let base = PgConnectOptions::from_str(&base_url()).expect("DATABASE_URL");
        let mut admin = base
            .clone()
            .database("postgres")
            .connect()
            .await
            .expect("connect to postgres db");
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create test database");
        admin.close().await.ok();
        let opts = base.database(&name);
        let url = format!("{}", opts.to_url_lossy());
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .connect_with(opts)
            .await
            .expect("connect to test database");
        sales_server::db::migrate(&pool).await.expect("migrations");
        Self { name, url, pool }
    }

    /// A fresh single connection (for LISTEN, or for holding a transaction open).
    pub async fn connect(&self) -> sqlx::PgConnection {
        sqlx::PgConnection::connect(&self.url)
            .await
            .expect("connect")
    }

    /// Inserts `n` stores (codes T001..), returning their ids.
    pub async fn stores(&self, n: usize) -> Vec<i64> {
        let codes: Vec<String> = (1..=n).map(|i| format!("T{i:03}")).collect();
        let regions: Vec<String> = (0..n)
            .map(|i| ["North", "South", "East"][i % 3].to_string())
            .collect();
        sqlx::query_scalar(
            "INSERT INTO sales.stores (code, name, region)
             SELECT c, 'Store ' || c, r FROM unnest($1::text[], $2::text[]) AS t(c, r) RETURNING id",
        )
        .bind(&codes)
        .bind(&regions)
        .fetch_all(&self.pool)
        .await
        .expect("insert stores")
    }

    /// Server configuration pointing at this database, with `overrides`.
    pub fn config(&self, overrides: &[(&str, &str)]) -> Config {
        let mut vars: HashMap<String, String> = HashMap::new();
        vars.insert("DATABASE_URL".into(), self.url.clone());
        vars.insert("PORT".into(), "0".into());
        vars.insert("JWT_SECRET".into(), TEST_JWT_SECRET.into());
        vars.insert("REDIS_URL".into(), redis_url());
        vars.insert("CACHE_PREFIX".into(), self.name.clone());
        vars.insert("DB_POOL_MAX".into(), "8".into());
        vars.insert("DB_POOL_MIN".into(), "0".into());
        vars.insert("LOG_LEVEL".into(), "warn".into());
        for (k, v) in overrides {
            vars.insert(k.to_string(), v.to_string());
        }
        Config::from_map(&vars).expect("test configuration")
    }

    /// Starts an in-process server on a free port.
    pub async fn server(&self, overrides: &[(&str, &str)]) -> RunningServer {
        sales_server::Server::bind(self.config(overrides))
            .await
            .expect("server bind")
            .spawn()
    }

    /// Environment for running the server binary against this database.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("DATABASE_URL".into(), self.url.clone()),
            ("JWT_SECRET".into(), TEST_JWT_SECRET.into()),
            ("REDIS_URL".into(), redis_url()),
            ("CACHE_PREFIX".into(), self.name.clone()),
            ("LOG_LEVEL".into(), "warn".into()),
        ]
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Async drop is not available; a short-lived runtime on its own thread
        // removes the database so runs do not pile up.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async move {
                    if let Ok(opts) = PgConnectOptions::from_str(&base_url()) {
                        if let Ok(mut c) = opts.database("postgres").connect().await {
                            let _ = c
                                .execute(
                                    format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str(),
                                )
                                .await;
                        }
                    }
                });
            }
        })
        .join();
    }
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The SQLSTATE of a database error, if it is one.
pub fn sqlstate(e: &sqlx::Error) -> Option<String> {
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.to_string())
}

/// Creates (or updates) a user and returns (user id, bearer token).
pub async fn user_token(
    db: &TestDb,
    server: &RunningServer,
    email: &str,
    role: &str,
    stores: &[i64],
) -> (i64, String) {
    let (id, _) = sales_server::users::upsert_user(&db.pool, email, role, stores, "password-123")
        .await
        .expect("create user");
    let role = sales_server::auth::Role::parse(role).expect("role");
    let (token, _) = server
        .state
        .auth
        .issue(id, email, role, stores.to_vec())
        .expect("token");
    (id, token)
}

/// A small HTTP client for one server and one token.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub token: Option<String>,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(server: &RunningServer, token: Option<&str>) -> Self {
        Self {
            base: format!("http://{}", server.addr),
            token: token.map(str::to_string),
            http: reqwest::Client::builder()
                .no_gzip()
                .no_brotli()
                .no_zstd()
                .build()
                .expect("client"),
        }
    }

    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{}", self.base, path));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self
            .req(reqwest::Method::GET, path)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        assert!(status < 500, "GET {path} answered {status}");
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let r = self
            .req(method.clone(), path)
            .json(body)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        assert!(status < 500, "{method} {path} answered {status}");
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub async fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        self.send_json(reqwest::Method::POST, path, body).await
    }
}

/// A month of daily data with `days` days of `sales` each.
pub fn month(store: i64, year: i32, month: i32, days: u32, sales: f64) -> serde_json::Value {
    let daily: serde_json::Map<String, serde_json::Value> = (1..=days)
        .map(|d| {
            (
                d.to_string(),
                serde_json::json!({"sales": sales, "customers": 10}),
            )
        })
        .collect();
    serde_json::json!({"storeId": store, "year": year, "month": month, "dailyData": daily})
}

/// A streaming replica of the test cluster, made with pg_basebackup into a
/// temporary directory and started on a free port; stopped and removed on drop.
pub struct PgReplica {
    pub port: u16,
    pub dir: std::path::PathBuf,
}

impl PgReplica {
    pub fn start() -> Self {
        let port = free_port();
        let dir = std::path::PathBuf::from(format!(
            "/tmp/pgs_replica_{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.to_string_lossy().to_string();
        let sh = |cmd: &str| {
            let out = std::process::Command::new("bash")
                .arg("-c")
                .arg(cmd)
                .output()
                .expect("bash");
            assert!(
                out.status.success(),
                "{cmd}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        sh(&format!("chown postgres:postgres {d} && chmod 700 {d}"));
        let base = PgConnectOptions::from_str(&base_url()).unwrap();
        let user = base.get_username().to_string();
        sh(&format!(
            "sudo -u postgres env PGPASSWORD=pg_sales_dev pg_basebackup -h 127.0.0.1 -p 5432 -U {user} -D {d} -R -X stream -c fast"
        ));
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{d}'\n\
             hba_file = '/etc/postgresql/15/main/pg_hba.conf'\nident_file = '/etc/postgresql/15/main/pg_ident.conf'\n\
             hot_standby = on\nmax_connections = 300\nmax_wal_senders = 10\nshared_buffers = 64MB\n\
             shared_preload_libraries = 'pg_stat_statements,pg_sales'\n"
        );
        std::fs::write(dir.join("postgresql.conf"), conf).unwrap();
        sh(&format!("chown postgres:postgres {d}/postgresql.conf"));
        sh(&format!("sudo -u postgres /usr/lib/postgresql/15/bin/pg_ctl -D {d} -l {d}/server.log -w -t 60 start"));
        Self { port, dir }
    }

    /// The URL of `db`'s database on the replica.
    pub fn url_for(&self, db: &TestDb) -> String {
        let opts = PgConnectOptions::from_str(&db.url).unwrap().port(self.port);
        format!("{}", opts.to_url_lossy())
    }

    pub fn stop(&self) {
        let _ = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "sudo -u postgres /usr/lib/postgresql/15/bin/pg_ctl -D {} -m immediate -w stop",
                self.dir.display()
            ))
            .output();
    }
}

impl Drop for PgReplica {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private redis-server on its own port, so stopping it disturbs no other test.
pub struct OwnRedis {
    child: std::process::Child,
}

impl OwnRedis {
    pub fn start(port: u16) -> Self {
        Self::start_in(port, None)
    }

    /// With `dir`, Redis keeps its snapshot (dump.rdb) there and loads it at start.
    pub fn start_in(port: u16, dir: Option<&std::path::Path>) -> Self {
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]);
        if let Some(d) = dir {
            cmd.arg("--dir").arg(d);
        }
        let child = cmd
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Self { child }
    }

    pub fn signal(&self, sig: &str) {
        let _ = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .stderr(std::process::Stdio::null())
            .status();
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.signal("CONT");
        self.stop();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// CPU time (user + system) a local process has used so far, from
/// /proc/<pid>/stat (in clock ticks of 1/100 s, Linux's USER_HZ).
pub fn process_cpu(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ") ".
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Reads `path` until it is served from the cache (bounded): the relay has
/// caught up with earlier writes, whose events would otherwise invalidate
/// the entry right after it is stored.
pub async fn warm(api: &Api, path: &str) {
    eventually(Duration::from_secs(10), "a cache hit", || async {
        let r = api.req(reqwest::Method::GET, path).send().await.ok()?;
        (r.headers().get("x-cache").is_some_and(|v| v == "hit")).then_some(())
    })
    .await;
}
