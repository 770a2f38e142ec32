//! The event store's optimistic concurrency with many writers on one
//! stream, against a real PostgreSQL. A counter aggregate makes every
//! command produce an event, so a lost update would show as a wrong count.

use std::str::FromStr as _;
use std::time::Duration;

use anyhow::bail;
use database::DatabaseSettings;
use dev_stack::TestEnv;
use futures::future::BoxFuture;
use order_service::event_store::{
    self, Aggregate, Encoded, ExecuteError, Projection, Retry, Stream, Writer,
};
use sqlx::PgConnection;
use telemetry::CorrelationId;
use uuid::Uuid;

/// Counts; each increment records the value it reached.
#[derive(Debug, Default)]
struct Counter(u64);

#[derive(Debug)]
struct Increment;

#[derive(Debug, PartialEq, Eq)]
struct Incremented {
    to: u64,
}

impl Aggregate for Counter {
    type Command = Increment;
    type Event = Incremented;
    type Error = std::convert::Infallible;
    const KIND: &'static str = "counter";

    fn decide(&self, _: &Increment) -> Result<Vec<Incremented>, Self::Error> {
        Ok(vec![Incremented { to: self.0 + 1 }])
    }

    fn evolve(self, event: &Incremented) -> Self {
        Counter(event.to)
    }

    fn encode(_: Uuid, event: &Incremented) -> Encoded {
        Encoded {
            event_type: "test.Incremented".into(),
            schema_version: 1,
            payload: event.to.to_be_bytes().to_vec(),
        }
    }

    fn decode(event_type: &str, _: u32, payload: &[u8]) -> anyhow::Result<Incremented> {
        if event_type != "test.Incremented" {
            bail!("unexpected {event_type}");
        }
        Ok(Incremented {
            to: u64::from_be_bytes(payload.try_into()?),
        })
    }
}

/// No read model: the store (with the outbox it writes) alone is under test.
struct Nothing;

impl Projection<Counter> for Nothing {
    fn apply<'a>(
        &'a self,
        _: &'a mut PgConnection,
        _: &'a Stream<Counter>,
        _: usize,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

async fn pool() -> sqlx::PgPool {
    let db = TestEnv::get().await.database().await.unwrap();
    let url = db
        .provision(&order_service::MANIFEST.account("order-test-password"))
        .await
        .unwrap();
    let settings = DatabaseSettings {
        url: sqlx::postgres::PgConnectOptions::from_str(&url).unwrap(),
        max_connections: 60,
        connect_timeout: Duration::from_secs(10),
    };
    let pool = database::connect(&settings, order_service::SCHEMA)
        .await
        .unwrap();
    database::migrate(&pool, &[messaging::MIGRATIONS, order_service::MIGRATIONS])
        .await
        .unwrap();
    pool
}

fn writer() -> Writer {
    Writer {
        publisher: messaging::Publisher::new("test", "test.counter.events"),
        origin: messaging::envelope::Origin {
            correlation_id: CorrelationId::generate(),
            causation_id: None,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_commands_on_one_stream_leave_no_gap_and_lose_no_update() {
    let pool = pool().await;
    let id = Uuid::now_v7();
    // Enough attempts for the last of fifty writers to get its turn.
    let retry = Retry {
        max_attempts: 60,
        backoff: Duration::from_millis(1),
    };
    let writers: Vec<_> = (0..50)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                event_store::execute(&pool, id, &Increment, &writer(), &Nothing, retry).await
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap().unwrap();
    }

    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM events WHERE stream_id = $1 ORDER BY version")
            .bind(id)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        versions,
        (1..=50).collect::<Vec<i64>>(),
        "gap-free versions"
    );

    let mut conn = pool.acquire().await.unwrap();
    let stream = event_store::load::<Counter>(&mut conn, id).await.unwrap();
    assert_eq!(stream.state.0, 50, "every increment counted once");
    for (index, recorded) in stream.history.iter().enumerate() {
        assert_eq!(
            recorded.event.to,
            index as u64 + 1,
            "each event was decided on the state before it"
        );
        assert_eq!(recorded.envelope.aggregate_version, index as u64 + 1);
        assert_eq!(recorded.envelope.aggregate_type, "counter");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_writer_that_keeps_losing_gives_up_with_a_conflict() {
    let pool = pool().await;
    let id = Uuid::now_v7();
    let once = Retry {
        max_attempts: 1,
        backoff: Duration::ZERO,
    };
    let outcomes: Vec<_> = (0..20)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                event_store::execute(&pool, id, &Increment, &writer(), &Nothing, once).await
            })
        })
        .collect();
    let mut committed = 0;
    let mut conflicts = 0;
    for outcome in outcomes {
        match outcome.await.unwrap() {
            Ok(_) => committed += 1,
            Err(ExecuteError::Conflict { attempts: 1 }) => conflicts += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE stream_id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        stored, committed,
        "exactly the committed commands are stored"
    );
    assert_eq!(committed + conflicts, 20);
}
