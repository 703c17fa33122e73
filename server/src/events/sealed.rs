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
    open_parts(payload, now_ms).map(|(json, _, _)| json)
}

/// The JSON, the seal and `sentAt` of a payload [`open`] accepts.
fn open_parts(payload: &str, now_ms: i64) -> Result<(&str, [u8; 32], i64), &'static str> {
    let rest = payload.strip_prefix(PREFIX).ok_or("not sealed")?;
    let (tag, json) = rest.split_once('.').ok_or("not sealed")?;
    let tag: [u8; 32] = hex::decode(tag)
        .ok()
        .and_then(|t| t.try_into().ok())
        .ok_or("not sealed")?;
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
    Ok((json, tag, sent_at))
}

/// The seals a listener has opened within [`MAX_AGE_MS`]: a sealed
/// message is relayed once. Any role that can LISTEN sees the payloads and
/// could NOTIFY one again (a stale progress, a link already shown); the
/// copy is dropped. Holds what was sent in the last [`MAX_AGE_MS`] (the
/// seals' age bounds it: nothing older opens), pruned as it grows.
#[derive(Debug, Default)]
pub struct Replays {
    seen: std::collections::HashMap<[u8; 32], i64>,
    prune_at: usize,
}

impl Replays {
    /// [`open`], and refused when this seal was opened here before.
    pub fn open<'p>(&mut self, payload: &'p str, now_ms: i64) -> Result<&'p str, &'static str> {
        let (json, tag, sent_at) = open_parts(payload, now_ms)?;
        if self.seen.len() >= self.prune_at.max(1024) {
            self.seen
                .retain(|_, sent| (now_ms - *sent).abs() <= MAX_AGE_MS);
            self.prune_at = self.seen.len() * 2;
        }
        if self.seen.insert(tag, sent_at).is_some() {
            return Err("relayed already (a copy sent again)");
        }
        Ok(json)
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
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

    #[test]
    fn a_seal_opens_once_per_listener_and_old_ones_are_forgotten() {
        init("a-secret-of-the-tests-a-secret-of-the-tests");
        let now = chrono::Utc::now().timestamp_millis();
        let mut replays = Replays::default();
        let p = seal_at(4, "export-progress", json!({"rows": 10}), now);
        assert!(replays.open(&p, now).is_ok());
        assert_eq!(
            replays.open(&p, now + 1000),
            Err("relayed already (a copy sent again)")
        );
        // The same message sent again later is another seal.
        let again = seal_at(4, "export-progress", json!({"rows": 10}), now + 1);
        assert!(replays.open(&again, now + 1000).is_ok());
        // Another listener (instance) relays its own copy.
        assert!(Replays::default().open(&p, now).is_ok());
        // Seals past their age are pruned as more arrive.
        for i in 0..2000 {
            let q = seal_at(5, "export-progress", json!({"i": i}), now);
            assert!(replays.open(&q, now).is_ok());
        }
        let later = now + MAX_AGE_MS + 1;
        for i in 0..2000 {
            let q = seal_at(6, "export-progress", json!({"i": i}), later);
            assert!(replays.open(&q, later).is_ok());
        }
        assert!(replays.len() < 3000, "{}", replays.len());
        assert_eq!(replays.open(&p, later), Err("sent too long ago"));
    }
}
