//! Configuration: read once from the environment into one struct. Each bad
//! value is refused at start with a message naming the variable.

use std::collections::HashMap;
use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{var}: {reason} (got {value:?})")]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub database_replica_url: Option<String>,
    pub db_pool_min: u32,
    pub db_pool_max: u32,
    pub db_idle_timeout: Duration,
    pub db_connection_timeout: Duration,
    pub db_query_timeout: Duration,
    /// `None`: no Redis; an in-process cache serves a single instance.
    pub redis_url: Option<String>,
    pub redis_cluster_urls: Vec<String>,
    pub redis_timeout: Duration,
    pub bind_addr: String,
    pub port: u16,
    pub log_level: String,
    pub log_format: LogFormat,
    pub compression_level: u32,
    pub cache_ttl: Duration,
    /// How long the in-process first level in front of Redis may keep an
    /// entry (0: no first level).
    pub cache_l1_ttl: Duration,
    pub cache_prefix: String,
    pub cache_compress_min: usize,
    pub jwt_secret: Option<String>,
    pub jwt_public_key_file: Option<String>,
    /// JWKS of an outside identity provider: a URL or a file (not both).
    pub jwt_jwks_url: Option<String>,
    pub jwt_jwks_file: Option<String>,
    /// How often the JWKS is read again.
    pub jwt_jwks_refresh: Duration,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    pub jwt_expiry: Duration,
    pub batch_max_records: usize,
    pub body_limit: usize,
    pub rate_limit_per_minute: u32,
    pub rate_limit_per_ip_per_minute: u32,
    pub cors_origins: Vec<String>,
    /// Reverse proxies whose `X-Forwarded-For` names the client
    /// (`TRUSTED_PROXIES`, addresses or networks); empty: none.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub hsts: bool,
    pub export_max_concurrent: usize,
    pub event_retention: Duration,
    /// How long sales events stay readable as history (`HISTORY_RETENTION`,
    /// at least `event_retention`): `maintain` moves pruned sales events to
    /// `sales.event_history` until then.
    pub history_retention: Duration,
    pub ws_ping_interval: Duration,
    pub ws_send_queue: usize,
    /// A resume past this many events of the log is answered `resync_required`.
    pub ws_replay_max_events: u64,
    pub slow_query_ms: u64,
    /// Whether every statement slower than `slow_query_ms` is logged (the
    /// server: its statements are requests'); the commands, whose long
    /// statements are their work (a seed, a merge, a maintenance run),
    /// keep the driver's own threshold.
    pub log_slow_statements: bool,
    /// When set, `/metrics` answers only requests bearing this token.
    pub metrics_token: Option<String>,
    pub shutdown_timeout: Duration,
    /// PG_SALES_DEV=1 or APP_ENV/NODE_ENV=development: allows the
    /// development secrets the repository publishes.
    pub dev_mode: bool,
    /// Logins per account per minute before each further attempt waits longer.
    pub login_attempts_per_minute: u32,
    /// Password hashes computed at once (each takes a blocking thread and ~19 MB).
    pub password_hash_concurrency: usize,
    /// Failed logins from one IP address (any accounts) before each further
    /// attempt from it waits longer.
    pub login_attempts_per_ip: u32,
    /// How long a session lives without a refresh (refresh tokens).
    pub refresh_token_ttl: Duration,
    /// How long a session lives at most, however often it is refreshed:
    /// past this since the login, a refresh is refused and the user logs in
    /// again.
    pub session_max_age: Duration,
    /// WebSocket upgrades per IP per minute.
    pub ws_upgrades_per_minute: u32,
    /// Exports one user may run at once.
    pub export_max_per_user: usize,
    /// Wall-clock limit for one export, however slowly the client reads.
    pub export_max_duration: Duration,
    /// Largest import body (POST /api/v2/imports), counted while it streams.
    pub import_max_bytes: u64,
    /// Import uploads this instance reads at once (each holds a database
    /// connection while its body comes in).
    pub import_max_uploads: usize,
    /// Import uploads one user may send at once.
    pub import_max_uploads_per_user: usize,
    /// Unfinished jobs (uploading, queued or running imports and
    /// asynchronous batches) one user may have at once.
    pub jobs_max_per_user: i64,
    /// An upload whose body sends nothing for this long is dropped.
    pub import_idle_timeout: Duration,
    /// Most staged rows (lines × days) merged in one transaction (fewer when a
    /// chunk runs long), plus the rest of the store-month the chunk ends in.
    pub import_chunk_lines: u32,
    /// Connections that merge one import's chunks at once.
    pub import_parallelism: usize,
    /// Job workers of this instance (0: this instance runs no jobs).
    pub job_workers: usize,
    /// How long a running job stays its worker's without a renewal.
    pub job_lease: Duration,
    /// Settings given that nothing reads, with why (the Redis parts when
    /// REDIS_URL names the Redis, or when REDIS_HOST is not set): warned
    /// about at start rather than refused, since platforms set such
    /// variables for their own reasons (a Kubernetes service named `redis`
    /// sets `REDIS_PORT=tcp://...`).
    pub ignored: Vec<(&'static str, &'static str)>,
}

/// JWT secrets published in this repository (Makefile, compose file, README):
/// anyone can mint tokens with them, so `serve` refuses them outside
/// development mode.
pub const WELL_KNOWN_SECRETS: &[&str] = &[
    "pg-sales-development-secret-change-me-in-production",
    "change-me-change-me-change-me-change-me",
];

/// The shortest `JWT_SECRET`, in bytes: HS256 wants a key at least as long
/// as its hash (256 bits).
pub const JWT_SECRET_MIN_BYTES: usize = 32;

pub const DEFAULT_DATABASE_URL: &str = "postgres://sales_app:pg_sales_dev@127.0.0.1:5432/pg_sales";

/// The key under which `Config::from_env` lists the variables whose
/// values are not UTF-8 (a name no environment can hold: it has a NUL),
/// and what such a value reads as meanwhile.
const NOT_UTF8: &str = "\0not-utf8";
const NOT_UTF8_VALUE: &str = "<not UTF-8>";

struct Env<'a>(&'a HashMap<String, String>);

