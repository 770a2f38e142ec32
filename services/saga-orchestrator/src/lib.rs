//! Runs each order through payment to confirmation as a durable saga,
//! compensating when a step fails; hosts the operators' saga API and the
//! trace view.
//!
//! - `order_saga`: the order-processing saga, versions 1 and 2 (steps,
//!   calls, compensations); `return_saga`: the return of a confirmed order
//!   and its payment-refund child; `calls`: how their steps call services.
//! - `starter`: starts, signals and calls off sagas from the order events
//!   topic.
//! - `trace_view`: the read model of every service's events, by flow, and
//!   its live feed; `trace_api`: TraceService over it.
//! - `operator`: the operators' actions (retry, compensate, pause, resume,
//!   terminate), for SagaService and the dashboard alike.
//! - `grpc`: SagaService; the engine itself is the `saga-engine` crate.
//! - `retention`: what the purge job deletes, and after how long.

mod calls;
mod dashboard;
mod grpc;
mod operator;
pub mod order_saga;
mod retention;
pub mod return_saga;
mod starter;
mod trace_api;
mod trace_view;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use access_control::{
    Access, AuthLayer, AuthSettings, Policy, Scope, ServiceCredentials, ServiceTokenSource,
    Verifier,
};
use api_saga::v1::saga_service_server::{self, SagaServiceServer};
use api_trace::v1::trace_service_server::{self, TraceServiceServer};
use database::MigrationSet;
use messaging::Consumer;
use saga_engine::{Engine, EngineConfig, RetryPolicy};
use service_runtime::client::{self, BreakerSettings};
use service_runtime::manifest::{self, ConsumerGroup, Manifest, Peer};
use service_runtime::{CommonSettings, GrpcServer, Platform};
use tokio_util::sync::CancellationToken;

pub use dashboard::DashboardSettings;

/// Service name, in logs, traces and event envelopes.
pub const NAME: &str = "saga-orchestrator";
/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 50054;
/// The schema this service owns, and the role it connects as.
pub const SCHEMA: &str = "saga";
pub const ROLE: &str = "saga_service";
/// This service's own tables (the saga tables come with the engine).
pub const MIGRATIONS: MigrationSet = database::migrations!(
    "saga-orchestrator",
    [
        "0001_trace_view.sql",
        "0002_trace_notify_per_statement.sql",
        "0003_trace_notify_by_the_writer.sql",
    ]
);
/// The consumer group that starts sagas from order events.
pub const CONSUMER_GROUP: &str = "saga-orchestrator";
/// Starts and calls off sagas from order events.
const STARTER: ConsumerGroup = ConsumerGroup {
    group: CONSUMER_GROUP,
    topics: &[messaging::ORDER_EVENTS],
};
/// Records every service's events in the trace view. Saga events are
/// recorded by the engine itself (TraceJournal).
const TRACE_RECORDER: ConsumerGroup = ConsumerGroup {
    group: trace_view::CONSUMER_GROUP,
    topics: &[
        messaging::USER_EVENTS,
        messaging::ORDER_EVENTS,
        messaging::PAYMENT_EVENTS,
    ],
};
/// The services the saga's steps call.
const ORDER: Peer = Peer {
    service: "order",
    url_env: "ORDER_SERVICE_URL",
};
const PAYMENT: Peer = Peer {
    service: "payment",
    url_env: "PAYMENT_SERVICE_URL",
};
pub use order_saga::SCOPES;

/// The orchestrator, as the rest of the system sees it.
pub const MANIFEST: Manifest = Manifest {
    name: NAME,
    grpc_port: DEFAULT_PORT,
    schema: SCHEMA,
    role: ROLE,
    password_env: "SAGA_DB_PASSWORD",
    grpc_services: &[
        saga_service_server::SERVICE_NAME,
        trace_service_server::SERVICE_NAME,
    ],
    migrations: &[saga_engine::MIGRATIONS, MIGRATIONS],
    produces: &[messaging::SAGA_EVENTS],
    consumers: &[STARTER, TRACE_RECORDER],
    peers: &[manifest::AUTH, ORDER, PAYMENT],
    scopes: &SCOPES,
    // Sagas survive losing a replica only if there is another to resume them.
    min_replicas: 3,
    settings: <Settings as clap::CommandFactory>::command,
};

