//! Resume: replays from the event log what a connection missed.

use super::hub::{Conn, ResumeSnapshot};
use super::{protocol, Context};
use crate::events::model::{is_pruned, Event};
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio_tungstenite::tungstenite::protocol::frame::Utf8Bytes;
use tokio_tungstenite::tungstenite::Message;

/// Events read from the log per query during a replay.
const REPLAY_PAGE: i32 = 500;
/// Rows named in `resumed.supersededRows` at most (past it the client is
/// told the list is cut and reloads what it shows).
const MAX_SUPERSEDED_ROWS: usize = 1000;

enum ReplayEnd {
    /// From where, events replayed, events skipped as superseded, the
    /// rows they were of and whether some of those rows were left out.
    Done(crate::events::Pos, u64, u64, Vec<i64>, bool),
    Pruned,
    /// The id was read under another epoch of the log.
    OtherLog,
    TooLong,
    Closed,
}

/// Replays from the log what `conn` missed after `last_event_id` (only what
/// its subscriptions and scope allow, and only what was not delivered live),
/// up to the position where live delivery was held back; then the held-back
/// live events follow.
///
/// Bounds, so that no client can delay another's resume: a user runs one
/// replay at a time (their others wait behind it); a replay holds one of the
/// hub's replay slots only while it reads a page, never while it waits for
/// its client to read; it goes through at most `replay_max_events` events
/// of the log, sent or not (then the client is told to resync: a sparse
/// subscription far behind costs as much to find as a busy one), stops
/// reading once its connection closes, and ends after `replay_timeout`
/// (then its connection is closed as a slow consumer, 4008, and the client
/// resumes again).
pub(super) async fn replay(
    ctx: Arc<Context>,
    conn: Arc<Conn>,
    snap: ResumeSnapshot,
    last_event_id: i64,
    epoch: Option<String>,
) {
    let hub = &ctx.hub;
    let pool = &ctx.pool;
    // The time limit starts once the turn is taken: waiting behind another
    // of the user's connections is not this one being slow.
    let Some(_turn) = hub.replay_turn(&conn).await else {
        return;
    };
    let run = async {
        if hub.close_if_expired(&conn) {
            return Ok::<_, sqlx::Error>(ReplayEnd::Closed);
        }
        // Ids are given again after a restore or a recovery to an earlier
        // point: under another epoch the id names another event, or none.
        // The log's own epoch is read, not the relay's copy, which lags a
        // replaced log until the relay connects again.
        if let Some(e) = &epoch {
            let now = Event::epoch(pool).await?;
            if now.as_deref().unwrap_or(&hub.epoch()) != e.as_str() {
                return Ok(ReplayEnd::OtherLog);
            }
        }
        let max = i64::try_from(hub.cfg.replay_max_events).unwrap_or(i64::MAX - 1);
        let start = {
            let _slot = hub
                .replay_slots
                .acquire()
                .await
                .map_err(|_| sqlx::Error::PoolClosed)?;
            let within = max.saturating_add(1);
            let from = if last_event_id == 0 && !Event::log_start_kept(pool, within).await? {
                // From the start, but the start is gone: a replay would
                // leave out what was pruned without saying so.
                None
            } else {
                Event::position_of(pool, last_event_id).await?
            };
            match from {
                None => Err(ReplayEnd::Pruned),
                // Too far behind is said before anything is replayed: a
                // client told `resync_required` reloads, and events sent
                // ahead of it would only be shown and then reloaded.
                Some(from)
                    if from < snap.upto
                        && Event::more_than_between(pool, from, snap.upto, max).await? =>
                {
                    Err(ReplayEnd::TooLong)
                }
                Some(from) => Ok(from),
            }
        };
        let from = match start {
            Ok(from) => from,
            Err(end) => return Ok::<_, sqlx::Error>(end),
        };
        let mut count = 0u64;
        let mut superseded = 0u64;
        let mut superseded_rows: Vec<i64> = Vec::new();
        let mut rows_cut = false;
        if from < snap.upto {
            // A client that subscribed before resuming may have had newer
            // versions of some rows live already: the older ones the replay
            // finds are skipped, so no row's version goes backwards.
            let newest = if snap.live_before() {
                match newest_live(hub, pool, &conn, &snap, last_event_id).await? {
                    Some(newest) => newest,
                    None if conn.is_closing() => return Ok(ReplayEnd::Closed),
                    None => return Ok(ReplayEnd::TooLong),
                }
            } else {
                HashMap::new()
            };
            let mut after = last_event_id;
            let mut scanned = 0u64;
            'pages: loop {
                if conn.is_closing() {
                    return Ok(ReplayEnd::Closed);
                }
                let page = page_after(hub, pool, after).await?;
                for e in &page {
                    if e.pos() > snap.upto {
                        break 'pages;
                    }
                    scanned += 1;
                    if scanned > hub.cfg.replay_max_events {
                        return Ok(ReplayEnd::TooLong);
                    }
                    if let Some(variant) = snap.wants(&conn, e) {
                        if let (true, Some(row), Some(version)) =
                            (e.kind.is_sales(), e.row_id, e.row_version)
                        {
                            if newest.get(&row).is_some_and(|v| *v > version) {
                                superseded += 1;
                                if !superseded_rows.contains(&row) {
                                    if superseded_rows.len() < MAX_SUPERSEDED_ROWS {
                                        superseded_rows.push(row);
                                    } else {
                                        rows_cut = true;
                                    }
                                }
                                continue;
                            }
                        }
                        let msg = Message::Text(Utf8Bytes::from(e.frame(variant)));
                        if !hub.push_replay(&conn, msg).await {
                            return Ok(ReplayEnd::Closed);
                        }
                        count += 1;
                    }
                }
                match page.last() {
                    Some(e) if page.len() == REPLAY_PAGE as usize => after = e.id,
                    _ => break,
                }
            }
        }
        Ok(ReplayEnd::Done(
            from,
            count,
            superseded,
            superseded_rows,
            rows_cut,
        ))
    };
    let resync = |msg: &str| {
        hub.counters.resync_required.fetch_add(1, Relaxed);
        hub.finish_resume(
            &conn,
            &snap,
            snap.resync_seam(),
            None,
            protocol::error("resync_required", msg, None),
        );
    };
    match tokio::time::timeout(hub.cfg.replay_timeout, run).await {
        Ok(Ok(ReplayEnd::Done(from, count, superseded, rows, rows_cut))) => {
            let seam = from.max(snap.upto);
            hub.finish_resume(
                &conn,
                &snap,
                seam,
                Some(from),
                protocol::resumed(last_event_id, count, superseded, &rows, rows_cut, seam.id),
            );
        }
        Ok(Ok(ReplayEnd::Closed)) => {}
        // The log's retention is not named: whoever pruned (`maintain`, an
        // admin's call, another instance) may have kept less than this
        // instance's EVENT_RETENTION, which read "0 days" below a day.
        Ok(Ok(ReplayEnd::Pruned)) if last_event_id == 0 => resync(
            "events from the start of the log were pruned; reload, then follow live events",
        ),
        Ok(Ok(ReplayEnd::Pruned)) => resync(&format!(
            "event {last_event_id} was pruned from the event log, or is unknown; reload, then follow live events"
        )),
        Ok(Ok(ReplayEnd::OtherLog)) => resync(&format!(
            "event {last_event_id} is of another epoch of the event log (it was restored from a backup or recovered to an earlier point since): reload, then follow live events"
        )),
        Ok(Ok(ReplayEnd::TooLong)) => resync(&format!(
            "more than {} events were missed; reload, then follow live events",
            hub.cfg.replay_max_events
        )),
        Ok(Err(e)) if is_pruned(&e) => {
            resync("the events after lastEventId were pruned during the replay")
        }
        Ok(Err(e)) => {
            // Flushing the live events now would leave a gap: close instead,
            // so that the client resumes again from the same id.
            tracing::warn!(error = %e, "resume failed");
            hub.close(&conn, 1011, "resume failed; reconnect and resume again");
        }
        Err(_) => {
            hub.counters.replays_timed_out.fetch_add(1, Relaxed);
            if hub.close(
                &conn,
                protocol::CLOSE_SLOW_CONSUMER,
                protocol::REASON_SLOW_CONSUMER,
            ) {
                hub.counters.closed_slow.fetch_add(1, Relaxed);
            }
        }
    }
}

