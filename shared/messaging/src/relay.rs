//! The outbox relay: publishes committed outbox rows to Kafka.
//!
//! Order matters (one aggregate's events must reach its partition in the
//! order they were written), so one relay publishes a given row range at a
//! time. A batch is one statement in a transaction: it deletes the oldest
//! rows and returns them, holding their row locks. The relay publishes
//! them, waits for the broker to acknowledge every one, and only then
//! commits. A replica whose batch reaches a locked row waits there until
//! the holder commits, then skips the rows it deleted: the next batch
//! begins after the last one, never beside it. A relay that dies or fails
//! mid-batch rolls its delete back, so those rows are published again:
//! delivery is at least once, and consumers deduplicate by event id.
//!
//! The relay sleeps on `LISTEN` and is woken by the `NOTIFY` that the
//! statement writing outbox rows sends on commit, naming the highest id it
//! wrote; a relay that has published that row already skips the round. A
//! slow sweep also runs in case a notification was lost while the
//! listening connection was being re-established.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use sqlx::postgres::{PgListener, PgNotification};
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::backoff::Backoff;

/// Publishes one schema's outbox; see the module documentation.
#[derive(Clone)]
pub struct Relay {
    pool: PgPool,
    producer: FutureProducer,
    batch_size: i64,
    sweep_interval: Duration,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

/// One outbox row, as claimed for publishing.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct OutboxRow {
    id: i64,
    event_id: uuid::Uuid,
    topic: String,
    message_key: String,
    envelope: Vec<u8>,
    headers: sqlx::types::Json<Vec<(String, String)>>,
}

impl Relay {
    /// A relay for the schema `pool` is confined to.
    pub fn new(pool: PgPool, producer: FutureProducer) -> Self {
        Self {
            pool,
            producer,
            batch_size: 500,
            sweep_interval: Duration::from_secs(10),
        }
    }