/// Everything the service reads from its environment.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "saga-orchestrator",
    version,
    about = "Runs each order through payment to confirmation as a durable saga, compensating when a step fails; hosts the trace view."
)]
pub struct Settings {
    #[command(flatten)]
    pub common: CommonSettings,
    #[command(flatten)]
    pub auth: AuthSettings,
    #[command(flatten)]
    pub credentials: ServiceCredentials,
    #[command(flatten)]
    pub breaker: BreakerSettings,
    #[command(flatten)]
    pub saga: SagaSettings,
    #[command(flatten)]
    pub order_saga: OrderSagaSettings,
    #[command(flatten)]
    pub retention: retention::OrchestratorRetention,
    #[command(flatten)]
    pub dashboard: DashboardSettings,

    /// gRPC URL of the order service.
    #[arg(
        long = "order-service-url",
        env = ORDER.url_env,
        default_value = "http://localhost:50052"
    )]
    pub order_service_url: String,

    /// gRPC URL of the payment service.
    #[arg(
        long = "payment-service-url",
        env = PAYMENT.url_env,
        default_value = "http://localhost:50053"
    )]
    pub payment_service_url: String,
}

/// How sagas are run.
#[derive(Debug, Clone, clap::Args)]
pub struct SagaSettings {
    /// How long a replica's claim on a saga lasts without renewal: how long
    /// the sagas of a replica that died wait before another takes them.
    #[arg(long = "saga-lease", env = "SAGA_LEASE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub lease: Duration,

    /// Sagas one replica drives at once.
    #[arg(long = "saga-concurrency", env = "SAGA_CONCURRENCY", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,

    /// Longest one call of a step may take.
    #[arg(long = "saga-attempt-timeout", env = "SAGA_ATTEMPT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub attempt_timeout: Duration,

    /// Longest a step may keep trying before it fails for good.
    #[arg(long = "saga-step-deadline", env = "SAGA_STEP_DEADLINE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub step_deadline: Duration,

    /// Attempts of a step before it fails for good.
    #[arg(long = "saga-step-max-attempts", env = "SAGA_STEP_MAX_ATTEMPTS", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub step_max_attempts: u32,

    /// Attempts of a compensation before the saga is parked as FAILED.
    #[arg(long = "saga-compensation-max-attempts", env = "SAGA_COMPENSATION_MAX_ATTEMPTS", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub compensation_max_attempts: u32,

    /// Pause before the first retry; it doubles with each (with jitter).
    #[arg(long = "saga-retry-backoff", env = "SAGA_RETRY_BACKOFF", default_value = "200ms", value_parser = humantime::parse_duration)]
    pub retry_backoff: Duration,

    /// Longest pause between retries.
    #[arg(long = "saga-retry-max-backoff", env = "SAGA_RETRY_MAX_BACKOFF", default_value = "5s", value_parser = humantime::parse_duration)]
    pub retry_max_backoff: Duration,

    /// A running or compensating saga with no progress (no step succeeded,
    /// no change of state) for this long is stuck: flagged, logged once,
    /// counted in `sagas_stuck`.
    #[arg(long = "saga-stuck-after", env = "SAGA_STUCK_AFTER", default_value = "5m", value_parser = parse_stuck_after)]
    pub stuck_after: Duration,
}

