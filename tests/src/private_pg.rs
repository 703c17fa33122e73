//! A private Postgres 15 cluster for tests that must stop or restart the
//! database (fault tests): `initdb` as the postgres OS user into a temporary
//! directory, password authentication over TCP, started with `pg_ctl` on a
//! free port. Other tests keep using the shared system cluster undisturbed.
//! The extension is installed system-wide, so `CREATE EXTENSION pg_sales`
//! (the first migration) works here too. Stopped and removed on drop.

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Executor};
use std::path::PathBuf;
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant};

const BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct PrivatePg {
    pub port: u16,
    /// Holds `data/` (the cluster), the password file, the socket and `server.log`.
    pub dir: PathBuf,
    pub password: String,
}

fn sh(cmd: &str) -> Result<String, String> {
    let out = Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PrivatePg {
    /// initdb + start. Takes a second or two.
    pub fn start() -> Self {
        let dir =
            std::env::temp_dir().join(format!("pgs_private_{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
        std::fs::write(dir.join("pwfile"), format!("{password}\n")).unwrap();
        let d = dir.display();
        sh(&format!("chown -R postgres:postgres {d} && chmod 700 {d}")).unwrap();
        sh(&format!(
            "sudo -u postgres {BIN}/initdb -D {d}/data -U postgres --auth-local=peer \
             --auth-host=scram-sha-256 --pwfile={d}/pwfile -E UTF8 --locale=C.UTF-8 --no-sync"
        ))
        .unwrap_or_else(|e| panic!("initdb: {e}"));
        let port = free_port();
        let conf = format!(
            "\n# private test cluster\nport = {port}\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{d}'\nmax_connections = 100\nshared_buffers = 32MB\n\
             fsync = off\nlog_min_messages = warning\nshared_preload_libraries = 'pg_sales'\n"
        );
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("data/postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(&mut f, conf.as_bytes()).unwrap();
        let pg = Self {
            port,
            dir,
            password,
        };
        pg.start_server()
            .unwrap_or_else(|e| panic!("pg_ctl start: {e}"));
        pg
    }

    /// `pg_ctl start`, waiting until it accepts connections.
    pub fn start_server(&self) -> Result<(), String> {
        let d = self.dir.display();
        sh(&format!(
            "sudo -u postgres {BIN}/pg_ctl -D {d}/data -l {d}/server.log -w -t 60 start"
        ))
        .map(|_| ())
    }

    /// `pg_ctl stop` with `mode` (`smart`, `fast` or `immediate`).
    pub fn stop_server(&self, mode: &str) -> Result<(), String> {
        let d = self.dir.display();
        sh(&format!(
            "sudo -u postgres {BIN}/pg_ctl -D {d}/data -m {mode} -w -t 60 stop"
        ))
        .map(|_| ())
    }

    /// Stops (fast), stays down for `down`, starts again. Returns when the
    /// cluster accepts connections again: (when it went down, when it was back).
    pub fn restart(&self, down: Duration) -> (Instant, Instant) {
        let stopping = Instant::now();
        self.stop_server("fast")
            .unwrap_or_else(|e| panic!("stop: {e}"));
        std::thread::sleep(down);
        self.start_server().unwrap_or_else(|e| panic!("start: {e}"));
        (stopping, Instant::now())
    }

    /// The URL of database `db` as the `postgres` user, with its password.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{db}",
            self.password, self.port
        )
    }

    /// Creates database `name`, runs the server's migrations (installing the
    /// extension) and returns its URL and a pool on it.
    pub async fn create_database(&self, name: &str) -> (String, PgPool) {
        let mut admin = PgConnectOptions::from_str(&self.url("postgres"))
            .unwrap()
            .connect()
            .await
            .expect("connect to the private cluster");
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create database");
        drop(admin);
        let url = self.url(name);
        let pool = self.pool(&url, 4).await;
        sales_server::db::migrate(&pool).await.expect("migrations");
        (url, pool)
    }

    /// A pool that checks connections before use (it survives restarts).
    pub async fn pool(&self, url: &str, max: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(max)
            .test_before_acquire(true)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(PgConnectOptions::from_str(url).unwrap())
            .await
            .expect("connect to the private cluster")
    }

    /// The end of the server log (for failure messages).
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = self.stop_server("immediate");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
