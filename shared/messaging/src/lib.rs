//! Domain events between services, delivered at least once and applied
//! exactly once.
//!
//! - [`envelope`]: building and reading the [`EventEnvelope`] every event
//!   travels in.
//! - [`outbox`]: a [`Publisher`] seals each event (correlation id of the
//!   flow, causation id of the event or request being handled) and writes
//!   it in the caller's transaction, so a change and its announcement
//!   commit or vanish together.
//! - [`Relay`]: publishes the outbox to Kafka in order, keyed by aggregate
//!   id, woken by `NOTIFY` on commit; replicas take turns under a lock.
//! - [`Consumer`]: reads topics in a consumer group and hands each event to
//!   an [`EventHandler`] inside a transaction that also records the event id
//!   in the inbox; failures are retried, and an event that keeps failing goes
//!   to a dead-letter topic so the rest keep flowing.
//! - [`security`]: TLS and SASL to the brokers (`KAFKA_SECURITY_PROTOCOL`,
//!   `KAFKA_SSL_*`, `KAFKA_SASL_*`), and [`client_config`], where every
//!   rdkafka client of the system is configured from.
//!
//! The tables live in each service's own schema; [`MIGRATIONS`] creates them.

mod backoff;
pub mod consumer;
pub mod envelope;
mod kafka;
pub mod outbox;
mod relay;
pub mod security;
mod settings;
mod topics;

pub use api_events::v1::EventEnvelope;
pub use consumer::{Consumer, EventHandler, HandleError, ReceivedEvent, inbox_purge};
pub use kafka::{BrokerProbe, producer};
pub use outbox::Publisher;
pub use relay::Relay;
pub use security::{KafkaSecurity, SecurityProtocol, client_config};
pub use settings::KafkaSettings;
pub use topics::{ORDER_EVENTS, PAYMENT_EVENTS, SAGA_EVENTS, Topics, USER_EVENTS};

// Unit tests share the integration tests' fixture, which names this crate.
#[cfg(test)]
extern crate self as messaging;
#[cfg(test)]
#[path = "../tests/support/mod.rs"]
mod test_support;

/// The outbox and inbox tables, applied in every service's schema.
pub const MIGRATIONS: database::MigrationSet = database::migrations!(
    "messaging",
    [
        "0001_outbox.sql",
        "0002_inbox.sql",
        "0003_outbox_notify_by_the_writer.sql",
        "0004_inbox_by_age.sql",
    ]
);
