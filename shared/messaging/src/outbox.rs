//! Writing events into the transactional outbox.
//!
//! [`Publisher`] is the one way a service publishes: it seals each event
//! in an envelope (a fresh UUIDv7 id, the payload's type, the correlation
//! id of the flow, the causation id of the event or request being handled)
//! and writes it to the outbox in the caller's transaction. Producers that
//! keep the envelope too (the order's event store, the saga's journal) seal
//! first and enqueue what they sealed.

use anyhow::Context as _;
use prost::{Message, Name};
use sqlx::PgConnection;

use crate::EventEnvelope;
use crate::envelope::{self, EventMeta, Origin, Subject};

/// One producer's events to one topic.
#[derive(Debug, Clone)]
pub struct Publisher {
    producer: &'static str,
    topic: String,
}

impl Publisher {
    /// `producer` names the service in every envelope; `topic` is where
    /// the relay publishes them.
    pub fn new(producer: &'static str, topic: impl Into<String>) -> Self {
        Self {
            producer,
            topic: topic.into(),
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Seals `payload` with the [current origin](Origin::current) and adds
    /// it to the outbox in the caller's transaction.
    pub async fn publish<M: Message + Name>(
        &self,
        conn: &mut PgConnection,
        subject: Subject,
        schema_version: u32,
        payload: &M,
    ) -> anyhow::Result<EventEnvelope> {
        let envelope = self.seal(subject, Origin::current(), schema_version, payload);
        self.enqueue(conn, std::slice::from_ref(&envelope)).await?;
        Ok(envelope)
    }

    /// A new event's envelope, not yet written: for a producer that keeps
    /// it (then [`enqueue`](Self::enqueue)s it) or writes several at once.
    pub fn seal<M: Message + Name>(
        &self,
        subject: Subject,
        origin: Origin,
        schema_version: u32,
        payload: &M,
    ) -> EventEnvelope {
        envelope::seal(
            EventMeta::new(self.producer, subject, origin),
            schema_version,
            payload,
        )
    }

    /// [`seal`](Self::seal) for a payload already encoded, whose type the
    /// caller names.
    pub fn seal_encoded(
        &self,
        subject: Subject,
        origin: Origin,
        event_type: String,
        schema_version: u32,
        payload: Vec<u8>,
    ) -> EventEnvelope {
        envelope::seal_encoded(
            EventMeta::new(self.producer, subject, origin),
            event_type,
            schema_version,
            payload,
        )
    }

    /// Adds sealed events to the outbox, in order, in the caller's
    /// transaction (see [`enqueue_all`]).
    pub async fn enqueue(
        &self,
        conn: &mut PgConnection,
        envelopes: &[EventEnvelope],
    ) -> anyhow::Result<()> {
        enqueue_all(conn, &self.topic, envelopes).await
    }
}

/// Adds `envelope` to the outbox in the caller's transaction, to be
/// published on `topic` keyed by its aggregate id once the transaction
/// commits. The trace context and correlation id of the current span go
/// with it, so the published record continues the request's trace.
pub async fn enqueue(
    conn: &mut PgConnection,
    topic: &str,
    envelope: &EventEnvelope,
) -> anyhow::Result<()> {
    enqueue_all(conn, topic, std::slice::from_ref(envelope)).await
}

/// Adds several events in one statement, in order.
pub async fn enqueue_all(
    conn: &mut PgConnection,
    topic: &str,
    envelopes: &[EventEnvelope],
) -> anyhow::Result<()> {
    if envelopes.is_empty() {
        return Ok(());
    }
    let headers = serde_json::to_value(telemetry::propagation::current_headers())?;
    let mut event_ids = Vec::with_capacity(envelopes.len());
    let mut keys = Vec::with_capacity(envelopes.len());
    let mut bodies = Vec::with_capacity(envelopes.len());
    for envelope in envelopes {
        event_ids
            .push(uuid::Uuid::parse_str(&envelope.event_id).context("event id is not a UUID")?);
        keys.push(envelope.aggregate_id.clone());
        bodies.push(envelope.encode_to_vec());
    }
    // UNNEST ... WITH ORDINALITY keeps the given order in the identity
    // column. The same statement wakes the relays (on commit), telling them
    // the highest id written, so that a relay which has already published
    // past it need not look.
    sqlx::query(
        "WITH written AS (
             INSERT INTO outbox (event_id, topic, message_key, envelope, headers)
             SELECT event_id, $2, message_key, envelope, $5
             FROM UNNEST($1::uuid[], $3::text[], $4::bytea[]) WITH ORDINALITY AS e(event_id, message_key, envelope, n)
             ORDER BY n
             RETURNING id
         )
         SELECT pg_notify(current_schema() || '.outbox', max(id)::text) FROM written HAVING count(*) > 0",
    )
    .bind(&event_ids)
    .bind(topic)
    .bind(&keys)
    .bind(&bodies)
    .bind(&headers)
    .execute(conn)
    .await
    .context("writing to the outbox")?;
    Ok(())
}