    /// How often to look at the outbox without being notified (default 10 s):
    /// a safety net for notifications lost while reconnecting.
    pub fn with_sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// Runs until `shutdown`, publishing whenever the outbox is written.
    /// Failures (database or broker down) are logged and retried with
    /// backoff; the relay never gives up while the service runs.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        'connect: while !shutdown.is_cancelled() {
            let mut listener = match self.listen().await {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "outbox relay cannot listen yet"
                    );
                    backoff.wait(&shutdown).await;
                    continue;
                }
            };
            let mut published = RecentlyPublished::default();
            loop {
                // Publish everything there is, including what was written
                // while we were not listening.
                match self.publish_all().await {
                    Ok(ids) => published.extend(ids),
                    Err(error) => {
                        tracing::warn!(
                            error = format!("{error:#}"),
                            "outbox relay could not publish; will retry"
                        );
                        backoff.wait(&shutdown).await;
                        continue 'connect;
                    }
                }
                backoff.reset();
                // Wait for rows this relay has not published yet.
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => break 'connect,
                        received = listener.try_recv() => match received {
                            // Every notification here already: one round
                            // covers them all, and none if this relay has
                            // published what each announces.
                            Ok(Some(first)) => {
                                let mut new = !published.covers(&first);
                                while let Some(next) = listener.next_buffered() {
                                    new |= !published.covers(&next);
                                }
                                if new {
                                    break;
                                }
                            }
                            // The connection was lost and is being
                            // re-established: notifications may have been
                            // missed, so publish anyway.
                            Ok(None) => break,
                            Err(error) => {
                                tracing::warn!(%error, "outbox relay lost its listening connection");
                                continue 'connect;
                            }
                        },
                        () = tokio::time::sleep(self.sweep_interval) => break,
                    }
                }
            }
        }
        tracing::debug!("outbox relay stopped");
    }

    async fn listen(&self) -> anyhow::Result<PgListener> {
        let (schema,): (String,) = sqlx::query_as("SELECT current_schema()")
            .fetch_one(&self.pool)
            .await?;
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(&format!("{schema}.outbox")).await?;
        Ok(listener)
    }

    /// Publishes the whole backlog, batch by batch; returns how many events
    /// were published.
    pub async fn publish_pending(&self) -> anyhow::Result<usize> {
        Ok(self.publish_all().await?.len())
    }

    /// Publishes the whole backlog, batch by batch; returns the ids of the
    /// rows published.
    async fn publish_all(&self) -> anyhow::Result<Vec<i64>> {
        let mut published = Vec::new();
        loop {
            let mut tx = self
                .pool
                .begin()
                .await
                .context("starting an outbox transaction")?;
            let batch = claim(&mut tx, self.batch_size).await?;
            if batch.is_empty() {
                return Ok(published); // dropping `tx` ends it: nothing was written
            }
            // Every row acknowledged, or none deleted: a failure rolls the
            // whole batch back, and it is published again.
            self.send(&batch).await?;
            tx.commit()
                .await
                .context("committing published outbox rows")?;
            published.extend(batch.iter().map(|row| row.id));
            metrics::counter!("outbox_published_total").increment(batch.len() as u64);
            if batch.len() < usize::try_from(self.batch_size).unwrap_or(usize::MAX) {
                return Ok(published);
            }
        }
    }

    /// Hands the batch to the producer in order and waits for every
    /// acknowledgement; fails with the first failure.
    pub(crate) async fn send(&self, batch: &[OutboxRow]) -> anyhow::Result<()> {
        let sends = batch.iter().map(|row| {
            let received = telemetry::propagation::extract(
                row.headers
                    .iter()
                    .map(|(name, value)| (name.as_str(), value.as_str())),
            );
            let span = tracing::info_span!(
                "outbox.publish",
                otel.name = format!("{} publish", row.topic),
                otel.kind = "producer",
                messaging.system = "kafka",
                messaging.operation.type = "send",
                messaging.destination.name = %row.topic,
                messaging.message.id = %row.event_id,
                correlation_id = received.correlation.as_ref().map(ToString::to_string),
                trace_id = tracing::field::Empty,
            );
            telemetry::propagation::adopt_parent(&span, received.context);
            let mut headers = OwnedHeaders::new();
            for (name, value) in
                telemetry::propagation::headers_for(&span, received.correlation.as_ref())
            {
                headers = headers.insert(Header {
                    key: &name,
                    value: Some(value.as_bytes()),
                });
            }
            let event_id = row.event_id.to_string();
            headers = headers.insert(Header {
                key: "event-id",
                value: Some(event_id.as_bytes()),
            });
            let record = FutureRecord::to(&row.topic)
                .key(row.message_key.as_bytes())
                .payload(&row.envelope)
                .headers(headers);
            self.producer.send(record, Timeout::Never).instrument(span)
        });
        for result in futures::future::join_all(sends).await {
            result
                .map_err(|(error, _message)| anyhow::Error::new(error))
                .context("publishing to Kafka")?;
        }
        Ok(())
    }
}

/// The ids of the rows a relay published lately, to recognise the
/// notifications of rows it has already published. A notification carries
/// the highest id its statement wrote; rows go out in id order, so if that
/// one went, so did the statement's others.
#[derive(Default)]
struct RecentlyPublished {
    ids: HashSet<i64>,
    oldest_first: VecDeque<i64>,
}

/// Notifications come within moments of their rows' commit: a few thousand
/// ids cover them.
const RECENT_IDS: usize = 4096;

impl RecentlyPublished {
    fn extend(&mut self, ids: Vec<i64>) {
        for id in ids {
            if self.ids.insert(id) {
                self.oldest_first.push_back(id);
            }
        }
        while self.oldest_first.len() > RECENT_IDS {
            if let Some(old) = self.oldest_first.pop_front() {
                self.ids.remove(&old);
            }
        }
    }

