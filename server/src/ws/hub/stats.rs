//! The counters behind `GET /api/admin/websocket/stats`.

use super::protocol::Channel;
use super::Hub;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

#[derive(Default)]
pub struct Counters {
    pub opened: AtomicU64,
    pub sent: AtomicU64,
    pub dropped: AtomicU64,
    pub closed_slow: AtomicU64,
    pub closed_heartbeat: AtomicU64,
    pub closed_expired: AtomicU64,
    /// Closed because the user's access was revoked (4010-4014).
    pub closed_revoked: AtomicU64,
    pub closed_shutdown: AtomicU64,
    pub closed_log_replaced: AtomicU64,
    pub closed_policy: AtomicU64,
    pub refused_subscriptions: AtomicU64,
    pub refused_connections: AtomicU64,
    pub replays_timed_out: AtomicU64,
    pub resumes: AtomicU64,
    pub replayed: AtomicU64,
    pub resync_required: AtomicU64,
    pub events_relayed: AtomicU64,
    pub ephemeral_relayed: AtomicU64,
}

#[derive(Default)]
pub struct RelayStatus {
    /// The reader.
    pub connected: AtomicBool,
    pub reconnects: AtomicU64,
    /// The listener (`sales_ephemeral`, `sales_access`, `sales_cache`).
    pub listening: AtomicBool,
    /// Whether it ever listened (so a later session counts a reconnect).
    pub listened: AtomicBool,
    pub listener_reconnects: AtomicU64,
    /// Times the relay found the log replaced (see `Hub::log_replaced`).
    pub log_replaced: AtomicU64,
}

impl Hub {
    /// The figures behind `GET /api/admin/websocket/stats`.
    pub fn stats(&self) -> Value {
        let reg = self.reg();
        let mut by_role: BTreeMap<&str, u64> = [("admin", 0), ("manager", 0), ("staff", 0)]
            .into_iter()
            .collect();
        let mut by_store: BTreeMap<i64, u64> = BTreeMap::new();
        let mut all_stores = 0u64;
        let (mut queued, mut resuming) = (0u64, 0u64);
        for c in reg.conns.values() {
            *by_role.entry(c.principal.role.as_str()).or_default() += 1;
            if c.principal.is_admin() {
                all_stores += 1;
            } else {
                for s in c.principal.stores.iter() {
                    *by_store.entry(*s).or_default() += 1;
                }
            }
            let st = c.lock();
            queued += st.queue.len() as u64;
            resuming += (st.catch_up.is_some() && !st.opening) as u64;
        }
        let mut channels: Vec<(Channel, usize)> =
            reg.channels.iter().map(|(c, m)| (*c, m.len())).collect();
        channels.sort();
        let subscriptions: Map<String, Value> = channels
            .iter()
            .map(|(c, n)| (c.name(), Value::from(*n)))
            .collect();
        let total = reg.conns.len();
        let position = reg.position;
        drop(reg);
        let n = |a: &AtomicU64| a.load(Relaxed);
        let k = &self.counters;
        json!({
            "connections": {
                "total": total,
                "byRole": by_role,
                "byStore": by_store.iter().map(|(s, n)| (s.to_string(), Value::from(*n))).collect::<Map<String, Value>>(),
                "allStores": all_stores,
                "opened": n(&k.opened),
                "resuming": resuming,
            },
            "subscriptions": {
                "total": channels.iter().map(|(_, n)| n).sum::<usize>(),
                "byChannel": subscriptions,
            },
            "messages": {
                "sent": n(&k.sent),
                "dropped": n(&k.dropped),
                "queued": queued,
                "replayed": n(&k.replayed),
            },
            "closed": {
                "slowConsumer": n(&k.closed_slow),
                "heartbeat": n(&k.closed_heartbeat),
                "tokenExpired": n(&k.closed_expired),
                "revoked": n(&k.closed_revoked),
                "shutdown": n(&k.closed_shutdown),
                "logReplaced": n(&k.closed_log_replaced),
                "policy": n(&k.closed_policy),
            },
            "refusedSubscriptions": n(&k.refused_subscriptions),
            "refusedConnections": n(&k.refused_connections),
            "replaysTimedOut": n(&k.replays_timed_out),
            "resumes": n(&k.resumes),
            "resyncRequired": n(&k.resync_required),
            "relay": {
                "connected": self.relay.connected.load(Relaxed),
                "reconnects": n(&self.relay.reconnects),
                "listening": self.relay.listening.load(Relaxed),
                "listenerReconnects": n(&self.relay.listener_reconnects),
                "lastEventId": position.id,
                "epoch": &*self.epoch(),
                "logReplaced": n(&self.relay.log_replaced),
                "eventsRelayed": n(&k.events_relayed),
                "ephemeralRelayed": n(&k.ephemeral_relayed),
            },
            "config": {
                "sendQueue": self.cfg.send_queue,
                "pingIntervalMs": self.cfg.ping_interval.as_millis() as u64,
            },
        })
    }
}