/// What the order saga does.
#[derive(Debug, Clone, clap::Args)]
pub struct OrderSagaSettings {
    /// The version of the order saga new orders start on: 2 (authorize,
    /// review, confirm, capture) or 1 (charge, confirm). Both are carried
    /// whatever this says, so sagas under way finish on their own version;
    /// roll a new version out by deploying it while starting the old one,
    /// then switching.
    #[arg(long = "order-saga-version", env = "ORDER_SAGA_VERSION", value_name = "VERSION", default_value_t = order_saga::NEWEST,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(order_saga::NEWEST)))]
    pub start_version: u32,

    /// Orders of at least this total, in minor units of their currency,
    /// wait for an admin's ApproveOrder or DeclineOrder before they are
    /// confirmed (version 2).
    #[arg(long = "review-threshold", env = "REVIEW_THRESHOLD", default_value_t = 100_000,
          value_parser = clap::value_parser!(i64).range(1..))]
    pub review_threshold: i64,

    /// How long an order waits for its review; then it is declined. Keep
    /// it well under the payment provider's authorization lifetime
    /// (`AUTHORIZATION_LIFETIME`, 7 days by default): an approval that
    /// comes too late to capture is a decline.
    #[arg(long = "review-timeout", env = "REVIEW_TIMEOUT", default_value = "24h", value_parser = parse_review_timeout)]
    pub review_timeout: Duration,
}

/// From a second to 30 days.
fn parse_review_timeout(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|error| error.to_string())?;
    if duration < Duration::from_secs(1) || duration > Duration::from_secs(30 * 86_400) {
        return Err("must be from 1s to 30 days".to_owned());
    }
    Ok(duration)
}

/// At least a second: shorter would flag sagas between ordinary retries.
fn parse_stuck_after(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|error| error.to_string())?;
    if duration < Duration::from_secs(1) || duration > Duration::from_secs(30 * 86_400) {
        return Err("must be from 1s to 30 days".to_owned());
    }
    Ok(duration)
}

/// Who may call what on the orchestrator: operators, and for SignalSaga
/// also a service granted `sagas:signal` (a system that decides what a
/// waiting step waits for).
fn policy() -> Policy {
    const SAGA: &str = saga_service_server::SERVICE_NAME;
    const TRACE: &str = trace_service_server::SERVICE_NAME;
    let saga = [
        "GetSagaStatus",
        "ListActiveSagas",
        "RetrySaga",
        "CompensateSaga",
        "ListSagas",
        "PauseSaga",
        "ResumeSaga",
        "TerminateSaga",
    ]
    .into_iter()
    .fold(Policy::new(), |policy, method| {
        policy.rpc(SAGA, method, Access::Admin)
    })
    .rpc(
        SAGA,
        "SignalSaga",
        Access::AdminOrService(Scope::SagasSignal),
    );
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
    engine: Arc<Engine>,
    review: order_saga::v2::Review,
    settings: Settings,
}

