//! What the order service purges, and after how long. The event store and
//! the read model are never purged: the events are the orders.

use std::time::Duration;

use database::PurgeTarget;

#[derive(Debug, Clone, Copy, clap::Args)]
pub struct OrderRetention {
    /// How long a CreateOrder idempotency key is remembered: a retry with
    /// the key within this returns the first order; after it, the request
    /// places a new one. Keep it far longer than any client retries.
    #[arg(long = "idempotency-key-retention", env = "IDEMPOTENCY_KEY_RETENTION", default_value = "30days",
          value_parser = database::parse_retention)]
    pub idempotency_keys: Duration,
}

impl OrderRetention {
    pub(crate) fn targets(&self) -> Vec<PurgeTarget> {
        vec![crate::app::idempotency_key_purge(self.idempotency_keys)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[tokio::test]
    async fn every_purge_finds_its_batch_through_an_index() {
        let retention = OrderRetention {
            idempotency_keys: DAY,
        };
        testkit::assert_purges_use_indexes(&crate::MANIFEST, retention.targets())
            .await
            .unwrap();
    }
}
