//! What the services' integration tests share.
//!
//! - [`ServiceUnderTest`]: one service binary, with its schema provisioned
//!   in a fresh database and its topics created under a fresh prefix.
//! - [`contract`]: the checks every binary must pass (health follows its
//!   dependencies, reflection, settings validation, graceful stop).
//! - [`grpc`]: channels, bearer tokens and status details for tests.

pub mod contract;
pub mod grpc;

use std::path::PathBuf;
use std::time::Duration;

use database::ServiceAccount;
use dev_stack::{ServiceProcess, ServingStatus, TestDatabase, TestEnv};
use messaging::Topics;

/// How a service binary is described to the tests.
#[derive(Debug, Clone, Copy)]
pub struct Binary {
    /// Service name, e.g. "order".
    pub name: &'static str,
    /// Path of the built binary (`env!("CARGO_BIN_EXE_<name>")`).
    pub path: &'static str,
    pub schema: &'static str,
    pub role: &'static str,
    /// Full names of the gRPC services it serves.
    pub services: &'static [&'static str],
    /// Settings it cannot start without, beyond the database and broker.
    pub required_env: &'static [(&'static str, &'static str)],
}

impl Binary {
    pub fn account(&self) -> ServiceAccount {
        ServiceAccount {
            schema: self.schema,
            role: self.role,
            password: format!("{}-test-password", self.role),
        }
    }
}

/// The infrastructure one test's services share: a fresh database and a
/// fresh topic prefix (with every topic created) on the run's stack.
#[derive(Debug)]
pub struct Scenario {
    pub env: &'static TestEnv,
    pub database: TestDatabase,
    pub topics: Topics,
}

/// The auth service's key-encryption key in every test (32 bytes, base64):
/// tests seal signing keys like a deployment does, with a key of their own.
pub const TEST_KEY_ENCRYPTION_KEY: &str = "b3JkZXJzYWdhLXRlc3Qta2V5LWVuY3J5cHRpb24tayE=";

/// Consumer groups whose dead-letter topics exist in every scenario: the
/// orchestrator's `CONSUMER_GROUPS` (testkit sits below the services, so
/// it cannot name theirs; `deploy/ops`'s tests check the two agree).
pub const CONSUMER_GROUPS: &[&str] = &["saga-orchestrator", "trace-view"];

impl Scenario {
    /// A superuser pool on the scenario's database, to look behind a
    /// service's back (count rows, read what it stored).
    pub async fn inspect(&self) -> anyhow::Result<sqlx::PgPool> {
        Ok(sqlx::PgPool::connect(&self.database.admin_url()).await?)
    }

    pub async fn new() -> anyhow::Result<Self> {
        let env = TestEnv::get().await;
        let database = env.database().await?;
        let topics = Topics::new(env.unique_topic_prefix());
        env.create_topics(&topics.all(CONSUMER_GROUPS), 3)?;
        Ok(Self {
            env,
            database,
            topics,
        })
    }

    /// The environment a service needs to run here, with its database URL
    /// pointing at `database_url` (the provisioned URL, or one through a
    /// fault proxy).
    pub fn service_env(&self, database_url: &str) -> Vec<(String, String)> {
        [
            ("DATABASE_URL", database_url),
            ("KAFKA_BROKERS", self.env.bootstrap_servers()),
            ("KAFKA_TOPIC_PREFIX", self.topics.prefix()),
            ("KAFKA_SESSION_TIMEOUT", "2s"),
            ("HEALTH_CHECK_INTERVAL", "100ms"),
            ("METRICS_ADDR", "127.0.0.1:0"),
            ("SHUTDOWN_GRACE_PERIOD", "5s"),
            ("LOG_LEVEL", "info"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }
}

/// One service binary running in a scenario.
#[derive(Debug)]
pub struct ServiceUnderTest {
    pub binary: Binary,
    pub process: ServiceProcess,
}

impl ServiceUnderTest {
    /// Provisions the binary's schema in the scenario's database and starts
    /// it with `extra_env`, waiting until it reports SERVING.
    pub async fn start(
        scenario: &Scenario,
        binary: Binary,
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let url = scenario.database.provision(&binary.account()).await?;
        Self::start_with_database_url(scenario, binary, &url, extra_env).await
    }

    /// Like [`start`](Self::start) with an explicit database URL (for
    /// instance through a [`dev_stack::FaultProxy`]); the schema must be
    /// provisioned already.
    pub async fn start_with_database_url(
        scenario: &Scenario,
        binary: Binary,
        database_url: &str,
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut env = scenario.service_env(database_url);
        env.extend(
            binary
                .required_env
                .iter()
                .chain(extra_env)
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );

        let mut process =
            ServiceProcess::start(binary.name, &PathBuf::from(binary.path), env).await?;
        process
            .wait_for_health("", ServingStatus::Serving, Duration::from_secs(30))
            .await?;
        Ok(Self { binary, process })
    }
}
