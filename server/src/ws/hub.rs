//! The fan-out hub: which connection listens to what, each connection's
//! bounded send queue, and the counters behind the stats endpoint.
//!
//! The relay is the only source of events and calls [`Hub::dispatch`] for
//! each event in delivery order. Dispatch never waits for a socket: it puts a
//! shared, already serialised frame into each target's queue (or closes the
//! connection when the queue is full, code 4008), so one slow client cannot
//! delay any other. Authorization is decided from the claims each connection
//! holds in memory: no query per event.
//!
//! Lock order: the registry, then a connection's state. A connection's own
//! task never takes the registry while holding its state.

use super::protocol::{self, Channel};
use crate::auth::{Principal, Role};
use crate::events::model::{Ephemeral, Event, Kind, Pos};
use futures_util::task::AtomicWaker;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::protocol::frame::Utf8Bytes;
use tokio_tungstenite::tungstenite::Message;

/// Replies (acks, pongs, errors, pings) may exceed the event limit by this
/// much; a client that sends requests without reading replies beyond it is closed.
const CONTROL_HEADROOM: usize = 64;

#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Events waiting for one socket before it counts as a slow consumer.
    pub send_queue: usize,
    /// Live events held back for one connection while it replays (resume).
    pub catch_up_limit: usize,
    pub max_subscriptions: usize,
    pub ping_interval: Duration,
}

impl HubConfig {
    pub fn from_config(c: &crate::config::Config) -> Self {
        HubConfig {
            send_queue: c.ws_send_queue,
            catch_up_limit: (c.ws_send_queue * 4).max(4096),
            max_subscriptions: 1000,
            ping_interval: c.ws_ping_interval,
        }
    }
}

/// One WebSocket connection as the hub sees it.
pub struct Conn {
    pub id: u64,
    pub user_id: i64,
    pub role: Role,
    /// Sorted store ids; empty for admins, who see every store.
    stores: Box<[i64]>,
    /// Token expiry (seconds since the epoch), when known.
    pub exp: Option<i64>,
    st: Mutex<ConnState>,
    /// Wakes the connection's task when something is queued or it must close.
    pub(crate) waker: AtomicWaker,
    /// Wakes a replay waiting for room in the queue.
    space: Notify,
}

#[derive(Default)]
struct ConnState {
    queue: VecDeque<Message>,
    /// While a resume replays from the log: live events held back, with their positions.
    catch_up: Option<Vec<(Option<Pos>, Message)>>,
    close: Option<(u16, &'static str)>,
    /// Explicit subscriptions and the relay position each started at: events
    /// after it were delivered live.
    subs: Vec<(Channel, Pos)>,
    /// Position at which the implicit per-user channel started.
    user_since: Pos,
    missed_pongs: u8,
    /// Last event id queued, so an event reaching a connection through two
    /// channels is sent once.
    last_event_id: i64,
    replay_waiting: bool,
}

impl Conn {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    pub fn can_access_store(&self, store: i64) -> bool {
        self.is_admin() || self.stores.binary_search(&store).is_ok()
    }

    fn lock(&self) -> MutexGuard<'_, ConnState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next frame to write, if any.
    pub fn pop(&self) -> Option<Message> {
        let mut st = self.lock();
        let m = st.queue.pop_front();
        if m.is_some() && st.replay_waiting {
            st.replay_waiting = false;
            drop(st);
            self.space.notify_one();
        } else if m.is_none() && st.queue.capacity() > 16 {
            // A burst is over: give the memory back.
            st.queue = VecDeque::new();
        }
        m
    }

    /// A close the hub asked for (slow consumer, heartbeat, shutdown...).
    pub fn close_requested(&self) -> Option<(u16, &'static str)> {
        self.lock().close
    }

    pub fn alive(&self) {
        self.lock().missed_pongs = 0;
    }