impl Application {
    /// Binds the gRPC port, migrates the database, and builds the engine
    /// with its downstream clients (which connect lazily).
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let server = GrpcServer::bind(
            settings.common.server.clone(),
            &tls::Tls::load(&settings.common.tls)?,
        )
        .await?;
        let platform = Platform::start(&MANIFEST, &settings.common).await?;
        let token = Arc::new(ServiceTokenSource::new(
            &settings.auth.url,
            settings.credentials.clone(),
            SCOPES.into_iter().collect(),
            server.tls(),
        )?);
        let downstreams = order_saga::Downstreams {
            orders: client::downstream(
                ORDER.service,
                &settings.order_service_url,
                settings.breaker,
                Some(token.clone()),
                server.tls(),
            )?,
            payments: client::downstream(
                PAYMENT.service,
                &settings.payment_service_url,
                settings.breaker,
                Some(token),
                server.tls(),
            )?,
        };
        let saga = &settings.saga;
        let tuning = order_saga::Tuning {
            attempt_timeout: saga.attempt_timeout,
            step_deadline: saga.step_deadline,
            retry: RetryPolicy {
                max_attempts: saga.step_max_attempts,
                initial_backoff: saga.retry_backoff,
                max_backoff: saga.retry_max_backoff,
            },
            compensation_retry: RetryPolicy {
                max_attempts: saga.compensation_max_attempts,
                initial_backoff: saga.retry_backoff,
                max_backoff: saga.retry_max_backoff,
            },
        };
        let config = EngineConfig {
            worker_id: format!("{}-{}", hostname(), std::process::id()),
            lease: saga.lease,
            concurrency: saga.concurrency as usize,
            events_topic: platform.topics.saga_events(),
            producer: NAME,
        };
        let review = order_saga::v2::Review {
            threshold_minor: settings.order_saga.review_threshold,
            timeout: settings.order_saga.review_timeout,
        };
        let mut definitions = order_saga::definitions(&downstreams, tuning, review);
        definitions.extend(return_saga::definitions(&downstreams, tuning));
        let engine = Arc::new(
            Engine::new(platform.pool.clone(), definitions, config)?
                .starting_on(order_saga::SAGA_TYPE, settings.order_saga.start_version)?
                .with_journal(Arc::new(trace_view::TraceJournal)),
        );
        Ok(Self {
            server,
            platform,
            engine,
            review,
            settings,
        })
    }

    /// Where the gRPC server listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Serves, consumes and drives sagas until `shutdown` is cancelled,
    /// then stops everything.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            server,
            mut platform,
            engine,
            review,
            settings,
        } = self;
        platform.spawn_relay(&shutdown);
        platform.spawn_purge(
            &settings.common.retention,
            settings.retention.targets(),
            &shutdown,
        );
        platform.spawn("saga engine", engine.clone().run(shutdown.clone()));
        platform.spawn(
            "stuck saga detector",
            engine
                .clone()
                .watch_stuck(settings.saga.stuck_after, shutdown.clone()),
        );
        let starter = Consumer::new(
            &settings.common.kafka,
            STARTER.group,
            &STARTER.topic_names(&platform.topics),
            platform.pool.clone(),
            platform.producer.clone(),
            starter::SagaStarter::new(engine.clone(), review),
        )?;
        platform.spawn("order events consumer", starter.run(shutdown.clone()));
        let recorder = Consumer::new(
            &settings.common.kafka,
            TRACE_RECORDER.group,
            &TRACE_RECORDER.topic_names(&platform.topics),
            platform.pool.clone(),
            platform.producer.clone(),
            trace_view::TraceRecorder,
        )?;
        platform.spawn("trace view consumer", recorder.run(shutdown.clone()));
        let feed = trace_view::LiveFeed::new();
        platform.spawn(
            "trace feed",
            feed.clone().run(platform.pool.clone(), shutdown.clone()),
        );
        let trace_api = trace_api::TraceApi {
            pool: platform.pool.clone(),
            feed,
        };

        let verifier = Verifier::remote(&settings.auth, server.tls())?;
        let (dashboard, sampler) = dashboard::routes(
            engine.clone(),
            Arc::new(verifier.clone()),
            &settings.dashboard,
            platform.outbox_metrics(),
        );
        platform.spawn("dashboard sampler", sampler.run(shutdown.clone()));
        let served = server
            .with_access_control(AuthLayer::new(verifier, policy()))
            .add_service(SagaServiceServer::new(grpc::SagaApi { engine }))
            .add_service(TraceServiceServer::new(trace_api))
            .reflect(api_saga::FILE_DESCRIPTOR_SET)
            .reflect(api_trace::FILE_DESCRIPTOR_SET)
            .http_routes(dashboard)
            .collect_metrics(platform.outbox_metrics())
            .collect_metrics(dashboard::saga_metrics(platform.pool.clone()))
            .serve(platform.readiness(), shutdown.clone())
            .await;
        shutdown.cancel();
        platform
            .stop(settings.common.server.shutdown_grace_period)
            .await;
        served
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "orchestrator".to_owned())
}
