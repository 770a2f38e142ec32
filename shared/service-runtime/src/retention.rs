//! The retention settings every service shares: when and in what batches
//! its purge job runs, and how long its schema's inbox keeps a row. Each
//! service adds the retention of its own tables beside these.

use std::time::Duration;

use database::PurgeSettings;

#[derive(Debug, Clone, Copy, clap::Args)]
pub struct RetentionSettings {
    #[command(flatten)]
    pub purge: PurgeSettings,

    /// How long a consumed event's inbox row is kept, which is how long a
    /// redelivery of it is recognised: keep it longer than the topics keep
    /// their records.
    #[arg(long = "inbox-retention", env = "INBOX_RETENTION", default_value = "30days",
          value_parser = database::parse_retention)]
    pub inbox: Duration,
}
