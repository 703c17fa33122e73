//! Configuration refused at start by the binary (exit 2, `configuration
//! error:` naming the variable) rather than at the first connection, and
//! what must keep starting: sslmodes that need TLS this build lacks, values
//! set but empty, a Redis named twice, the pool's default minimum.

use sales_e2e::{free_port, server_bin, TestDb};
use std::process::{Command, Output};

/// The binary with exactly `env` (plus PATH), so the runner's own
/// DATABASE_URL or REDIS_URL cannot decide the outcome.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(server_bin())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LOG_LEVEL", "warn")
        .envs(env.iter().copied())
        .output()
        .expect("run the server binary")
}

/// `url` with `sslmode=<mode>` appended (the last one counts).
fn with_sslmode(url: &str, mode: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}sslmode={mode}")
}

#[test]
fn settings_refused_at_start_exit_2_naming_the_variable() {
    // Nothing listens there: a command that got as far as connecting
    // would fail with another message.
    let nowhere = format!("postgres://app:secret-pw@127.0.0.1:{}/x", free_port());
    let require = with_sslmode(&nowhere, "require");
    let verify_full = with_sslmode(&nowhere, "verify-full");
    let disable = with_sslmode(&nowhere, "disable");
    let cases = [
        (
            "migrate",
            vec![("DATABASE_URL", require.as_str())],
            "DATABASE_URL",
            "without TLS",
        ),
        (
            "serve",
            vec![
                ("DATABASE_URL", disable.as_str()),
                ("DATABASE_REPLICA_URL", verify_full.as_str()),
            ],
            "DATABASE_REPLICA_URL",
            "without TLS",
        ),
        (
            "migrate",
            vec![
                ("DATABASE_URL", nowhere.as_str()),
                ("PGSSLMODE", "verify-ca"),
            ],
            "PGSSLMODE",
            "for DATABASE_URL",
        ),
        (
            "serve",
            vec![("DATABASE_URL", nowhere.as_str()), ("REDIS_URL", "")],
            "REDIS_URL",
            "`unset REDIS_URL`",
        ),
        (
            "serve",
            vec![("DATABASE_URL", nowhere.as_str()), ("METRICS_TOKEN", " ")],
            "METRICS_TOKEN",
            "`unset METRICS_TOKEN`",
        ),
        (
            "serve",
            vec![
                ("DATABASE_URL", nowhere.as_str()),
                ("REDIS_URL", "redis://127.0.0.1:6379"),
                ("REDIS_CLUSTER_URLS", "redis://127.0.0.1:7000"),
            ],
            "REDIS_URL",
            "not both",
        ),
    ];
    for (command, env, var, says) in cases {
        let out = run(&[command], &env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}: {stderr}");
        assert!(
            stderr.starts_with(&format!("configuration error: {var}: ")),
            "{var}: {stderr}"
        );
        assert!(stderr.contains(says), "{var}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(!stderr.contains("secret-pw"), "{stderr}");
    }
}

/// A value that is not UTF-8 is refused naming its variable, free-form
/// ones included (a secret or token read with U+FFFD for its bad bytes is
/// not the one configured: `...\xff` and `...\xfe` were one key); a URL
/// whose `://` is mistyped, or that gives its password as a parameter,
/// is refused without the password; an unknown PGSSLMODE and a CORS `*`
/// are refused rather than read as "no TLS" and as an origin no browser
/// sends.
#[test]
fn values_that_cannot_mean_what_they_say_are_refused() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let nowhere = format!("postgres://app@127.0.0.1:{}/x", free_port());
    for (var, value) in [
        (
            "JWT_SECRET",
            &b"a-secret-of-at-least-thirty-two-bytes\xff"[..],
        ),
        ("METRICS_TOKEN", &b"s15o-tok\xff"[..]),
        ("CACHE_PREFIX", &b"ab\xfe"[..]),
    ] {
        let out = Command::new(server_bin())
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LOG_LEVEL", "warn")
            .env("DATABASE_URL", &nowhere)
            .env(var, OsStr::from_bytes(value))
            .output()
            .expect("run the server binary");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}: {stderr}");
        assert!(
            stderr.starts_with(&format!("configuration error: {var}: ")),
            "{var}: {stderr}"
        );
        assert!(stderr.contains("not UTF-8"), "{var}: {stderr}");
    }
    for (var, value, says) in [
        (
            "REDIS_URL",
            "redis//:TopSecret99@127.0.0.1:6379",
            "redis://",
        ),
        (
            "DATABASE_REPLICA_URL",
            "pg://replica.internal/pg_sales?user=sales_app&password=TopSecret99",
            "postgres://",
        ),
        ("PGSSLMODE", "bogus", "verify-full"),
        ("PGSSLMODE", " require", "verify-full"),
        ("CORS_ORIGINS", "*", "`*` is not one"),
    ] {
        let out = run(
            &["serve"],
            &[("DATABASE_URL", nowhere.as_str()), (var, value)],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}: {stderr}");
        assert!(
            stderr.starts_with(&format!("configuration error: {var}: ")),
            "{var}: {stderr}"
        );
        assert!(stderr.contains(says), "{var}: {stderr}");
        assert!(!stderr.contains("TopSecret99"), "{stderr}");
    }
}

