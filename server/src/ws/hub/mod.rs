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
//! Resume (`resume`) and the statistics (`stats`) are in their own files.
//!
//! Lock order: the registry, then a connection's state. A connection's own
//! task never takes the registry while holding its state.

mod resume;
mod stats;

pub use resume::{ReplayTurn, ResumeSnapshot};
pub use stats::{Counters, RelayStatus};

use super::protocol::{self, Channel};
use crate::auth::Principal;
use crate::events::model::{Ephemeral, Event, Pos};
use crate::events::vocab::{Recipient, Variant};
use futures_util::task::AtomicWaker;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::protocol::frame::Utf8Bytes;
use tokio_tungstenite::tungstenite::Message;

/// Replies (acks, pongs, errors, pings) not read yet may number the event
/// limit (`send_queue`) and this many more; a client that sends requests
/// without reading the replies beyond that is closed (1008). Events queued
/// ahead of the replies do not count: during a replay the queue stays full
/// of events however steadily the client reads.
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
    /// Events of the log one replay goes through at most (whether it
    /// sends them or not: the subscriptions and scope leave some out);
    /// past it the client is told to resync (reload, then follow live
    /// events).
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
            replay_max_events: c.ws_replay_max_events,
        }
    }
}

/// How long a new connection's own events (the implicit per-user channel)
/// wait for its first request: a client that resumes right after `ready`
/// gets them in order within its replay. (Checked once a second, so up to
/// a second more.)
pub const OPENING_HOLD: std::time::Duration = std::time::Duration::from_secs(5);

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
    /// While a resume replays from the log, and while the connection opens
    /// (`opening`): live events held back, with their positions.
    catch_up: Option<Vec<(Option<Pos>, Message)>>,
    /// From registration until the client's first request, or
    /// [`OPENING_HOLD`]: the implicit per-user channel's events are held
    /// back, so that a resume sent first replays them in order instead of
    /// finding them already delivered ahead of older events.
    opening: bool,
    /// The relay position at registration (what `ready` reports), and the
    /// epoch of the log it is a position of.
    opened: Pos,
    opened_epoch: Arc<str>,
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
    /// Where the client's last resume left it: live events at or before it
    /// are ones it already has (it resumed from a position this instance's
    /// relay had not reached yet).
    floor: Option<Pos>,
    replay_waiting: bool,
    /// Frames a resume queued (its answer and the events it released) not
    /// read yet: they do not count against the live bound (`send_queue`)
    /// (each read takes one off).
    backlog: usize,
    /// Frames taken from the queue so far: the frame at `queue[i]` is the
    /// `popped + i`-th ever queued.
    popped: u64,
    /// Where each reply not read yet stands in that count: the bound on a
    /// client that sends without reading counts these, not the events
    /// queued before them (a replay keeps the queue full of events while
    /// the client reads them).
    replies_at: VecDeque<u64>,
    /// Whether `catch_up` (the one it was set for; a new one starts false)
    /// holds a reply (`reply_after_held`): later replies then wait behind
    /// it, so answers keep the order of their requests. Held events of no
    /// position (export progress, notifications) are not replies.
    held_reply: bool,
    /// Answers waiting in `catch_up` (see `held_reply`): bounded like the
    /// replies in the queue, so a client that floods requests during a
    /// resume is closed as one (1008), not as a slow consumer.
    held_answers: usize,
}

impl Conn {
    pub fn user_id(&self) -> i64 {
        self.principal.user_id
    }

    fn lock(&self) -> MutexGuard<'_, ConnState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The relay position when the connection registered: `ready` reports
    /// its id, from which a resume covers everything held back since.
    pub fn opened_at(&self) -> Pos {
        self.lock().opened
    }

    /// The epoch of the log [`Conn::opened_at`] is a position of (what
    /// `ready` names with it).
    pub fn opened_epoch(&self) -> Arc<str> {
        self.lock().opened_epoch.clone()
    }

    /// Whether its token has expired at `now` (seconds since the epoch):
    /// past `exp` by more than the clock skew allowed, as a request or an
    /// upgrade with the token is judged, so a token the upgrade took is
    /// not closed at the connection's first request.
    pub fn expired(&self, now: i64) -> bool {
        self.principal
            .exp
            .is_some_and(|exp| exp < now - crate::auth::LEEWAY_SECS as i64)
    }

    /// Whether the connection is closing (work for it can stop).
    pub fn is_closing(&self) -> bool {
        self.lock().close.is_some()
    }

