//! Idempotent charges, authorizations (captured or voided later) and
//! refunds against a payment provider (a deterministic simulation by
//! default).
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
use api_payment::v1::payment_service_server::{self, PaymentServiceServer};
use database::MigrationSet;
use service_runtime::manifest::{self, Manifest};
use service_runtime::{CommonSettings, GrpcServer, Platform};
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
        "0006_authorizations.sql",
    ]
);

/// The payment service, as the rest of the system sees it.
pub const MANIFEST: Manifest = Manifest {
    name: NAME,
    grpc_port: DEFAULT_PORT,
    schema: SCHEMA,
    role: ROLE,
    password_env: "PAYMENT_DB_PASSWORD",
    grpc_services: &[payment_service_server::SERVICE_NAME],
    migrations: &[MIGRATIONS],
    produces: &[messaging::PAYMENT_EVENTS],
    consumers: &[],
    peers: &[manifest::AUTH],
    scopes: &[],
    min_replicas: 2,
    settings: <Settings as clap::CommandFactory>::command,
};

/// Everything the service reads from its environment.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "payment",
    version,
    about = "Idempotent charges and refunds against a payment provider (a deterministic simulation by default)."
)]
pub struct Settings {
    #[command(flatten)]
    pub common: CommonSettings,
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

    /// How long an authorization holds its amount before it lapses (card
    /// networks allow about 7 days); a lapsed one holds nothing and cannot
    /// be captured.
    #[arg(long = "authorization-lifetime", env = "AUTHORIZATION_LIFETIME", default_value = "7days",
          value_parser = parse_positive_duration)]
    pub authorization_lifetime: std::time::Duration,
}

fn parse_positive_duration(text: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(text) {
        Ok(duration) if duration.is_zero() => Err("must be above zero".into()),
        Ok(duration) => Ok(duration),
        Err(error) => Err(error.to_string()),
    }
}

/// Who may call what on the payment service.
fn policy() -> Policy {
    const SERVICE: &str = payment_service_server::SERVICE_NAME;
    let charge = Access::Service(Scope::PaymentsCharge);
    let refund = Access::Service(Scope::PaymentsRefund);
    let read = Access::UserOrService(Scope::PaymentsRead);
    Policy::new()
        .rpc(SERVICE, "ProcessPayment", charge)
        .rpc(SERVICE, "RefundPayment", refund)
        // An authorization holds or takes the customer's money, as a
        // charge does; a void only gives a hold back, as a refund gives
        // money back.
        .rpc(SERVICE, "AuthorizePayment", charge)
        .rpc(SERVICE, "CapturePayment", charge)
        .rpc(SERVICE, "VoidPayment", refund)
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
        let server = GrpcServer::bind(
            settings.common.server.clone(),
            &tls::Tls::load(&settings.common.tls)?,
        )
        .await?;
        let platform = Platform::start(&MANIFEST, &settings.common).await?;
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
            &settings.common.retention,
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
                authorization_lifetime: settings.provider.authorization_lifetime,
            },
        );
        let payments = app::Payments::new(
            platform.pool.clone(),
            Arc::new(provider),
            &platform.topics,
            app::Leases::for_request_timeout(settings.common.server.request_timeout),
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
        platform
            .stop(settings.common.server.shutdown_grace_period)
            .await;
        served
    }
}