/// `prefer` (and `allow`, `disable`) connect without TLS; a URL's own
/// sslmode wins over PGSSLMODE; DB_POOL_MAX=1 alone is a usable pool.
#[tokio::test]
async fn sslmodes_without_tls_and_a_pool_of_one_still_connect() {
    let db = TestDb::new().await;
    for (url, extra) in [
        (with_sslmode(&db.url, "prefer"), None),
        (with_sslmode(&db.url, "allow"), None),
        (
            with_sslmode(&db.url, "disable"),
            Some(("PGSSLMODE", "require")),
        ),
        (db.url.clone(), Some(("DB_POOL_MAX", "1"))),
    ] {
        let mut env = vec![("DATABASE_URL", url.as_str())];
        env.extend(extra);
        let out = run(&["migrate"], &env);
        assert!(
            out.status.success(),
            "{env:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A `BIND_ADDR` that is no address of this machine is refused naming it
/// (exit 2), as other bad values are: it failed after start-up with exit 1
/// and "binding 192.0.2.1:...: Cannot assign requested address", and
/// unbalanced brackets (`[::1`) passed the check to fail the same way.
#[tokio::test]
async fn a_bind_address_this_machine_does_not_have_is_refused() {
    let db = TestDb::new().await;
    let port = free_port().to_string();
    for bind in ["192.0.2.1", "[::1", "::1]", "[[::1]]"] {
        let out = run(
            &["serve"],
            &[
                ("DATABASE_URL", db.url.as_str()),
                ("PG_SALES_DEV", "1"),
                (
                    "JWT_SECRET",
                    "pg-sales-development-secret-change-me-in-production",
                ),
                ("JOB_WORKERS", "0"),
                ("PORT", port.as_str()),
                ("BIND_ADDR", bind),
            ],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bind}: {stderr}");
        assert!(
            stderr.contains("configuration error: BIND_ADDR"),
            "{bind}: {stderr}"
        );
    }
}

/// A Postgres address that accepts connections and never answers: the
/// command gives up, saying how long it waited and that it tried twice (it
/// named one timeout and took two).
#[test]
fn a_database_that_never_answers_is_named_with_both_waits() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "postgres://u:p@127.0.0.1:{}/db",
        silent.local_addr().unwrap().port()
    );
    let out = run(
        &["migrate"],
        &[
            ("DATABASE_URL", url.as_str()),
            ("DB_CONNECTION_TIMEOUT", "1s"),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no answer within DB_CONNECTION_TIMEOUT (1s), twice"),
        "{stderr}"
    );
    drop(silent);
}

/// Redis parts nothing reads (REDIS_URL names the Redis) are warned about
/// at start, not refused: platforms set such variables for their own
/// reasons. They were ignored without a word, whatever their value.
#[tokio::test]
async fn redis_parts_nothing_reads_are_warned_about() {
    let db = TestDb::new().await;
    let out = run(
        &["migrate"],
        &[
            ("DATABASE_URL", db.url.as_str()),
            ("REDIS_URL", "redis://127.0.0.1:6379"),
            ("REDIS_PORT", "tcp://10.0.0.1:6379"),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("REDIS_PORT is set but not read: REDIS_URL is set and names the Redis"),
        "{stderr}"
    );
}
