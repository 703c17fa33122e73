//! Keys of an outside identity provider as a JWKS (JSON Web Key Set), from
//! a URL (`JWT_JWKS_URL`) or a file (`JWT_JWKS_FILE`), for RS256 and ES256
//! tokens that name their key (`kid`).
//!
//! Rotation: the set is read again every `JWT_JWKS_REFRESH`, and at once
//! (at most every 10 s) when a token names a key the set does not have, so a
//! provider's new key is accepted as soon as it is published and a key it
//! withdrew is refused from the next reading. A reading that fails keeps the
//! keys already known.

use anyhow::Context;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// The largest key set read from JWT_JWKS_URL (a real one is a few KiB).
const MAX_JWKS_BYTES: usize = 1 << 20;

/// The shortest time between two readings asked for by unknown keys.
const MIN_RELOAD: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub enum Source {
    Url(String),
    File(String),
}

pub struct Jwks {
    source: Source,
    refresh: Duration,
    keys: RwLock<HashMap<String, (Algorithm, Arc<DecodingKey>)>>,
    wanted: Notify,
    last: Mutex<Option<Instant>>,
}

/// The keys of a set this server can use: RS256 (RSA) and ES256 (EC P-256)
/// with a `kid`; others are skipped.
pub fn parse(json: &str) -> anyhow::Result<HashMap<String, (Algorithm, Arc<DecodingKey>)>> {
    let set: JwkSet = serde_json::from_str(json).context("not a JWKS document")?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
            (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
            (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
                if ec.curve == EllipticCurve::P256 =>
            {
                Algorithm::ES256
            }
            _ => continue,
        };
        match DecodingKey::from_jwk(jwk) {
            Ok(k) => {
                keys.insert(kid, (alg, Arc::new(k)));
            }
            Err(e) => tracing::warn!(kid, error = %e, "JWKS: skipping a key that cannot be used"),
        }
    }
    Ok(keys)
}

impl Jwks {
    pub fn new(source: Source, refresh: Duration) -> Self {
        Self {
            source,
            refresh,
            keys: RwLock::new(HashMap::new()),
            wanted: Notify::new(),
            last: Mutex::new(None),
        }
    }

    /// The key a token names; `None` asks for a new reading.
    pub fn key(&self, kid: &str) -> Option<(Algorithm, Arc<DecodingKey>)> {
        let found = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(kid)
            .cloned();
        if found.is_none() {
            self.wanted.notify_one();
        }
        found
    }

    pub fn key_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        ids.sort();
        ids
    }

    async fn fetch(&self) -> anyhow::Result<String> {
        match &self.source {
            Source::File(path) => tokio::fs::read_to_string(path)
                .await
                .with_context(|| format!("JWT_JWKS_FILE: reading {path}")),
            Source::Url(url) => {
                // No redirects: only the configured `https` address is
                // trusted for keys, and a redirect could lead elsewhere,
                // over plain http too.
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .redirect(reqwest::redirect::Policy::none())
                    .build()?;
                let resp = client
                    .get(url)
                    .send()
                    .await
                    .with_context(|| format!("JWT_JWKS_URL: fetching {url}"))?;
                if !resp.status().is_success() {
                    anyhow::bail!("JWT_JWKS_URL: {url} answered {}", resp.status());
                }
                let mut resp = resp;
                let mut body = Vec::new();
                while let Some(chunk) = resp.chunk().await? {
                    if body.len() + chunk.len() > MAX_JWKS_BYTES {
                        anyhow::bail!(
                            "JWT_JWKS_URL: {url} answered more than {MAX_JWKS_BYTES} bytes"
                        );
                    }
                    body.extend_from_slice(&chunk);
                }
                String::from_utf8(body).context("JWT_JWKS_URL: the answer is not UTF-8")
            }
        }
    }

    /// Reads the set again and replaces the keys; returns how many there are.
    pub async fn reload(&self) -> anyhow::Result<usize> {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let keys = parse(&self.fetch().await?)?;
        let n = keys.len();
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        Ok(n)
    }

    /// Reads the set every `refresh`, and when a token named an unknown key
    /// (at most every 10 s), until the task is dropped.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(me.refresh) => {}
                    _ = me.wanted.notified() => {
                        let since = me.last.lock().unwrap_or_else(|p| p.into_inner()).map(|t| t.elapsed());
                        if let Some(wait) = since.and_then(|s| MIN_RELOAD.checked_sub(s)) {
                            tokio::time::sleep(wait).await;
                        }
                    }
                }
                match me.reload().await {
                    Ok(n) => tracing::debug!(keys = n, "JWKS read"),
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "JWKS: keeping the keys known so far")
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_rs256_and_es256_keys_with_a_kid() {
        let set = r#"{"keys": [
            {"kty": "RSA", "kid": "r1", "alg": "RS256", "use": "sig",
             "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw",
             "e": "AQAB"},
            {"kty": "EC", "kid": "e1", "crv": "P-256",
             "x": "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4",
             "y": "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"},
            {"kty": "RSA", "n": "AQAB", "e": "AQAB"},
            {"kty": "oct", "kid": "h1", "k": "c2VjcmV0"}
        ]}"#;
        let keys = parse(set).unwrap();
        let mut ids: Vec<&String> = keys.keys().collect();
        ids.sort();
        assert_eq!(ids, ["e1", "r1"]);
        assert_eq!(keys["r1"].0, Algorithm::RS256);
        assert_eq!(keys["e1"].0, Algorithm::ES256);
        assert!(parse("{}").is_err());
    }

    /// Answers every request on loopback with `head` and `body`.
    async fn answer(head: String, body: &'static str) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let head = head.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = sock.read(&mut buf).await;
                    let resp = format!(
                        "{head}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                });
            }
        });
        addr
    }

    /// The key set is read from the configured address only: a redirect
    /// is an error, not followed (it could lead anywhere, over plain http).
    #[tokio::test]
    async fn a_redirect_is_not_followed() {
        let keys = answer(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json".into(),
            r#"{"keys": []}"#,
        )
        .await;
        let direct = Jwks::new(
            Source::Url(format!("http://{keys}/jwks.json")),
            Duration::from_secs(60),
        );
        assert_eq!(direct.reload().await.unwrap(), 0);
        let redirect = answer(
            format!("HTTP/1.1 302 Found\r\nlocation: http://{keys}/jwks.json"),
            "",
        )
        .await;
        let jwks = Jwks::new(
            Source::Url(format!("http://{redirect}/jwks.json")),
            Duration::from_secs(60),
        );
        let err = format!("{:#}", jwks.reload().await.unwrap_err());
        assert!(err.contains("302"), "{err}");
    }
}
