//! NOTIFY-only messages are sealed: `sales_ephemeral` is a channel any
//! role that can connect may NOTIFY on (Postgres asks no privilege for it),
//! so a message is relayed to a user's WebSocket only when it carries an
//! HMAC made with a key the server instances share (derived from
//! `JWT_SECRET`) and was sent within [`MAX_AGE_MS`]. A message forged in
//! plain SQL (a link sent as if it were an export's) is dropped.
//!
//! Wire form: `s1.<hex HMAC-SHA256 of the JSON>.<JSON>`, the JSON being
//! `{"userId", "event", "data", "sentAt"}` (`sentAt` in Unix milliseconds).

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::sync::OnceLock;

const PREFIX: &str = "s1.";

/// How old (or how far ahead, for clocks apart) a sealed message may be.
pub const MAX_AGE_MS: i64 = 5 * 60 * 1000;

static KEY: OnceLock<[u8; 32]> = OnceLock::new();

/// Sets this process' sealing key from the JWT secret (every instance has
/// the same); the first call wins. Without it the key is random, so what
/// this process seals no other process opens.
pub fn init(secret: &str) {
    let _ = KEY.get_or_init(|| {
        let mut h = Sha256::new();
        h.update(b"pg_sales sales_ephemeral v1\0");
        h.update(secret.as_bytes());
        h.finalize().into()
    });
}

fn key() -> &'static [u8; 32] {
    KEY.get_or_init(rand::random)
}

fn mac(json: &str) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key()).expect("any key length");
    m.update(json.as_bytes());
    m
}

/// The NOTIFY payload for a live-only message to one user.
pub fn seal(user_id: i64, event: &str, data: serde_json::Value) -> String {
    seal_at(user_id, event, data, chrono::Utc::now().timestamp_millis())
}

fn seal_at(user_id: i64, event: &str, data: serde_json::Value, sent_at: i64) -> String {
    let json = serde_json::json!({
        "userId": user_id, "event": event, "data": data, "sentAt": sent_at,
    })
    .to_string();
    let tag = hex::encode(mac(&json).finalize().into_bytes());
    format!("{PREFIX}{tag}.{json}")
}

/// The JSON of a sealed payload whose seal holds and which was sent within
/// [`MAX_AGE_MS`] of `now_ms`; otherwise why not.
pub fn open(payload: &str, now_ms: i64) -> Result<&str, &'static str> {
    let rest = payload.strip_prefix(PREFIX).ok_or("not sealed")?;
    let (tag, json) = rest.split_once('.').ok_or("not sealed")?;
    let tag = hex::decode(tag).map_err(|_| "not sealed")?;
    mac(json)
        .verify_slice(&tag)
        .map_err(|_| "its seal does not match")?;
    let sent_at = serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v.get("sentAt").and_then(serde_json::Value::as_i64))
        .ok_or("no sentAt")?;
    if (now_ms - sent_at).abs() > MAX_AGE_MS {
        return Err("sent too long ago");
    }
    Ok(json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_what_was_sealed_here_recently_opens() {
        init("a-secret-of-the-tests-a-secret-of-the-tests");
        let now = chrono::Utc::now().timestamp_millis();
        let p = seal_at(4, "export-progress", json!({"rows": 10}), now);
        let json = open(&p, now).unwrap();
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["userId"], 4);
        assert_eq!(v["data"]["rows"], 10);
        // Plain JSON, as any SQL role can NOTIFY it.
        assert_eq!(
            open(r#"{"userId":4,"event":"export-progress","data":{}}"#, now),
            Err("not sealed")
        );
        // Changed after sealing.
        let forged = p.replace("\"rows\":10", "\"rows\":11");
        assert_eq!(open(&forged, now), Err("its seal does not match"));
        // Sealed with another key.
        let other = <Hmac<Sha256> as Mac>::new_from_slice(b"another key")
            .unwrap()
            .chain_update(b"{}")
            .finalize()
            .into_bytes();
        assert!(open(&format!("s1.{}.{{}}", hex::encode(other)), now).is_err());
        // Replayed much later.
        assert_eq!(open(&p, now + MAX_AGE_MS + 1), Err("sent too long ago"));
    }
}
