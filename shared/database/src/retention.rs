//! Purging rows that have outlived their use, in small batches.
//!
//! Each service lists what it purges as [`PurgeTarget`]s: a table's name,
//! how long its rows are kept, and one `DELETE` that removes at most a
//! batch of the rows older than that. The statements live next to the code
//! that owns each table; this module only runs them:
//!
//! - **Batched.** A statement deletes at most `$2` rows, so no transaction
//!   is long and no lock is held for long; a target runs batch after batch
//!   until one deletes fewer than the limit (nothing is left), then the
//!   job waits for the next interval. An idle pass costs one statement per
//!   target.
//! - **Replica-safe.** Every replica of a service runs the job. Statements
//!   pick their rows `FOR UPDATE SKIP LOCKED`, so replicas purging at once
//!   split the rows between them instead of waiting for each other or
//!   deleting anything twice.
//! - **Served by an index.** Each statement finds its batch through an
//!   index on the age it compares (oldest first), so a batch costs the
//!   same whatever the table's history, and deletes the rows it locked by
//!   their tuple ids (`WHERE ctid = ANY(ARRAY(SELECT ctid ...))`): a TID
//!   scan whatever the planner estimates, and rows locked by the statement
//!   itself cannot move under it. [`Purger::plans`] shows the plans.
//!
//! The cutoff is computed by the database (`now() - $1`), so replicas whose
//! clocks disagree still agree on what is old.

use std::time::Duration;

use anyhow::Context as _;
use sqlx::PgPool;
use sqlx::postgres::types::PgInterval;
use tokio_util::sync::CancellationToken;

/// How often, and in what batches, a service purges.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct PurgeSettings {
    /// Time between purge passes (the first runs at start).
    #[arg(long = "purge-interval", env = "PURGE_INTERVAL", default_value = "10m", value_parser = positive_duration)]
    pub interval: Duration,

    /// Most rows one purge statement deletes: the bound on each purge
    /// transaction and the locks it holds.
    #[arg(long = "purge-batch-size", env = "PURGE_BATCH_SIZE", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,
}

/// The longest retention a setting may ask for: beyond it `now() - $1`
/// leaves the range of PostgreSQL's timestamps.
const LONGEST_RETENTION: Duration = Duration::from_secs(1000 * 365 * 24 * 3600);

/// A retention setting: a humantime duration above zero and below a
/// thousand years (a zero retention would purge what is being written).
pub fn parse_retention(value: &str) -> Result<Duration, String> {
    let duration = positive_duration(value)?;
    if duration > LONGEST_RETENTION {
        return Err("must be less than 1000 years".to_owned());
    }
    Ok(duration)
}

fn positive_duration(value: &str) -> Result<Duration, String> {
    match humantime::parse_duration(value) {
        Ok(duration) if duration > Duration::ZERO => Ok(duration),
        Ok(_) => Err("must be more than zero".to_owned()),
        Err(error) => Err(error.to_string()),
    }
}

/// One table's purge.
#[derive(Debug, Clone)]
pub struct PurgeTarget {
    /// The table purged: the label of its metrics and log lines.
    pub table: &'static str,
    /// How old a row must be to go (each statement says old by what).
    pub retention: Duration,
    /// A `DELETE` of at most `$2` (BIGINT) rows older than `now() - $1`
    /// (INTERVAL), found through an index, locked `FOR UPDATE SKIP LOCKED`
    /// and deleted by `ctid`.
    pub statement: &'static str,
}

/// What purging one table did in one pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgeReport {
    pub table: &'static str,
    pub rows: u64,
    /// Statements run: batches that deleted a full batch, plus the last.
    pub statements: u64,
}

/// A service's purge job: its targets, run in order on every pass.
#[derive(Debug, Clone)]
pub struct Purger {
    pool: PgPool,
    targets: Vec<PurgeTarget>,
    settings: PurgeSettings,
}

impl Purger {
    pub fn new(pool: PgPool, targets: Vec<PurgeTarget>, settings: PurgeSettings) -> Self {
        Self {
            pool,
            targets,
            settings,
        }
    }

    /// Purges every target until nothing older than its retention is left
    /// (or another replica holds what is), one batch per statement. A
    /// target that fails does not hold up the others: the pass goes on,
    /// and reports the first failure at its end.
    pub async fn purge_once(&self) -> anyhow::Result<Vec<PurgeReport>> {
        let mut reports = Vec::with_capacity(self.targets.len());
        let mut first_failure = None;
        for target in &self.targets {
            match self.purge(target).await {
                Ok(report) => reports.push(report),
                Err(error) => {
                    tracing::warn!(
                        table = target.table,
                        error = format!("{error:#}"),
                        "purge failed"
                    );
                    first_failure.get_or_insert(error);
                }
            }
        }
        match first_failure {
            Some(error) => Err(error),
            None => Ok(reports),
        }
    }

    async fn purge(&self, target: &PurgeTarget) -> anyhow::Result<PurgeReport> {
        let limit = i64::from(self.settings.batch_size);
        let retention = PgInterval::try_from(target.retention)
            .map_err(|error| anyhow::anyhow!("retention of {}: {error}", target.table))?;
        let mut report = PurgeReport {
            table: target.table,
            rows: 0,
            statements: 0,
        };
        loop {
            let deleted = sqlx::query(sqlx::AssertSqlSafe(target.statement))
                .bind(retention)
                .bind(limit)
                .execute(&self.pool)
                .await
                .with_context(|| format!("purging {}", target.table))?
                .rows_affected();
            report.statements += 1;
            report.rows += deleted;
            metrics::counter!("purge_statements_total", "table" => target.table).increment(1);
            metrics::counter!("purged_rows_total", "table" => target.table).increment(deleted);
            if deleted < limit.unsigned_abs() {
                break;
            }
        }
        if report.rows > 0 {
            tracing::info!(
                table = report.table,
                rows = report.rows,
                statements = report.statements,
                "purged rows past their retention"
            );
        }
        Ok(report)
    }

    /// Each target's query plan, as PostgreSQL would run it with sequential
    /// scans ruled out: a plan that still holds a `Seq Scan` has no index
    /// to find its batch through, and would cost more as history grows.
    /// (Cascaded deletes are not in the plan; their foreign keys need
    /// their own index.)
    pub async fn plans(&self) -> anyhow::Result<Vec<(&'static str, String)>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET LOCAL enable_seqscan = off")
            .execute(&mut *tx)
            .await?;
        let mut plans = Vec::with_capacity(self.targets.len());
        for target in &self.targets {
            let retention = PgInterval::try_from(target.retention)
                .map_err(|error| anyhow::anyhow!("retention of {}: {error}", target.table))?;
            let lines: Vec<String> =
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {}", target.statement)))
                    .bind(retention)
                    .bind(i64::from(self.settings.batch_size))
                    .fetch_all(&mut *tx)
                    .await
                    .with_context(|| format!("explaining the purge of {}", target.table))?;
            plans.push((target.table, lines.join("\n")));
        }
        Ok(plans)
    }

    /// Purges at once, then every interval, until `shutdown`. A failed
    /// purge is logged and the next pass tries again: nothing is lost by
    /// waiting.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(self.settings.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            // A pass in progress stops at shutdown between statements; each
            // statement is its own short transaction.
            tokio::select! {
                () = shutdown.cancelled() => return,
                // Failures are logged per table; the next pass tries again.
                _ = self.purge_once() => {}
            }
        }
    }
}
