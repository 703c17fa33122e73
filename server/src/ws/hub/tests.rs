//! The hub's unit tests.
use super::*;
use crate::auth::Role;
use crate::events::Kind;
use serde_json::{json, Value};
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
        generation: 0,
        session: None,
        outside: false,
        identity: None,
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
        payload: Default::default(),
        created_at: chrono::Utc::now(),
        region: None,
    }
}

/// What each queued text frame is: a reply's `type` or an event's name.
fn kinds(h: &Hub, c: &Conn) -> Vec<String> {
    h.queued(c)
        .iter()
        .map(|t| {
            let v: Value = serde_json::from_str(t).unwrap();
            v.get("type")
                .or(v.get("event"))
                .and_then(Value::as_str)
                .unwrap()
                .to_string()
        })
        .collect()
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
        protocol::resumed(0, 1, 0, &[], false, 2),
    );
    assert_eq!(ids(&h, &c), vec![2, 3]);
    // After the resume, every event since `from` counts as delivered.
    let (again, _) = h.begin_resume(&c, &[]).unwrap();
    assert!(again
        .wants(&c, &event(1, "sales-data-created", Some(1), None))
        .is_none());
}

/// A client resuming from a position this instance's relay has not
/// reached yet (it came from an instance further ahead) already has the
/// events up to it: they do not arrive live a second time.
#[test]
fn a_resume_from_ahead_of_the_relay_is_not_delivered_twice() {
    let h = hub(16);
    h.set_position(Pos { seq: 1000, id: 0 });
    let c = h.register(principal(1, Role::Staff, &[1])).unwrap();
    h.subscribe(&c, Channel::Sales(1)).unwrap();
    h.dispatch(&event(2, "sales-data-created", Some(1), None));
    let (snap, _) = h.begin_resume(&c, &[]).unwrap();
    assert_eq!(snap.upto.id, 2);
    let from = event(4, "sales-data-updated", Some(1), None).pos();
    h.finish_resume(
        &c,
        &snap,
        from.max(snap.upto),
        Some(from),
        protocol::resumed(0, 1, 0, &[], false, 4),
    );
    for id in 3..=5 {
        h.dispatch(&event(id, "sales-data-updated", Some(1), None));
    }
    assert_eq!(ids(&h, &c), vec![2, 5]);
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
    e.payload = crate::events::model::Payload::from_value(
        &json!({"year": 2025, "month": 1, "totalSales": 5, "previousStoreId": 2}),
    );
    h.dispatch(&e);
    let frame = |c: &Conn| -> Value { serde_json::from_str(&h.queued(c)[0]).unwrap() };
    assert_eq!(frame(&old)["event"], "sales-data-deleted");
    assert_eq!(frame(&old)["data"]["storeId"], 2);
    assert!(frame(&old)["data"].get("totalSales").is_none());
    assert_eq!(frame(&new)["event"], "sales-data-updated");
    assert_eq!(frame(&both)["event"], "sales-data-updated");
    assert_eq!(h.queued(&both).len(), 1);
}

/// A follower of the old store that sees the row's new store through the
/// whole chain gets the row where it is now, not its deletion.
#[test]
fn a_moved_row_reaches_a_chain_follower_of_its_old_store_in_full() {
    let h = hub(16);
    let admin = h.register(principal(1, Role::Admin, &[])).unwrap();
    let manager = h.register(principal(2, Role::Staff, &[2, 3])).unwrap();
    let old_only = h.register(principal(3, Role::Staff, &[2])).unwrap();
    for c in [&admin, &manager, &old_only] {
        h.subscribe(c, Channel::Sales(2)).unwrap();
        h.subscribe(c, Channel::AllStores).unwrap();
    }
    let mut e = event(1, "sales-data-updated", Some(3), None);
    e.payload = crate::events::model::Payload::from_value(
        &json!({"year": 2025, "month": 1, "totalSales": 5, "previousStoreId": 2}),
    );
    h.dispatch(&e);
    let frames = |c: &Conn| -> Vec<Value> {
        h.queued(c)
            .iter()
            .map(|f| serde_json::from_str(f).unwrap())
            .collect()
    };
    for c in [&admin, &manager] {
        let f = frames(c);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0]["event"], "sales-data-updated", "{f:?}");
        assert_eq!(f[0]["data"]["storeId"], 3);
    }
    // Store 3 is outside this one's scope: it sees the row leave.
    let f = frames(&old_only);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0]["event"], "sales-data-deleted");
}