#[cfg(test)]
thread_local! {
    /// Every variable [`Env::get`] was asked for on this thread (tests
    /// check that each refuses an empty value).
    static READ: std::cell::RefCell<Vec<&'static str>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Env<'_> {
    /// The value of `var`, trimmed; `None` when unset. Set but empty (or
    /// only blanks) is refused rather than read as unset: a value that went
    /// missing (`REDIS_URL=` in an env file, `VAR=$UNSET` in a script) would
    /// otherwise silently become the default: the demo database (which
    /// seed, user and maintain commands would then write to), no Redis (a
    /// cache per instance), the default `CACHE_PREFIX` (another deployment's
    /// keys), an open `/metrics`.
    fn get(&self, var: &'static str) -> Result<Option<&str>, ConfigError> {
        #[cfg(test)]
        READ.with(|r| r.borrow_mut().push(var));
        if self
            .0
            .get(NOT_UTF8)
            .is_some_and(|names| names.split('\n').any(|n| n == var))
        {
            return Err(Self::err(
                var,
                NOT_UTF8_VALUE,
                "is not UTF-8 text (a byte that is not part of any character); \
                 set it again as plain text",
            ));
        }
        match self.0.get(var).map(|s| s.trim()) {
            None => Ok(None),
            Some("") => Err(Self::err(
                var,
                &self.0[var],
                format!("is set but empty; {}", Self::unset_hint(var)),
            )),
            Some(v) => Ok(Some(v)),
        }
    }

    /// What a refusal of an empty value tells to do instead.
    fn unset_hint(var: &str) -> String {
        format!(
            "give it a value, or unset it (`unset {var}`, or leave it out of the \
             environment) for the default"
        )
    }

    fn err(var: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            var,
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    fn string(&self, var: &'static str, default: &str) -> Result<String, ConfigError> {
        Ok(self.get(var)?.unwrap_or(default).to_string())
    }

    fn opt(&self, var: &'static str) -> Result<Option<String>, ConfigError> {
        Ok(self.get(var)?.map(str::to_string))
    }

    fn num<T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy>(
        &self,
        var: &'static str,
        default: T,
        min: T,
        max: T,
    ) -> Result<T, ConfigError> {
        let Some(raw) = self.get(var)? else {
            return Ok(default);
        };
        let v: T = raw.parse().map_err(|_| {
            Self::err(
                var,
                raw,
                format!("must be a whole number between {min} and {max}"),
            )
        })?;
        if v < min || v > max {
            return Err(Self::err(
                var,
                raw,
                format!("must be between {min} and {max}"),
            ));
        }
        Ok(v)
    }

    fn duration(
        &self,
        var: &'static str,
        default: Duration,
        min: Duration,
        max: Duration,
    ) -> Result<Duration, ConfigError> {
        self.duration_in(var, default, min, max, Duration::from_secs(1))
    }

    /// Like [`Self::duration`], reading a bare number in `bare` units (the
    /// DB_* timeouts follow the seed's milliseconds; the rest are seconds).
    fn duration_in(
        &self,
        var: &'static str,
        default: Duration,
        min: Duration,
        max: Duration,
        bare: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(raw) = self.get(var)? else {
            return Ok(default);
        };
        let unit = if bare == Duration::from_millis(1) {
            "milliseconds"
        } else {
            "seconds"
        };
        let d = parse_duration_in(raw, bare).ok_or_else(|| {
            Self::err(
                var,
                raw,
                format!(
                    "must be a duration such as 500ms, 30s, 5m, 2h or 7d (a bare number is {unit})"
                ),
            )
        })?;
        if d < min || d > max {
            let bare_note = if raw.bytes().all(|b| b.is_ascii_digit()) {
                format!(" (a bare number is {unit}: {raw} is {d:?})")
            } else {
                String::new()
            };
            return Err(Self::err(
                var,
                raw,
                format!("must be between {min:?} and {max:?}{bare_note}"),
            ));
        }
        Ok(d)
    }

    fn bool(&self, var: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(var)?.map(|s| s.to_ascii_lowercase()) {
            None => Ok(default),
            Some(s) if matches!(s.as_str(), "1" | "true" | "yes" | "on") => Ok(true),
            Some(s) if matches!(s.as_str(), "0" | "false" | "no" | "off") => Ok(false),
            Some(s) => Err(Self::err(var, &s, "must be true or false")),
        }
    }

    /// A comma-separated list of addresses (`10.0.0.5`, `::1`) and networks
    /// (`10.0.0.0/8`, `fd00::/8`).
    fn networks(&self, var: &'static str) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        self.list(var)?
            .iter()
            .map(|p| {
                p.parse::<ipnet::IpNet>()
                    .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map(|n| n.trunc())
                    .map_err(|_| {
                        Self::err(
                            var,
                            p,
                            "must be IP addresses or networks (10.0.0.5, 10.0.0.0/8, ::1), separated by commas",
                        )
                    })
            })
            .collect()
    }

    /// Browser origins: `scheme://host[:port]`, exactly as a browser sends
    /// them in `Origin` (no path, no trailing slash), or `*`.
    fn origins(&self, var: &'static str) -> Result<Vec<String>, ConfigError> {
        let list = self.list(var)?;
        for o in &list {
            // Any scheme browsers send (`https`, `chrome-extension`,
            // `capacitor`, ...), then a host and maybe a port.
            let rest = o.split_once("://").and_then(|(scheme, rest)| {
                let mut c = scheme.chars();
                let ok = c.next().is_some_and(|f| f.is_ascii_alphabetic())
                    && c.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
                ok.then_some(rest)
            });
            // `*` is not an origin: the list is compared with each
            // request's `Origin`, so `*` would let no browser in.
            let ok = rest.is_some_and(|r| {
                !r.is_empty() && !r.contains(['/', '?', '#', '@', ' ']) && !r.ends_with(':')
            });
            if !ok {
                return Err(Self::err(
                    var,
                    o,
                    "must be origins as browsers send them, scheme://host[:port] \
                     (https://app.example.com, no path or trailing slash), separated by commas; \
                     `*` is not one (name each origin)",
                ));
            }
        }
        Ok(list)
    }

    /// A comma-separated list; empty entries are skipped, but a value with
    /// no entry at all (`,`) is refused like an empty one.
    fn list(&self, var: &'static str) -> Result<Vec<String>, ConfigError> {
        let Some(raw) = self.get(var)? else {
            return Ok(Vec::new());
        };
        let list: Vec<String> = raw
            .split(',')
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect();
        if list.is_empty() {
            return Err(Self::err(
                var,
                raw,
                format!("is set but names nothing; {}", Self::unset_hint(var)),
            ));
        }
        Ok(list)
    }
}

/// `500ms`, `30s`, `5m`, `2h`, `7d`; a bare number is seconds.
pub fn parse_duration(raw: &str) -> Option<Duration> {
    parse_duration_in(raw, Duration::from_secs(1))
}

/// [`parse_duration`] with a bare number counted in `bare` units.
pub fn parse_duration_in(raw: &str, bare: Duration) -> Option<Duration> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (num, unit) = raw.split_at(split);
    let n: u64 = num.parse().ok()?;
    let secs = |m: u64| n.checked_mul(m).map(Duration::from_secs);
    match unit.trim() {
        "" => bare.checked_mul(u32::try_from(n).ok()?),
        "s" => secs(1),
        "ms" => Some(Duration::from_millis(n)),
        "m" | "min" => secs(60),
        "h" => secs(3600),
        "d" => secs(86400),
        _ => None,
    }
}

/// A password as a URL's userinfo: everything but unreserved characters
/// percent-encoded.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether every directive of a tracing filter names a level: a bare word
/// that is not one (`warning`, `inf`) would be read as a target and leave
/// everything else silent.
fn log_filter_has_levels(filter: &str) -> bool {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let level = |l: &str| {
        LEVELS.contains(&l.to_ascii_lowercase().as_str())
            || matches!(l, "0" | "1" | "2" | "3" | "4" | "5")
    };
    filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .all(|d| {
            // A span filter (`target[span{field=value}]`) is tracing's own
            // syntax, checked by EnvFilter: its `=` may sit in the braces.
            if d.contains(['[', '{']) {
                return true;
            }
            match d.rsplit_once('=') {
                Some((_, l)) => level(l),
                // A bare word is a level, or a target (a module path)
                // enabled at every level.
                None => level(d) || d.contains("::") || d.contains('_'),
            }
        })
}

/// Whether this build's Postgres driver can speak TLS: server/Cargo.toml
/// enables no `tls-*` feature of sqlx, so a connection whose sslmode
/// requires TLS fails every time ("TLS upgrade required by connect options
/// but SQLx was built without TLS support enabled"). The test
/// `postgres_tls_matches_the_driver` fails when this stops being true.
const POSTGRES_TLS: bool = false;

/// A Postgres URL the driver can use: the scheme, then everything else as
/// sqlx reads it (a port that is not a number, an unknown `sslmode`), and
/// no sslmode that requires TLS when the driver has none. The sslmode is
/// the URL's (`sslmode` or `ssl-mode`, the last one), else `pgsslmode`
/// (PGSSLMODE, read by sqlx when it is one of its modes), else `prefer`,
/// which connects without TLS when the driver has none.
fn check_pg_url(var: &'static str, url: &str, pgsslmode: Option<&str>) -> Result<(), ConfigError> {
    use sqlx::postgres::PgSslMode;
    check_url(var, url, &["postgres", "postgresql"])?;
    let options = url
        .parse::<sqlx::postgres::PgConnectOptions>()
        .map_err(|e| {
            // The URL may hold a password: name the variable, not the value.
            Env::err(
                var,
                "<hidden>",
                format!("is not a usable Postgres URL: {e}"),
            )
        })?;
    if POSTGRES_TLS {
        return Ok(());
    }
    let in_url = reqwest::Url::parse(url).ok().and_then(|u| {
        u.query_pairs()
            .filter(|(k, _)| k == "sslmode" || k == "ssl-mode")
            .last()
            .map(|(k, v)| format!("{k}={v}"))
    });
    let (mode, source, shown) = match in_url {
        Some(pair) => (options.get_ssl_mode(), var, pair),
        None => match pgsslmode.filter(|m| !m.is_empty()) {
            // libpq refuses a mode it does not know; sqlx would ignore it
            // and connect without TLS, so ` require` would mean plaintext.
            Some(m) => match m.parse::<PgSslMode>() {
                Ok(mode) => (mode, "PGSSLMODE", m.to_string()),
                Err(_) => {
                    return Err(Env::err(
                        "PGSSLMODE",
                        m,
                        "must be one of disable, allow, prefer, require, verify-ca, \
                         verify-full (as libpq reads it)",
                    ))
                }
            },
            None => return Ok(()),
        },
    };
    if matches!(
        mode,
        PgSslMode::Require | PgSslMode::VerifyCa | PgSslMode::VerifyFull
    ) {
        let whose = if source == var {
            String::new()
        } else {
            format!(" (for {var}, which names no sslmode of its own)")
        };
        return Err(Env::err(
            source,
            &shown,
            format!(
                "requires TLS{whose}, and this build connects to Postgres without TLS; \
                 use sslmode=disable, allow or prefer (each connects without TLS here), \
                 or reach Postgres through a TLS-terminating proxy"
            ),
        ));
    }
    Ok(())
}

/// `url` with whatever stands between `//` (or the start) and the last `@`
/// before its query replaced by `<hidden>`, and the values of its query's
/// password-like parameters (`password`, `sslpassword`, anything with
/// `pass`, `secret` or `token` in its name) too: a password is never
/// echoed, also in a URL whose `://` is mistyped (`redis//:pw@host`) or
/// that gives it libpq's way (`?password=`).
fn without_password(url: &str) -> String {
    // The userinfo first, up to the last `@` of the whole value: a
    // password may hold `?`, `#` or `/` (unencoded, which is what makes
    // such a URL refused and shown). A query holding an `@` hides more
    // than the userinfo, never less.
    let start = url.find("//").map_or(0, |i| i + 2);
    let (mut out, rest) = match url[start..].rfind('@') {
        Some(at) => (format!("{}<hidden>", &url[..start]), &url[start + at..]),
        None => (url[..start].to_string(), &url[start..]),
    };
    let (main, query) = rest.split_at(rest.find(['?', '#']).unwrap_or(rest.len()));
    out.push_str(main);
    if let Some(sep) = query.chars().next() {
        out.push(sep);
        let sensitive = |k: &str| {
            let k = k.to_ascii_lowercase();
            ["pass", "secret", "token"].iter().any(|w| k.contains(w))
        };
        let parts: Vec<String> = query[1..]
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if sensitive(k) => format!("{k}=<hidden>"),
                _ => kv.to_string(),
            })
            .collect();
        out.push_str(&parts.join("&"));
    }
    out
}

