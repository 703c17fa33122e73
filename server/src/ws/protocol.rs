//! The WebSocket protocol: what clients send, what the server answers, the
//! channel names and the close codes. Every frame is a JSON text frame.
//!
//! Client → server:
//! `{"type":"subscribe","event":"sales-data-12"}`, `{"type":"unsubscribe","event":"stores"}`,
//! `{"type":"ping"}`, `{"type":"resume","lastEventId":1234}` (optionally with
//! `"events":["sales-data-12",...]` to subscribe and resume in one step, and
//! the `"epoch"` the id was read under, from `ready`).
//!
//! Server → client: `{"type":"ready",...}` once, acks (`subscribed`, `unsubscribed`,
//! `resumed`), `{"type":"pong"}`, `{"type":"error","code":...,"message":...}` and
//! events `{"id":N,"event":"sales-data-updated","data":{...},"ts":"..."}`
//! (ephemeral ones such as `export-progress` carry no `id`).

use crate::{clip, MAX_MESSAGE};
use serde::Deserialize;
use serde_json::{json, Value};

/// Server shutting down (standard "going away").
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// The client sends requests faster than it reads the replies.
pub const CLOSE_POLICY: u16 = 1008;
/// A client frame larger than the limit.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// No pong to two pings in a row.
pub const CLOSE_HEARTBEAT: u16 = 4000;
/// The token the connection was opened with has expired.
pub const CLOSE_TOKEN_EXPIRED: u16 = 4001;
/// The relay found the event log replaced (a restore, a point-in-time
/// recovery, a promoted standby): resume, and reload if told to resync.
pub const CLOSE_LOG_REPLACED: u16 = 1012;
pub const REASON_LOG_REPLACED: &str = "event log replaced; resume with lastEventId and epoch";
/// The send queue overflowed: the client reads too slowly. It can reconnect
/// and resume from the last event id it processed.
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
pub const REASON_SLOW_CONSUMER: &str = "slow consumer; resume with lastEventId";

pub use crate::events::vocab::{Channel, IMPLICIT};

#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum ClientMessage {
    Subscribe {
        event: String,
    },
    Unsubscribe {
        event: String,
    },
    /// A struct variant with no members (not a unit one), so that a ping
    /// with a member it does not have is refused like any other request.
    Ping {},
    /// `events` (optional) subscribes to those channels at the moment the
    /// replay starts, so nothing on them arrives live before the replay.
    Resume {
        #[serde(rename = "lastEventId")]
        last_event_id: i64,
        #[serde(default)]
        events: Vec<String>,
        /// The `epoch` of the `ready` message of the connection the id
        /// came on (optional): under another, the id names another event.
        #[serde(default)]
        epoch: Option<String>,
    },
}

impl ClientMessage {
    pub fn parse(text: &str) -> Result<Self, String> {
        const TYPES: &str = "type must be subscribe, unsubscribe, ping or resume";
        serde_json::from_str(text).map_err(|e| {
            // Worded by the request's shape where the parser's own words
            // would name its types ("internally tagged enum
            // ClientMessage", "variant identifier").
            match serde_json::from_str::<serde_json::Value>(text) {
                Ok(v) if !v.is_object() => {
                    "a request is a JSON object with a type, such as {\"type\":\"ping\"}"
                        .to_string()
                }
                Ok(v) if v.get("type").is_none() => format!("missing member type; {TYPES}"),
                Ok(v) if !v["type"].is_string() => TYPES.to_string(),
                _ if e.to_string().contains("unknown variant") => TYPES.to_string(),
                _ => format!("malformed message: {e}"),
            }
        })
    }
}

pub fn ready(
    user_id: i64,
    role: &str,
    position: i64,
    epoch: &str,
    heartbeat_ms: u128,
    send_queue: usize,
) -> String {
    json!({
        "type": "ready", "userId": user_id, "role": role, "lastEventId": position,
        "epoch": epoch, "heartbeatMs": heartbeat_ms as u64, "sendQueue": send_queue,
    })
    .to_string()
}

/// Longest channel name an answer quotes back, in bytes (messages are cut
/// at [`MAX_MESSAGE`]): a reply is never much larger than a valid
/// request's, whatever the client sent.
const MAX_EVENT_ECHO: usize = 200;