    fn subscribed_to(&self, ch: Channel) -> bool {
        self.lock().subs.iter().any(|(c, _)| *c == ch)
    }
}

/// What a resume replays against: the subscriptions at the moment it began.
pub struct ResumeSnapshot {
    /// Relay position when the resume began: the replay covers events up to it,
    /// live events after it were held back and follow the replay.
    pub upto: Pos,
    subs: Vec<(Channel, Pos)>,
    user_since: Pos,
}

impl ResumeSnapshot {
    fn since(&self, ch: Channel) -> Option<Pos> {
        self.subs.iter().find(|(c, _)| *c == ch).map(|(_, p)| *p)
    }

    /// Whether a logged event is one to replay to `conn`: it is one the
    /// connection may see, and it was not already delivered live (it is not
    /// after the start of a subscription that matches it).
    pub fn wants(&self, conn: &Conn, e: &Event) -> bool {
        let pos = e.pos();
        let (mut matched, mut live) = (false, false);
        let mut check = |since: Option<Pos>| {
            if let Some(s) = since {
                matched = true;
                live |= pos > s;
            }
        };
        if let Some(u) = e.user_id {
            // A user-only event: that user's own channel, nothing else.
            if u == conn.user_id {
                check(Some(self.user_since));
            }
            return matched && !live;
        }
        match e.kind {
            k if k.is_sales() => {
                if let Some(s) = e.store_id {
                    check(self.since(Channel::Sales(s)));
                }
                if let Some(p) = e.previous_store_id().filter(|p| Some(*p) != e.store_id) {
                    check(self.since(Channel::Sales(p)));
                }
            }
            k if k.is_store() && e.store_id.is_some_and(|s| conn.can_access_store(s)) => {
                check(self.since(Channel::Stores))
            }
            Kind::Announcement => check(self.since(Channel::Announcements)),
            Kind::BatchCompleted => {
                // The batch's author gets it on their own channel; admins may
                // follow every batch.
                if e.actor_id == Some(conn.user_id) {
                    check(Some(self.user_since));
                }
                check(self.since(Channel::Batch));
            }
            _ => {}
        }
        matched && !live
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubscribeError {
    #[error("this token may not see {0}")]
    Forbidden(String),
    #[error("at most {0} subscriptions per connection")]
    TooMany(usize),
}

#[derive(Default)]
pub struct Counters {
    pub opened: AtomicU64,
    pub sent: AtomicU64,
    pub dropped: AtomicU64,
    pub closed_slow: AtomicU64,
    pub closed_heartbeat: AtomicU64,
    pub closed_expired: AtomicU64,
    pub closed_shutdown: AtomicU64,
    pub closed_policy: AtomicU64,
    pub refused_subscriptions: AtomicU64,
    pub resumes: AtomicU64,
    pub replayed: AtomicU64,
    pub resync_required: AtomicU64,
    pub events_relayed: AtomicU64,
    pub ephemeral_relayed: AtomicU64,
}

#[derive(Default)]
pub struct RelayStatus {
    pub connected: AtomicBool,
    pub reconnects: AtomicU64,
    pub last_event_id: AtomicI64,
}

#[derive(Default)]
struct Registry {
    position: Pos,
    conns: HashMap<u64, Arc<Conn>>,
    channels: HashMap<Channel, HashMap<u64, Arc<Conn>>>,
    users: HashMap<i64, HashMap<u64, Arc<Conn>>>,
}

impl Registry {
    fn each(map: Option<&HashMap<u64, Arc<Conn>>>, f: &mut impl FnMut(&Arc<Conn>)) {
        if let Some(m) = map {
            m.values().for_each(f);
        }
    }

    /// Calls `f` for each connection an event goes to (a connection may come
    /// twice; the queue drops the repeat).
    fn targets(&self, e: &Event, mut f: impl FnMut(&Arc<Conn>)) {
        if let Some(u) = e.user_id {
            // A user-only event (user notifications): that user alone.
            return Self::each(self.users.get(&u), &mut f);
        }
        match e.kind {
            k if k.is_sales() => {
                if let Some(s) = e.store_id {
                    Self::each(self.channels.get(&Channel::Sales(s)), &mut f);
                }
                if let Some(p) = e.previous_store_id().filter(|p| Some(*p) != e.store_id) {
                    Self::each(self.channels.get(&Channel::Sales(p)), &mut f);
                }
            }
            k if k.is_store() => {
                if let Some(s) = e.store_id {
                    Self::each(self.channels.get(&Channel::Stores), &mut |c: &Arc<Conn>| {
                        if c.can_access_store(s) {
                            f(c)
                        }
                    });
                }
            }
            Kind::Announcement => Self::each(self.channels.get(&Channel::Announcements), &mut f),
            Kind::BatchCompleted => {
                if let Some(a) = e.actor_id {
                    Self::each(self.users.get(&a), &mut f);
                }
                Self::each(self.channels.get(&Channel::Batch), &mut f);
            }
            _ => {}
        }
    }
}

pub struct Hub {
    pub cfg: HubConfig,
    reg: Mutex<Registry>,
    next_id: AtomicU64,
    pub counters: Counters,
    pub relay: RelayStatus,
    shutting_down: AtomicBool,
    empty: Notify,
    /// Replays (resume) reading the log at once; the others wait their turn.
    pub replay_slots: tokio::sync::Semaphore,
}

/// What pushing into a queue did.
enum Pushed {
    Queued(usize),
    Skipped,
    Overflow,
}

impl Hub {
    pub fn new(cfg: HubConfig) -> Self {
        Hub {
            cfg,
            reg: Mutex::new(Registry::default()),
            next_id: AtomicU64::new(1),
            counters: Counters::default(),
            relay: RelayStatus::default(),
            shutting_down: AtomicBool::new(false),
            empty: Notify::new(),
            replay_slots: tokio::sync::Semaphore::new(4),
        }
    }

    fn reg(&self) -> MutexGuard<'_, Registry> {
        self.reg.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The position of the last event dispatched.
    pub fn position(&self) -> Pos {
        self.reg().position
    }

    /// Where the relay starts; set once before serving.
    pub fn set_position(&self, pos: Pos) {
        self.reg().position = pos;
        self.relay.last_event_id.store(pos.id, Relaxed);
    }

    pub fn connections(&self) -> usize {
        self.reg().conns.len()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Relaxed)
    }

    /// Adds a connection; `None` once the server is shutting down.
    pub fn register(&self, p: &Principal, exp: Option<i64>) -> Option<Arc<Conn>> {
        let mut stores: Vec<i64> = p.stores.iter().copied().collect();
        stores.sort_unstable();
        let conn = Arc::new(Conn {
            id: self.next_id.fetch_add(1, Relaxed),
            user_id: p.user_id,
            role: p.role,
            stores: if p.is_admin() {
                Box::default()
            } else {
                stores.into_boxed_slice()
            },
            exp,
            st: Mutex::new(ConnState::default()),
            waker: AtomicWaker::new(),
            space: Notify::new(),
        });
        let mut reg = self.reg();
        if self.is_shutting_down() {
            return None;
        }
        conn.lock().user_since = reg.position;
        reg.conns.insert(conn.id, conn.clone());
        reg.users
            .entry(conn.user_id)
            .or_default()
            .insert(conn.id, conn.clone());
        self.counters.opened.fetch_add(1, Relaxed);
        Some(conn)
    }

    pub fn unregister(&self, conn: &Arc<Conn>) {
        let subs = {
            let mut st = conn.lock();
            st.close
                .get_or_insert((protocol::CLOSE_GOING_AWAY, "closed"));
            st.queue = VecDeque::new();
            st.catch_up = None;
            std::mem::take(&mut st.subs)
        };
        conn.space.notify_one();
        let mut reg = self.reg();
        reg.conns.remove(&conn.id);
        if let Some(m) = reg.users.get_mut(&conn.user_id) {
            m.remove(&conn.id);
            if m.is_empty() {
                reg.users.remove(&conn.user_id);
            }
        }
        for (ch, _) in subs {
            Self::unindex(&mut reg, ch, conn.id);
        }
        if reg.conns.is_empty() {
            self.empty.notify_waiters();
        }
    }

    fn unindex(reg: &mut Registry, ch: Channel, id: u64) {
        if let Some(m) = reg.channels.get_mut(&ch) {
            m.remove(&id);
            if m.is_empty() {
                reg.channels.remove(&ch);
            }
        }
    }

    /// Subscribes after checking the connection's claims; `Ok(false)` when
    /// it was already subscribed.
    pub fn subscribe(&self, conn: &Arc<Conn>, ch: Channel) -> Result<bool, SubscribeError> {
        let mut reg = self.reg();
        self.subscribe_locked(&mut reg, conn, ch)
    }

    fn subscribe_locked(
        &self,
        reg: &mut Registry,
        conn: &Arc<Conn>,
        ch: Channel,
    ) -> Result<bool, SubscribeError> {
        let allowed = match ch {
            Channel::Sales(s) => conn.can_access_store(s),
            Channel::Batch => conn.is_admin(),
            Channel::Stores | Channel::Announcements => true,
        };
        if !allowed {
            self.counters.refused_subscriptions.fetch_add(1, Relaxed);
            return Err(SubscribeError::Forbidden(ch.name()));
        }
        let position = reg.position;
        {
            let mut st = conn.lock();
            if st.subs.iter().any(|(c, _)| *c == ch) {
                return Ok(false);
            }
            if st.subs.len() >= self.cfg.max_subscriptions {
                self.counters.refused_subscriptions.fetch_add(1, Relaxed);
                return Err(SubscribeError::TooMany(self.cfg.max_subscriptions));
            }
            st.subs.push((ch, position));
        }
        reg.channels
            .entry(ch)
            .or_default()
            .insert(conn.id, conn.clone());
        Ok(true)
    }

    /// `false` when the connection was not subscribed.
    pub fn unsubscribe(&self, conn: &Arc<Conn>, ch: Channel) -> bool {
        let mut reg = self.reg();
        let removed = {
            let mut st = conn.lock();
            let before = st.subs.len();
            st.subs.retain(|(c, _)| *c != ch);
            st.subs.len() != before
        };
        if removed {
            Self::unindex(&mut reg, ch, conn.id);
        }
        removed
    }

    /// Queues a reply (ack, error, pong, ping). A client that floods requests
    /// without reading is closed (1008).
    pub fn reply(&self, conn: &Conn, text: String) {
        self.control(conn, Message::Text(Utf8Bytes::from(text)));
    }

    fn control(&self, conn: &Conn, msg: Message) {
        let mut st = conn.lock();
        if st.close.is_some() {
            return;
        }
        if st.queue.len() >= self.cfg.send_queue + CONTROL_HEADROOM {
            st.queue = VecDeque::new();
            st.close = Some((
                protocol::CLOSE_POLICY,
                "too many requests without reading the replies",
            ));
            self.counters.closed_policy.fetch_add(1, Relaxed);
        } else {
            st.queue.push_back(msg);
        }
        drop(st);
        conn.waker.wake();
    }

    /// Asks a connection to close with `code`; its task sends the close frame.
    pub fn close(&self, conn: &Conn, code: u16, reason: &'static str) -> bool {
        let mut st = conn.lock();
        if st.close.is_some() {
            return false;
        }
        st.close = Some((code, reason));
        st.queue = VecDeque::new();
        drop(st);
        conn.waker.wake();
        conn.space.notify_one();
        true
    }

    fn overflow(&self, st: &mut ConnState) {
        let dropped = 1 + st.queue.len() + st.catch_up.as_ref().map_or(0, Vec::len);
        st.queue = VecDeque::new();
        st.catch_up = None;
        st.close = Some((
            protocol::CLOSE_SLOW_CONSUMER,
            protocol::REASON_SLOW_CONSUMER,
        ));
        self.counters.dropped.fetch_add(dropped as u64, Relaxed);
        self.counters.closed_slow.fetch_add(1, Relaxed);
    }

    /// Never waits: queues, holds back (resume in progress) or closes the
    /// connection as a slow consumer.
    fn push_live(&self, conn: &Conn, pos: Option<Pos>, id: i64, msg: &Message) -> Pushed {
        let mut st = conn.lock();
        if st.close.is_some() {
            return Pushed::Skipped;
        }
        if id != 0 {
            if st.last_event_id == id {
                return Pushed::Skipped;
            }
            st.last_event_id = id;
        }
        let limit = self.cfg.catch_up_limit;
        if let Some(buf) = st.catch_up.as_mut() {
            if buf.len() < limit {
                buf.push((pos, msg.clone()));
                return Pushed::Queued(0);
            }
        } else if st.queue.len() < self.cfg.send_queue {
            st.queue.push_back(msg.clone());
            let len = st.queue.len();
            drop(st);
            conn.waker.wake();
            return Pushed::Queued(len);
        }
        self.overflow(&mut st);
        drop(st);
        conn.waker.wake();
        conn.space.notify_one();
        Pushed::Overflow
    }

    /// Delivers one event to every connection allowed to see it, and moves
    /// the position past it. Returns true when some queue is more than half
    /// full: the relay then yields so that those connections' tasks can
    /// drain before the next event (it never waits for them).
    pub fn dispatch(&self, e: &Event) -> bool {
        let msg = Message::Text(Utf8Bytes::from(e.to_frame()));
        let pos = e.pos();
        let half = self.cfg.send_queue / 2;
        let mut pressure = false;
        let mut reg = self.reg();
        reg.targets(e, |c| match self.push_live(c, Some(pos), e.id, &msg) {
            Pushed::Queued(n) => pressure |= n > half,
            Pushed::Skipped => {}
            Pushed::Overflow => pressure = true,
        });
        reg.position = pos;
        drop(reg);
        self.relay.last_event_id.store(e.id, Relaxed);
        self.counters.events_relayed.fetch_add(1, Relaxed);
        pressure
    }

    /// A NOTIFY-only message for one user's connections.
    pub fn dispatch_ephemeral(&self, e: &Ephemeral) {
        let msg = Message::Text(Utf8Bytes::from(e.to_frame()));
        let reg = self.reg();
        if let Some(m) = reg.users.get(&e.user_id) {
            for c in m.values() {
                self.push_live(c, None, 0, &msg);
            }
        }
        self.counters.ephemeral_relayed.fetch_add(1, Relaxed);
    }

    /// Starts a resume: live events for `conn` are held back from now on.
    /// Subscribing to `add` at the same moment, so that nothing is
    /// delivered live on them before the replay.
    #[allow(clippy::type_complexity)]
    pub fn begin_resume(
        &self,
        conn: &Arc<Conn>,
        add: &[Channel],
    ) -> Result<(ResumeSnapshot, Vec<Result<bool, SubscribeError>>), &'static str> {
        let mut reg = self.reg();
        {
            let st = conn.lock();
            if st.close.is_some() {
                return Err("connection is closing");
            }
            if st.catch_up.is_some() {
                return Err("a resume is already in progress");
            }
        }
        let added = add
            .iter()
            .map(|ch| self.subscribe_locked(&mut reg, conn, *ch))
            .collect();
        let mut st = conn.lock();
        st.catch_up = Some(Vec::new());
        self.counters.resumes.fetch_add(1, Relaxed);
        let snap = ResumeSnapshot {
            upto: reg.position,
            subs: st.subs.clone(),
            user_since: st.user_since,
        };
        Ok((snap, added))
    }

