//! What the orchestrator purges, and after how long.

use std::time::Duration;

use database::PurgeTarget;

#[derive(Debug, Clone, Copy, clap::Args)]
pub struct OrchestratorRetention {
    /// How long a saga that completed or compensated is kept, with its
    /// steps, after it ended. Failed sagas are kept until an operator acts.
    /// Keep it longer than INBOX_RETENTION.
    #[arg(long = "saga-retention", env = "SAGA_RETENTION", default_value = "90days",
          value_parser = database::parse_retention)]
    pub sagas: Duration,

    /// How long the trace view keeps an event after recording it.
    #[arg(long = "trace-event-retention", env = "TRACE_EVENT_RETENTION", default_value = "30days",
          value_parser = database::parse_retention)]
    pub trace_events: Duration,
}

impl OrchestratorRetention {
    pub(crate) fn targets(&self) -> Vec<PurgeTarget> {
        vec![
            crate::trace_view::trace_event_purge(self.trace_events),
            saga_engine::store::finished_purge(self.sagas),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[tokio::test]
    async fn every_purge_finds_its_batch_through_an_index() {
        let retention = OrchestratorRetention {
            sagas: DAY,
            trace_events: DAY,
        };
        testkit::assert_purges_use_indexes(&crate::MANIFEST, retention.targets())
            .await
            .unwrap();
    }
}
