//! The runtime every service binary shares, so that a service's `main` is a
//! few lines and its library holds only what is particular to it.
//!
//! - [`settings`]: typed settings from the environment (listed by `--help`),
//!   validated at start; a bad value stops the service naming the setting.
//! - [`GrpcServer`]: binds first (so tests can ask for port 0), then serves
//!   the service with `grpc.health.v1` reporting real readiness, server
//!   reflection (v1 and v1alpha), request timeouts, the telemetry layer and
//!   graceful shutdown.
//! - [`Platform`]: the database pool, migrations, Kafka producer and
//!   background tasks (outbox relay, consumers, the purge job) of a
//!   service; [`RetentionSettings`]: the purge settings they all share.
//! - [`manifest`]: what the rest of the system must know of a service
//!   (name, ports, schema, topics, peers...), one `MANIFEST` per service.
//! - [`client`]: channels to downstream services with telemetry, the
//!   service's token and a circuit breaker.
//! - [`status`]: deliberate error-to-status mapping helpers.
//! - [`fields`]: edge checks of request fields (text without NUL and of
//!   bounded length, durations in range, timestamps PostgreSQL can hold),
//!   recorded as field violations.
//! - [`paging`]: page sizes and opaque keyset page tokens, for every list
//!   RPC alike.
//! - [`http`]: the HTTP port beside gRPC (`/metrics`, the dashboard), with
//!   its timeouts, connection limit, cached gauges and security headers.
//! - [`main`]: the shape of every binary: settings, telemetry, signals,
//!   run, report, flush.

pub mod client;
pub mod fields;
mod health;
pub mod http;
pub mod manifest;
pub mod paging;
mod platform;
mod retention;
mod runner;
mod server;
pub mod settings;
pub mod status;

pub use health::{LIVENESS, Readiness, ReadinessCheck};
pub use manifest::Manifest;
pub use platform::Platform;
pub use retention::RetentionSettings;
pub use runner::{main, shutdown_signal};
pub use server::GrpcServer;
pub use settings::{CommonSettings, ServerSettings};