    /// Queues a replayed event, waiting (without holding anything) while the
    /// queue is full. `false` when the connection is closing.
    pub async fn push_replay(&self, conn: &Conn, msg: Message) -> bool {
        let mut msg = Some(msg);
        loop {
            {
                let mut st = conn.lock();
                if st.close.is_some() || st.catch_up.is_none() {
                    return false;
                }
                if st.queue.len() < self.cfg.send_queue {
                    st.queue.push_back(msg.take().expect("message"));
                    drop(st);
                    conn.waker.wake();
                    self.counters.replayed.fetch_add(1, Relaxed);
                    return true;
                }
                st.replay_waiting = true;
            }
            // Bounded so that a lost wake-up costs a little time, never a hang.
            let _ = tokio::time::timeout(Duration::from_millis(250), conn.space.notified()).await;
        }
    }

    /// Ends a resume: queues `ack`, then the live events held back that come
    /// after `seam` (the replay covered everything up to it), and notes that
    /// every event after `from` on the replayed channels has been delivered.
    pub fn finish_resume(
        &self,
        conn: &Conn,
        snap: &ResumeSnapshot,
        seam: Pos,
        from: Option<Pos>,
        ack: String,
    ) {
        let mut st = conn.lock();
        let Some(held) = st.catch_up.take() else {
            return;
        };
        if st.close.is_some() {
            return;
        }
        st.queue.push_back(Message::Text(Utf8Bytes::from(ack)));
        for (pos, msg) in held {
            if pos.is_some_and(|p| p <= seam) {
                continue;
            }
            if st.queue.len() >= self.cfg.send_queue + self.cfg.catch_up_limit {
                self.overflow(&mut st);
                break;
            }
            st.queue.push_back(msg);
        }
        if let Some(from) = from {
            for (ch, since) in st.subs.iter_mut() {
                if snap.since(*ch) == Some(*since) && from < *since {
                    *since = from;
                }
            }
            if st.user_since == snap.user_since && from < st.user_since {
                st.user_since = from;
            }
        }
        drop(st);
        conn.waker.wake();
    }

