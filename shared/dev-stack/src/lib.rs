//! The machinery that runs real infrastructure without containers.
//!
//! `cargo xtask up` and every integration test use the same pieces:
//!
//! - [`Certificates`]: a local CA and a certificate per service, for TLS
//!   on the local stack and in tests;
//! - [`tools`] finds the PostgreSQL server binaries and fetches the broker
//!   (`tansu`, a Kafka-protocol broker) and `grpcurl` into the build tree;
//! - [`PostgresServer`] runs a private cluster in a temporary folder on a
//!   free port (throwaway for tests, or durable for benchmarks),
//!   [`Broker`] a private broker (in cleartext, or over TLS behind a
//!   listener of ours: tansu's own TLS cannot be switched on);
//! - [`Supervised`] runs a child process that cannot outlive its parent, so
//!   a test binary killed mid-run leaves no server behind;
//! - [`ServiceProcess`] runs one of our service binaries and watches its
//!   health;
//! - [`TestEnv`] gives each test its own database and topic names on one
//!   stack per test run (started on first use, or installed from servers
//!   the program started), and [`FaultProxy`] lets a test cut a connection.

mod broker;
pub mod certs;
mod ports;
mod postgres;
mod process;
mod proxy;
mod service;
mod test_env;
mod tls_front;
pub mod tools;
mod topic_reader;

pub use broker::Broker;
pub use certs::{Certificates, KafkaTls};
pub use ports::free_port;
pub use postgres::PostgresServer;
pub use process::Supervised;
pub use proxy::FaultProxy;
pub use service::ServiceProcess;
pub use test_env::{KAFKA_ENV, POSTGRES_ENV, TestDatabase, TestEnv};
pub use tonic_health::pb::health_check_response::ServingStatus;
pub use topic_reader::{TopicReader, header};
