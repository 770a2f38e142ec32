//! Kafka clients configured the one way this system uses them.

use std::time::Duration;

use anyhow::Context as _;
use rdkafka::ClientConfig;
use rdkafka::producer::FutureProducer;

use crate::{KafkaSettings, client_config};

/// An idempotent producer: the broker drops the duplicates its own retries
/// would create, and per-partition order survives them. `acks=all` makes an
/// acknowledged record durable on every in-sync replica.
pub fn producer(settings: &KafkaSettings, client_id: &str) -> anyhow::Result<FutureProducer> {
    client_config(&settings.brokers, &settings.security)?
        .set("client.id", client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // Batch for at most 2 ms: latency matters more than throughput here.
        .set("linger.ms", "2")
        .set(
            "message.timeout.ms",
            settings.publish_timeout.as_millis().to_string(),
        )
        .create()
        .context("creating the Kafka producer")
}

/// Consumer configuration: offsets are stored by the consumer only after an
/// event has been handled (or dead-lettered) and committed in the
/// background; a rebalance may redeliver, which the inbox absorbs.
pub(crate) fn consumer_config(
    settings: &KafkaSettings,
    group: &str,
    client_id: &str,
) -> anyhow::Result<ClientConfig> {
    let mut config = client_config(&settings.brokers, &settings.security)?;
    config
        .set("client.id", client_id)
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Lag figures for the metrics, every few seconds.
        .set("statistics.interval.ms", "5000")
        // A broker that holds a fetch until its deadline rather than until
        // the first record arrives adds that deadline to every event's
        // latency; a short one bounds it, for a few idle fetches a second.
        .set("fetch.wait.max.ms", "50")
        // A replica that dies loses its partitions after this long.
        .set(
            "session.timeout.ms",
            settings.session_timeout.as_millis().to_string(),
        )
        .set(
            "heartbeat.interval.ms",
            (settings.session_timeout.as_millis() / 5)
                .max(100)
                .to_string(),
        );
    Ok(config)
}

/// Answers whether the broker is reachable, for health reporting.
#[derive(Clone)]
pub struct BrokerProbe {
    producer: FutureProducer,
}

impl std::fmt::Debug for BrokerProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerProbe").finish_non_exhaustive()
    }
}

impl BrokerProbe {
    pub fn new(producer: FutureProducer) -> Self {
        Self { producer }
    }

    /// Fetches cluster metadata within `timeout`.
    pub async fn check(&self, timeout: Duration) -> anyhow::Result<()> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            use rdkafka::producer::Producer as _;
            producer
                .client()
                .fetch_metadata(None, timeout)
                .map(|_| ())
                .context("fetching broker metadata")
        })
        .await?
    }
}

/// The context of our consumers: reports each partition's lag (how far the
/// group's position trails the newest record) as a gauge, from librdkafka's
/// periodic statistics.
#[derive(Debug, Clone)]
pub(crate) struct LagReporter {
    pub(crate) group: String,
}

impl rdkafka::ClientContext for LagReporter {
    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, details) in &statistics.topics {
            for (partition, numbers) in &details.partitions {
                // -1 means unknown (not assigned here, or nothing fetched yet).
                if *partition >= 0 && numbers.consumer_lag >= 0 {
                    metrics::gauge!(
                        "kafka_consumer_lag",
                        "group" => self.group.clone(),
                        "topic" => topic.clone(),
                        "partition" => partition.to_string()
                    )
                    .set(numbers.consumer_lag as f64);
                }
            }
        }
    }
}

impl rdkafka::consumer::ConsumerContext for LagReporter {}