/// The newest version of each row that reached `conn` live before its
/// resume began, from the part of the log the replay covers; `None` when
/// that is more than `replay_max_events` events (the client then resyncs)
/// or the connection closes meanwhile.
async fn newest_live(
    hub: &super::hub::Hub,
    pool: &sqlx::PgPool,
    conn: &Conn,
    snap: &ResumeSnapshot,
    last_event_id: i64,
) -> Result<Option<HashMap<i64, i64>>, sqlx::Error> {
    let mut newest: HashMap<i64, i64> = HashMap::new();
    let mut scanned = 0u64;
    let mut after = last_event_id;
    loop {
        if conn.is_closing() {
            return Ok(None);
        }
        let page = page_after(hub, pool, after).await?;
        for e in &page {
            if e.pos() > snap.upto {
                return Ok(Some(newest));
            }
            scanned += 1;
            if scanned > hub.cfg.replay_max_events {
                return Ok(None);
            }
            if !snap.went_live(conn, e) {
                continue;
            }
            // Sales rows only: a store's events carry its id as `row_id`,
            // and ids of the two tables overlap.
            if let (true, Some(row), Some(version)) = (e.kind.is_sales(), e.row_id, e.row_version) {
                let v = newest.entry(row).or_insert(version);
                *v = (*v).max(version);
            }
        }
        match page.last() {
            Some(e) if page.len() == REPLAY_PAGE as usize => after = e.id,
            _ => return Ok(Some(newest)),
        }
    }
}

/// A page of the log after event `after`, read while holding one of the
/// hub's replay slots (never while waiting for a client).
async fn page_after(
    hub: &super::hub::Hub,
    pool: &sqlx::PgPool,
    after: i64,
) -> Result<Vec<Event>, sqlx::Error> {
    let _slot = hub
        .replay_slots
        .acquire()
        .await
        .map_err(|_| sqlx::Error::PoolClosed)?;
    Event::since(pool, after, REPLAY_PAGE).await
}
