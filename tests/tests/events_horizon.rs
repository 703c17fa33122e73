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