    /// Whether the rows `notification` announces were published here. One
    /// that names no id (from a writer of before `0003`) is never covered.
    fn covers(&self, notification: &PgNotification) -> bool {
        notification
            .payload()
            .parse::<i64>()
            .is_ok_and(|id| self.ids.contains(&id))
    }
}

/// Deletes the oldest `limit` rows in the caller's transaction and returns
/// them in write order, holding their row locks until it ends. A concurrent
/// batch waits at the first of these rows and, once this one commits, finds
/// them gone and starts after them (`FOR UPDATE` re-checks a row it waited
/// for, and the lock sits below the `LIMIT`, so skipped rows do not count).
pub(crate) async fn claim(
    tx: &mut Transaction<'static, Postgres>,
    limit: i64,
) -> anyhow::Result<Vec<OutboxRow>> {
    let mut rows: Vec<OutboxRow> = sqlx::query_as(
        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT $1 FOR UPDATE)
         RETURNING id, event_id, topic, message_key, envelope, headers",
    )
    .bind(limit)
    .fetch_all(&mut **tx)
    .await
    .context("taking a batch from the outbox")?;
    // RETURNING follows no particular order.
    rows.sort_unstable_by_key(|row| row.id);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prost::Message as _;
    use rdkafka::Message as _;
    use telemetry::CorrelationId;
    use tokio_util::sync::CancellationToken;

    use super::{Relay, claim};
    use crate::test_support::{Fixture, RecordingHandler, receive, widget_event};

    #[tokio::test]
    async fn a_relay_killed_between_publishing_and_marking_loses_nothing() {
        let fixture = Fixture::new().await;
        let topic = fixture.topics.order_events();
        let reader = fixture.reader(&topic);
        // One key, so one partition, so the copies arrive in a known order.
        let mut tx = fixture.pool.begin().await.unwrap();
        for _ in 0..3 {
            let envelope = widget_event("same", &CorrelationId::generate());
            crate::outbox::enqueue(&mut tx, &topic, &envelope)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();

        // The first relay publishes its batch and dies before deleting it:
        // its transaction never commits.
        let doomed = Relay::new(fixture.pool.clone(), fixture.producer());
        let mut turn = fixture.pool.begin().await.unwrap();
        let batch = claim(&mut turn, 100).await.unwrap();
        assert_eq!(batch.len(), 3);
        doomed.send(&batch).await.unwrap();
        drop(turn);

        // Its successor finds the rows still there and publishes them again.
        let successor = Relay::new(fixture.pool.clone(), fixture.producer());
        assert_eq!(successor.publish_pending().await.unwrap(), 3);
        let records = receive(&reader, 6, Duration::from_secs(20)).await;
        let ids: Vec<String> = records
            .iter()
            .map(|r| {
                crate::EventEnvelope::decode(r.payload().unwrap())
                    .unwrap()
                    .event_id
            })
            .collect();
        assert_eq!(ids[..3], ids[3..], "the same three events, twice");

        // The inbox absorbs the duplicates: once a marker written after them
        // is handled, exactly the three events and the marker had effects.
        let mut tx = fixture.pool.begin().await.unwrap();
        crate::outbox::enqueue(
            &mut tx,
            &topic,
            &widget_event("same", &CorrelationId::generate()),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        successor.publish_pending().await.unwrap();
        let shutdown = CancellationToken::new();
        let consumer = crate::Consumer::new(
            &fixture.kafka,
            "shop-consumer",
            &[topic],
            fixture.pool.clone(),
            fixture.producer(),
            RecordingHandler::default(),
        )
        .unwrap();
        let consuming = tokio::spawn(consumer.run(shutdown.clone()));
        fixture.wait_for_effects(4).await;
        shutdown.cancel();
        consuming.await.unwrap();
        let (handled,): (i64,) = sqlx::query_as("SELECT count(*) FROM inbox")
            .fetch_one(&fixture.pool)
            .await
            .unwrap();
        assert_eq!(fixture.effects().await.len(), 4);
        assert_eq!(handled, 4);
    }
}
