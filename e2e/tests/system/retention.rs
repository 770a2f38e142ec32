//! Retention across the running system: once flows are old, the purge jobs
//! delete their sagas (with steps), trace events, inbox rows and CreateOrder
//! keys while the services serve; the orders themselves (the event store
//! and the read model), recent flows, and sagas still waiting for someone
//! stay.

use std::collections::BTreeSet;
use std::time::Duration;

use api_order::v1::{GetOrderRequest, OrderStatus};
use api_saga::v1::SagaState;
use e2e::Stack;
use sqlx::PgPool;
use testkit::grpc::bearer;

const SETTLE: Duration = Duration::from_secs(60);

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Waits until every query counts what it should, or fails saying which
/// did not.
async fn until_counts(pool: &PgPool, expected: &[(&str, i64)], within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let mut wrong = Vec::new();
        for (sql, n) in expected {
            let seen = count(pool, sql).await;
            if seen != *n {
                wrong.push(format!("{sql}: {seen}, not {n}"));
            }
        }
        if wrong.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "within {within:?}:\n{}",
            wrong.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn old_flows_are_purged_and_their_orders_stay() {
    let stack = Stack::builder()
        .env_all("PURGE_INTERVAL", "200ms")
        .env_all("PURGE_BATCH_SIZE", "3")
        .start()
        .await
        .unwrap();
    let customer = stack.customer_token("old@example.com").await.unwrap();
    let mut old = Vec::new();
    for (key, token) in [
        ("old-1", "tok_visa"),
        ("old-2", "tok_visa"),
        ("old-3", "tok_declined"),
    ] {
        let placed = stack.place_order(&customer, key, token).await;
        let saga = stack.settled_saga(&placed.order_id, SETTLE).await.unwrap();
        assert!(
            matches!(saga.state(), SagaState::Completed | SagaState::Compensated),
            "{saga:#?}"
        );
        old.push(placed);
    }
    let pool = stack.scenario.inspect().await.unwrap();
    let events_before = count(&pool, "SELECT count(*) FROM orders.events").await;
    assert!(count(&pool, "SELECT count(*) FROM saga.trace_events").await > 0);
    assert!(count(&pool, "SELECT count(*) FROM saga.inbox").await > 0);

    // A saga that failed long ago and waits for an operator, and one still
    // running: neither is ever purged, however old.
    sqlx::raw_sql(
        "INSERT INTO saga.saga_instances (saga_id, saga_type, business_key, state, data, correlation_id,
                                          created_at, finished_at, failure_reason)
         VALUES (gen_random_uuid(), 'parked', 'failed-long-ago', 'failed', '{}', 'c-failed',
                 now() - interval '400 days', now() - interval '399 days', 'waits for an operator'),
                (gen_random_uuid(), 'parked', 'running-long', 'running', '{}', 'c-running',
                 now() - interval '400 days', NULL, NULL);",
    )
    .execute(&pool)
    .await
    .unwrap();

    // Time passes for everything there is so far.
    sqlx::raw_sql(
        "UPDATE orders.idempotency_keys SET created_at = now() - interval '31 days';
         UPDATE saga.inbox SET processed_at = now() - interval '31 days';
         UPDATE saga.trace_events SET recorded_at = now() - interval '31 days';
         UPDATE saga.saga_instances SET finished_at = now() - interval '91 days'
         WHERE finished_at IS NOT NULL;",
    )
    .execute(&pool)
    .await
    .unwrap();

    // And a new flow runs meanwhile.
    let fresh = stack.place_order(&customer, "fresh", "tok_visa").await;
    let saga = stack.settled_saga(&fresh.order_id, SETTLE).await.unwrap();
    assert_eq!(saga.state(), SagaState::Completed);

    let recent = "now() - interval '1 day'";
    until_counts(
        &pool,
        &[
            ("SELECT count(*) FROM orders.idempotency_keys", 1),
            (
                &format!("SELECT count(*) FROM saga.inbox WHERE processed_at < {recent}"),
                0,
            ),
            (
                &format!("SELECT count(*) FROM saga.trace_events WHERE recorded_at < {recent}"),
                0,
            ),
            ("SELECT count(*) FROM saga.saga_instances", 3),
            (
                "SELECT count(*) FROM saga.saga_steps
                 WHERE saga_id NOT IN (SELECT saga_id FROM saga.saga_instances)",
                0,
            ),
        ],
        Duration::from_secs(30),
    )
    .await;

    let kept: BTreeSet<(String, String)> =
        sqlx::query_as("SELECT business_key, state FROM saga.saga_instances")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let expected: BTreeSet<(String, String)> = [
        ("failed-long-ago", "failed"),
        (fresh.order_id.as_str(), "completed"),
        ("running-long", "running"),
    ]
    .into_iter()
    .map(|(key, state)| (key.to_owned(), state.to_owned()))
    .collect();
    assert_eq!(kept, expected);
    assert!(
        count(&pool, "SELECT count(*) FROM saga.trace_events").await > 0,
        "the new flow's trace stays"
    );
    assert!(
        count(&pool, "SELECT count(*) FROM saga.saga_steps").await > 0,
        "the new flow's steps stay"
    );

    // The orders are all there, as they ended.
    assert!(count(&pool, "SELECT count(*) FROM orders.events").await > events_before);
    for (placed, status) in old.iter().zip([
        OrderStatus::Confirmed,
        OrderStatus::Confirmed,
        OrderStatus::Rejected,
    ]) {
        let order = stack
            .orders()
            .await
            .get_order(bearer(
                GetOrderRequest {
                    order_id: placed.order_id.clone(),
                },
                &customer,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(order.status(), status);
    }
}
