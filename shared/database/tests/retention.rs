//! The purge job's mechanics against a real PostgreSQL: bounded batches,
//! recent rows kept, and replicas purging at once without double work.

use std::str::FromStr as _;
use std::time::Duration;

use database::{DatabaseSettings, PurgeSettings, PurgeTarget, Purger, ServiceAccount};
use dev_stack::TestEnv;
use sqlx::PgPool;

const EVENTS: PurgeTarget = PurgeTarget {
    table: "events",
    retention: Duration::from_secs(3600),
    statement: "DELETE FROM events WHERE ctid = ANY(ARRAY(
                    SELECT ctid FROM events WHERE recorded_at < now() - $1
                    ORDER BY recorded_at LIMIT $2 FOR UPDATE SKIP LOCKED))",
};

async fn pool_with_events(old: i64, recent: i64) -> PgPool {
    let db = TestEnv::get().await.database().await.unwrap();
    let account = ServiceAccount {
        schema: "purging",
        role: "purging_service",
        password: "purging-test".into(),
    };
    let url = db.provision(&account).await.unwrap();
    let settings = DatabaseSettings {
        url: sqlx::postgres::PgConnectOptions::from_str(&url).unwrap(),
        max_connections: 8,
        connect_timeout: Duration::from_secs(10),
    };
    let pool = database::connect(&settings, account.schema).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE events (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                              recorded_at TIMESTAMPTZ NOT NULL);
         CREATE INDEX events_recorded_at ON events (recorded_at);",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO events (recorded_at)
         SELECT now() - interval '2 hours' - n * interval '1 second' FROM generate_series(1, $1) AS n
         UNION ALL
         SELECT now() - n * interval '1 second' FROM generate_series(1, $2) AS n",
    )
    .bind(old)
    .bind(recent)
    .execute(&pool)
    .await
    .unwrap();
    pool
}

async fn remaining(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE recorded_at < now() - interval '1 hour'),
                count(*) FILTER (WHERE recorded_at >= now() - interval '1 hour')
         FROM events",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

fn settings(batch_size: u32) -> PurgeSettings {
    PurgeSettings {
        interval: Duration::from_secs(3600),
        batch_size,
    }
}

#[tokio::test]
async fn a_pass_deletes_the_old_rows_in_bounded_batches_and_keeps_the_recent_ones() {
    let pool = pool_with_events(35, 5).await;
    let purger = Purger::new(pool.clone(), vec![EVENTS], settings(10));

    let reports = purger.purge_once().await.unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!(
        (reports[0].rows, reports[0].statements),
        (35, 4),
        "35 rows in batches of 10: 10, 10, 10, then 5 (fewer than a batch: done)"
    );
    assert_eq!(remaining(&pool).await, (0, 5));

    let idle = purger.purge_once().await.unwrap();
    assert_eq!(
        (idle[0].rows, idle[0].statements),
        (0, 1),
        "an idle pass is one statement"
    );
}

#[tokio::test]
async fn replicas_purging_at_once_split_the_rows_without_deleting_any_twice() {
    let pool = pool_with_events(2000, 50).await;
    let replicas: Vec<_> = (0..4)
        .map(|_| {
            let purger = Purger::new(pool.clone(), vec![EVENTS], settings(25));
            tokio::spawn(async move { purger.purge_once().await.unwrap() })
        })
        .collect();
    let mut deleted = 0;
    for replica in replicas {
        deleted += replica.await.unwrap()[0].rows;
    }
    assert_eq!(deleted, 2000, "every old row deleted exactly once");
    assert_eq!(remaining(&pool).await, (0, 50));
}

#[tokio::test]
async fn a_failing_target_does_not_hold_up_the_others() {
    let pool = pool_with_events(12, 3).await;
    let broken = PurgeTarget {
        table: "missing",
        retention: Duration::from_secs(60),
        statement: "DELETE FROM no_such_table WHERE $1::interval IS NULL AND $2::bigint IS NULL",
    };
    let purger = Purger::new(pool.clone(), vec![broken, EVENTS], settings(5));
    let error = purger.purge_once().await.unwrap_err();
    assert!(
        format!("{error:#}").contains("purging missing"),
        "{error:#}"
    );
    assert_eq!(remaining(&pool).await, (0, 3), "the next target still ran");
}

#[tokio::test]
async fn a_plan_without_an_index_shows_a_sequential_scan() {
    let pool = pool_with_events(1, 0).await;
    let unindexed = PurgeTarget {
        table: "events",
        retention: Duration::from_secs(60),
        statement: "DELETE FROM events WHERE ctid = ANY(ARRAY(
                        SELECT ctid FROM events WHERE id::text < $1::text
                        ORDER BY id::text LIMIT $2 FOR UPDATE SKIP LOCKED))",
    };
    let purger = Purger::new(pool, vec![EVENTS, unindexed], settings(10));
    let plans = purger.plans().await.unwrap();
    assert!(!plans[0].1.contains("Seq Scan"), "{}", plans[0].1);
    assert!(plans[0].1.contains("events_recorded_at"), "{}", plans[0].1);
    assert!(plans[1].1.contains("Seq Scan"), "{}", plans[1].1);
}
