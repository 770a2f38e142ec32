//! Writing events into the transactional outbox.

use anyhow::Context as _;
use prost::Message as _;
use sqlx::PgConnection;

use crate::EventEnvelope;

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
