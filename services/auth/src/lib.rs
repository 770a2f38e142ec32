//! The auth service: users, passwords (argon2id), refresh-token rotation
//! with reuse detection, service clients, and the Ed25519 keys that sign
//! the JWTs every other service verifies without sharing a secret.
//!
//! - `domain`: email, password and display name, parsed at the edge.
//! - `passwords`: argon2id hashing, bounded and off the async threads.
//! - `keys`: signing keys in the database, their rotation and publication.
//! - `tokens`: access tokens (JWT) and refresh tokens (opaque, hashed).
//! - `throttle`: failed-login limits per email and per peer.
//! - `app`: the use cases; `grpc`: their gRPC face.

mod app;
mod clients;
mod domain;
mod grpc;
mod keys;
mod passwords;
mod throttle;
mod tokens;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use access_control::{Access, AuthLayer, KeyCache, Policy, TokenSettings, Verifier};
use anyhow::Context as _;
use api_auth::v1::auth_service_server::AuthServiceServer;
use database::{DatabaseSettings, MigrationSet, ServiceAccount};
use messaging::KafkaSettings;
use service_runtime::{GrpcServer, Platform, ServerSettings};
use telemetry::TelemetrySettings;
use tokio_util::sync::CancellationToken;

pub use clients::ServiceClients;

/// Service name, in logs, traces and event envelopes.
pub const NAME: &str = "auth";
/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 50051;
/// The schema this service owns, and the role it connects as.
pub const SCHEMA: &str = "auth";
pub const ROLE: &str = "auth_service";
/// This service's tables.
pub const MIGRATIONS: MigrationSet = database::migrations!("auth", ["0001_identities.sql"]);

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
    name = "auth",
    version,
    about = "Issues and verifies identities: users, passwords, refresh tokens, service clients and the signing keys of the JWTs every other service verifies."
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
    pub auth: AuthServiceSettings,
}

/// Settings particular to the auth service.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthServiceSettings {
    #[command(flatten)]
    pub tokens: TokenSettings,

    /// Lifetime of access tokens.
    #[arg(long = "access-token-ttl", env = "ACCESS_TOKEN_TTL", default_value = "15m", value_parser = humantime::parse_duration)]
    pub access_token_ttl: Duration,

    /// Lifetime of refresh tokens.
    #[arg(long = "refresh-token-ttl", env = "REFRESH_TOKEN_TTL", default_value = "30days", value_parser = humantime::parse_duration)]
    pub refresh_token_ttl: Duration,

    /// Lifetime of service tokens (client-credentials grant).
    #[arg(long = "service-token-ttl", env = "SERVICE_TOKEN_TTL", default_value = "15m", value_parser = humantime::parse_duration)]
    pub service_token_ttl: Duration,

    /// Email of an admin account created on first start, if none exists.
    #[arg(
        long = "auth-admin-email",
        env = "AUTH_ADMIN_EMAIL",
        requires = "admin_password"
    )]
    pub admin_email: Option<String>,

    /// Password of that admin account.
    #[arg(
        long = "auth-admin-password",
        env = "AUTH_ADMIN_PASSWORD",
        hide_env_values = true,
        requires = "admin_email"
    )]
    pub admin_password: Option<String>,

    /// Service clients allowed the client-credentials grant, as
    /// `id=secret,id=secret` (secrets of at least 16 bytes).
    #[arg(long = "auth-service-clients", env = "AUTH_SERVICE_CLIENTS", default_value = "", hide_env_values = true,
          hide_default_value = true, value_parser = ServiceClients::parse)]
    pub service_clients: ServiceClients,

    /// Failed logins for one email, within the window, that block it.
    #[arg(long = "login-max-failures-per-email", env = "LOGIN_MAX_FAILURES_PER_EMAIL", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub login_max_failures_per_email: u32,

    /// Failed logins from one peer address, within the window, that block it.
    #[arg(long = "login-max-failures-per-peer", env = "LOGIN_MAX_FAILURES_PER_PEER", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub login_max_failures_per_peer: u32,

    /// Window of the failed-login counts, and how long a block lasts.
    #[arg(long = "login-throttle-window", env = "LOGIN_THROTTLE_WINDOW", default_value = "15m", value_parser = humantime::parse_duration)]
    pub login_throttle_window: Duration,

    /// Password hashes computed at once (each takes 19 MiB and one core
    /// for tens of milliseconds).
    #[arg(long = "password-hash-concurrency", env = "PASSWORD_HASH_CONCURRENCY", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub password_hash_concurrency: u32,
}

/// Who may call what on the auth service.
fn policy() -> Policy {
    const SERVICE: &str = "ordersaga.auth.v1.AuthService";
    [
        "Register",
        "Login",
        "Refresh",
        "Logout",
        "IssueServiceToken",
        "GetPublicKeys",
    ]
    .into_iter()
    .fold(Policy::new(), |policy, method| {
        policy.rpc(SERVICE, method, Access::Public)
    })
    .rpc(SERVICE, "RotateSigningKey", Access::Admin)
}

/// The service, built and bound, ready to run.
#[derive(Debug)]
pub struct Application {
    server: GrpcServer,
    platform: Platform,
    auth: app::Auth,
    settings: Settings,
}

impl Application {
    /// Binds the gRPC port, migrates the database, makes sure a signing key
    /// exists and the configured admin too.
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
        let config = &settings.auth;
        let policy = app::AuthPolicy {
            tokens: config.tokens.clone(),
            access_token_ttl: config.access_token_ttl,
            refresh_token_ttl: config.refresh_token_ttl,
            service_token_ttl: config.service_token_ttl,
            throttle: throttle::ThrottlePolicy {
                max_failures_per_email: config.login_max_failures_per_email,
                max_failures_per_peer: config.login_max_failures_per_peer,
                window: config.login_throttle_window,
            },
            service_clients: config.service_clients.clone(),
        };
        let passwords = passwords::Passwords::new(config.password_hash_concurrency as usize)?;
        let auth = app::Auth::new(
            platform.pool.clone(),
            passwords,
            policy,
            platform.topics.clone(),
        );

        keys::ensure_current(&platform.pool).await?;
        if let (Some(email), Some(password)) = (&config.admin_email, &config.admin_password) {
            let email = domain::Email::parse(email)
                .map_err(|reason| anyhow::anyhow!("AUTH_ADMIN_EMAIL {reason}"))?;
            let password = domain::Password::parse(password)
                .map_err(|reason| anyhow::anyhow!("AUTH_ADMIN_PASSWORD {reason}"))?;
            auth.bootstrap_admin(&email, &password)
                .await
                .context("creating the bootstrap admin")?;
        }
        Ok(Self {
            server,
            platform,
            auth,
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
            auth,
            settings,
        } = self;
        platform.spawn_relay(&shutdown);
        // Its own tokens are verified against its own keys, read locally.
        let keys = Arc::new(KeyCache::new(
            keys::LocalKeys(platform.pool.clone()),
            Duration::from_secs(1),
        ));
        let verifier = Verifier::new(keys, &settings.auth.tokens);
        let served = server
            .with_access_control(AuthLayer::new(verifier, policy()))
            .add_service(AuthServiceServer::new(grpc::AuthApi { auth }))
            .reflect(api_auth::FILE_DESCRIPTOR_SET)
            .collect_metrics(platform.outbox_metrics())
            .serve(platform.readiness(), shutdown.clone())
            .await;
        shutdown.cancel();
        platform.stop(settings.server.shutdown_grace_period).await;
        served
    }
}