/// What a new connection's registration checks (see `session::serve`): a
/// revocation applied before the connection was registered, which closed
/// nothing then, closes it now with its code.
#[test]
fn a_revocation_applied_before_registration_closes_the_connection() {
    let h = hub(16);
    let access = crate::access::Revocations::default();
    access.apply(&crate::access::Change::Deleted {
        id: 7,
        until: i64::MAX,
    });
    let late = h.register(principal(7, Role::Staff, &[1])).unwrap();
    let other = h.register(principal(8, Role::Staff, &[1])).unwrap();
    assert_eq!(late.close_requested(), None);
    assert_eq!(crate::ws::revoke::close_if_revoked(&h, &access, 7), 1);
    assert_eq!(
        late.close_requested().map(|c| c.0),
        Some(crate::access::Revoked::Deleted.close_code())
    );
    assert_eq!(crate::ws::revoke::close_if_revoked(&h, &access, 8), 0);
    assert_eq!(other.close_requested(), None);
}

/// A resume may release more held-back events than the live queue holds.
/// While the client reads that backlog, a ping (the server's heartbeat or
/// the client's own) and new live events queue behind it: the connection
/// is neither taken for one sending without reading (1008) nor for a slow
/// consumer (4008). Once the backlog is read, the usual bounds apply again.
#[test]
fn a_resumes_backlog_leaves_room_for_replies_and_live_events() {
    let h = Hub::new(HubConfig {
        send_queue: 4,
        catch_up_limit: 100,
        max_subscriptions: 4,
        ping_interval: Duration::from_secs(1),
        max_per_user: 3,
        replay_slots: 2,
        replay_slots_per_user: 1,
        replay_timeout: Duration::from_secs(5),
        replay_max_events: 100,
    });
    h.set_position(Pos { seq: 1000, id: 0 });
    let c = h.register(principal(1, Role::Staff, &[1])).unwrap();
    h.subscribe(&c, Channel::Sales(1)).unwrap();
    let (snap, _) = h.begin_resume(&c, &[]).unwrap();
    for id in 1..=80 {
        h.dispatch(&event(id, "sales-data-created", Some(1), None));
    }
    h.finish_resume(
        &c,
        &snap,
        snap.upto,
        None,
        protocol::resumed(0, 0, 0, &[], false, 0),
    );
    assert_eq!(h.queued_len(&c), 81);
    h.reply(&c, protocol::pong());
    h.heartbeat();
    h.dispatch(&event(81, "sales-data-created", Some(1), None));
    assert_eq!(c.close_requested(), None);
    assert_eq!(h.queued_len(&c), 84);
    // Behind the backlog, the live bound (4) holds as it would behind an
    // empty queue: the pong, the ping, event 81 and one more.
    h.dispatch(&event(82, "sales-data-created", Some(1), None));
    assert_eq!(c.close_requested(), None);
    while c.pop().is_some() {}
    // Read: the live bound is 4 events again.
    for id in 84..=87 {
        h.dispatch(&event(id, "sales-data-created", Some(1), None));
    }
    assert_eq!(c.close_requested(), None);
    h.dispatch(&event(88, "sales-data-created", Some(1), None));
    assert_eq!(
        c.close_requested(),
        Some((
            protocol::CLOSE_SLOW_CONSUMER,
            protocol::REASON_SLOW_CONSUMER
        ))
    );
}

/// An unsubscribe answered while a resume runs: its answer comes after the
/// events of the channel that were held back before it, so no event of
/// the channel arrives after `unsubscribed`.
#[test]
fn an_unsubscribe_during_a_resume_is_answered_after_what_it_held_back() {
    let h = hub(16);
    h.set_position(Pos { seq: 1000, id: 0 });
    let c = h.register(principal(1, Role::Staff, &[1])).unwrap();
    h.subscribe(&c, Channel::Sales(1)).unwrap();
    let (snap, _) = h.begin_resume(&c, &[]).unwrap();
    h.dispatch(&event(1, "sales-data-created", Some(1), None)); // held back
    h.unsubscribe(&c, Channel::Sales(1));
    h.reply_after_held(&c, protocol::unsubscribed("sales-data-1"));
    h.dispatch(&event(2, "sales-data-created", Some(1), None)); // not followed any more
    assert!(h.queued(&c).is_empty(), "{:?}", h.queued(&c));
    h.finish_resume(
        &c,
        &snap,
        snap.upto,
        None,
        protocol::resumed(0, 0, 0, &[], false, 0),
    );
    assert_eq!(
        kinds(&h, &c),
        ["resumed", "sales-data-created", "unsubscribed"]
    );
    assert_eq!(ids(&h, &c), vec![1]);
    // Outside a resume it is answered at once.
    h.subscribe(&c, Channel::Sales(1)).unwrap();
    h.unsubscribe(&c, Channel::Sales(1));
    h.reply_after_held(&c, protocol::unsubscribed("sales-data-1"));
    assert_eq!(h.queued(&c).len(), 4);
}