    /// One heartbeat: pings every connection, closing those that did not
    /// answer the last two pings (4000) or whose token expired (4001).
    pub fn heartbeat(&self) {
        let now = chrono::Utc::now().timestamp();
        let conns: Vec<Arc<Conn>> = self.reg().conns.values().cloned().collect();
        for c in conns {
            let missed = {
                let mut st = c.lock();
                if st.close.is_some() {
                    continue;
                }
                st.missed_pongs = st.missed_pongs.saturating_add(1);
                st.missed_pongs
            };
            if missed > 2 {
                if self.close(&c, protocol::CLOSE_HEARTBEAT, "heartbeat timeout") {
                    self.counters.closed_heartbeat.fetch_add(1, Relaxed);
                }
            } else if c.exp.is_some_and(|exp| now >= exp) {
                if self.close(&c, protocol::CLOSE_TOKEN_EXPIRED, "token expired") {
                    self.counters.closed_expired.fetch_add(1, Relaxed);
                }
            } else {
                self.control(&c, Message::Ping(Default::default()));
            }
        }
    }

    /// Refuses new connections and asks every open one to close with 1001.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Relaxed);
        let conns: Vec<Arc<Conn>> = self.reg().conns.values().cloned().collect();
        for c in conns {
            if self.close(&c, protocol::CLOSE_GOING_AWAY, "server shutting down") {
                self.counters.closed_shutdown.fetch_add(1, Relaxed);
            }
        }
    }