/// A Redis URL the client accepts (port, database number, options), not
/// only one with the right scheme: a wrong one would otherwise leave the
/// server running without its cache, warning that Redis is unreachable.
fn check_redis_url(var: &'static str, url: &str) -> Result<(), ConfigError> {
    check_url(var, url, &["redis", "rediss"])?;
    let info = redis::IntoConnectionInfo::into_connection_info(url).map_err(|e| {
        let why = e.to_string().replace("- InvalidClientConfig", "");
        Env::err(
            var,
            &without_password(url),
            format!("not a Redis URL the client accepts: {why}"),
        )
    })?;
    // The client takes any number; Redis has databases 0..15 (as
    // REDIS_DB), and another one fails every command once connected,
    // which the server would report as Redis being unreachable.
    let db = info.redis.db;
    if !(0..=15).contains(&db) {
        return Err(Env::err(
            var,
            &without_password(url),
            format!("names database {db}; Redis has databases 0 to 15"),
        ));
    }
    Ok(())
}

/// The key in `JWT_PUBLIC_KEY_FILE`: an RSA or EC public key in PEM form.
fn check_public_key_file(path: &str) -> Result<(), ConfigError> {
    let pem = std::fs::read(path).map_err(|e| {
        Env::err(
            "JWT_PUBLIC_KEY_FILE",
            path,
            format!("file cannot be read: {e}"),
        )
    })?;
    if jsonwebtoken::DecodingKey::from_rsa_pem(&pem).is_ok()
        || jsonwebtoken::DecodingKey::from_ec_pem(&pem).is_ok()
    {
        Ok(())
    } else {
        Err(Env::err(
            "JWT_PUBLIC_KEY_FILE",
            path,
            "not an RSA or EC public key in PEM form",
        ))
    }
}

/// The set in `JWT_JWKS_FILE`: a JWKS document (it is read again while
/// the server runs; a later reading that fails keeps the keys it had).
fn check_jwks_file(path: &str) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Env::err("JWT_JWKS_FILE", path, format!("file cannot be read: {e}")))?;
    let keys =
        crate::jwks::parse(&text).map_err(|e| Env::err("JWT_JWKS_FILE", path, format!("{e:#}")))?;
    if keys.is_empty() {
        return Err(Env::err(
            "JWT_JWKS_FILE",
            path,
            "holds no key this server can use (RS256, or ES256 on P-256, each with a kid)",
        ));
    }
    Ok(())
}

fn check_url(var: &'static str, url: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    if schemes.iter().any(|s| url.starts_with(&format!("{s}://"))) {
        Ok(())
    } else {
        // The value may hold a password (`user:secret@host`): shown without it.
        Err(Env::err(
            var,
            &without_password(url),
            format!(
                "must be a URL starting with {}",
                schemes.join(":// or ") + "://"
            ),
        ))
    }
}

impl Config {
    /// Reads the process environment. A value that is not UTF-8 is
    /// refused when the variable is one of ours (read by `Env::get`, which
    /// names it; free-form values such as `JWT_SECRET` or `METRICS_TOKEN`
    /// would otherwise be read with U+FFFD for their bad bytes, a key that
    /// is not the one configured), and a name that is not UTF-8 is
    /// skipped: `std::env::vars` panicked on either, whatever the variable.
    pub fn from_env() -> Result<Self, ConfigError> {
        let mut not_utf8 = Vec::new();
        let mut vars: HashMap<String, String> = std::env::vars_os()
            .filter_map(|(k, v)| {
                let k = k.into_string().ok()?;
                let v = v.into_string().unwrap_or_else(|_| {
                    not_utf8.push(k.clone());
                    NOT_UTF8_VALUE.to_string()
                });
                Some((k, v))
            })
            .collect();
        if !not_utf8.is_empty() {
            vars.insert(NOT_UTF8.to_string(), not_utf8.join("\n"));
        }
        Self::from_map(&vars)
    }