    /// The next frame to write, if any.
    pub fn pop(&self) -> Option<Message> {
        let mut st = self.lock();
        let m = st.queue.pop_front();
        if m.is_some() {
            st.backlog = st.backlog.saturating_sub(1);
            st.popped += 1;
            let popped = st.popped;
            if st.replies_at.front().is_some_and(|&at| at < popped) {
                st.replies_at.pop_front();
                if st.replies_at.is_empty() {
                    // Every reply read (the usual state of an idle
                    // connection): no buffer kept for the next one.
                    st.replies_at = VecDeque::new();
                }
            }
        }
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
struct Registry {
    position: Pos,
    /// The epoch of the event log the relay reads (`sales.event_log_epoch()`):
    /// ids and `position` are numbers of that log, so the two change
    /// together (under this lock) and a connection takes both at once.
    epoch: Arc<str>,
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
            // Each recipient gets the form its own scope allows.
            let mut to_conn = |c: &Arc<Conn>| {
                f(
                    c,
                    e.variant_for(variant, |s| c.principal.can_access_store(s)),
                )
            };
            match to {
                Recipient::User(u) => Self::each(self.users.get(&u), &mut to_conn),
                Recipient::Channel(ch) => Self::each(self.channels.get(&ch), &mut to_conn),
                Recipient::ChannelInScope(ch, s) => {
                    Self::each(self.channels.get(&ch), &mut |c: &Arc<Conn>| {
                        if c.principal.can_access_store(s) {
                            to_conn(c)
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
    /// Woken when a replay ends and gives its user's turn back.
    replay_freed: Notify,
    /// Connections in their opening hold, in the order they opened, with
    /// when it runs out (ended by [`Hub::end_openings`], from the
    /// heartbeat's task: no task or timer per connection).
    openings: Mutex<std::collections::VecDeque<(std::time::Instant, std::sync::Weak<Conn>)>>,
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
            replay_freed: Notify::new(),
            openings: Mutex::new(std::collections::VecDeque::new()),
            cfg,
        }
    }

    /// The epoch of the event log (see `Registry::epoch`); empty until set.
    pub fn epoch(&self) -> Arc<str> {
        self.reg().epoch.clone()
    }

    /// Sets the epoch of the event log; set once before serving, and again
    /// by [`Hub::log_replaced`].
    pub fn set_epoch(&self, epoch: &str) {
        self.reg().epoch = Arc::from(epoch);
    }

    /// The relay found, as it connected again, that the log is not the one
    /// it was reading (restored from a dump, recovered to a point in time,
    /// or a standby promoted without the newest events): every connection
    /// is closed with 1012, so that each client resumes, and one resuming
    /// from an id of the old log is told to resync (ids are given again).
    pub fn log_replaced(&self, epoch: &str, head: Pos) {
        let conns: Vec<Arc<Conn>> = {
            let mut reg = self.reg();
            reg.epoch = Arc::from(epoch);
            reg.position = head;
            reg.conns.values().cloned().collect()
        };
        self.relay.log_replaced.fetch_add(1, Relaxed);
        for c in conns {
            if self.close(
                &c,
                protocol::CLOSE_LOG_REPLACED,
                protocol::REASON_LOG_REPLACED,
            ) {
                self.counters.closed_log_replaced.fetch_add(1, Relaxed);
            }
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

    /// Ends a connection's opening hold (its first request other than a
    /// resume, or [`OPENING_HOLD`] after it opened): the events held back
    /// since it registered are queued, in order, and live delivery begins.
    pub fn end_opening(&self, conn: &Conn) {
        if !conn.lock().opening || self.close_if_expired(conn) {
            return;
        }
        // Under the registry lock, as a resume begins: the two cannot
        // interleave (a resume finding the hold half ended).
        let _reg = self.reg();
        let mut st = conn.lock();
        if !st.opening {
            return;
        }
        st.opening = false;
        let Some(held) = st.catch_up.take() else {
            return;
        };
        if st.close.is_some() {
            return;
        }
        let before = st.queue.len();
        self.release_held(&mut st, held.into_iter().map(|(_, msg)| msg));
        // Released at once, like a resume's: not counted against the live
        // bound or the replies' (each read takes one off).
        st.backlog += st.queue.len().saturating_sub(before);
        drop(st);
        conn.waker.wake();
    }

    /// Ends the opening hold of every connection whose hold has run out
    /// (or that has gone); called about once a second.
    pub fn end_openings(&self) {
        let now = std::time::Instant::now();
        loop {
            let due = {
                let mut q = self.openings.lock().unwrap_or_else(|p| p.into_inner());
                match q.front() {
                    Some((at, _)) if *at <= now => q.pop_front().map(|(_, c)| c),
                    _ => None,
                }
            };
            let Some(conn) = due else {
                return;
            };
            if let Some(conn) = conn.upgrade() {
                self.end_opening(&conn);
            }
        }
    }

    /// A connection whose token has expired is closed (4001): it gets no
    /// more events, live or replayed, and no answer. True when it was.
    pub fn close_if_expired(&self, conn: &Conn) -> bool {
        if !conn.expired(chrono::Utc::now().timestamp()) {
            return false;
        }
        if self.close(conn, protocol::CLOSE_TOKEN_EXPIRED, "token expired") {
            self.counters.closed_expired.fetch_add(1, Relaxed);
        }
        true
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
        {
            let mut st = conn.lock();
            st.user_since = reg.position;
            st.opened = reg.position;
            st.opened_epoch = reg.epoch.clone();
            st.catch_up = Some(Vec::new());
            st.held_reply = false;
            st.held_answers = 0;
            st.opening = true;
        }
        self.openings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((
                std::time::Instant::now() + OPENING_HOLD,
                Arc::downgrade(&conn),
            ));
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
    /// it was already subscribed. Outside a resume, so it ends the opening
    /// hold: events are live from here on.
    pub fn subscribe(&self, conn: &Arc<Conn>, ch: Channel) -> Result<bool, SubscribeError> {
        self.end_opening(conn);
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

    /// Queues the answer to an unsubscribe. While a resume runs, the answer
    /// waits with the live events held back, after them: events of the
    /// channel that the replay sends, or that were held back before the
    /// unsubscribe, then all arrive before it, never after.
    pub fn reply_after_held(&self, conn: &Conn, text: String) {
        {
            // From here on, answers go behind the held-back events (see
            // `control`), this one first.
            let mut st = conn.lock();
            if st.catch_up.is_some() {
                st.held_reply = true;
            }
        }
        self.reply(conn, text);
    }

    /// Queues a reply (ack, error, pong, ping). A client that floods requests
    /// without reading is closed (1008).
    pub fn reply(&self, conn: &Conn, text: String) {
        self.replies(conn, vec![text]);
    }

    /// The replies to one request, queued together: the limit on a client
    /// that sends without reading is checked once, before them, so that
    /// one request (a resume naming up to `max_subscriptions` channels)
    /// never trips it by itself.
    pub fn replies(&self, conn: &Conn, texts: Vec<String>) {
        self.control(
            conn,
            texts.into_iter().map(|t| Message::Text(Utf8Bytes::from(t))),
            true,
        );
    }

    /// Queues control frames. `answers`: they answer requests, so behind a
    /// reply that waits with the held-back events (an unsubscribe's during
    /// a resume) they wait too, and answers arrive in the order of their
    /// requests; the heartbeat's pings never wait.
    fn control(&self, conn: &Conn, msgs: impl IntoIterator<Item = Message>, answers: bool) {
        let mut st = conn.lock();
        if st.close.is_some() {
            return;
        }
        let limit = self.cfg.catch_up_limit;
        let most = self.cfg.send_queue + CONTROL_HEADROOM;
        if answers && st.held_reply && st.catch_up.is_some() {
            for msg in msgs {
                if st.held_answers >= most {
                    self.flooded(&mut st);
                    break;
                }
                let Some(buf) = st.catch_up.as_mut() else {
                    break;
                };
                if buf.len() >= limit {
                    self.overflow(&mut st);
                    break;
                }
                buf.push((None, msg));
                st.held_answers += 1;
            }
            drop(st);
            conn.waker.wake();
            return;
        }
        if st.replies_at.len() >= most {
            self.flooded(&mut st);
        } else {
            for msg in msgs {
                let at = st.popped + st.queue.len() as u64;
                st.replies_at.push_back(at);
                st.queue.push_back(msg);
            }
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
        st.backlog = 0;
        drop(st);
        conn.waker.wake();
        conn.space.notify_one();
        true
    }

    /// Queues held-back events released at once (at the end of a resume or
    /// of the opening hold), closing the connection as a slow consumer if
    /// they do not fit.
    fn release_held(&self, st: &mut ConnState, msgs: impl Iterator<Item = Message>) {
        for msg in msgs {
            if st.queue.len() >= self.cfg.send_queue + self.cfg.catch_up_limit {
                self.overflow(st);
                return;
            }
            st.queue.push_back(msg);
        }
    }

    /// Closes a connection that sends requests without reading the
    /// answers (1008).
    fn flooded(&self, st: &mut ConnState) {
        st.queue = VecDeque::new();
        st.replies_at = VecDeque::new();
        st.backlog = 0;
        st.catch_up = None;
        st.close = Some((
            protocol::CLOSE_POLICY,
            "too many requests without reading the replies",
        ));
        self.counters.closed_policy.fetch_add(1, Relaxed);
    }

    fn overflow(&self, st: &mut ConnState) {
        let dropped = 1 + st.queue.len() + st.catch_up.as_ref().map_or(0, Vec::len);
        st.queue = VecDeque::new();
        st.backlog = 0;
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
    /// A connection whose token has expired (`now`, seconds since the
    /// epoch, is past its `exp`) gets nothing more: it is closed (4001)
    /// at the first event after its expiry, not at the next heartbeat.
    fn push_live(&self, conn: &Conn, pos: Option<Pos>, id: i64, msg: &Message, now: i64) -> Pushed {
        let mut st = conn.lock();
        if st.close.is_some() {
            return Pushed::Skipped;
        }
        if conn.expired(now) {
            st.queue = VecDeque::new();
            st.backlog = 0;
            st.catch_up = None;
            st.close = Some((protocol::CLOSE_TOKEN_EXPIRED, "token expired"));
            self.counters.closed_expired.fetch_add(1, Relaxed);
            drop(st);
            conn.waker.wake();
            conn.space.notify_one();
            return Pushed::Skipped;
        }
        if let (Some(p), Some(floor)) = (pos, st.floor) {
            if p <= floor {
                return Pushed::Skipped;
            }
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
        } else if st.queue.len() < self.cfg.send_queue + st.backlog {
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
        // Each form is serialised once, when a first connection takes it,
        // and its bytes shared by every queue (an event nobody follows, like
        // most of a large batch's, is never serialised).
        let mut full: Option<Message> = None;
        let mut moved: Option<Message> = None;
        let mut moved_in: Option<Message> = None;
        let pos = e.pos();
        let half = self.cfg.send_queue / 2;
        let mut pressure = false;
        let now = chrono::Utc::now().timestamp();
        let mut reg = self.reg();
        reg.targets(e, |c, variant| {
            let msg = match variant {
                Variant::Full => full
                    .get_or_insert_with(|| Message::Text(Utf8Bytes::from(e.frame(Variant::Full)))),
                Variant::MovedAway => moved.get_or_insert_with(|| {
                    Message::Text(Utf8Bytes::from(e.frame(Variant::MovedAway)))
                }),
                Variant::MovedIn => moved_in.get_or_insert_with(|| {
                    Message::Text(Utf8Bytes::from(e.frame(Variant::MovedIn)))
                }),
            };
            match self.push_live(c, Some(pos), e.id, msg, now) {
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
        let now = chrono::Utc::now().timestamp();
        let reg = self.reg();
        if let Some(m) = reg.users.get(&e.user_id) {
            for c in m.values() {
                self.push_live(c, None, 0, &msg, now);
            }
        }
        self.counters.ephemeral_relayed.fetch_add(1, Relaxed);
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
            } else if c.expired(now) {
                if self.close(&c, protocol::CLOSE_TOKEN_EXPIRED, "token expired") {
                    self.counters.closed_expired.fetch_add(1, Relaxed);
                }
            } else {
                self.control(&c, [Message::Ping(Default::default())], false);
            }
        }
    }

    /// The users with an open connection.
    pub fn connected_users(&self) -> Vec<i64> {
        self.reg().users.keys().copied().collect()
    }

    /// Closes the connections of `user` for which `revoked` gives a close
    /// code and reason (their token was revoked); returns how many.
    pub fn close_user(
        &self,
        user: i64,
        revoked: impl Fn(&Principal) -> Option<(u16, &'static str)>,
    ) -> usize {
        let conns: Vec<Arc<Conn>> = self
            .reg()
            .users
            .get(&user)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        let mut closed = 0;
        for c in conns {
            if let Some((code, reason)) = revoked(&c.principal) {
                if self.close(&c, code, reason) {
                    self.counters.closed_revoked.fetch_add(1, Relaxed);
                    closed += 1;
                }
            }
        }
        closed
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

    #[cfg(test)]
    fn queued_len(&self, conn: &Conn) -> usize {
        conn.lock().queue.len()
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

    fn listening(&self, up: bool) {
        if up && self.relay.listened.swap(true, Relaxed) {
            self.relay.listener_reconnects.fetch_add(1, Relaxed);
        }
        self.relay.listening.store(up, Relaxed);
    }

    fn reconnected(&self) {
        self.relay.reconnects.fetch_add(1, Relaxed);
    }

    fn epoch(&self) -> Arc<str> {
        Hub::epoch(self)
    }

    fn log_replaced(&self, epoch: &str, head: Pos) {
        Hub::log_replaced(self, epoch, head)
    }

    fn position(&self) -> Pos {
        Hub::position(self)
    }
}

#[cfg(test)]
mod tests;