    /// Waits until every connection has gone, at most `limit`.
    pub async fn wait_empty(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.empty.notified();
            if self.connections() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.connections() == 0;
            }
        }
    }

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
            *by_role.entry(c.role.as_str()).or_default() += 1;
            if c.is_admin() {
                all_stores += 1;
            }
            for s in c.stores.iter() {
                *by_store.entry(*s).or_default() += 1;
            }
            let st = c.lock();
            queued += st.queue.len() as u64;
            resuming += st.catch_up.is_some() as u64;
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
                "shutdown": n(&k.closed_shutdown),
                "policy": n(&k.closed_policy),
            },
            "refusedSubscriptions": n(&k.refused_subscriptions),
            "resumes": n(&k.resumes),
            "resyncRequired": n(&k.resync_required),
            "relay": {
                "connected": self.relay.connected.load(Relaxed),
                "reconnects": n(&self.relay.reconnects),
                "lastEventId": position.id,
                "eventsRelayed": n(&k.events_relayed),
                "ephemeralRelayed": n(&k.ephemeral_relayed),
            },
            "config": {
                "sendQueue": self.cfg.send_queue,
                "pingIntervalMs": self.cfg.ping_interval.as_millis() as u64,
            },
        })
    }

    #[cfg(test)]
    fn queued(&self, conn: &Conn) -> Vec<String> {
        conn.lock()
            .queue
            .iter()
            .filter_map(|m| match m {
                Message::Text(t) => Some(t.to_string()),
                _ => None,
            })
            .collect()
    }
}

