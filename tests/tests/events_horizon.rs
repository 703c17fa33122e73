//! The delivery horizon is per database: a long write transaction in another
//! database of the cluster does not hold back this database's events, while
//! one in this database does (until it ends).

use sales_e2e::TestDb;
use sqlx::Connection;

async fn delivered(db: &TestDb) -> Vec<i64> {
    sqlx::query_scalar("SELECT id FROM sales.events_since(0, 1000)")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn other_databases_hold_nothing_back() {
    let here = TestDb::new().await;
    let elsewhere = TestDb::new().await;
    // A write transaction left open in the other database.
    let mut other = sqlx::PgConnection::connect(&elsewhere.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    sqlx::query("INSERT INTO sales.stores (code, name, region) VALUES ('O1', 'Other', 'North')")
        .execute(&mut other)
        .await
        .unwrap();

    here.stores(2).await;
    assert_eq!(
        delivered(&here).await.len(),
        2,
        "events here are delivered despite the open transaction elsewhere"
    );

    // An open write transaction in this database holds back what commits after it.
    let mut mine = here.connect().await;
    sqlx::query("BEGIN").execute(&mut mine).await.unwrap();
    sqlx::query("INSERT INTO sales.stores (code, name, region) VALUES ('H1', 'Held', 'North')")
        .execute(&mut mine)
        .await
        .unwrap();
    sqlx::query("INSERT INTO sales.stores (code, name, region) VALUES ('L1', 'Later', 'North')")
        .execute(&here.pool)
        .await
        .unwrap();
    assert_eq!(
        delivered(&here).await.len(),
        2,
        "the later commit waits for the older open transaction"
    );
    sqlx::query("COMMIT").execute(&mut mine).await.unwrap();
    assert_eq!(delivered(&here).await.len(), 4);
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
}

/// A reader waiting for this database's events (`sales.events_wait`, as
/// the relay's long poll does) is woken by this database's event-writing
/// commits only. With one condition variable for the cluster, every such
/// commit in any database woke every waiting reader of every database (a
/// signal from the committing backend, a context switch in each reader):
/// 300 commits elsewhere cost this reader about 300 wake-ups.
#[tokio::test]
async fn commits_in_another_database_do_not_wake_this_ones_readers() {
    use sales_e2e::fixtures::procfs::context_switches;
    let oid = |db: &TestDb| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, sqlx::postgres::types::Oid>(
                "SELECT oid FROM pg_database WHERE datname = current_database()",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
            .0
        }
    };
    // A database's wake-ups are those of the entry its oid picks (oid
    // modulo 64, `delivery.rs`): this one must share its entry with no
    // other database of the cluster (other tests' databases, written to
    // meanwhile, would wake the reader: a wait that ends early, and a
    // reader gone), and the database written to must pick another.
    let mut here = TestDb::new().await;
    for _ in 0..50 {
        let shared: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_database d, pg_database m
                            WHERE m.datname = current_database() AND d.oid <> m.oid
                              AND d.oid::bigint % 64 = m.oid::bigint % 64)",
        )
        .fetch_one(&here.pool)
        .await
        .unwrap();
        if !shared {
            break;
        }
        here = TestDb::new().await;
    }
    let mine = oid(&here).await % 64;
    let mut elsewhere = TestDb::new().await;
    while oid(&elsewhere).await % 64 == mine {
        elsewhere = TestDb::new().await;
    }
    let store = elsewhere.stores(1).await[0];
    let mut writer = sqlx::PgConnection::connect(&elsewhere.url).await.unwrap();
    // A database created after the choice above (other tests make them all
    // the time) may share this one's entry, and a commit there moves this
    // entry's generation and ends the wait: such an attempt says nothing
    // of the commits elsewhere, and is made again (bounded). A wake-up
    // that moved no generation is what this test is about.
    for attempt in 1..=5 {
        let mut reader = sqlx::PgConnection::connect(&here.url).await.unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut reader)
            .await
            .unwrap();
        let generation: i64 = sqlx::query_scalar("SELECT sales.events_generation()")
            .fetch_one(&mut reader)
            .await
            .unwrap();
        let waiting = tokio::spawn(async move {
            sqlx::query_scalar::<_, i64>("SELECT sales.events_wait($1, 60000)")
                .bind(generation)
                .fetch_one(&mut reader)
                .await
                .unwrap()
        });
        let asleep = sales_e2e::eventually(
            std::time::Duration::from_secs(30),
            "the reader to wait (or its wait to end)",
            || async {
                if waiting.is_finished() {
                    return Some(false);
                }
                let ev: Option<String> = sqlx::query_scalar(
                    "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1",
                )
                .bind(pid)
                .fetch_optional(&here.pool)
                .await
                .unwrap()
                .flatten();
                (ev.as_deref() == Some("Extension")).then_some(true)
            },
        )
        .await;
        if !asleep {
            eprintln!(
                "attempt {attempt}: the wait ended before it slept (this entry's generation moved)"
            );
            continue;
        }
        let before = context_switches(pid as u32);
        assert!(before > 0, "the backend's /proc/{pid}/status is readable");
        for i in 0..300 {
            sqlx::query("UPDATE sales.stores SET name = $2 WHERE id = $1")
                .bind(store)
                .bind(format!("Elsewhere {i}"))
                .execute(&mut writer)
                .await
                .unwrap();
        }
        let woken = context_switches(pid as u32).saturating_sub(before);
        if waiting.is_finished() {
            eprintln!("attempt {attempt}: the wait ended during the commits elsewhere (this entry's generation moved)");
            continue;
        }
        assert!(
            woken < 60,
            "300 event-writing commits in another database woke this database's reader {woken} times"
        );
        // A commit here wakes it.
        here.stores(1).await;
        let moved = tokio::time::timeout(std::time::Duration::from_secs(30), waiting)
            .await
            .expect("woken by this database's commit")
            .unwrap();
        assert!(moved > generation);
        return;
    }
    panic!("five attempts in a row were ended by commits of databases sharing this one's entry");
}

/// Where a starting relay begins (the log's head) is an event the log
/// holds, however many writers commit meanwhile: the head was looked up by
/// an id that `sales.events_head()` read with a snapshot of its own, newer
/// than the lookup's, so an event committed between the two was found by
/// the function and not by the lookup, and the relay started from the
/// beginning of the log (every retained event relayed again as live).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_head_is_found_while_writers_commit() {
    use sales_server::events::model::{Event, Pos};
    let db = TestDb::new().await;
    sqlx::query("SELECT sales.emit('test-filler', '{}')")
        .execute(&db.pool)
        .await
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for _ in 0..4 {
        let (pool, stop) = (db.pool.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                sqlx::query("SELECT sales.emit('test-filler', '{}')")
                    .execute(&pool)
                    .await
                    .unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut conn = db.connect().await;
    let mut last = Pos::START;
    for _ in 0..3000 {
        let head = Event::head(&mut conn).await.unwrap();
        assert!(head > Pos::START, "the head lost after {last:?}");
        assert!(head >= last, "the head went back from {last:?} to {head:?}");
        last = head;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut written = 0;
    for w in writers {
        written += w.await.unwrap();
    }
    assert!(written > 0);
}
