//! Runs each order through payment to confirmation as a durable saga, compensating when a step fails; hosts the trace view.

use std::net::SocketAddr;

use access_control::{Access, AuthLayer, AuthSettings, Policy, Verifier};
use database::{DatabaseSettings, MigrationSet, ServiceAccount};
use messaging::KafkaSettings;
use service_runtime::{GrpcServer, Platform, ServerSettings};
use telemetry::TelemetrySettings;
use tokio_util::sync::CancellationToken;

/// Service name, in logs, traces and event envelopes.
pub const NAME: &str = "saga-orchestrator";
/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 50054;
/// The schema this service owns, and the role it connects as.
pub const SCHEMA: &str = "saga";
pub const ROLE: &str = "saga_service";
/// This service's tables.
pub const MIGRATIONS: MigrationSet = database::migrations!("saga-orchestrator", []);

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
    name = "saga-orchestrator",
    version,
    about = "Runs each order through payment to confirmation as a durable saga, compensating when a step fails; hosts the trace view."
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

/// Who may call what on the orchestrator: operators only.
fn policy() -> Policy {
    const SAGA: &str = "ordersaga.saga.v1.SagaService";
    const TRACE: &str = "ordersaga.trace.v1.TraceService";
    let saga = [
        "GetSagaStatus",
        "ListActiveSagas",
        "RetrySaga",
        "CompensateSaga",
    ]
    .into_iter()
    .fold(Policy::new(), |policy, method| {
        policy.rpc(SAGA, method, Access::Admin)
    });
    [
        "GetTraceByCorrelation",
        "GetTraceByOrder",
        "StreamEvents",
        "ListActiveFlows",
    ]
    .into_iter()
    .fold(saga, |policy, method| {
        policy.rpc(TRACE, method, Access::Admin)
    })
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
            .add_service(api_saga::v1::saga_service_server::SagaServiceServer::new(
                grpc::SagaServiceApi,
            ))
            .add_service(
                api_trace::v1::trace_service_server::TraceServiceServer::new(grpc::TraceServiceApi),
            )
            .reflect(api_saga::FILE_DESCRIPTOR_SET)
            .reflect(api_trace::FILE_DESCRIPTOR_SET)
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
    pub(crate) struct SagaServiceApi;

    #[tonic::async_trait]
    impl api_saga::v1::saga_service_server::SagaService for SagaServiceApi {}

    /// The trace API. RPCs not implemented yet answer UNIMPLEMENTED.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct TraceServiceApi;

    #[tonic::async_trait]
    impl api_trace::v1::trace_service_server::TraceService for TraceServiceApi {}
}
