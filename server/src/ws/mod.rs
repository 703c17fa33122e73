//! WebSocket connections (the upgrade itself is `http/websocket.rs`).
//!
//! Each connection is driven by a single task that reads client frames and
//! writes what the hub queued for it, from one hand-written poll loop, so an
//! idle connection costs one small task, the socket, tungstenite's state
//! (read buffer 512 bytes) and its hub entry (`session`). A resume adds a
//! second, short-lived task that replays from the log (`replay`). The hub
//! fans events out (`hub`); the heartbeat pings (`heartbeat`).

pub mod heartbeat;
pub mod hub;
pub mod protocol;
mod replay;
pub mod revoke;
pub mod session;

pub use heartbeat::Heartbeat;
pub use hub::{Hub, HubConfig};
pub use revoke::Revoking;

use crate::auth::Auth;
use std::sync::Arc;
use std::time::Duration;

/// What the WebSocket side uses: the hub, token checks, and the pool that
/// replays read the log from.
#[derive(Clone)]
pub struct Context {
    pub hub: Arc<Hub>,
    pub auth: Arc<Auth>,
    pub pool: sqlx::PgPool,
    pub event_retention: Duration,
}