/// A connection whose token has expired (past `exp` by more than the
/// clock skew a request or an upgrade allows) is closed (4001) at the
/// first event after its expiry, which it does not get; others go on,
/// including one within the allowance, which the upgrade accepted.
#[test]
fn an_expired_token_gets_no_more_events() {
    let h = hub(16);
    let now = chrono::Utc::now().timestamp();
    let skew = crate::auth::LEEWAY_SECS as i64;
    let expired = h
        .register(principal_until(1, Role::Staff, &[1], Some(now - skew - 2)))
        .unwrap();
    let valid = h
        .register(principal_until(2, Role::Staff, &[1], Some(now + 600)))
        .unwrap();
    let within = h
        .register(principal_until(3, Role::Staff, &[1], Some(now - 1)))
        .unwrap();
    h.subscribe(&expired, Channel::Sales(1)).unwrap();
    h.subscribe(&valid, Channel::Sales(1)).unwrap();
    h.subscribe(&within, Channel::Sales(1)).unwrap();
    h.dispatch(&event(1, "sales-data-created", Some(1), None));
    assert_eq!(
        expired.close_requested(),
        Some((protocol::CLOSE_TOKEN_EXPIRED, "token expired"))
    );
    assert!(ids(&h, &expired).is_empty());
    assert_eq!(valid.close_requested(), None);
    assert_eq!(ids(&h, &valid), vec![1]);
    assert_eq!(within.close_requested(), None);
    assert_eq!(ids(&h, &within), vec![1]);
}

/// A user's own events that arrive while the connection opens wait for its
/// first request: a resume sent first replays them in delivery order (the
/// held copies it covers are dropped at the seam); any other request, or the
/// opening hold running out, releases them live.
#[test]
fn own_events_wait_for_the_first_request() {
    let h = hub(16);
    h.set_position(Pos { seq: 1000, id: 0 });
    let note = |id| event(id, "user-notification", None, Some(1));
    // Resumed first.
    let c = h.register(principal(1, Role::Staff, &[1])).unwrap();
    h.dispatch(&note(1));
    // `ready` reports where the connection opened: a resume from there
    // covers what was held since.
    assert_eq!(c.opened_at(), Pos { seq: 1000, id: 0 });
    h.dispatch(&event(2, "sales-data-created", Some(1), None));
    h.dispatch(&note(3));
    assert_eq!(ids(&h, &c), Vec::<i64>::new(), "held while opening");
    let (snap, _) = h.begin_resume(&c, &[Channel::Sales(1)]).unwrap();
    assert_eq!(snap.upto.id, 3);
    for id in [1, 3] {
        assert!(snap.wants(&c, &note(id)).is_some(), "{id}: replayed");
    }
    h.dispatch(&note(4)); // during the replay: held, then released
    h.finish_resume(
        &c,
        &snap,
        snap.upto,
        Some(Pos { seq: 1000, id: 0 }),
        protocol::resumed(0, 3, 0, &[], false, 3),
    );
    assert_eq!(ids(&h, &c), vec![4], "only what the replay did not cover");
    // Another request first (or the hold running out): released in order.
    let d = h.register(principal(1, Role::Staff, &[1])).unwrap();
    h.dispatch(&note(5));
    h.dispatch(&note(6));
    assert_eq!(ids(&h, &d), Vec::<i64>::new());
    h.subscribe(&d, Channel::Sales(1)).unwrap();
    assert_eq!(ids(&h, &d), vec![5, 6]);
    h.dispatch(&note(7));
    assert_eq!(ids(&h, &d), vec![5, 6, 7]);
    let e = h.register(principal(1, Role::Staff, &[1])).unwrap();
    h.dispatch(&note(8));
    h.end_opening(&e);
    h.end_opening(&e);
    assert_eq!(ids(&h, &e), vec![8]);
    assert!(h.begin_resume(&e, &[]).is_ok());
}