    pub fn from_map(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let e = Env(vars);
        let s = Duration::from_secs;
        let ms = Duration::from_millis(1);
        // Set but empty is refused by every read (see `Env::get`); the
        // Redis parts are read below only when REDIS_HOST is the source,
        // so an empty one is looked for here whatever the source.
        for var in ["REDIS_HOST", "REDIS_PORT", "REDIS_DB", "REDIS_PASSWORD"] {
            e.get(var)?;
        }
        let database_url = e.string("DATABASE_URL", DEFAULT_DATABASE_URL)?;
        // sqlx reads PGSSLMODE (as libpq does) when a URL names no sslmode.
        let pgsslmode = vars.get("PGSSLMODE").map(String::as_str);
        check_pg_url("DATABASE_URL", &database_url, pgsslmode)?;
        let database_replica_url = e.opt("DATABASE_REPLICA_URL")?;
        if let Some(u) = &database_replica_url {
            check_pg_url("DATABASE_REPLICA_URL", u, pgsslmode)?;
        }
        let db_pool_max = e.num("DB_POOL_MAX", 20u32, 1, 1000)?;
        // The default minimum (2) follows a smaller maximum; a minimum set
        // above the maximum is refused.
        let db_pool_min = e.num("DB_POOL_MIN", 2u32.min(db_pool_max), 0, 1000)?;
        if db_pool_min > db_pool_max {
            return Err(Env::err(
                "DB_POOL_MIN",
                &db_pool_min.to_string(),
                format!("must not exceed DB_POOL_MAX ({db_pool_max})"),
            ));
        }
        let redis_url = match e.opt("REDIS_URL")? {
            Some(u) => {
                check_redis_url("REDIS_URL", &u)?;
                Some(u)
            }
            None => match e.opt("REDIS_HOST")? {
                Some(host) => {
                    let port = e.num("REDIS_PORT", 6379u16, 1, 65535)?;
                    let db = e.num("REDIS_DB", 0u32, 0, 15)?;
                    let auth = e
                        .opt("REDIS_PASSWORD")?
                        .map(|p| format!(":{}@", percent_encode(&p)))
                        .unwrap_or_default();
                    let host = match host.parse::<std::net::Ipv6Addr>() {
                        Ok(v6) => format!("[{v6}]"),
                        // A name, an IPv4 address or a bracketed IPv6 one.
                        Err(_)
                            if !host.is_empty()
                                && !host.contains(['/', '@', '?', '#', ' '])
                                && host.starts_with('[') == host.ends_with(']') =>
                        {
                            host
                        }
                        Err(_) => {
                            return Err(Env::err(
                                "REDIS_HOST",
                                &host,
                                "must be a host name or an IP address",
                            ))
                        }
                    };
                    Some(format!("redis://{auth}{host}:{port}/{db}"))
                }
                None => None,
            },
        };
        let mut ignored = Vec::new();
        let parts = ["REDIS_PORT", "REDIS_DB", "REDIS_PASSWORD"];
        if e.get("REDIS_URL")?.is_some() {
            for var in ["REDIS_HOST"].into_iter().chain(parts) {
                if e.get(var)?.is_some() {
                    ignored.push((var, "REDIS_URL is set and names the Redis"));
                }
            }
        } else if e.get("REDIS_HOST")?.is_none() {
            for var in parts {
                if e.get(var)?.is_some() {
                    ignored.push((var, "read only with REDIS_HOST, which is not set"));
                }
            }
        }
        let redis_cluster_urls = e.list("REDIS_CLUSTER_URLS")?;
        for u in &redis_cluster_urls {
            check_redis_url("REDIS_CLUSTER_URLS", u)?;
        }
        // One user and password for every node: the cluster client refuses
        // nodes given different ones, or uses the first node's for all
        // (a node named without a password then answers NOAUTH), at every
        // connection attempt. Refused here rather than retried for ever.
        let credentials = |u: &String| {
            redis::IntoConnectionInfo::into_connection_info(u.as_str())
                .ok()
                .map(|i| (i.redis.username, i.redis.password))
        };
        if let Some(first) = redis_cluster_urls.first().and_then(credentials) {
            if redis_cluster_urls
                .iter()
                .any(|u| credentials(u).is_some_and(|c| c != first))
            {
                let shown: Vec<String> = redis_cluster_urls
                    .iter()
                    .map(|u| without_password(u))
                    .collect();
                return Err(Env::err(
                    "REDIS_CLUSTER_URLS",
                    &shown.join(","),
                    "give every node the same user and password",
                ));
            }
        }
        // The cluster is used whenever it is set: a single Redis named as
        // well would be ignored, and is refused instead.
        if !redis_cluster_urls.is_empty() {
            if let Some(u) = e.get("REDIS_URL")? {
                return Err(Env::err(
                    "REDIS_URL",
                    &without_password(u),
                    "set REDIS_URL or REDIS_CLUSTER_URLS, not both",
                ));
            }
            if let Some(host) = e.get("REDIS_HOST")? {
                return Err(Env::err(
                    "REDIS_HOST",
                    host,
                    "set REDIS_HOST or REDIS_CLUSTER_URLS, not both",
                ));
            }
        }
        let log_format = match e
            .string("LOG_FORMAT", "pretty")?
            .to_ascii_lowercase()
            .as_str()
        {
            "pretty" | "text" => LogFormat::Pretty,
            "json" => LogFormat::Json,
            other => return Err(Env::err("LOG_FORMAT", other, "must be json or pretty")),
        };
        let log_level = e.string("LOG_LEVEL", "info")?;
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err()
            || !log_filter_has_levels(&log_level)
        {
            return Err(Env::err(
                "LOG_LEVEL",
                &log_level,
                "must be a level (error, warn, info, debug, trace) or a filter",
            ));
        }
        let event_retention = e.duration("EVENT_RETENTION", s(7 * 86400), s(60), s(365 * 86400))?;
        let history_retention = e.duration(
            "HISTORY_RETENTION",
            event_retention,
            event_retention,
            s(10 * 366 * 86400),
        )?;
        let jwt_secret = e.opt("JWT_SECRET")?;
        if let Some(secret) = &jwt_secret {
            // Counted in bytes, as HMAC uses it: HS256 wants a key at least
            // as long as its 256-bit hash (RFC 7518, 3.2).
            if secret.len() < JWT_SECRET_MIN_BYTES {
                return Err(Env::err(
                    "JWT_SECRET",
                    "<hidden>",
                    format!(
                        "must be at least {JWT_SECRET_MIN_BYTES} bytes (this one has {}; e.g. `openssl rand -hex 32`)",
                        secret.len()
                    ),
                ));
            }
        }
        // NODE_ENV (the seed's) and APP_ENV name the environment; only
        // `development` relaxes anything. Other software reads them too, so
        // an empty one is read as unset (not development, the strict side)
        // rather than refused.
        let dev_mode = e.bool("PG_SALES_DEV", false)?
            || ["APP_ENV", "NODE_ENV"].iter().any(|v| {
                vars.get(*v)
                    .is_some_and(|x| x.trim().eq_ignore_ascii_case("development"))
            });
        let rate_limit_per_minute = e.num("RATE_LIMIT_PER_MINUTE", 600u32, 1, 10_000_000)?;
        let export_max_concurrent = e.num("EXPORT_MAX_CONCURRENT", 4usize, 1, 1000)?;
        let jwt_public_key_file = e.opt("JWT_PUBLIC_KEY_FILE")?;
        if let Some(path) = &jwt_public_key_file {
            check_public_key_file(path)?;
        }
        let jwt_jwks_url = e.opt("JWT_JWKS_URL")?;
        let jwt_jwks_file = e.opt("JWT_JWKS_FILE")?;
        if let Some(url) = &jwt_jwks_url {
            check_jwks_url(url).map_err(|why| Env::err("JWT_JWKS_URL", url, why))?;
            if jwt_jwks_file.is_some() {
                return Err(Env::err(
                    "JWT_JWKS_URL",
                    url,
                    "set JWT_JWKS_URL or JWT_JWKS_FILE, not both",
                ));
            }
        }
        if let Some(path) = &jwt_jwks_file {
            check_jwks_file(path)?;
        }
        Ok(Config {
            ignored,
            database_url,
            database_replica_url,
            db_pool_min,
            db_pool_max,
            db_idle_timeout: e.duration_in("DB_IDLE_TIMEOUT", s(300), s(1), s(86400), ms)?,
            db_connection_timeout: e.duration_in(
                "DB_CONNECTION_TIMEOUT",
                s(5),
                Duration::from_millis(100),
                s(300),
                ms,
            )?,
            db_query_timeout: e.duration_in(
                "DB_QUERY_TIMEOUT",
                s(30),
                Duration::from_millis(10),
                s(3600),
                ms,
            )?,
            redis_url,
            redis_cluster_urls,
            redis_timeout: e.duration(
                "REDIS_TIMEOUT",
                Duration::from_millis(250),
                Duration::from_millis(10),
                s(60),
            )?,
            bind_addr: {
                let b = e.string("BIND_ADDR", "127.0.0.1")?;
                // An address (`::` or `[::]` alike: brackets only around an
                // IPv6 address, one pair), or a name that resolves.
                let bare = match b.strip_prefix('[') {
                    Some(inner) => inner
                        .strip_suffix(']')
                        .filter(|a| a.parse::<std::net::Ipv6Addr>().is_ok()),
                    None => Some(b.as_str()).filter(|a| !a.contains(['[', ']'])),
                };
                let usable = bare.is_some_and(|bare| {
                    bare.parse::<std::net::IpAddr>().is_ok()
                        || std::net::ToSocketAddrs::to_socket_addrs(&(bare, 0))
                            .is_ok_and(|mut a| a.next().is_some())
                });
                if !usable {
                    return Err(Env::err(
                        "BIND_ADDR",
                        &b,
                        "must be an address of this machine (127.0.0.1, 0.0.0.0, ::) or a name that resolves to one",
                    ));
                }
                b
            },
            port: e.num("PORT", 3001u16, 0, 65535)?,
            log_level,
            log_format,
            compression_level: e.num("COMPRESSION_LEVEL", 3u32, 1, 9)?,
            cache_ttl: e.duration("CACHE_TTL", s(60), s(1), s(86400 * 7))?,
            cache_l1_ttl: e.duration("CACHE_L1_TTL", s(5), Duration::ZERO, s(3600))?,
            cache_prefix: e.string("CACHE_PREFIX", "pg_sales")?,
            cache_compress_min: e.num("CACHE_COMPRESS_MIN", 1024usize, 0, 1 << 30)?,
            jwt_secret,
            jwt_public_key_file,
            jwt_jwks_url,
            jwt_jwks_file,
            jwt_jwks_refresh: e.duration("JWT_JWKS_REFRESH", s(300), s(1), s(86400))?,
            jwt_issuer: e.opt("JWT_ISSUER")?,
            jwt_audience: e.opt("JWT_AUDIENCE")?,
            jwt_expiry: e.duration(
                "JWT_EXPIRY",
                s(900),
                s(60),
                s(crate::auth::LONGEST_TOKEN_SECS as u64),
            )?,
            batch_max_records: e.num("BATCH_MAX_RECORDS", 5000usize, 1, 100_000)?,
            body_limit: e.num("BODY_LIMIT", 16usize << 20, 1024, 1 << 30)?,
            rate_limit_per_minute,
            rate_limit_per_ip_per_minute: e.num(
                "RATE_LIMIT_PER_IP_PER_MINUTE",
                rate_limit_per_minute.saturating_mul(4),
                1,
                u32::MAX,
            )?,
            cors_origins: e.origins("CORS_ORIGINS")?,
            trusted_proxies: e.networks("TRUSTED_PROXIES")?,
            hsts: e.bool("HSTS", false)?,
            export_max_concurrent,
            event_retention,
            history_retention,
            ws_ping_interval: e.duration(
                "WS_PING_INTERVAL",
                s(30),
                Duration::from_millis(100),
                s(3600),
            )?,
            ws_send_queue: e.num("WS_SEND_QUEUE", 256usize, 1, 1_000_000)?,
            ws_replay_max_events: e.num("WS_REPLAY_MAX_EVENTS", 100_000u64, 10, 10_000_000)?,
            slow_query_ms: e.num("SLOW_QUERY_MS", 500u64, 1, 3_600_000)?,
            log_slow_statements: true,
            metrics_token: e.opt("METRICS_TOKEN")?,
            shutdown_timeout: e.duration("SHUTDOWN_TIMEOUT", s(30), Duration::ZERO, s(3600))?,
            dev_mode,
            login_attempts_per_minute: e.num("LOGIN_ATTEMPTS_PER_MINUTE", 5u32, 1, 10_000)?,
            password_hash_concurrency: e.num("PASSWORD_HASH_CONCURRENCY", 2usize, 1, 256)?,
            login_attempts_per_ip: e.num("LOGIN_ATTEMPTS_PER_IP", 20u32, 1, 1_000_000)?,
            refresh_token_ttl: e.duration(
                "REFRESH_TOKEN_TTL",
                s(7 * 86400),
                s(60),
                s(365 * 86400),
            )?,
            session_max_age: e.duration(
                "SESSION_MAX_AGE",
                s(30 * 86400),
                s(60),
                s(3650 * 86400),
            )?,
            ws_upgrades_per_minute: e.num(
                "WS_UPGRADES_PER_MINUTE",
                rate_limit_per_minute,
                1,
                10_000_000,
            )?,
            export_max_per_user: e.num(
                "EXPORT_MAX_PER_USER",
                (export_max_concurrent / 2).max(1),
                1,
                1000,
            )?,
            export_max_duration: e.duration("EXPORT_MAX_DURATION", s(3600), s(1), s(86400))?,
            import_max_bytes: e.num("IMPORT_MAX_BYTES", 1u64 << 30, 1, 1 << 40)?,
            import_max_uploads: e.num("IMPORT_MAX_UPLOADS", 4usize, 1, 1000)?,
            import_max_uploads_per_user: e.num("IMPORT_MAX_UPLOADS_PER_USER", 2usize, 1, 1000)?,
            jobs_max_per_user: e.num("JOBS_MAX_PER_USER", 10i64, 1, 100_000)?,
            import_idle_timeout: e.duration("IMPORT_IDLE_TIMEOUT", s(60), s(1), s(3600))?,
            import_chunk_lines: e.num("IMPORT_CHUNK_LINES", 20_000u32, 1, 1_000_000)?,
            import_parallelism: e.num("IMPORT_PARALLELISM", 2usize, 1, 16)?,
            job_workers: e.num("JOB_WORKERS", 2usize, 0, 64)?,
            job_lease: e.duration("JOB_LEASE", s(30), s(1), s(3600))?,
        })
    }

