//! What the services' integration tests share.
//!
//! - [`ServiceUnderTest`]: one service binary, with its schema provisioned
//!   in a fresh database and its topics created under a fresh prefix.
//! - [`contract`]: the checks every binary must pass (health follows its
//!   dependencies, reflection, settings validation, graceful stop).
//! - [`grpc`]: channels, bearer tokens and status details for tests.
//! - [`auth`]: a stand-in for the auth service (its public keys) and
//!   tokens it signs, for tests of one service's API.

pub mod auth;
pub mod contract;
pub mod grpc;

use std::path::PathBuf;
use std::time::Duration;

use database::ServiceAccount;
use dev_stack::{ServiceProcess, ServingStatus, TestDatabase, TestEnv, TopicReader};
use messaging::Topics;
use service_runtime::manifest::{self, Manifest};

/// A service binary as the tests run it: its manifest (name, schema, role,
/// the gRPC services it serves...) and where it was built.
#[derive(Debug, Clone, Copy)]
pub struct Binary {
    pub manifest: &'static Manifest,
    /// Path of the built binary (`env!("CARGO_BIN_EXE_<name>")`).
    pub path: &'static str,
    /// Settings it cannot start without, beyond the database and broker.
    pub required_env: &'static [(&'static str, &'static str)],
}

impl Binary {
    /// The binary of `manifest`'s service built at `path`.
    pub const fn new(manifest: &'static Manifest, path: &'static str) -> Self {
        Self {
            manifest,
            path,
            required_env: &[],
        }
    }

    /// The same binary, given `env` beyond the database and broker.
    pub const fn requiring(self, env: &'static [(&'static str, &'static str)]) -> Self {
        Self {
            required_env: env,
            ..self
        }
    }

    /// The service's name.
    pub fn name(&self) -> &'static str {
        self.manifest.name
    }

    /// Its role and schema, with a password of the tests'.
    pub fn account(&self) -> ServiceAccount {
        self.manifest
            .account(format!("{}-test-password", self.manifest.role))
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

impl Scenario {
    /// A superuser pool on the scenario's database, to look behind a
    /// service's back (count rows, read what it stored).
    pub async fn inspect(&self) -> anyhow::Result<sqlx::PgPool> {
        Ok(sqlx::PgPool::connect(&self.database.admin_url()).await?)
    }

    /// A fresh database, and a fresh prefix with every topic the services
    /// of `manifests` use (testkit sits below the services: their tests
    /// pass their own manifest, the system's tests every one).
    pub async fn new(manifests: &[&Manifest]) -> anyhow::Result<Self> {
        Self::on(TestEnv::get().await, manifests).await
    }

    /// A scenario on `env` rather than the run's stack (a stack of the
    /// test's own, such as one whose PostgreSQL speaks TLS only).
    pub async fn on(env: &'static TestEnv, manifests: &[&Manifest]) -> anyhow::Result<Self> {
        let database = env.database().await?;
        let topics = Topics::new(env.unique_topic_prefix());
        env.create_topics(&manifest::topics(manifests, &topics), 3)?;
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
        .chain(self.env.kafka_env())
        .collect()
    }

    /// How the tests' own Kafka clients reach the broker: over TLS with
    /// the tests' client certificate when the broker speaks TLS.
    pub fn kafka_security(&self) -> messaging::KafkaSecurity {
        kafka_security(self.env)
    }

    /// Reads `topic` (all of its `partitions`) from its beginning.
    pub fn topic_reader(&self, topic: &str, partitions: i32) -> anyhow::Result<TopicReader> {
        let config =
            messaging::client_config(self.env.bootstrap_servers(), &self.kafka_security())?;
        TopicReader::new(config, topic, partitions)
    }
}

/// How a test's own Kafka clients reach `env`'s broker (see
/// [`Scenario::kafka_security`]).
pub fn kafka_security(env: &TestEnv) -> messaging::KafkaSecurity {
    match env.kafka_tls() {
        Some(tls) => messaging::KafkaSecurity::tls(&tls.ca)
            .with_client_certificate(&tls.certificate, &tls.key),
        None => messaging::KafkaSecurity::default(),
    }
}

/// Checks that every purge of a service finds its batch through an index
/// (the plan has no sequential scan), on a fresh database holding the
/// service's schema as its migrations leave it (the messaging tables
/// first, like every service), with the inbox purge that every service runs.
pub async fn assert_purges_use_indexes(
    manifest: &Manifest,
    targets: Vec<database::PurgeTarget>,
) -> anyhow::Result<()> {
    let db = TestEnv::get().await.database().await?;
    let account = manifest.account("retention-test-password");
    let url = db.provision(&account).await?;
    let settings = database::DatabaseSettings {
        url: url.parse()?,
        max_connections: 2,
        connect_timeout: Duration::from_secs(10),
    };
    let pool = database::connect(&settings, account.schema).await?;
    let mut all = vec![messaging::MIGRATIONS];
    all.extend_from_slice(manifest.migrations);
    database::migrate(&pool, &all).await?;
    let targets = std::iter::once(messaging::inbox_purge(Duration::from_secs(60)))
        .chain(targets)
        .collect();
    let purger = database::Purger::new(
        pool,
        targets,
        database::PurgeSettings {
            interval: Duration::from_secs(60),
            batch_size: 100,
        },
    );
    let plans = purger.plans().await?;
    if std::env::var_os("SHOW_PURGE_PLANS").is_some() {
        for (table, plan) in &plans {
            eprintln!("{table}:\n{plan}");
        }
    }
    let unindexed: Vec<String> = plans
        .into_iter()
        .filter(|(_, plan)| !every_scan_has_a_condition(plan))
        .map(|(table, plan)| format!("{table}:\n{plan}"))
        .collect();
    anyhow::ensure!(
        unindexed.is_empty(),
        "purges without an index:\n{}",
        unindexed.join("\n")
    );
    Ok(())
}

/// Whether every scan of a table in `plan` (EXPLAIN's text) goes through
/// an index condition (or reads rows by their TIDs): a sequential scan, or
/// an index scan that walks a whole index, reads the table's history.
fn every_scan_has_a_condition(plan: &str) -> bool {
    let lines: Vec<&str> = plan.lines().collect();
    lines.iter().enumerate().all(|(i, line)| {
        let scans_a_table = line.contains(" Scan ")
            && !line.contains("Subquery Scan")
            && !line.contains("Bitmap Heap Scan")
            && !line.contains("CTE Scan");
        !scans_a_table
            || lines[i + 1..]
                .iter()
                .take_while(|detail| !detail.contains("->"))
                .any(|detail| detail.contains("Index Cond:") || detail.contains("TID Cond:"))
    })
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
            ServiceProcess::start(binary.name(), &PathBuf::from(binary.path), env).await?;
        process
            .wait_for_health("", ServingStatus::Serving, Duration::from_secs(30))
            .await?;
        Ok(Self { binary, process })
    }
}
