use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use messaging::{BrokerProbe, KafkaSettings, Relay, Topics};
use rdkafka::producer::FutureProducer;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::manifest::Manifest;
use crate::settings::CommonSettings;
use crate::{Readiness, ReadinessCheck};

/// The shared infrastructure of one service: its database pool (confined to
/// its schema and migrated), its Kafka producer and topic names, and the
/// background tasks started on them.
pub struct Platform {
    pub pool: PgPool,
    pub producer: FutureProducer,
    pub topics: Topics,
    pub kafka: KafkaSettings,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform")
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

impl Platform {
    /// Connects to the database (waiting for it, bounded), applies the
    /// messaging tables and the service's migrations to its schema, and
    /// creates the Kafka producer.
    pub async fn start(manifest: &Manifest, settings: &CommonSettings) -> anyhow::Result<Self> {
        // A Kafka TLS setting that cannot work stops the service before it
        // touches anything, naming the setting.
        settings.kafka.security.check()?;
        let pool = database::connect(&settings.database, manifest.schema).await?;
        let mut all = vec![messaging::MIGRATIONS];
        all.extend_from_slice(manifest.migrations);
        database::migrate(&pool, &all)
            .await
            .context("migrating the database")?;
        let kafka = &settings.kafka;
        let producer = messaging::producer(kafka, manifest.name)?;
        Ok(Self {
            pool,
            producer,
            topics: Topics::new(kafka.topic_prefix.clone()),
            kafka: kafka.clone(),
            tasks: Vec::new(),
        })
    }

    /// What the health service reports on: the database and the broker.
    pub fn readiness(&self) -> Readiness {
        Readiness::new([
            ReadinessCheck::Database(self.pool.clone()),
            ReadinessCheck::Broker(BrokerProbe::new(self.producer.clone())),
        ])
    }

    /// Sets the outbox gauges before each scrape: how many events wait, and
    /// for how long the oldest has (the table holds only the backlog, so
    /// this reads a handful of rows).
    pub fn outbox_metrics(&self) -> crate::http::Collector {
        let pool = self.pool.clone();
        Arc::new(move || {
            let pool = pool.clone();
            Box::pin(async move {
                let read = sqlx::query_as::<_, (i64, Option<f64>)>(
                    "SELECT count(*), extract(epoch FROM now() - min(created_at))::float8 FROM outbox",
                )
                .fetch_one(&pool)
                .await;
                if let Ok((backlog, oldest)) = read {
                    metrics::gauge!("outbox_backlog").set(backlog as f64);
                    metrics::gauge!("outbox_oldest_age_seconds").set(oldest.unwrap_or(0.0));
                }
            })
        })
    }

    /// Starts the outbox relay of this service's schema.
    pub fn spawn_relay(&mut self, shutdown: &CancellationToken) {
        let relay = Relay::new(self.pool.clone(), self.producer.clone());
        self.spawn("outbox relay", relay.run(shutdown.clone()));
    }

    /// Starts the purge job: this schema's inbox, then `targets` (the
    /// service's own tables), every `settings.purge.interval`.
    pub fn spawn_purge(
        &mut self,
        settings: &crate::RetentionSettings,
        targets: impl IntoIterator<Item = database::PurgeTarget>,
        shutdown: &CancellationToken,
    ) {
        let all = std::iter::once(messaging::inbox_purge(settings.inbox))
            .chain(targets)
            .collect();
        let purger = database::Purger::new(self.pool.clone(), all, settings.purge);
        self.spawn("purge", purger.run(shutdown.clone()));
    }

    /// Starts a background task that must stop when `shutdown` is cancelled.
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.push((name, tokio::spawn(task)));
    }

    /// Waits for the background tasks (already told to stop) for at most
    /// `grace`, then closes the pool.
    pub async fn stop(self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        for (name, task) in self.tasks {
            match tokio::time::timeout_at(deadline, task).await {
                Ok(Ok(())) => tracing::debug!(task = name, "stopped"),
                Ok(Err(error)) => tracing::error!(task = name, %error, "background task failed"),
                Err(_) => tracing::warn!(task = name, "did not stop within the grace period"),
            }
        }
        self.pool.close().await;
    }
}
