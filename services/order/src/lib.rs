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
use api_order::v1::order_service_server::{self, OrderServiceServer};
use database::MigrationSet;
use service_runtime::manifest::{self, Manifest};
use service_runtime::{CommonSettings, GrpcServer, Platform};
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

/// The order service, as the rest of the system sees it.
pub const MANIFEST: Manifest = Manifest {
    name: NAME,
    grpc_port: DEFAULT_PORT,
    schema: SCHEMA,
    role: ROLE,
    password_env: "ORDER_DB_PASSWORD",
    grpc_services: &[order_service_server::SERVICE_NAME],
    migrations: &[MIGRATIONS],
    produces: &[messaging::ORDER_EVENTS],
    consumers: &[],
    peers: &[manifest::AUTH],
    scopes: &[],
    min_replicas: 2,
    settings: <Settings as clap::CommandFactory>::command,
};

/// Everything the service reads from its environment.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "order",
    version,
    about = "Customer orders, event-sourced, with a CQRS read model; their events go out through the outbox."
)]
pub struct Settings {
    #[command(flatten)]
    pub common: CommonSettings,
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
    const SERVICE: &str = order_service_server::SERVICE_NAME;
    let settle = Access::Service(Scope::OrdersSettle);
    Policy::new()
        .rpc(SERVICE, "CreateOrder", Access::User)
        .rpc(SERVICE, "GetOrder", Access::User)
        .rpc(SERVICE, "ListOrders", Access::User)
        .rpc(SERVICE, "RequestOrderCancellation", Access::User)
        .rpc(SERVICE, "ConfirmOrder", settle)
        .rpc(SERVICE, "RejectOrder", settle)
        .rpc(SERVICE, "CancelOrder", settle)
        // The saga holds large orders; an operator decides them.
        .rpc(SERVICE, "HoldOrderForReview", settle)
        .rpc(SERVICE, "ApproveOrder", Access::Admin)
        .rpc(SERVICE, "DeclineOrder", Access::Admin)
        // The customer (or an admin) asks; the saga settles it.
        .rpc(SERVICE, "RequestReturn", Access::User)
        .rpc(SERVICE, "MarkOrderReturned", settle)
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
        platform
            .stop(settings.common.server.shutdown_grace_period)
            .await;
        served
    }
}
