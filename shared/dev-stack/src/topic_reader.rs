use std::time::Duration;

use rdkafka::Message as _;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{Headers as _, OwnedMessage};

/// Reads a topic from its beginning, for tests that check what was
/// published. It joins no consumer group (its partitions are assigned
/// directly), so it starts at once and disturbs no one.
pub struct TopicReader {
    consumer: StreamConsumer,
}

impl std::fmt::Debug for TopicReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicReader").finish_non_exhaustive()
    }
}

impl TopicReader {
    /// Reads all `partitions` partitions of `topic`, connecting as
    /// `config` says (`messaging::client_config`: the brokers, and how the
    /// connection is secured).
    pub fn new(
        mut config: rdkafka::ClientConfig,
        topic: &str,
        partitions: i32,
    ) -> anyhow::Result<Self> {
        let consumer: StreamConsumer = config
            .set("group.id", "topic-reader-without-a-group")
            .set("enable.auto.commit", "false")
            .create()?;
        let mut assignment = rdkafka::TopicPartitionList::new();
        for partition in 0..partitions {
            assignment.add_partition_offset(topic, partition, rdkafka::Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        Ok(Self { consumer })
    }

    /// The next `count` records, failing after `timeout`.
    pub async fn receive(
        &self,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<OwnedMessage>> {
        let mut received = Vec::with_capacity(count);
        let reading = async {
            while received.len() < count {
                received.push(self.consumer.recv().await?.detach());
            }
            anyhow::Ok(())
        };
        match tokio::time::timeout(timeout, reading).await {
            Ok(result) => result.map(|()| received),
            Err(_) => anyhow::bail!(
                "received {} of {count} records within {timeout:?}",
                received.len()
            ),
        }
    }

    /// Records arriving within `quiet`, expecting none; the first one if any.
    pub async fn next_within(&self, quiet: Duration) -> Option<OwnedMessage> {
        match tokio::time::timeout(quiet, self.consumer.recv()).await {
            Ok(Ok(message)) => Some(message.detach()),
            _ => None,
        }
    }
}

/// The value of header `name` of a record, as text.
pub fn header(message: &OwnedMessage, name: &str) -> Option<String> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}