/// Whether `conn` is subscribed to `ch` (for tests and diagnostics).
pub fn is_subscribed(conn: &Conn, ch: Channel) -> bool {
    conn.subscribed_to(ch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn hub(queue: usize) -> Hub {
        Hub::new(HubConfig {
            send_queue: queue,
            catch_up_limit: 8,
            max_subscriptions: 4,
            ping_interval: Duration::from_secs(1),
        })
    }

    fn principal(user: i64, role: Role, stores: &[i64]) -> Principal {
        Principal {
            user_id: user,
            email: None,
            role,
            stores: stores.iter().copied().collect::<HashSet<_>>(),
        }
    }

    /// `user` is the addressee of a user notification, else the actor.
    fn event(id: i64, kind: &str, store: Option<i64>, user: Option<i64>) -> Event {
        let only_for = if kind == "user-notification" {
            user
        } else {
            None
        };
        Event {
            id,
            xid: 1000 + id,
            kind_name: kind.into(),
            kind: Kind::parse(kind),
            store_id: store,
            user_id: only_for,
            actor_id: user,
            row_id: None,
            row_version: Some(1),
            payload: json!({}),
            created_at: chrono::Utc::now(),
        }
    }

    fn ids(h: &Hub, c: &Conn) -> Vec<i64> {
        h.queued(c)
            .iter()
            .filter_map(|t| serde_json::from_str::<Value>(t).ok()?.get("id")?.as_i64())
            .collect()
    }

    #[test]
    fn scope_is_checked_from_claims() {
        let h = hub(16);
        let staff = h
            .register(&principal(1, Role::Staff, &[1, 2]), None)
            .unwrap();
        let admin = h.register(&principal(2, Role::Admin, &[]), None).unwrap();
        assert_eq!(h.subscribe(&staff, Channel::Sales(1)), Ok(true));
        assert_eq!(h.subscribe(&staff, Channel::Sales(1)), Ok(false));
        assert!(matches!(
            h.subscribe(&staff, Channel::Sales(3)),
            Err(SubscribeError::Forbidden(_))
        ));
        assert!(matches!(
            h.subscribe(&staff, Channel::Batch),
            Err(SubscribeError::Forbidden(_))
        ));
        assert_eq!(h.subscribe(&admin, Channel::Sales(3)), Ok(true));
        h.subscribe(&staff, Channel::Stores).unwrap();
        h.subscribe(&admin, Channel::Stores).unwrap();
        h.subscribe(&admin, Channel::Batch).unwrap();

        h.dispatch(&event(1, "sales-data-updated", Some(1), Some(9)));
        h.dispatch(&event(2, "sales-data-updated", Some(3), Some(9)));
        h.dispatch(&event(3, "store-status-changed", Some(3), Some(9)));
        h.dispatch(&event(4, "store-status-changed", Some(2), Some(9)));
        h.dispatch(&event(5, "user-notification", None, Some(1)));
        h.dispatch(&event(6, "batch-completed", None, Some(1)));
        h.dispatch(&event(7, "system-announcement", None, None));
        assert_eq!(ids(&h, &staff), vec![1, 4, 5, 6]);
        assert_eq!(ids(&h, &admin), vec![2, 3, 4, 6]);
        assert_eq!(h.position().id, 7);
    }

    #[test]
    fn full_queue_closes_slow_consumer_only() {
        let h = hub(2);
        let slow = h.register(&principal(1, Role::Admin, &[]), None).unwrap();
        let fast = h.register(&principal(2, Role::Admin, &[]), None).unwrap();
        h.subscribe(&slow, Channel::Sales(1)).unwrap();
        h.subscribe(&fast, Channel::Sales(1)).unwrap();
        for id in 1..=3 {
            h.dispatch(&event(id, "sales-data-created", Some(1), None));
            while fast.pop().is_some() {}
        }
        assert_eq!(
            slow.close_requested(),
            Some((
                protocol::CLOSE_SLOW_CONSUMER,
                protocol::REASON_SLOW_CONSUMER
            ))
        );
        assert_eq!(fast.close_requested(), None);
        assert_eq!(h.counters.closed_slow.load(Relaxed), 1);
        assert_eq!(h.counters.dropped.load(Relaxed), 3);
    }

    #[test]
    fn resume_skips_what_was_live_and_holds_back_new_events() {
        let h = hub(16);
        h.set_position(Pos { xid: 1000, id: 0 });
        let c = h.register(&principal(1, Role::Staff, &[1]), None).unwrap();
        h.dispatch(&event(1, "sales-data-created", Some(1), None)); // before the subscription
        h.subscribe(&c, Channel::Sales(1)).unwrap();
        h.dispatch(&event(2, "sales-data-created", Some(1), None)); // live
        let (snap, _) = h.begin_resume(&c, &[]).unwrap();
        assert_eq!(snap.upto.id, 2);
        h.dispatch(&event(3, "sales-data-created", Some(1), None)); // held back
        assert!(
            !snap.wants(&c, &event(2, "sales-data-created", Some(1), None)),
            "already live"
        );
        assert!(
            snap.wants(&c, &event(1, "sales-data-created", Some(1), None)),
            "missed"
        );
        assert!(
            !snap.wants(&c, &event(1, "sales-data-created", Some(2), None)),
            "not subscribed"
        );
        assert!(h.begin_resume(&c, &[]).is_err());
        assert_eq!(ids(&h, &c), vec![2]);
        h.finish_resume(
            &c,
            &snap,
            snap.upto,
            Some(Pos { xid: 1000, id: 0 }),
            protocol::resumed(0, 1, 2),
        );
        assert_eq!(ids(&h, &c), vec![2, 3]);
        // After the resume, every event since `from` counts as delivered.
        let (again, _) = h.begin_resume(&c, &[]).unwrap();
        assert!(!again.wants(&c, &event(1, "sales-data-created", Some(1), None)));
    }

    #[test]
    fn heartbeat_closes_after_two_missed_pongs() {
        let h = hub(16);
        let c = h.register(&principal(1, Role::Staff, &[]), None).unwrap();
        let ok = h.register(&principal(2, Role::Staff, &[]), None).unwrap();
        for _ in 0..3 {
            h.heartbeat();
            ok.alive();
        }
        assert_eq!(
            c.close_requested().map(|c| c.0),
            Some(protocol::CLOSE_HEARTBEAT)
        );
        assert_eq!(ok.close_requested(), None);
        let expired = h
            .register(&principal(3, Role::Staff, &[]), Some(1))
            .unwrap();
        h.heartbeat();
        assert_eq!(
            expired.close_requested().map(|c| c.0),
            Some(protocol::CLOSE_TOKEN_EXPIRED)
        );
    }
}
