//! Resume: what a replay covers, live events held back meanwhile, and the
//! seam where they meet.

use super::protocol::Channel;
use super::{Conn, Hub, SubscribeError};
use crate::events::model::{Event, Pos};
use crate::events::vocab::{Recipient, Variant};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::protocol::frame::Utf8Bytes;
use tokio_tungstenite::tungstenite::Message;

/// What a resume replays against: the subscriptions at the moment it began.
pub struct ResumeSnapshot {
    /// Relay position when the resume began: the replay covers events up to it,
    /// live events after it were held back and follow the replay.
    pub upto: Pos,
    subs: Vec<(Channel, Pos)>,
    user_since: Pos,
    /// Where the connection opened, when the resume began during its
    /// opening hold: the events held since then were never delivered.
    opened: Option<Pos>,
}

impl ResumeSnapshot {
    /// Where a resume that ends without replaying (`resync_required`)
    /// releases held events from: after `upto` (the live events held during
    /// the replay), or after the connection opened when it began during the
    /// opening hold (its own events held since then, never delivered).
    pub fn resync_seam(&self) -> Pos {
        self.opened.unwrap_or(self.upto)
    }

    pub(super) fn since(&self, ch: Channel) -> Option<Pos> {
        self.subs.iter().find(|(c, _)| *c == ch).map(|(_, p)| *p)
    }

    /// Where `conn` started receiving what goes to `to` live, when it may
    /// see it at all.
    fn live_since(&self, conn: &Conn, to: Recipient) -> Option<Pos> {
        match to {
            Recipient::User(u) => (u == conn.user_id()).then_some(self.user_since),
            Recipient::Channel(ch) => self.since(ch),
            Recipient::ChannelInScope(ch, s) => {
                if conn.principal.can_access_store(s) {
                    self.since(ch)
                } else {
                    None
                }
            }
        }
    }

    /// Whether a logged event is one to replay to `conn`, and in which
    /// form: it is one the connection may see, and it was not already
    /// delivered live (it is not after the start of a subscription that
    /// matches it).
    pub fn wants(&self, conn: &Conn, e: &Event) -> Option<Variant> {
        let pos = e.pos();
        let mut first = None;
        for (to, variant) in e.deliveries() {
            if let Some(since) = self.live_since(conn, to) {
                if pos > since {
                    return None;
                }
                first.get_or_insert(variant);
            }
        }
        first.map(|v| e.variant_for(v, |s| conn.principal.can_access_store(s)))
    }

    /// Whether `conn` may already have had live events the replay covers:
    /// it subscribed before it resumed (subscriptions made by the resume
    /// itself start where the replay ends).
    pub fn live_before(&self) -> bool {
        self.subs.iter().any(|(_, since)| *since < self.upto)
    }

    /// Whether `e` reached `conn` live before the resume began.
    pub fn went_live(&self, conn: &Conn, e: &Event) -> bool {
        let pos = e.pos();
        pos <= self.upto
            && e.deliveries()
                .into_iter()
                .any(|(to, _)| self.live_since(conn, to).is_some_and(|since| pos > since))
    }
}

impl Hub {
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
            if st.catch_up.is_some() && !st.opening {
                return Err("a resume is already in progress");
            }
        }
        let added = add
            .iter()
            .map(|ch| self.subscribe_locked(&mut reg, conn, *ch))
            .collect();
        let mut st = conn.lock();
        let opened = st.opening.then_some(st.opened);
        if st.opening {
            // The events held back since the connection opened were not
            // delivered: the replay covers the implicit channel up to here,
            // as it does the channels the resume adds, and those held
            // events it covers are dropped at the seam.
            st.opening = false;
            st.user_since = reg.position;
        }
        if st.catch_up.is_none() {
            st.catch_up = Some(Vec::new());
            st.held_reply = false;
            st.held_answers = 0;
        }
        self.counters.resumes.fetch_add(1, Relaxed);
        let snap = ResumeSnapshot {
            upto: reg.position,
            subs: st.subs.clone(),
            user_since: st.user_since,
            opened,
        };
        Ok((snap, added))
    }

    /// From here until the resume ends, answers to later requests wait
    /// with the held-back events, behind the resume's own answer
    /// (`resumed`), so answers come in the order of their requests. Called
    /// once the resume's acknowledgements of the channels it adds are
    /// queued.
    pub fn hold_answers_until_resumed(&self, conn: &Conn) {
        let mut st = conn.lock();
        if st.catch_up.is_some() && !st.opening {
            st.held_reply = true;
        }
    }

    /// Takes one of `conn`'s user's replay turns, waiting (only behind that
    /// user's own replays) while they have `replay_slots_per_user` running.
    /// None once `conn` is closing.
    pub async fn replay_turn(self: &Arc<Self>, conn: &Conn) -> Option<ReplayTurn> {
        let user = conn.user_id();
        loop {
            // Registered before the count is read, so a turn given back
            // between the read and the wait still wakes this one.
            let freed = self.replay_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if conn.is_closing() {
                return None;
            }
            {
                let mut m = self.replaying.lock().unwrap_or_else(|p| p.into_inner());
                let n = m.entry(user).or_insert(0);
                if *n < self.cfg.replay_slots_per_user.max(1) {
                    *n += 1;
                    return Some(ReplayTurn {
                        hub: self.clone(),
                        user,
                    });
                }
            }
            // Woken when one of the user's replays ends; the bound only
            // notices a connection that starts closing while it waits.
            let _ = tokio::time::timeout(Duration::from_millis(250), freed).await;
        }
    }

    /// Queues a replayed event, waiting (without holding anything) while the
    /// queue is full. `false` when the connection is closing.
    pub async fn push_replay(&self, conn: &Conn, msg: Message) -> bool {
        if self.close_if_expired(conn) {
            return false;
        }
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
        if self.close_if_expired(conn) {
            return;
        }
        let mut st = conn.lock();
        let Some(held) = st.catch_up.take() else {
            return;
        };
        if st.close.is_some() {
            return;
        }
        let before = st.queue.len();
        st.queue.push_back(Message::Text(Utf8Bytes::from(ack)));
        // Everything up to the seam is the client's: a seam beyond this
        // instance's relay (a resume from another instance's position)
        // keeps those events from arriving live a second time.
        if snap.upto < seam {
            st.floor = Some(st.floor.map_or(seam, |f| f.max(seam)));
        }
        self.release_held(
            &mut st,
            held.into_iter()
                .filter(|(pos, _)| !pos.is_some_and(|p| p <= seam))
                .map(|(_, msg)| msg),
        );
        // What the resume queued (its answer and the events it released)
        // is the client's to read first, and does not count against the
        // live bound: pings and live events arriving meanwhile queue behind
        // it as they would behind an empty queue (that is neither a client
        // sending without reading nor a slow one).
        st.backlog = st.queue.len().saturating_sub(before);
        if let Some(from) = from {
            for (ch, since) in st.subs.iter_mut() {
                if snap.since(*ch) == Some(*since) && from < *since {
                    *since = from;
                }
            }
            if st.user_since == snap.user_since && from < st.user_since {
                st.user_since = from;
            }
        } else if st.user_since == snap.user_since && seam < st.user_since {
            // Nothing replayed (`resync_required`): the user's own events
            // after the seam went out live just now, released from the
            // hold, so a later resume does not send them again.
            st.user_since = seam;
        }
        drop(st);
        conn.waker.wake();
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
        drop(m);
        self.hub.replay_freed.notify_waiters();
    }
}
