//! Readiness as the health service reports it: SERVING once every
//! dependency answers, NOT_SERVING after a few failed checks in a row
//! (re-checked on an interval), and NOT_SERVING from the moment shutdown
//! begins.

use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The health service name that reports SERVING for as long as the server
/// answers, whatever its dependencies do: what a liveness probe asks.
/// Readiness probes ask about "" (the whole server).
pub const LIVENESS: &str = "liveness";

/// One dependency that must answer for the service to be ready.
#[derive(Debug, Clone)]
pub enum ReadinessCheck {
    /// The service's database answers `SELECT 1`.
    Database(sqlx::PgPool),
    /// The Kafka broker returns cluster metadata.
    Broker(messaging::BrokerProbe),
}

impl ReadinessCheck {
    async fn check(&self, timeout: Duration) -> anyhow::Result<()> {
        match self {
            Self::Database(pool) => {
                tokio::time::timeout(timeout, sqlx::query("SELECT 1").execute(pool))
                    .await
                    .context("database did not answer in time")?
                    .map(|_| ())
                    .context("database")
            }
            Self::Broker(probe) => probe.check(timeout).await.context("broker"),
        }
    }
}

/// The dependencies of a service.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    checks: Vec<ReadinessCheck>,
}

impl Readiness {
    pub fn new(checks: impl IntoIterator<Item = ReadinessCheck>) -> Self {
        Self {
            checks: checks.into_iter().collect(),
        }
    }

    /// Whether every dependency answers now; the error names the first that
    /// does not.
    pub async fn check(&self, timeout: Duration) -> anyhow::Result<()> {
        for check in &self.checks {
            check.check(timeout).await?;
        }
        Ok(())
    }
}

/// Sets the status of the whole server ("") and of each named service.
pub(crate) async fn set_all(
    reporter: &HealthReporter,
    services: &[&'static str],
    status: ServingStatus,
) {
    for service in std::iter::once("").chain(services.iter().copied()) {
        reporter.set_service_status(service, status).await;
    }
}

/// How many checks in a row must fail before a serving replica reports
/// NOT_SERVING. One slow answer on a loaded machine (a broker metadata
/// round trip, a pool connection being opened) is not an outage, and a
/// replica that flaps in and out of its Service's endpoints serves worse
/// than one that waits for the failure to persist. Becoming ready takes a
/// single success; shutdown reports NOT_SERVING at once.
const FAILURES_BEFORE_NOT_SERVING: u32 = 3;

/// What the reporter has told the world, and the failures seen since.
#[derive(Debug, Default)]
struct Verdict {
    serving: bool,
    failures_in_a_row: u32,
}

impl Verdict {
    /// Takes one check's result; returns the status to report if it changes.
    fn observe(&mut self, ready: bool) -> Option<ServingStatus> {
        if ready {
            self.failures_in_a_row = 0;
            (!self.serving).then(|| {
                self.serving = true;
                ServingStatus::Serving
            })
        } else {
            self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
            (self.serving && self.failures_in_a_row >= FAILURES_BEFORE_NOT_SERVING).then(|| {
                self.serving = false;
                ServingStatus::NotServing
            })
        }
    }
}

/// Keeps `reporter` (which must start out NOT_SERVING) in step with
/// `readiness` for the whole server ("") and each named service until
/// `shutdown`, then reports NOT_SERVING.
pub(crate) async fn report(
    readiness: Readiness,
    reporter: HealthReporter,
    services: Vec<&'static str>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let set = |status| set_all(&reporter, &services, status);
    // A probe may take longer than the interval between probes: a short
    // interval is for noticing recovery quickly, not for a tighter deadline.
    let probe_timeout = interval.clamp(Duration::from_secs(1), Duration::from_secs(2));
    let mut verdict = Verdict::default();
    loop {
        let ready = readiness.check(probe_timeout).await;
        if let Some(status) = verdict.observe(ready.is_ok())
            && !shutdown.is_cancelled()
        {
            match &ready {
                Ok(()) => tracing::info!("ready: reporting SERVING"),
                Err(error) => tracing::warn!(
                    error = format!("{error:#}"),
                    "not ready: reporting NOT_SERVING"
                ),
            }
            set(status).await;
        } else if let Err(error) = &ready {
            tracing::debug!(error = format!("{error:#}"), "readiness check failed");
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(interval) => {}
        }
    }
    set(ServingStatus::NotServing).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_success_makes_a_replica_ready() {
        let mut verdict = Verdict::default();
        assert_eq!(
            verdict.observe(false),
            None,
            "not serving yet, nothing to change"
        );
        assert_eq!(verdict.observe(true), Some(ServingStatus::Serving));
        assert_eq!(verdict.observe(true), None);
    }

    #[test]
    fn a_serving_replica_turns_unready_only_after_failures_in_a_row() {
        let mut verdict = Verdict::default();
        verdict.observe(true);
        for _ in 1..FAILURES_BEFORE_NOT_SERVING {
            assert_eq!(verdict.observe(false), None);
        }
        // A success in between starts the count again.
        assert_eq!(verdict.observe(true), None);
        for _ in 1..FAILURES_BEFORE_NOT_SERVING {
            assert_eq!(verdict.observe(false), None);
        }
        assert_eq!(verdict.observe(false), Some(ServingStatus::NotServing));
        assert_eq!(verdict.observe(false), None);
        assert_eq!(verdict.observe(true), Some(ServingStatus::Serving));
    }
}
