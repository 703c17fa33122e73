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
use crate::auth::Principal;
use crate::events::model::{Ephemeral, Event, Pos};
use crate::events::vocab::{Recipient, Variant};
use futures_util::task::AtomicWaker;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
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
    /// Open connections per user; more are refused (HTTP 429 before the upgrade).
    pub max_per_user: usize,
    /// Replays reading the log at once (all users), and per user.
    pub replay_slots: usize,
    pub replay_slots_per_user: usize,
    /// A replay that has not finished within this is ended: its connection
    /// is closed (4009) and the client resumes again from where it got to.
    pub replay_timeout: Duration,
    /// Events one replay sends at most; past it the client is told to
    /// resync (reload, then follow live events).
    pub replay_max_events: u64,
}

impl HubConfig {
    pub fn from_config(c: &crate::config::Config) -> Self {
        HubConfig {
            send_queue: c.ws_send_queue,
            catch_up_limit: (c.ws_send_queue * 4).max(4096),
            max_subscriptions: 1000,
            ping_interval: c.ws_ping_interval,
            max_per_user: 64,
            replay_slots: 8,
            replay_slots_per_user: 1,
            replay_timeout: Duration::from_secs(30),
            replay_max_events: 100_000,
        }
    }
}

/// One WebSocket connection as the hub sees it.
pub struct Conn {
    pub id: u64,
    /// Who opened it: scope checks and the token's expiry come from here.
    pub principal: Principal,
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
    pub fn user_id(&self) -> i64 {
        self.principal.user_id
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

    /// Whether a logged event is one to replay to `conn`, and in which
    /// form: it is one the connection may see, and it was not already
    /// delivered live (it is not after the start of a subscription that
    /// matches it).
    pub fn wants(&self, conn: &Conn, e: &Event) -> Option<Variant> {
        let pos = e.pos();
        let mut first = None;
        for (to, variant) in e.deliveries() {
            let since = match to {
                Recipient::User(u) => (u == conn.user_id()).then_some(self.user_since),
                Recipient::Channel(ch) => self.since(ch),
                Recipient::ChannelInScope(ch, s) => {
                    if conn.principal.can_access_store(s) {
                        self.since(ch)
                    } else {
                        None
                    }
                }
            };
            if let Some(since) = since {
                if pos > since {
                    return None;
                }
                first.get_or_insert(variant);
            }
        }
        first
    }
}

/// Why a connection was not registered.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    ShuttingDown,
    /// The user has `max_per_user` connections open.
    TooMany,
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
    pub connected: AtomicBool,
    pub reconnects: AtomicU64,
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

    /// Calls `f` for each connection an event goes to, with the form it
    /// gets (a connection may come twice; the queue drops the repeat).
    fn targets(&self, e: &Event, mut f: impl FnMut(&Arc<Conn>, Variant)) {
        for (to, variant) in e.deliveries() {
            match to {
                Recipient::User(u) => Self::each(self.users.get(&u), &mut |c| f(c, variant)),
                Recipient::Channel(ch) => {
                    Self::each(self.channels.get(&ch), &mut |c| f(c, variant))
                }
                Recipient::ChannelInScope(ch, s) => {
                    Self::each(self.channels.get(&ch), &mut |c: &Arc<Conn>| {
                        if c.principal.can_access_store(s) {
                            f(c, variant)
                        }
                    })
                }
            }
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
    /// Replay queries running at once. A replay holds a slot only while it
    /// reads a page from the log, never while it waits for its client to
    /// read, so a client that does not read cannot delay another's resume.
    pub replay_slots: tokio::sync::Semaphore,
    /// Replays in progress per user (bounded by `replay_slots_per_user`).
    replaying: Mutex<HashMap<i64, usize>>,
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
            reg: Mutex::new(Registry::default()),
            next_id: AtomicU64::new(1),
            counters: Counters::default(),
            relay: RelayStatus::default(),
            shutting_down: AtomicBool::new(false),
            empty: Notify::new(),
            replay_slots: tokio::sync::Semaphore::new(cfg.replay_slots.max(1)),
            replaying: Mutex::new(HashMap::new()),
            cfg,
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
    }

    pub fn connections(&self) -> usize {
        self.reg().conns.len()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Relaxed)
    }

    /// Whether `user` may open another connection.
    pub fn user_has_room(&self, user: i64) -> bool {
        self.reg()
            .users
            .get(&user)
            .is_none_or(|m| m.len() < self.cfg.max_per_user)
    }

