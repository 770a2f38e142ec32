//! Customer orders, event-sourced, with a CQRS read model; their events go
//! out through the outbox.
//!
//! - `domain`: the order aggregate, pure: `decide` and `evolve`.
//! - `event_store`: streams on PostgreSQL with optimistic concurrency.
//! - `codec`: how order events are stored (protobuf, versioned, upcast).
//! - `read_model`: the projection queries read, and its rebuild.
//! - `retention`: what the purge job deletes, and after how long.
//! - `app`: the use cases; `grpc`: their gRPC face.

mod app;
mod codec;
pub mod domain;
pub mod event_store;
mod grpc;
mod read_model;
mod retention;

use std::net::SocketAddr;

use access_control::{Access, AuthLayer, AuthSettings, Policy, Scope, Verifier};
use api_order::v1::order_service_server::OrderServiceServer;
use database::{DatabaseSettings, MigrationSet, ServiceAccount};
use messaging::KafkaSettings;
use service_runtime::{GrpcServer, Platform, ServerSettings};
use telemetry::TelemetrySettings;
use tokio_util::sync::CancellationToken;

/// Service name, in logs, traces and event envelopes.
pub const NAME: &str = "order";
/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 50052;
/// The schema this service owns, and the role it connects as.
pub const SCHEMA: &str = "orders";
pub const ROLE: &str = "order_service";
/// This service's tables.
pub const MIGRATIONS: MigrationSet = database::migrations!(
    "order",
    [
        "0001_event_store.sql",
        "0002_read_model.sql",
        "0003_idempotency_key_age.sql",
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
    name = "order",
    version,
    about = "Customer orders, event-sourced, with a CQRS read model; their events go out through the outbox."
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
    pub retention: retention::OrderRetention,

    /// Attempts at a command whose order keeps changing concurrently
    /// before answering ABORTED.
    #[arg(long = "command-max-attempts", env = "COMMAND_MAX_ATTEMPTS", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub command_max_attempts: u32,
}

/// Who may call what on the order service.
fn policy() -> Policy {
    const SERVICE: &str = "ordersaga.order.v1.OrderService";
    let settle = Access::Service(Scope::OrdersSettle);
    Policy::new()
        .rpc(SERVICE, "CreateOrder", Access::User)
        .rpc(SERVICE, "GetOrder", Access::User)
        .rpc(SERVICE, "ListOrders", Access::User)
        .rpc(SERVICE, "RequestOrderCancellation", Access::User)
        .rpc(SERVICE, "ConfirmOrder", settle)
        .rpc(SERVICE, "RejectOrder", settle)
        .rpc(SERVICE, "CancelOrder", settle)
        .rpc(SERVICE, "RebuildReadModel", Access::Admin)
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
        let retry = event_store::Retry {
            max_attempts: settings.command_max_attempts,
            backoff: std::time::Duration::from_millis(2),
        };
        let orders = app::Orders::new(platform.pool.clone(), platform.topics.order_events(), retry);
        let verifier = Verifier::remote(&settings.auth, server.tls())?;

        let served = server
            .with_access_control(AuthLayer::new(verifier, policy()))
            .add_service(OrderServiceServer::new(grpc::OrderApi { orders }))
            .reflect(api_order::FILE_DESCRIPTOR_SET)
            .collect_metrics(platform.outbox_metrics())
            .serve(platform.readiness(), shutdown.clone())
            .await;
        shutdown.cancel();
        platform.stop(settings.server.shutdown_grace_period).await;
        served
    }
}