    /// Warns of each setting given that nothing reads (see `ignored`).
    pub fn warn_ignored(&self) {
        for (var, why) in &self.ignored {
            tracing::warn!(variable = *var, "{var} is set but not read: {why}");
        }
    }

    /// For `serve`: a warning when what holds a pooled connection for long
    /// could hold the whole pool: imports merging (JOB_WORKERS x
    /// IMPORT_PARALLELISM; extra import connections are taken only when the
    /// pool gives them within a second, so jobs never wait on each other),
    /// exports streaming (one each, up to `EXPORT_MAX_DURATION`) and
    /// uploads arriving (one each while the body is read). While they hold
    /// the pool, requests wait for a connection (and are answered 503 past
    /// DB_CONNECTION_TIMEOUT).
    pub fn warn_if_long_holders_can_fill_the_pool(&self) {
        if let Some(most) = self.long_holders_over_pool() {
            tracing::warn!(
                "imports, exports and uploads may hold {most} connections at once \
                 (JOB_WORKERS x IMPORT_PARALLELISM = {}, EXPORT_MAX_CONCURRENT = {}, IMPORT_MAX_UPLOADS = {}), \
                 not fewer than DB_POOL_MAX ({}): requests may wait for a connection while they run",
                self.job_workers * self.import_parallelism,
                self.export_max_concurrent,
                self.import_max_uploads,
                self.db_pool_max
            );
        }
    }

    /// How many pooled connections imports, exports and uploads may hold
    /// at once, when that is not fewer than the pool.
    fn long_holders_over_pool(&self) -> Option<usize> {
        let most = self.job_workers * self.import_parallelism
            + self.export_max_concurrent
            + self.import_max_uploads;
        (most >= self.db_pool_max as usize).then_some(most)
    }

    /// For `serve`: the secret must not be one this repository publishes,
    /// unless development mode is explicit.
    pub fn check_serving_secret(&self) -> Result<(), ConfigError> {
        let secret = self.require_jwt_secret()?;
        if !self.dev_mode && WELL_KNOWN_SECRETS.contains(&secret) {
            return Err(Env::err(
                "JWT_SECRET",
                "<hidden>",
                "is a development secret published in this repository; set a secret of your own \
                 (e.g. `openssl rand -hex 32`), or PG_SALES_DEV=1 for local development",
            ));
        }
        Ok(())
    }

    /// The HMAC secret, required by commands that verify or issue tokens.
    pub fn require_jwt_secret(&self) -> Result<&str, ConfigError> {
        self.jwt_secret.as_deref().ok_or_else(|| {
            Env::err(
                "JWT_SECRET",
                "",
                format!("must be set (at least {JWT_SECRET_MIN_BYTES} bytes) to issue and verify tokens"),
            )
        })
    }
}

