//! What the payment service purges, and after how long.
//!
//! `payments` is never purged: it is the ledger, and its unique charge key
//! is what keeps a key from charging twice once its claim is gone.

use std::time::Duration;

use database::PurgeTarget;

#[derive(Debug, Clone, Copy, clap::Args)]
pub struct PaymentRetention {
    /// How long a settled charge key's claim is kept after its last change.
    /// Only claims of keys whose payment is recorded, and whose lease is
    /// free, are purged; the payment answers any later request for the key.
    #[arg(long = "charge-claim-retention", env = "CHARGE_CLAIM_RETENTION", default_value = "30days",
          value_parser = database::parse_retention)]
    pub charge_claims: Duration,

    /// How long the simulated provider remembers a key it is done with
    /// (declined, refunded or voided). Keys whose money it holds are kept.
    #[arg(long = "simulated-provider-retention", env = "SIMULATED_PROVIDER_RETENTION", default_value = "90days",
          value_parser = database::parse_retention)]
    pub simulated_provider: Duration,
}

impl PaymentRetention {
    pub(crate) fn targets(&self) -> Vec<PurgeTarget> {
        vec![
            crate::app::charge_claim_purge(self.charge_claims),
            crate::provider::simulated_provider_purge(self.simulated_provider),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[tokio::test]
    async fn every_purge_finds_its_batch_through_an_index() {
        let retention = PaymentRetention {
            charge_claims: DAY,
            simulated_provider: DAY,
        };
        testkit::assert_purges_use_indexes(&crate::MANIFEST, retention.targets())
            .await
            .unwrap();
    }
}