    /// Adds a connection.
    pub fn register(&self, principal: Principal) -> Result<Arc<Conn>, Refused> {
        let conn = Arc::new(Conn {
            id: self.next_id.fetch_add(1, Relaxed),
            principal,
            st: Mutex::new(ConnState::default()),
            waker: AtomicWaker::new(),
            space: Notify::new(),
        });
        let mut reg = self.reg();
        if self.is_shutting_down() {
            return Err(Refused::ShuttingDown);
        }
        let user = conn.user_id();
        if reg
            .users
            .get(&user)
            .is_some_and(|m| m.len() >= self.cfg.max_per_user)
        {
            self.counters.refused_connections.fetch_add(1, Relaxed);
            return Err(Refused::TooMany);
        }
        conn.lock().user_since = reg.position;
        reg.conns.insert(conn.id, conn.clone());
        reg.users
            .entry(user)
            .or_default()
            .insert(conn.id, conn.clone());
        self.counters.opened.fetch_add(1, Relaxed);
        Ok(conn)
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
        if let Some(m) = reg.users.get_mut(&conn.user_id()) {
            m.remove(&conn.id);
            if m.is_empty() {
                reg.users.remove(&conn.user_id());
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
        let p = &conn.principal;
        if !ch.allowed(p.is_admin(), |s| p.can_access_store(s)) {
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
        // Each form is serialised once and its bytes shared by every queue.
        let full = Message::Text(Utf8Bytes::from(e.frame(Variant::Full)));
        let mut moved: Option<Message> = None;
        let pos = e.pos();
        let half = self.cfg.send_queue / 2;
        let mut pressure = false;
        let mut reg = self.reg();
        reg.targets(e, |c, variant| {
            let msg = match variant {
                Variant::Full => &full,
                Variant::MovedAway => moved.get_or_insert_with(|| {
                    Message::Text(Utf8Bytes::from(e.frame(Variant::MovedAway)))
                }),
            };
            match self.push_live(c, Some(pos), e.id, msg) {
                Pushed::Queued(n) => pressure |= n > half,
                Pushed::Skipped => {}
                Pushed::Overflow => pressure = true,
            }
        });
        reg.position = pos;
        drop(reg);
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

    /// Takes one of `user`'s replay turns, waiting (only behind that user's
    /// own replays) while they have `replay_slots_per_user` running.
    pub async fn replay_turn(self: &Arc<Self>, user: i64) -> ReplayTurn {
        loop {
            {
                let mut m = self.replaying.lock().unwrap_or_else(|p| p.into_inner());
                let n = m.entry(user).or_insert(0);
                if *n < self.cfg.replay_slots_per_user.max(1) {
                    *n += 1;
                    return ReplayTurn {
                        hub: self.clone(),
                        user,
                    };
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
            } else if c.principal.exp.is_some_and(|exp| now >= exp) {
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
            "refusedConnections": n(&k.refused_connections),
            "replaysTimedOut": n(&k.replays_timed_out),
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

/// One of a user's replay turns; given back when dropped.
pub struct ReplayTurn {
    hub: Arc<Hub>,
    user: i64,
}

impl Drop for ReplayTurn {
    fn drop(&mut self) {
        let mut m = self.hub.replaying.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.user);
            }
        }
    }
}

/// The relay hands events to the hub through this.
impl crate::events::relay::Sink for Hub {
    fn deliver(&self, e: &Event) -> bool {
        self.dispatch(e)
    }

    fn ephemeral(&self, e: &Ephemeral) {
        self.dispatch_ephemeral(e)
    }

    fn connected(&self, up: bool) {
        self.relay.connected.store(up, Relaxed);
    }

    fn reconnected(&self) {
        self.relay.reconnects.fetch_add(1, Relaxed);
    }

    fn position(&self) -> Pos {
        Hub::position(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;
    use crate::events::Kind;
    use std::collections::HashSet;

    fn hub(queue: usize) -> Hub {
        Hub::new(HubConfig {
            send_queue: queue,
            catch_up_limit: 8,
            max_subscriptions: 4,
            ping_interval: Duration::from_secs(1),
            max_per_user: 3,
            replay_slots: 2,
            replay_slots_per_user: 1,
            replay_timeout: Duration::from_secs(5),
            replay_max_events: 100,
        })
    }

    fn principal(user: i64, role: Role, stores: &[i64]) -> Principal {
        principal_until(user, role, stores, None)
    }

    fn principal_until(user: i64, role: Role, stores: &[i64], exp: Option<i64>) -> Principal {
        Principal {
            user_id: user,
            email: None,
            role,
            stores: stores.iter().copied().collect::<HashSet<_>>(),
            exp,
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
            seq: 1000 + id,
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
        let staff = h.register(principal(1, Role::Staff, &[1, 2])).unwrap();
        let admin = h.register(principal(2, Role::Admin, &[])).unwrap();
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
        let slow = h.register(principal(1, Role::Admin, &[])).unwrap();
        let fast = h.register(principal(2, Role::Admin, &[])).unwrap();
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
        h.set_position(Pos { seq: 1000, id: 0 });
        let c = h.register(principal(1, Role::Staff, &[1])).unwrap();
        h.dispatch(&event(1, "sales-data-created", Some(1), None)); // before the subscription
        h.subscribe(&c, Channel::Sales(1)).unwrap();
        h.dispatch(&event(2, "sales-data-created", Some(1), None)); // live
        let (snap, _) = h.begin_resume(&c, &[]).unwrap();
        assert_eq!(snap.upto.id, 2);
        h.dispatch(&event(3, "sales-data-created", Some(1), None)); // held back
        assert!(
            snap.wants(&c, &event(2, "sales-data-created", Some(1), None))
                .is_none(),
            "already live"
        );
        assert_eq!(
            snap.wants(&c, &event(1, "sales-data-created", Some(1), None)),
            Some(Variant::Full),
            "missed"
        );
        assert!(
            snap.wants(&c, &event(1, "sales-data-created", Some(2), None))
                .is_none(),
            "not subscribed"
        );
        assert!(h.begin_resume(&c, &[]).is_err());
        assert_eq!(ids(&h, &c), vec![2]);
        h.finish_resume(
            &c,
            &snap,
            snap.upto,
            Some(Pos { seq: 1000, id: 0 }),
            protocol::resumed(0, 1, 2),
        );
        assert_eq!(ids(&h, &c), vec![2, 3]);
        // After the resume, every event since `from` counts as delivered.
        let (again, _) = h.begin_resume(&c, &[]).unwrap();
        assert!(again
            .wants(&c, &event(1, "sales-data-created", Some(1), None))
            .is_none());
    }

    #[test]
    fn heartbeat_closes_after_two_missed_pongs() {
        let h = hub(16);
        let c = h.register(principal(1, Role::Staff, &[])).unwrap();
        let ok = h.register(principal(2, Role::Staff, &[])).unwrap();
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
            .register(principal_until(3, Role::Staff, &[], Some(1)))
            .unwrap();
        h.heartbeat();
        assert_eq!(
            expired.close_requested().map(|c| c.0),
            Some(protocol::CLOSE_TOKEN_EXPIRED)
        );
    }

    #[test]
    fn connections_per_user_are_capped() {
        let h = hub(16);
        for _ in 0..3 {
            h.register(principal(7, Role::Staff, &[1])).unwrap();
        }
        assert!(!h.user_has_room(7));
        assert_eq!(
            h.register(principal(7, Role::Staff, &[1])).err(),
            Some(Refused::TooMany)
        );
        assert!(h.register(principal(8, Role::Staff, &[1])).is_ok());
    }

    #[test]
    fn a_moved_row_reaches_its_old_store_as_a_deletion() {
        let h = hub(16);
        let old = h.register(principal(1, Role::Staff, &[2])).unwrap();
        let new = h.register(principal(2, Role::Staff, &[3])).unwrap();
        let both = h.register(principal(3, Role::Admin, &[])).unwrap();
        h.subscribe(&old, Channel::Sales(2)).unwrap();
        h.subscribe(&new, Channel::Sales(3)).unwrap();
        h.subscribe(&both, Channel::Sales(2)).unwrap();
        h.subscribe(&both, Channel::Sales(3)).unwrap();
        let mut e = event(1, "sales-data-updated", Some(3), None);
        e.payload = json!({"year": 2025, "month": 1, "totalSales": 5, "previousStoreId": 2});
        h.dispatch(&e);
        let frame = |c: &Conn| -> Value { serde_json::from_str(&h.queued(c)[0]).unwrap() };
        assert_eq!(frame(&old)["event"], "sales-data-deleted");
        assert_eq!(frame(&old)["data"]["storeId"], 2);
        assert!(frame(&old)["data"].get("totalSales").is_none());
        assert_eq!(frame(&new)["event"], "sales-data-updated");
        assert_eq!(frame(&both)["event"], "sales-data-updated");
        assert_eq!(h.queued(&both).len(), 1);
    }
}