/// The keys that verify tokens must not be open to tampering on the way:
/// `https`, except on this machine (a loopback address or `localhost`).
fn check_jwks_url(url: &str) -> Result<(), &'static str> {
    let parsed = reqwest::Url::parse(url).map_err(|_| "must be an https URL")?;
    let host = parsed.host_str().ok_or("must be an https URL")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err("must be https (plain http only for a loopback address)"),
        _ => Err("must be an https URL"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_must_hold_keys() {
        let dir = std::env::temp_dir().join(format!("pgs-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p.to_string_lossy().into_owned()
        };
        let not_pem = write("k.pem", "not a key\n");
        let e = cfg(&[("JWT_PUBLIC_KEY_FILE", &not_pem)]).unwrap_err();
        assert_eq!(
            (e.var, e.reason.as_str()),
            (
                "JWT_PUBLIC_KEY_FILE",
                "not an RSA or EC public key in PEM form"
            )
        );
        let ec = write(
            "ec.pem",
            "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEEVs/o5+uQbTjL3chynL4wXgUg2R9\nq9UU8I5mEovUf86QZ7kOBIjJwqnzD1omageEHWwHdBO6B+dFabmdT9POxg==\n-----END PUBLIC KEY-----\n",
        );
        assert!(cfg(&[("JWT_PUBLIC_KEY_FILE", &ec)]).is_ok());
        let missing = dir.join("missing.pem").to_string_lossy().into_owned();
        let e = cfg(&[("JWT_PUBLIC_KEY_FILE", &missing)]).unwrap_err();
        assert!(e.reason.starts_with("file cannot be read"), "{e}");

        let not_jwks = write("j.json", "{\"x\": 1}");
        let e = cfg(&[("JWT_JWKS_FILE", &not_jwks)]).unwrap_err();
        assert_eq!(e.var, "JWT_JWKS_FILE");
        assert!(e.reason.starts_with("not a JWKS document"), "{e}");
        let empty = write("empty.json", "{\"keys\": []}");
        let e = cfg(&[("JWT_JWKS_FILE", &empty)]).unwrap_err();
        assert!(e.reason.starts_with("holds no key"), "{e}");
        // A key without a kid, or of another algorithm, is no usable key.
        let no_kid = write(
            "no-kid.json",
            "{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\", \"alg\": \"HS256\"}]}",
        );
        assert!(cfg(&[("JWT_JWKS_FILE", &no_kid)]).is_err());
        let dir_path = dir.to_string_lossy().into_owned();
        assert!(cfg(&[("JWT_JWKS_FILE", &dir_path)])
            .unwrap_err()
            .reason
            .starts_with("file cannot be read"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_map(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn defaults() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.port, 3001);
        assert_eq!(c.db_pool_max, 20);
        assert_eq!(c.cache_ttl, Duration::from_secs(60));
        assert!(c.redis_url.is_none());
        assert_eq!(c.log_format, LogFormat::Pretty);
    }

    #[test]
    fn an_empty_database_url_is_refused_and_urls_hide_passwords() {
        let e = cfg(&[("DATABASE_URL", " ")]).unwrap_err();
        assert_eq!(e.var, "DATABASE_URL");
        let e = cfg(&[("DATABASE_URL", "postgresq://app:s3cret@db/x")]).unwrap_err();
        assert_eq!(e.value, "postgresq://<hidden>@db/x");
        let e = cfg(&[("REDIS_URL", "redi://:topsecret@cache:6379/0")]).unwrap_err();
        assert!(!e.value.contains("topsecret"), "{}", e.value);
        assert_eq!(without_password("redis://cache/0"), "redis://cache/0");
        // A mistyped `://`, or the password given libpq's way, in a query
        // parameter: hidden all the same.
        for (var, url) in [
            ("REDIS_URL", "redis//:TopSecret99@127.0.0.1:6379"),
            ("REDIS_URL", "redis:/u:TopSecret99@cache/0"),
            (
                "DATABASE_REPLICA_URL",
                "pg://replica.internal/pg_sales?user=sales_app&password=TopSecret99",
            ),
            (
                "DATABASE_URL",
                "postgres//sales_app@127.0.0.1/pg_sales?sslpassword=TopSecret99&x=1",
            ),
            (
                "DATABASE_URL",
                "postgres:/a:TopSecret99@h/db#Token=TopSecret99",
            ),
            // Unencoded `?`, `#` or `/` in the password itself.
            ("REDIS_URL", "redis://:Top?Secret99@cache:6379/0"),
            ("REDIS_URL", "redis://:TopSecret99#x@cache:6379/0"),
            ("DATABASE_URL", "postgres://app:Top/Secret99?x@db/x"),
        ] {
            let e = cfg(&[(var, url)]).unwrap_err();
            assert_eq!(e.var, var);
            assert!(!e.to_string().contains("TopSecret99"), "{e}");
        }
        assert_eq!(
            without_password("pg://h/db?user=u&password=x&sslmode=disable"),
            "pg://h/db?user=u&password=<hidden>&sslmode=disable"
        );
        // An unknown PGSSLMODE is refused, as libpq refuses it, rather
        // than read as none (and so no TLS).
        for m in ["bogus", "requir"] {
            let e = cfg(&[("PGSSLMODE", m)]).unwrap_err();
            assert_eq!(e.var, "PGSSLMODE", "{m}");
        }
        assert!(cfg(&[("PGSSLMODE", "disable")]).is_ok());
        // A Redis database number outside 0..15, which the client takes.
        for url in ["redis://127.0.0.1:6379/-1", "redis://127.0.0.1:6379/99"] {
            let e = cfg(&[("REDIS_URL", url)]).unwrap_err();
            assert!(e.reason.contains("databases 0 to 15"), "{e}");
        }
        assert!(cfg(&[("REDIS_URL", "redis://127.0.0.1:6379/15")]).is_ok());
    }

    #[test]
    fn origins_log_levels_redis_parts_and_bare_durations() {
        let bad = |k: &str, v: &str| cfg(&[(k, v)]).unwrap_err();
        for o in [
            "https://app.example.com/",
            "app.example.com",
            "https://app.example.com/x",
            "1http://a.b",
            "https://",
        ] {
            let e = bad("CORS_ORIGINS", o);
            assert_eq!(e.var, "CORS_ORIGINS", "{o}");
            assert!(e.reason.contains("no path or trailing slash"), "{e}");
        }
        let ok = cfg(&[(
            "CORS_ORIGINS",
            "https://a.example.com, http://127.0.0.1:8080",
        )])
        .unwrap();
        assert_eq!(
            ok.cors_origins,
            ["https://a.example.com", "http://127.0.0.1:8080"]
        );
        for l in ["warning", "inf", "sales_server=loud"] {
            assert_eq!(bad("LOG_LEVEL", l).var, "LOG_LEVEL", "{l}");
        }
        for l in [
            "warn",
            "DEBUG",
            "sales_server=debug,info",
            "sales_server",
            "off",
        ] {
            assert!(cfg(&[("LOG_LEVEL", l)]).is_ok(), "{l}");
        }
        let c = cfg(&[("REDIS_HOST", "127.0.0.1"), ("REDIS_PASSWORD", "a/b#c@d:e")]).unwrap();
        assert_eq!(
            c.redis_url.as_deref(),
            Some("redis://:a%2Fb%23c%40d%3Ae@127.0.0.1:6379/0")
        );
        let c = cfg(&[("REDIS_HOST", "::1"), ("REDIS_PORT", "6380")]).unwrap();
        assert_eq!(c.redis_url.as_deref(), Some("redis://[::1]:6380/0"));
        assert_eq!(bad("REDIS_HOST", "a/b").var, "REDIS_HOST");
        for (host, url) in [
            ("[::1]", "redis://[::1]:6379/0"),
            ("project_redis_1", "redis://project_redis_1:6379/0"),
        ] {
            let c = cfg(&[("REDIS_HOST", host)]).unwrap();
            assert_eq!(c.redis_url.as_deref(), Some(url));
        }
        for b in ["::", "[::]", "[::1]", "0.0.0.0", "localhost"] {
            assert!(cfg(&[("BIND_ADDR", b)]).is_ok(), "{b}");
        }
        assert_eq!(bad("BIND_ADDR", "no-such-host.invalid").var, "BIND_ADDR");
        // Redis parts nothing reads are warned about, not refused (and
        // not read: a bad value of one is not an error).
        let c = cfg(&[
            ("REDIS_URL", "redis://127.0.0.1:6379"),
            ("REDIS_PORT", "abc"),
            ("REDIS_HOST", "10.0.0.1"),
        ])
        .unwrap();
        let vars: Vec<&str> = c.ignored.iter().map(|(v, _)| *v).collect();
        assert_eq!(vars, ["REDIS_HOST", "REDIS_PORT"]);
        let c = cfg(&[("REDIS_DB", "x")]).unwrap();
        assert_eq!(c.ignored.len(), 1);
        assert!(cfg(&[]).unwrap().ignored.is_empty());
        let e = cfg(&[("REDIS_HOST", "127.0.0.1"), ("REDIS_PORT", "6379x")]).unwrap_err();
        assert_eq!(e.var, "REDIS_PORT", "read with REDIS_HOST");
        // Brackets: one pair, around an IPv6 address only.
        for b in ["[::1", "::1]", "[[::1]]", "[127.0.0.1]", "[localhost]"] {
            assert_eq!(bad("BIND_ADDR", b).var, "BIND_ADDR", "{b}");
        }
        for o in [
            "chrome-extension://abcdef",
            "capacitor://localhost",
            "http://[::1]:3000",
        ] {
            assert!(cfg(&[("CORS_ORIGINS", o)]).is_ok(), "{o}");
        }
        assert!(bad("CORS_ORIGINS", "*").reason.contains("`*` is not one"));
        for l in [
            "3",
            "sales_server=4",
            "sales_server[request{user_id=5}]",
            "h2[conn]=debug,info",
        ] {
            assert!(cfg(&[("LOG_LEVEL", l)]).is_ok(), "{l}");
        }
        let e = bad("DB_IDLE_TIMEOUT", "300");
        assert!(
            e.reason
                .contains("a bare number is milliseconds: 300 is 300ms"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        assert_eq!(
            cfg(&[("DB_POOL_MAX", "abc")]).unwrap_err().var,
            "DB_POOL_MAX"
        );
        assert_eq!(cfg(&[("PORT", "70000")]).unwrap_err().var, "PORT");
        assert_eq!(cfg(&[("LOG_FORMAT", "xml")]).unwrap_err().var, "LOG_FORMAT");
        assert_eq!(
            cfg(&[("DB_QUERY_TIMEOUT", "soon")]).unwrap_err().var,
            "DB_QUERY_TIMEOUT"
        );
        assert_eq!(
            cfg(&[("DATABASE_URL", "mysql://x")]).unwrap_err().var,
            "DATABASE_URL"
        );
        assert_eq!(
            cfg(&[("JWT_SECRET", "short")]).unwrap_err().var,
            "JWT_SECRET"
        );
        assert_eq!(
            cfg(&[("DB_POOL_MIN", "50"), ("DB_POOL_MAX", "10")])
                .unwrap_err()
                .var,
            "DB_POOL_MIN"
        );
        assert_eq!(
            cfg(&[("REDIS_URL", "http://x")]).unwrap_err().var,
            "REDIS_URL"
        );
        // The scheme is not enough: what the client refuses is refused here.
        for bad in [
            "redis://:topsecret@127.0.0.1:99999",
            "redis://127.0.0.1:abc",
            "redis://127.0.0.1:6379/x",
            "redis://127.0.0.1:6379/0?protocol=resp9",
        ] {
            let e = cfg(&[("REDIS_URL", bad)]).unwrap_err();
            assert_eq!(e.var, "REDIS_URL", "{bad}");
            assert!(e.reason.starts_with("not a Redis URL"), "{e}");
            assert!(!e.to_string().contains("topsecret"), "{e}");
            let e = cfg(&[("REDIS_CLUSTER_URLS", bad)]).unwrap_err();
            assert_eq!(e.var, "REDIS_CLUSTER_URLS", "{bad}");
        }
        assert!(cfg(&[("REDIS_URL", "redis://:pw@127.0.0.1:6380/3")]).is_ok());
        // Nodes of one cluster with different passwords (or users): the
        // client would refuse them, or use the first's for all, at every
        // connection attempt.
        for mixed in [
            "redis://:topsecret@127.0.0.1:7000,redis://127.0.0.1:7001",
            "redis://127.0.0.1:7000,redis://:topsecret@127.0.0.1:7001",
            "redis://a:topsecret@127.0.0.1:7000,redis://b:topsecret@127.0.0.1:7001",
        ] {
            let e = cfg(&[("REDIS_CLUSTER_URLS", mixed)]).unwrap_err();
            assert_eq!(e.var, "REDIS_CLUSTER_URLS");
            assert!(e.reason.contains("same user and password"), "{e}");
            assert!(!e.to_string().contains("topsecret"), "{e}");
        }
        assert!(cfg(&[(
            "REDIS_CLUSTER_URLS",
            "redis://:pw@127.0.0.1:7000,redis://:pw@127.0.0.1:7001"
        )])
        .is_ok());
        // This build's Redis client has no TLS: said at start, not at the
        // first connection.
        let e = cfg(&[("REDIS_URL", "rediss://cache.example:6379")]).unwrap_err();
        assert!(e.reason.contains("TLS"), "{e}");
        assert_eq!(
            cfg(&[("COMPRESSION_LEVEL", "0")]).unwrap_err().var,
            "COMPRESSION_LEVEL"
        );
        assert_eq!(cfg(&[("HSTS", "maybe")]).unwrap_err().var, "HSTS");
        assert_eq!(
            cfg(&[("TRUSTED_PROXIES", "10.0.0.1, proxy.local")])
                .unwrap_err()
                .var,
            "TRUSTED_PROXIES"
        );
        assert_eq!(
            cfg(&[("TRUSTED_PROXIES", "10.0.0.0/33")]).unwrap_err().var,
            "TRUSTED_PROXIES"
        );
        let nets = cfg(&[("TRUSTED_PROXIES", "10.1.2.3/8, ::1,192.168.0.7")])
            .unwrap()
            .trusted_proxies;
        let names: Vec<String> = nets.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["10.0.0.0/8", "::1/128", "192.168.0.7/32"]);
    }

    #[test]
    fn redis_from_parts() {
        let c = cfg(&[
            ("REDIS_HOST", "10.0.0.5"),
            ("REDIS_PORT", "6380"),
            ("REDIS_PASSWORD", "pw"),
            ("REDIS_DB", "2"),
        ])
        .unwrap();
        assert_eq!(c.redis_url.as_deref(), Some("redis://:pw@10.0.0.5:6380/2"));
    }

    /// Imports, exports and uploads counted together against the pool (the
    /// warning counted imports alone: 4 exports and 4 uploads beside them
    /// could take a pool of 10 unwarned).
    #[test]
    fn long_holders_are_counted_against_the_pool() {
        assert_eq!(cfg(&[]).unwrap().long_holders_over_pool(), None);
        let c = cfg(&[
            ("DB_POOL_MAX", "10"),
            ("JOB_WORKERS", "2"),
            ("IMPORT_PARALLELISM", "2"),
        ])
        .unwrap();
        assert_eq!(c.long_holders_over_pool(), Some(12));
        let c = cfg(&[("DB_POOL_MAX", "13"), ("EXPORT_MAX_CONCURRENT", "2")]).unwrap();
        assert_eq!(c.long_holders_over_pool(), None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("-1s"), None);
    }

    /// The seed's environment block: bare DB_* timeouts are milliseconds.
    #[test]
    fn seed_environment() {
        let c = cfg(&[
            ("DB_IDLE_TIMEOUT", "30000"),
            ("DB_CONNECTION_TIMEOUT", "10000"),
            ("DB_QUERY_TIMEOUT", "30000"),
            ("CACHE_TTL", "300"),
            ("COMPRESSION_LEVEL", "6"),
            ("NODE_ENV", "production"),
        ])
        .unwrap();
        assert_eq!(c.db_idle_timeout, Duration::from_secs(30));
        assert_eq!(c.db_connection_timeout, Duration::from_secs(10));
        assert_eq!(c.db_query_timeout, Duration::from_secs(30));
        assert_eq!(c.cache_ttl, Duration::from_secs(300));
        assert_eq!(c.compression_level, 6);
        assert!(!c.dev_mode);
        let c = cfg(&[("DB_QUERY_TIMEOUT", "30s"), ("DB_IDLE_TIMEOUT", "5m")]).unwrap();
        assert_eq!(c.db_query_timeout, Duration::from_secs(30));
        assert_eq!(c.db_idle_timeout, Duration::from_secs(300));
    }

    #[test]
    fn published_secrets_need_development_mode() {
        for secret in WELL_KNOWN_SECRETS {
            let c = cfg(&[("JWT_SECRET", secret)]).unwrap();
            assert_eq!(c.check_serving_secret().unwrap_err().var, "JWT_SECRET");
            for dev in [("PG_SALES_DEV", "1"), ("APP_ENV", "development")] {
                let c = cfg(&[("JWT_SECRET", secret), dev]).unwrap();
                assert!(c.check_serving_secret().is_ok());
            }
        }
        let c = cfg(&[("JWT_SECRET", "a-secret-of-this-deployment-0123456789")]).unwrap();
        assert!(c.check_serving_secret().is_ok());
    }

    #[test]
    fn jwks_url_is_https_except_on_loopback() {
        for ok in [
            "https://idp.example.com/.well-known/jwks.json",
            "http://127.0.0.1:8080/jwks.json",
            "http://localhost/jwks.json",
            "http://[::1]:9000/jwks.json",
        ] {
            assert!(cfg(&[("JWT_JWKS_URL", ok)]).is_ok(), "{ok}");
        }
        for bad in [
            "http://idp.example.com/jwks.json",
            "http://10.0.0.5/jwks.json",
            "ftp://idp.example.com/jwks.json",
            "not a url",
        ] {
            let e = cfg(&[("JWT_JWKS_URL", bad)]).unwrap_err().to_string();
            assert!(
                e.contains("JWT_JWKS_URL") && e.contains("https"),
                "{bad}: {e}"
            );
        }
    }

    /// An sslmode that requires TLS is refused at start (this build's
    /// driver has none), from the URL or from PGSSLMODE, for either URL;
    /// the modes that connect without TLS here are accepted.
    #[test]
    fn sslmodes_requiring_tls_are_refused() {
        let base = "postgres://app:s3cret@db.example:5432/sales";
        for q in [
            "sslmode=require",
            "sslmode=verify-ca",
            "sslmode=verify-full",
            "sslmode=REQUIRE",
            "ssl-mode=require",
            "sslmode=disable&sslmode=require",
            "application_name=x&sslmode=verify-full",
        ] {
            let url = format!("{base}?{q}");
            for var in ["DATABASE_URL", "DATABASE_REPLICA_URL"] {
                let e = cfg(&[(var, &url)]).unwrap_err();
                assert_eq!(e.var, var, "{q}");
                assert!(
                    e.reason.contains("without TLS") && e.reason.contains("sslmode=disable"),
                    "{e}"
                );
                assert!(!e.to_string().contains("s3cret"), "{e}");
            }
        }
        for q in [
            "",
            "?sslmode=prefer",
            "?sslmode=allow",
            "?sslmode=disable",
            "?sslmode=require&sslmode=prefer",
        ] {
            let url = format!("{base}{q}");
            assert!(cfg(&[("DATABASE_URL", &url)]).is_ok(), "{q}");
            assert!(cfg(&[("DATABASE_REPLICA_URL", &url)]).is_ok(), "{q}");
        }
        // PGSSLMODE applies to a URL that names no sslmode (the default
        // URL too), as sqlx reads it.
        for mode in ["require", "verify-ca", "verify-full"] {
            let e = cfg(&[("PGSSLMODE", mode)]).unwrap_err();
            assert_eq!(e.var, "PGSSLMODE", "{mode}");
            assert!(e.reason.contains("for DATABASE_URL"), "{e}");
            let e = cfg(&[
                ("PGSSLMODE", mode),
                ("DATABASE_URL", &format!("{base}?sslmode=disable")),
                ("DATABASE_REPLICA_URL", base),
            ])
            .unwrap_err();
            assert_eq!(e.var, "PGSSLMODE", "{mode}");
            assert!(e.reason.contains("for DATABASE_REPLICA_URL"), "{e}");
            // A URL's own sslmode wins over PGSSLMODE.
            let url = format!("{base}?sslmode=prefer");
            assert!(cfg(&[("PGSSLMODE", mode), ("DATABASE_URL", &url)]).is_ok());
        }
        // Modes without TLS, and an empty value (unset).
        for mode in ["prefer", "allow", "disable", ""] {
            assert!(cfg(&[("PGSSLMODE", mode)]).is_ok(), "{mode}");
        }
        // A value sqlx does not read (it ignored it, and connected without
        // TLS) is refused, as libpq refuses it.
        for mode in ["tls-please", " require", "REQUIRE "] {
            assert_eq!(
                cfg(&[("PGSSLMODE", mode)]).unwrap_err().var,
                "PGSSLMODE",
                "{mode:?}"
            );
        }
    }

    /// [`POSTGRES_TLS`] says what the driver does: a connection that
    /// requires TLS fails before any byte is sent when it has none.
    #[tokio::test]
    async fn postgres_tls_matches_the_driver() {
        use sqlx::ConnectOptions;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // Accepts and closes, so a driver with TLS fails too (differently).
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                drop(socket);
            }
        });
        let options = sqlx::postgres::PgConnectOptions::new_without_pgpass()
            .host("127.0.0.1")
            .port(port)
            .username("nobody")
            .ssl_mode(sqlx::postgres::PgSslMode::Require);
        let e = tokio::time::timeout(Duration::from_secs(10), options.connect())
            .await
            .expect("the connection attempt ends")
            .expect_err("nothing answers as Postgres");
        let no_tls = e.to_string().contains("without TLS support");
        assert_eq!(no_tls, !POSTGRES_TLS, "{e}");
    }

    #[test]
    fn the_default_pool_minimum_follows_a_smaller_maximum() {
        let c = cfg(&[("DB_POOL_MAX", "1")]).unwrap();
        assert_eq!((c.db_pool_min, c.db_pool_max), (1, 1));
        let c = cfg(&[("DB_POOL_MAX", "2")]).unwrap();
        assert_eq!((c.db_pool_min, c.db_pool_max), (2, 2));
        let c = cfg(&[]).unwrap();
        assert_eq!((c.db_pool_min, c.db_pool_max), (2, 20));
        let c = cfg(&[("DB_POOL_MAX", "1"), ("DB_POOL_MIN", "0")]).unwrap();
        assert_eq!((c.db_pool_min, c.db_pool_max), (0, 1));
        // Both set and in conflict: refused.
        let e = cfg(&[("DB_POOL_MAX", "1"), ("DB_POOL_MIN", "2")]).unwrap_err();
        assert_eq!(e.var, "DB_POOL_MIN");
        assert_eq!(e.reason, "must not exceed DB_POOL_MAX (1)");
        // A minimum alone above the default maximum: refused as before.
        assert_eq!(
            cfg(&[("DB_POOL_MIN", "21")]).unwrap_err().var,
            "DB_POOL_MIN"
        );
    }

    /// Every variable the configuration reads refuses a value that is set
    /// but empty (or only blanks), naming it and saying how to unset it.
    #[test]
    fn set_but_empty_is_refused_for_every_variable() {
        READ.with(|r| r.borrow_mut().clear());
        cfg(&[]).unwrap();
        cfg(&[("REDIS_HOST", "cache.local")]).unwrap();
        let mut read = READ.with(|r| r.borrow().clone());
        read.sort_unstable();
        read.dedup();
        for var in [
            "DATABASE_URL",
            "REDIS_URL",
            "REDIS_PASSWORD",
            "REDIS_CLUSTER_URLS",
            "CACHE_PREFIX",
            "METRICS_TOKEN",
            "PORT",
            "LOG_LEVEL",
            "JWT_SECRET",
            "PG_SALES_DEV",
            "JOB_LEASE",
        ] {
            assert!(read.contains(&var), "{var} is not read: {read:?}");
        }
        assert!(read.len() >= 60, "{read:?}");
        for var in read {
            for value in ["", " ", "\t "] {
                // Alone: a Redis part is refused empty whatever the source
                // of the Redis address (it is read only with REDIS_HOST).
                let e = cfg(&[(var, value)]).expect_err(var);
                assert_eq!(e.var, var);
                assert_eq!(e.value, value);
                assert!(
                    e.reason.starts_with("is set but empty")
                        && e.reason.contains(&format!("`unset {var}`")),
                    "{e}"
                );
            }
        }
        // A list that names nothing is refused the same way.
        for var in ["CORS_ORIGINS", "TRUSTED_PROXIES", "REDIS_CLUSTER_URLS"] {
            for value in [",", " , ,"] {
                let e = cfg(&[(var, value)]).unwrap_err();
                assert_eq!(e.var, var);
                assert!(e.reason.contains(&format!("`unset {var}`")), "{e}");
            }
        }
        // APP_ENV and NODE_ENV are other software's as well: empty is
        // "not development", never refused.
        for var in ["APP_ENV", "NODE_ENV"] {
            assert!(!cfg(&[(var, "")]).unwrap().dev_mode);
            assert!(cfg(&[(var, " development ")]).unwrap().dev_mode);
        }
    }

    /// The cluster would win: a single Redis named as well is refused.
    #[test]
    fn redis_url_and_cluster_are_not_both_set() {
        let cluster = "redis://10.0.0.1:7000,redis://10.0.0.2:7000";
        let e = cfg(&[
            ("REDIS_URL", "redis://:topsecret@10.0.0.9:6379/0"),
            ("REDIS_CLUSTER_URLS", cluster),
        ])
        .unwrap_err();
        assert_eq!(e.var, "REDIS_URL");
        assert_eq!(e.reason, "set REDIS_URL or REDIS_CLUSTER_URLS, not both");
        assert!(!e.to_string().contains("topsecret"), "{e}");
        let e = cfg(&[("REDIS_HOST", "10.0.0.9"), ("REDIS_CLUSTER_URLS", cluster)]).unwrap_err();
        assert_eq!(e.var, "REDIS_HOST");
        assert_eq!(e.reason, "set REDIS_HOST or REDIS_CLUSTER_URLS, not both");
        let c = cfg(&[("REDIS_CLUSTER_URLS", cluster)]).unwrap();
        assert_eq!(c.redis_cluster_urls.len(), 2);
        assert!(c.redis_url.is_none());
        // REDIS_URL over REDIS_HOST stays as documented.
        let c = cfg(&[("REDIS_URL", "redis://a:6379"), ("REDIS_HOST", "b")]).unwrap();
        assert_eq!(c.redis_url.as_deref(), Some("redis://a:6379"));
    }

    /// The minimum is in bytes, as HMAC uses the secret, and says so.
    #[test]
    fn jwt_secret_minimum_is_in_bytes() {
        let e = cfg(&[("JWT_SECRET", &"a".repeat(31))]).unwrap_err();
        assert_eq!(e.var, "JWT_SECRET");
        assert!(
            e.reason
                .starts_with("must be at least 32 bytes (this one has 31;"),
            "{e}"
        );
        // 16 characters, 31 bytes: refused.
        let short = format!("{}a", "é".repeat(15));
        assert_eq!(short.chars().count(), 16);
        assert!(cfg(&[("JWT_SECRET", &short)])
            .unwrap_err()
            .reason
            .contains("32 bytes"));
        // 16 characters, 32 bytes: accepted.
        assert!(cfg(&[("JWT_SECRET", &"é".repeat(16))]).is_ok());
        assert!(cfg(&[("JWT_SECRET", &"a".repeat(32))]).is_ok());
        let unset = cfg(&[]).unwrap().require_jwt_secret().unwrap_err();
        assert!(unset.reason.contains("at least 32 bytes"), "{unset}");
        assert!(!unset.reason.contains("characters"), "{unset}");
    }
}