/// A resume begun during the opening hold that ends without a replay
/// (`resync_required`) still delivers the user's own events held since the
/// connection opened: they were never sent, and no reload brings them back.
#[test]
fn a_resync_during_the_opening_hold_keeps_own_events() {
    let h = hub(16);
    h.set_position(Pos { seq: 1000, id: 0 });
    let c = h.register(principal(1, Role::Staff, &[1])).unwrap();
    h.dispatch(&event(1, "user-notification", None, Some(1)));
    let (snap, _) = h.begin_resume(&c, &[Channel::Sales(1)]).unwrap();
    h.dispatch(&event(2, "sales-data-created", Some(1), None));
    h.finish_resume(
        &c,
        &snap,
        snap.resync_seam(),
        None,
        protocol::error("resync_required", "reload", None),
    );
    assert_eq!(ids(&h, &c), vec![1, 2]);
    // A resume begun after the hold releases only what came after it, and
    // does not replay the own event the resync released live (a client
    // resuming from where it opened, as told to, got it twice).
    let (snap, _) = h.begin_resume(&c, &[]).unwrap();
    assert_eq!(snap.resync_seam(), snap.upto);
    assert!(snap
        .wants(&c, &event(1, "user-notification", None, Some(1)))
        .is_none());
}

/// The bound on a client that sends requests without reading counts the
/// replies it has not read, not the events queued ahead of them: with the
/// queue full of events (as a replay keeps it), a client may still have
/// `send_queue + CONTROL_HEADROOM` replies outstanding, and reading frames
/// (events first) takes replies off only once it reaches them.
#[test]
fn the_request_bound_counts_unread_replies_only() {
    let h = hub(4);
    let c = h.register(principal(1, Role::Staff, &[1])).unwrap();
    h.subscribe(&c, Channel::Sales(1)).unwrap();
    h.end_opening(&c);
    while c.pop().is_some() {}
    for id in 1..=4 {
        h.dispatch(&event(id, "sales-data-created", Some(1), None));
    }
    assert_eq!(h.queued_len(&c), 4);
    let bound = 4 + CONTROL_HEADROOM;
    for _ in 0..bound {
        h.reply(&c, protocol::pong());
    }
    assert_eq!(c.close_requested(), None, "events ahead do not count");
    // Reading the four events reads no reply: the next request is over.
    for _ in 0..4 {
        c.pop();
    }
    h.reply(&c, protocol::pong());
    assert_eq!(
        c.close_requested().map(|c| c.0),
        Some(protocol::CLOSE_POLICY)
    );

    // A client that reads replies as it sends is never closed, whatever
    // is queued ahead.
    let c = h.register(principal(2, Role::Staff, &[1])).unwrap();
    h.subscribe(&c, Channel::Sales(1)).unwrap();
    h.end_opening(&c);
    while c.pop().is_some() {}
    for round in 0..10 * bound {
        h.reply(&c, protocol::pong());
        if round % 2 == 1 {
            c.pop();
            c.pop();
        }
    }
    assert_eq!(c.close_requested(), None);
}

/// During a resume an unsubscribe's answer waits behind the held-back
/// events; a later request's answer (subscribing again) waits behind it,
/// so the answers arrive in the order of the requests and the last one
/// says what the connection follows.
#[test]
fn answers_keep_the_order_of_their_requests_during_a_resume() {
    let h = hub(16);
    h.set_position(Pos { seq: 10, id: 10 });
    let c = h.register(principal(1, Role::Admin, &[])).unwrap();
    h.subscribe(&c, Channel::Sales(1)).unwrap();
    h.end_opening(&c);
    while c.pop().is_some() {}
    let (snap, _) = h.begin_resume(&c, &[]).unwrap();
    h.unsubscribe(&c, Channel::Sales(1));
    h.reply_after_held(&c, protocol::unsubscribed("sales-data-1"));
    h.subscribe(&c, Channel::Sales(1)).unwrap();
    h.reply(&c, protocol::subscribed("sales-data-1", false));
    assert!(h.queued(&c).is_empty(), "{:?}", h.queued(&c));
    h.dispatch(&event(11, "sales-data-created", Some(1), None));
    h.finish_resume(
        &c,
        &snap,
        snap.upto,
        None,
        protocol::resumed(0, 0, 0, &[], false, 0),
    );
    assert_eq!(
        kinds(&h, &c),
        [
            "resumed",
            "unsubscribed",
            "subscribed",
            "sales-data-created"
        ],
        "{:?}",
        h.queued(&c)
    );
}