/// Longest channel name a confirmation carries, in bytes: every valid name
/// whole (`region-` and 100 characters of up to 4 bytes each), so that a
/// client matches confirmations to its requests by name; an error quotes
/// less ([`MAX_EVENT_ECHO`]).
const MAX_NAME_ECHO: usize = 512;

pub fn subscribed(event: &str, implicit: bool) -> String {
    let event = clip(event, MAX_NAME_ECHO);
    if implicit {
        json!({"type": "subscribed", "event": event, "implicit": true}).to_string()
    } else {
        json!({"type": "subscribed", "event": event}).to_string()
    }
}

pub fn unsubscribed(event: &str) -> String {
    json!({"type": "unsubscribed", "event": clip(event, MAX_NAME_ECHO)}).to_string()
}

pub fn pong() -> String {
    r#"{"type":"pong"}"#.to_string()
}

/// Sent when a replay ends: `replayed` events came from the log; live events follow.
/// `superseded`: replayed events skipped because their row had already come
/// live in a newer version; `supersededRows`: those rows (at most 1,000;
/// `supersededRowsCut` when there were more), whose newer events name only
/// the days they changed themselves, so a client keeping days reloads them;
/// `supersededRowsCut` says rows were left out of the list.
pub fn resumed(
    last_event_id: i64,
    replayed: u64,
    superseded: u64,
    superseded_rows: &[i64],
    rows_cut: bool,
    position: i64,
) -> String {
    json!({"type": "resumed", "lastEventId": last_event_id, "replayed": replayed,
           "superseded": superseded, "supersededRows": superseded_rows,
           "supersededRowsCut": rows_cut, "position": position})
    .to_string()
}

pub fn error(code: &str, message: &str, event: Option<&str>) -> String {
    let mut v = json!({"type": "error", "code": code, "message": clip(message, MAX_MESSAGE)});
    if let Some(e) = event {
        v["event"] = Value::from(clip(e, MAX_EVENT_ECHO));
    }
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages() {
        assert_eq!(
            ClientMessage::parse(r#"{"type":"subscribe","event":"stores"}"#),
            Ok(ClientMessage::Subscribe {
                event: "stores".into()
            })
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"ping"}"#),
            Ok(ClientMessage::Ping {})
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"resume","lastEventId":42}"#),
            Ok(ClientMessage::Resume {
                last_event_id: 42,
                events: vec![],
                epoch: None,
            })
        );
        assert!(ClientMessage::parse(r#"{"type":"dance"}"#)
            .unwrap_err()
            .contains("type must be"));
        assert!(ClientMessage::parse("{").is_err());
        // Worded for a client, never with the parser's names for its types.
        for (text, says) in [
            (r#""""#, "a request is a JSON object"),
            ("[1,2]", "a request is a JSON object"),
            ("7", "a request is a JSON object"),
            (r#"{"event":"stores"}"#, "missing member type"),
            (r#"{"type":1}"#, "type must be"),
            (r#"{"type":null,"event":"stores"}"#, "type must be"),
        ] {
            let e = ClientMessage::parse(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
            assert!(
                !e.contains("ClientMessage") && !e.contains("variant"),
                "{text}: {e}"
            );
        }
        // No request takes a member it does not have, ping included.
        for extra in [
            r#"{"type":"ping","id":1}"#,
            r#"{"type":"subscribe","event":"stores","id":1}"#,
        ] {
            let e = ClientMessage::parse(extra).unwrap_err();
            assert!(e.contains("unknown field `id`"), "{extra}: {e}");
        }
        assert!(ClientMessage::parse(r#"{"type":"resume"}"#).is_err());
        assert_eq!(
            ClientMessage::parse(r#"{"type":"resume","lastEventId":1,"events":["stores"]}"#),
            Ok(ClientMessage::Resume {
                last_event_id: 1,
                events: vec!["stores".into()],
                epoch: None,
            })
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"resume","lastEventId":1,"epoch":"e.1"}"#),
            Ok(ClientMessage::Resume {
                last_event_id: 1,
                events: vec![],
                epoch: Some("e.1".into()),
            })
        );
    }
}
