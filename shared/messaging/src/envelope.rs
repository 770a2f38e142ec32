//! Building and opening [`EventEnvelope`]s.
//!
//! A producer does not build envelopes itself: it names the event's
//! [`Subject`] and [`Origin`] and lets its
//! [`Publisher`](crate::outbox::Publisher) seal and enqueue it, so every
//! event carries its correlation and causation ids the same way.

use std::time::SystemTime;

use prost::{Message, Name};
use telemetry::CorrelationId;
use uuid::Uuid;

use crate::EventEnvelope;

/// What an event is about: its aggregate and its place in the aggregate's
/// stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// Kind of aggregate, e.g. "order".
    pub aggregate_type: &'static str,
    /// Aggregate instance; also the Kafka record key.
    pub aggregate_id: String,
    /// Position in the aggregate's stream (1-based), or 0 without a stream.
    pub aggregate_version: u64,
}

impl Subject {
    /// An aggregate without a stream of its own (version 0).
    pub fn unversioned(aggregate_type: &'static str, aggregate_id: &impl ToString) -> Self {
        Self {
            aggregate_type,
            aggregate_id: aggregate_id.to_string(),
            aggregate_version: 0,
        }
    }
}

/// Where an event comes from: the flow it belongs to, and the event or
/// request that caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub correlation_id: CorrelationId,
    /// The id of the event or request being handled when this one was
    /// made; `None` for what nothing in particular caused (a timer).
    pub causation_id: Option<String>,
}

impl Origin {
    /// The origin of what the current task is handling: the correlation id
    /// of its scope (a fresh one outside any) and the cause of its scope (a
    /// consumed event's id, or a gRPC request's id; see
    /// [`telemetry::causation`]).
    pub fn current() -> Self {
        Self {
            correlation_id: telemetry::correlation::current()
                .unwrap_or_else(CorrelationId::generate),
            causation_id: telemetry::causation::current(),
        }
    }
}

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

impl EventMeta {
    pub fn new(producer: &'static str, subject: Subject, origin: Origin) -> Self {
        Self {
            producer,
            aggregate_type: subject.aggregate_type,
            aggregate_id: subject.aggregate_id,
            aggregate_version: subject.aggregate_version,
            correlation_id: origin.correlation_id,
            causation_id: origin.causation_id,
        }
    }
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