/// A held-back event of no position (export progress) is not a held
/// answer: replies during a resume still go out at once, and so do the
/// heartbeat's pings behind a held answer.
#[test]
fn held_progress_does_not_hold_answers_and_pings_never_wait() {
    let h = hub(16);
    h.set_position(Pos { seq: 10, id: 10 });
    let c = h.register(principal(1, Role::Admin, &[])).unwrap();
    h.end_opening(&c);
    while c.pop().is_some() {}
    let _resume = h.begin_resume(&c, &[]).unwrap();
    h.dispatch_ephemeral(&crate::events::model::Ephemeral {
        user_id: 1,
        event: "export-progress".into(),
        data: serde_json::json!({"rows": 1}),
    });
    h.reply(&c, protocol::pong());
    assert_eq!(h.queued(&c).len(), 1, "{:?}", h.queued(&c));
    // Behind a held answer, answers wait; pings do not.
    h.subscribe(&c, Channel::Stores).unwrap();
    h.unsubscribe(&c, Channel::Stores);
    h.reply_after_held(&c, protocol::unsubscribed("stores"));
    h.reply(&c, protocol::pong());
    h.heartbeat();
    assert_eq!(h.queued_len(&c), 2, "the first pong and the ping");
}

/// A replay waiting for its user's turn is woken as the running one ends,
/// not by a poll: with the clock paused, it gets the turn before any time
/// passes.
#[tokio::test(start_paused = true)]
async fn a_replay_turn_given_back_wakes_the_next_at_once() {
    let h = Arc::new(hub(16));
    let a = h.register(principal(7, Role::Staff, &[1])).unwrap();
    let b = h.register(principal(7, Role::Staff, &[1])).unwrap();
    let first = h.replay_turn(&a).await.expect("a turn");
    let waiting = {
        let h = h.clone();
        let b = b.clone();
        tokio::spawn(async move { h.replay_turn(&b).await.is_some() })
    };
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(
        !waiting.is_finished(),
        "one turn per user: the second waits"
    );
    let started = tokio::time::Instant::now();
    drop(first);
    assert!(waiting.await.unwrap(), "the second gets the turn");
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "woken by the turn given back, not by a timer"
    );
}

/// Requests answered while a resume runs wait behind its answer: the
/// client reads `resumed` first, then the answers to what it sent after
/// the resume, in that order (the heartbeat's pings do not wait).
#[test]
fn answers_during_a_resume_come_after_resumed() {
    let h = hub(16);
    let c = h.register(principal(1, Role::Staff, &[1])).unwrap();
    h.end_opening(&c);
    let (snap, _) = h.begin_resume(&c, &[Channel::Sales(1)]).unwrap();
    h.replies(&c, vec![protocol::subscribed("sales-data-1", false)]);
    h.hold_answers_until_resumed(&c);
    h.reply(&c, protocol::pong());
    h.reply(
        &c,
        protocol::error("bad_request", "a resume is already in progress", None),
    );
    assert_eq!(kinds(&h, &c), ["subscribed"]);
    h.finish_resume(
        &c,
        &snap,
        snap.upto,
        None,
        protocol::resumed(0, 0, 0, &[], false, 0),
    );
    assert_eq!(kinds(&h, &c), ["subscribed", "resumed", "pong", "error"]);
    // After it, answers go out at once.
    h.reply(&c, protocol::pong());
    assert_eq!(kinds(&h, &c).last().map(String::as_str), Some("pong"));
    assert_eq!(h.queued(&c).len(), 5);
}

/// A client flooding requests during a resume, whose answers wait behind
/// it, is closed as one that sends without reading (1008) at the same
/// bound as outside a resume, not as a slow consumer (4008) once the
/// held-back buffer is full.
#[test]
fn a_flood_during_a_resume_is_closed_as_a_flood() {
    let h = Hub::new(HubConfig {
        send_queue: 4,
        catch_up_limit: 10_000,
        max_subscriptions: 4,
        ping_interval: Duration::from_secs(1),
        max_per_user: 3,
        replay_slots: 2,
        replay_slots_per_user: 1,
        replay_timeout: Duration::from_secs(5),
        replay_max_events: 100,
    });
    let c = h.register(principal(1, Role::Staff, &[1])).unwrap();
    h.end_opening(&c);
    let (_snap, _) = h.begin_resume(&c, &[]).unwrap();
    h.hold_answers_until_resumed(&c);
    let bound = 4 + CONTROL_HEADROOM;
    for _ in 0..bound {
        h.reply(&c, protocol::pong());
    }
    assert_eq!(c.close_requested(), None, "within the bound");
    h.reply(&c, protocol::pong());
    assert_eq!(
        c.close_requested().map(|c| c.0),
        Some(protocol::CLOSE_POLICY)
    );
}
