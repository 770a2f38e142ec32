//! Readiness as the health service reports it: SERVING only while every
//! dependency answers, re-checked on an interval, NOT_SERVING from the
//! moment shutdown begins.

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

/// Keeps `reporter` (which must start out NOT_SERVING) in step with `readiness` for the whole server ("") and
/// each named service until `shutdown`, then reports NOT_SERVING.
pub(crate) async fn report(
    readiness: Readiness,
    reporter: HealthReporter,
    services: Vec<&'static str>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let set = |status| set_all(&reporter, &services, status);
    let probe_timeout = interval.clamp(Duration::from_millis(200), Duration::from_secs(2));
    let mut serving = Some(false);
    loop {
        let ready = readiness.check(probe_timeout).await;
        let now_serving = ready.is_ok();
        if serving != Some(now_serving) && !shutdown.is_cancelled() {
            match &ready {
                Ok(()) => tracing::info!("ready: reporting SERVING"),
                Err(error) => tracing::warn!(
                    error = format!("{error:#}"),
                    "not ready: reporting NOT_SERVING"
                ),
            }
            set(if now_serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            })
            .await;
            serving = Some(now_serving);
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(interval) => {}
        }
    }
    set(ServingStatus::NotServing).await;
}
