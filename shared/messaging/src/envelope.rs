//! Building and opening [`EventEnvelope`]s.

use std::time::SystemTime;

use prost::{Message, Name};
use telemetry::CorrelationId;
use uuid::Uuid;

use crate::EventEnvelope;

/// Who emitted an event and in what context.
#[derive(Debug, Clone)]
pub struct EventMeta {
    /// Producing service, e.g. "order".
    pub producer: &'static str,
    /// Kind of aggregate, e.g. "order".
    pub aggregate_type: &'static str,
    /// Aggregate instance; also the Kafka record key.
    pub aggregate_id: String,
    /// Position in the aggregate's stream (1-based), or 0 without a stream.
    pub aggregate_version: u64,
    pub correlation_id: CorrelationId,
    /// Event or request that caused this one.
    pub causation_id: Option<String>,
}

/// Wraps `payload` in a new envelope with a fresh UUIDv7 event id. The
/// event type is the payload's protobuf name, so it cannot drift from it.
pub fn seal<M: Message + Name>(meta: EventMeta, schema_version: u32, payload: &M) -> EventEnvelope {
    seal_encoded(
        meta,
        M::full_name(),
        schema_version,
        payload.encode_to_vec(),
    )
}

/// [`seal`] for a payload already encoded, whose type is named by the caller.
pub fn seal_encoded(
    meta: EventMeta,
    event_type: String,
    schema_version: u32,
    payload: Vec<u8>,
) -> EventEnvelope {
    EventEnvelope {
        event_id: Uuid::now_v7().to_string(),
        event_type,
        schema_version,
        aggregate_type: meta.aggregate_type.to_owned(),
        aggregate_id: meta.aggregate_id,
        aggregate_version: meta.aggregate_version,
        occurred_at: Some(SystemTime::now().into()),
        correlation_id: meta.correlation_id.to_string(),
        causation_id: meta.causation_id.unwrap_or_default(),
        producer: meta.producer.to_owned(),
        payload,
    }
}

/// Why an envelope could not be opened as the expected payload.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("expected a {expected} event, got {actual}")]
    WrongType { expected: String, actual: String },
    #[error("{event_type} version {version} is not known here")]
    UnknownVersion { event_type: String, version: u32 },
    #[error("malformed {event_type} payload: {source}")]
    Malformed {
        event_type: String,
        source: prost::DecodeError,
    },
}

/// Decodes the payload as `M` after checking the envelope says it is one.
pub fn open<M: Message + Default + Name>(envelope: &EventEnvelope) -> Result<M, OpenError> {
    if envelope.event_type != M::full_name() {
        return Err(OpenError::WrongType {
            expected: M::full_name(),
            actual: envelope.event_type.clone(),
        });
    }
    M::decode(envelope.payload.as_slice()).map_err(|source| OpenError::Malformed {
        event_type: envelope.event_type.clone(),
        source,
    })
}

/// Whether the envelope carries an `M`.
pub fn is<M: Name>(envelope: &EventEnvelope) -> bool {
    envelope.event_type == M::full_name()
}
