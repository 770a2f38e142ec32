//! Telemetry for every service: structured logs, OpenTelemetry traces, and
//! the correlation id that ties one business flow together.
//!
//! - [`init`] installs the `tracing` subscriber (JSON or pretty logs) with an
//!   OpenTelemetry layer, exporting over OTLP when an endpoint is configured.
//!   Without one, spans still get W3C trace ids, so logs and propagation work
//!   the same with or without a collector.
//! - [`correlation`]: the [`CorrelationId`] and the task-local scope that
//!   holds the current one.
//! - [`causation`]: the id of the event or request being handled, which
//!   the events it causes name as their causation id.
//! - [`propagation`]: W3C trace context and the correlation id to and from
//!   string headers (Kafka record headers, outbox rows).
//! - [`grpc`]: tower layers that carry both through gRPC metadata, on the
//!   server (extract, open the request span) and the client (inject).

pub mod causation;
pub mod correlation;
pub mod grpc;
pub mod propagation;
mod subscriber;

pub use correlation::CorrelationId;
pub use subscriber::{LogFormat, TelemetryGuard, TelemetrySettings, init, subscriber};
