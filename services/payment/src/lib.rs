//! Idempotent charges and refunds against a payment provider (a
//! deterministic simulation by default).
//!
//! - `domain`: payments, their status and values, and the pure rules of
//!   charging, refunding and voiding by key.
//! - `provider`: the provider trait and the simulation.
//! - `app`: the use cases, the I/O around the domain's rules: one charge
//!   per key, kept by a claim row in the database rather than by a lock
//!   held while the provider answers (its module documents the protocol);
//!   `grpc`: their gRPC face, where every field is parsed.
//! - `retention`: what the purge job deletes, and after how long.

mod app;
mod domain;
mod grpc;
mod lease_watch;
mod provider;
mod retention;

use std::net::SocketAddr;
use std::sync::Arc;

use access_control::{Access, AuthLayer, AuthSettings, Policy, Scope, Verifier};
use api_payment::v1::payment_service_server::PaymentServiceServer;
use database::{DatabaseSettings, MigrationSet, ServiceAccount};
use messaging::KafkaSettings;
use service_runtime::{GrpcServer, Platform, ServerSettings};
use telemetry::TelemetrySettings;
use tokio_util::sync::CancellationToken;

/// Service name, in logs, traces and event envelopes.
pub const NAME: &str = "payment";
/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 50053;
/// The schema this service owns, and the role it connects as.
pub const SCHEMA: &str = "payments";
pub const ROLE: &str = "payment_service";
/// This service's tables.
pub const MIGRATIONS: MigrationSet = database::migrations!(
    "payment",
    [
        "0001_payments.sql",
        "0002_provider_holdings.sql",
        "0003_charge_claims.sql",
        "0004_lease_wakeups.sql",
        "0005_retention.sql",
    ]
);

/// The role and schema to provision for this service.
pub fn account(password: impl Into<String>) -> ServiceAccount {
    ServiceAccount {
        schema: SCHEMA,
        role: ROLE,
        password: password.into(),
    }
}

/// Everything the service reads from its environment.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "payment",
    version,
    about = "Idempotent charges and refunds against a payment provider (a deterministic simulation by default)."
)]
pub struct Settings {
    #[command(flatten)]
    pub server: ServerSettings,
    #[command(flatten)]
    pub database: DatabaseSettings,
    #[command(flatten)]
    pub kafka: KafkaSettings,
    #[command(flatten)]
    pub telemetry: TelemetrySettings,
    #[command(flatten)]
    pub tls: tls::TlsSettings,
    #[command(flatten)]
    pub auth: AuthSettings,
    #[command(flatten)]
    pub provider: ProviderSettings,
    #[command(flatten)]
    pub retention: retention::PaymentRetention,
}

/// How the simulated payment provider behaves.
#[derive(Debug, Clone, clap::Args)]
pub struct ProviderSettings {
    /// Largest charge the provider approves, in minor units; larger ones
    /// are declined with `amount_over_limit`.
    #[arg(long = "payment-amount-limit", env = "PAYMENT_AMOUNT_LIMIT", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(i64).range(1..))]
    pub amount_limit_minor: i64,

    /// How long `tok_slow` takes to answer: longer than callers wait.
    #[arg(long = "provider-slow-delay", env = "PROVIDER_SLOW_DELAY", default_value = "30s",
          value_parser = humantime::parse_duration)]
    pub slow_delay: std::time::Duration,

    /// Attempts per idempotency key that `tok_flaky` fails before it succeeds.
    #[arg(
        long = "provider-flaky-failures",
        env = "PROVIDER_FLAKY_FAILURES",
        default_value_t = 2
    )]
    pub flaky_failures: u32,
}

/// Who may call what on the payment service.
fn policy() -> Policy {
    const SERVICE: &str = "ordersaga.payment.v1.PaymentService";
    let charge = Access::Service(Scope::PaymentsCharge);
    let refund = Access::Service(Scope::PaymentsRefund);
    let read = Access::UserOrService(Scope::PaymentsRead);
    Policy::new()
        .rpc(SERVICE, "ProcessPayment", charge)
        .rpc(SERVICE, "RefundPayment", refund)
        // Customers see their own payments; the handlers check ownership.
        .rpc(SERVICE, "GetPayment", read)
        .rpc(SERVICE, "ListPaymentsByOrder", read)
}

/// The service, built and bound, ready to run.
#[derive(Debug)]
pub struct Application {
    server: GrpcServer,
    platform: Platform,
    settings: Settings,
}

impl Application {
    /// Binds the gRPC port, connects to and migrates the database, and
    /// connects the Kafka producer.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let server =
            GrpcServer::bind(settings.server.clone(), &tls::Tls::load(&settings.tls)?).await?;
        let platform = Platform::start(
            NAME,
            SCHEMA,
            &settings.database,
            &[MIGRATIONS],
            &settings.kafka,
        )
        .await?;
        Ok(Self {
            server,
            platform,
            settings,
        })
    }

    /// Where the gRPC server listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Serves until `shutdown` is cancelled, then stops background work.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            server,
            mut platform,
            settings,
        } = self;
        platform.spawn_relay(&shutdown);
        platform.spawn_purge(
            &settings.retention.common,
            settings.retention.targets(),
            &shutdown,
        );
        // The simulated provider stands for another system: it gets its own
        // connections, so its calls never compete with our requests for
        // theirs.
        let provider_pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect_lazy_with(platform.pool.connect_options().as_ref().clone());
        let provider = provider::SimulatedProvider::new(
            provider_pool,
            provider::SimulationSettings {
                amount_limit_minor: settings.provider.amount_limit_minor,
                slow_delay: settings.provider.slow_delay,
                flaky_failures: settings.provider.flaky_failures,
            },
        );
        let payments = app::Payments::new(
            platform.pool.clone(),
            Arc::new(provider),
            &platform.topics,
            app::Leases::for_request_timeout(settings.server.request_timeout),
        );
        platform.spawn(
            "lease watch",
            payments
                .lease_watch()
                .run(platform.pool.clone(), shutdown.clone()),
        );
        let verifier = Verifier::remote(&settings.auth, server.tls())?;
        let served = server
            .with_access_control(AuthLayer::new(verifier, policy()))
            .add_service(PaymentServiceServer::new(grpc::PaymentApi { payments }))
            .reflect(api_payment::FILE_DESCRIPTOR_SET)
            .collect_metrics(platform.outbox_metrics())
            .serve(platform.readiness(), shutdown.clone())
            .await;
        shutdown.cancel();
        platform.stop(settings.server.shutdown_grace_period).await;
        served
    }
}
