//! Idempotent charges and refunds against a payment provider (a deterministic simulation by default).

use std::net::SocketAddr;

use access_control::{Access, AuthLayer, AuthSettings, Policy, Verifier};
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
pub const MIGRATIONS: MigrationSet = database::migrations!("payment", []);

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
    pub auth: AuthSettings,
}

/// Who may call what on the payment service.
fn policy() -> Policy {
    const SERVICE: &str = "ordersaga.payment.v1.PaymentService";
    Policy::new()
        .rpc(SERVICE, "ProcessPayment", Access::Service)
        .rpc(SERVICE, "RefundPayment", Access::Service)
        // Customers see their own payments; the handlers check ownership.
        .rpc(SERVICE, "GetPayment", Access::Authenticated)
        .rpc(SERVICE, "ListPaymentsByOrder", Access::Authenticated)
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
        let server = GrpcServer::bind(settings.server.clone()).await?;
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
        let verifier = Verifier::remote(&settings.auth)?;
        let served = server
            .with_access_control(AuthLayer::new(verifier, policy()))
            .add_service(
                api_payment::v1::payment_service_server::PaymentServiceServer::new(
                    grpc::PaymentServiceApi,
                ),
            )
            .reflect(api_payment::FILE_DESCRIPTOR_SET)
            .serve(platform.readiness(), shutdown.clone())
            .await;
        shutdown.cancel();
        platform.stop(settings.server.shutdown_grace_period).await;
        served
    }
}

mod grpc {
    /// The gRPC API. RPCs not implemented yet answer UNIMPLEMENTED.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct PaymentServiceApi;

    #[tonic::async_trait]
    impl api_payment::v1::payment_service_server::PaymentService for PaymentServiceApi {}
}
