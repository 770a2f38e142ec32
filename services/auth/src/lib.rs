//! The auth service: users, passwords (argon2id), refresh-token rotation
//! with reuse detection, service clients, and the Ed25519 keys that sign
//! the JWTs every other service verifies without sharing a secret.
//!
//! - `domain`: email, password and display name, parsed at the edge.
//! - `passwords`: argon2id hashing on a few dedicated threads, each with
//!   one memory block for life, so memory stays bounded.
//! - `source`: which address a request comes from (the peer, or what a
//!   trusted proxy says).
//! - `inflight`: how many password checks a replica, and one source, may
//!   have in flight.
//! - `throttle`: increasing waits after failed logins per (email, source)
//!   and per source, and the pace of registrations per source.
//! - `keys`: signing keys in the database (sealed at rest), their rotation
//!   and publication.
//! - `retention`: what the purge job deletes, and after how long.
//! - `tokens`: access tokens (JWT) and refresh tokens (opaque, hashed).
//! - `app`: the use cases; `grpc`: their gRPC face.

mod app;
mod clients;
mod domain;
mod grpc;
mod inflight;
mod keys;
mod passwords;
mod retention;
mod source;
mod throttle;
mod tokens;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use access_control::{Access, AuthLayer, KeyCache, Policy, TokenSettings, Verifier};
use anyhow::Context as _;
use api_auth::v1::auth_service_server::{self, AuthServiceServer};
use database::MigrationSet;
use service_runtime::{CommonSettings, GrpcServer, Manifest, Platform};
use tokio_util::sync::CancellationToken;

pub use clients::ServiceClients;
pub use keys::KeyEncryptionKey;
pub use source::Cidr;

/// Service name, in logs, traces and event envelopes.
pub const NAME: &str = "auth";
/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 50051;
/// The schema this service owns, and the role it connects as.
pub const SCHEMA: &str = "auth";
pub const ROLE: &str = "auth_service";
/// This service's tables.
pub const MIGRATIONS: MigrationSet = database::migrations!(
    "auth",
    [
        "0001_identities.sql",
        "0002_login_abuse.sql",
        "0003_retention.sql",
    ]
);

/// The auth service, as the rest of the system sees it.
pub const MANIFEST: Manifest = Manifest {
    name: NAME,
    grpc_port: DEFAULT_PORT,
    schema: SCHEMA,
    role: ROLE,
    password_env: "AUTH_DB_PASSWORD",
    grpc_services: &[auth_service_server::SERVICE_NAME],
    migrations: &[MIGRATIONS],
    produces: &[messaging::USER_EVENTS],
    consumers: &[],
    // It verifies its own tokens with its own keys, read locally.
    peers: &[],
    scopes: &[],
    min_replicas: 2,
    settings: <Settings as clap::CommandFactory>::command,
};

/// Everything the service reads from its environment.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "auth",
    version,
    about = "Issues and verifies identities: users, passwords, refresh tokens, service clients and the signing keys of the JWTs every other service verifies."
)]
pub struct Settings {
    #[command(flatten)]
    pub common: CommonSettings,
    #[command(flatten)]
    pub auth: AuthServiceSettings,
    #[command(flatten)]
    pub retention: retention::AuthRetention,
}

/// Settings particular to the auth service.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthServiceSettings {
    #[command(flatten)]
    pub tokens: TokenSettings,

    /// The key that seals the signing keys at rest: 32 random bytes,
    /// base64 (`openssl rand -base64 32`). Every replica needs the same
    /// one; a key that does not open the stored signing keys stops the
    /// service at start.
    #[arg(long = "auth-key-encryption-key", env = "AUTH_KEY_ENCRYPTION_KEY", hide_env_values = true,
          value_parser = KeyEncryptionKey::parse)]
    pub key_encryption_key: KeyEncryptionKey,

    /// Lifetime of access tokens.
    #[arg(long = "access-token-ttl", env = "ACCESS_TOKEN_TTL", default_value = "15m", value_parser = humantime::parse_duration)]
    pub access_token_ttl: Duration,

    /// Lifetime of refresh tokens.
    #[arg(long = "refresh-token-ttl", env = "REFRESH_TOKEN_TTL", default_value = "30days", value_parser = humantime::parse_duration)]
    pub refresh_token_ttl: Duration,

    /// Absolute lifetime of a refresh-token family (the tokens one login
    /// starts): after it Refresh fails however often the family was used,
    /// and the user logs in again.
    #[arg(long = "refresh-family-lifetime", env = "REFRESH_FAMILY_LIFETIME", default_value = "90days", value_parser = positive_duration)]
    pub refresh_family_lifetime: Duration,

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

    /// Service clients allowed the client-credentials grant, with the
    /// scopes each is granted: `id=secret scope scope, id=secret scope`
    /// (secrets of at least 16 bytes; an unknown scope is refused with the
    /// list of known ones, which the README explains).
    #[arg(long = "auth-service-clients", env = "AUTH_SERVICE_CLIENTS", default_value = "", hide_env_values = true,
          hide_default_value = true, value_parser = ServiceClients::parse)]
    pub service_clients: ServiceClients,

    /// Failed logins for one email from one source (address, or IPv6 /64)
    /// after which each further attempt of that pair must wait. Other
    /// sources are not affected: no one can lock an account's owner out.
    #[arg(long = "login-failures-before-delay", env = "LOGIN_FAILURES_BEFORE_DELAY", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub login_failures_before_delay: u32,

    /// Failed logins from one source, for any emails, after which each
    /// further login attempt from that source must wait.
    #[arg(long = "login-source-failures-before-delay", env = "LOGIN_SOURCE_FAILURES_BEFORE_DELAY", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub login_source_failures_before_delay: u32,

    /// The first wait after those failures; it doubles with each further
    /// failure.
    #[arg(long = "login-failure-delay", env = "LOGIN_FAILURE_DELAY", default_value = "1s", value_parser = positive_duration)]
    pub login_failure_delay: Duration,

    /// The longest wait after failed logins.
    #[arg(long = "login-failure-max-delay", env = "LOGIN_FAILURE_MAX_DELAY", default_value = "15m", value_parser = positive_duration)]
    pub login_failure_max_delay: Duration,

    /// How long it takes for one failed login to be forgotten (failures
    /// fade continuously at this rate; a right password forgets the
    /// email's failures from its source at once).
    #[arg(long = "login-failure-decay", env = "LOGIN_FAILURE_DECAY", default_value = "1h", value_parser = positive_duration)]
    pub login_failure_decay: Duration,

    /// Registrations one source may make at once.
    #[arg(long = "register-burst-per-source", env = "REGISTER_BURST_PER_SOURCE", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub register_burst_per_source: u32,

    /// After its burst, a source may register one more account per this.
    #[arg(long = "register-interval-per-source", env = "REGISTER_INTERVAL_PER_SOURCE", default_value = "30s", value_parser = positive_duration)]
    pub register_interval_per_source: Duration,

    /// Threads that hash passwords, each holding one argon2 memory block
    /// (12 MiB) for the life of the process: the hasher's whole memory.
    /// More threads than cores add memory, not speed.
    #[arg(long = "password-hash-concurrency", env = "PASSWORD_HASH_CONCURRENCY", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub password_hash_concurrency: u32,

    /// Requests that check or set a password (Login, Register,
    /// ChangePassword, SetPassword) one replica admits at once, waiting or
    /// hashing; more are refused with UNAVAILABLE and a retry delay.
    #[arg(long = "password-max-in-flight", env = "PASSWORD_MAX_IN_FLIGHT", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub password_max_in_flight: u32,

    /// Of those, how many one source may have in flight; more are refused
    /// with RESOURCE_EXHAUSTED and a retry delay.
    #[arg(long = "password-max-in-flight-per-source", env = "PASSWORD_MAX_IN_FLIGHT_PER_SOURCE", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub password_max_in_flight_per_source: u32,

    /// Proxies whose client-address header is believed, as a
    /// comma-separated list of addresses and CIDR blocks (e.g.
    /// `10.0.0.0/8,fd00::/8`). Empty: the TCP peer is every request's
    /// source, and the header is ignored.
    #[arg(long = "trusted-proxies", env = "TRUSTED_PROXIES", default_value = "", value_parser = parse_cidrs)]
    pub trusted_proxies: TrustedProxies,

    /// The header in which trusted proxies pass the client's address
    /// (`x-forwarded-for`, `x-real-ip`, or RFC 7239's `forwarded`).
    #[arg(long = "client-address-header", env = "CLIENT_ADDRESS_HEADER", default_value = "x-forwarded-for", value_parser = parse_header_name)]
    pub client_address_header: String,
}

/// The `TRUSTED_PROXIES` list.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(pub Vec<Cidr>);

fn parse_cidrs(value: &str) -> Result<TrustedProxies, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map(TrustedProxies)
}

/// A gRPC metadata key that carries text (lower case; not `-bin`).
fn parse_header_name(value: &str) -> Result<String, String> {
    let name = value.trim().to_ascii_lowercase();
    let valid = !name.is_empty()
        && !name.ends_with("-bin")
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if valid {
        Ok(name)
    } else {
        Err(format!(
            "{value:?} is not a header name (letters, digits, '-', '_', '.')"
        ))
    }
}

/// A duration above zero (a zero wait or lifetime would silently turn a
/// protection off).
fn positive_duration(value: &str) -> Result<Duration, String> {
    match humantime::parse_duration(value) {
        Ok(duration) if duration > Duration::ZERO => Ok(duration),
        Ok(_) => Err("must be more than zero".to_owned()),
        Err(error) => Err(error.to_string()),
    }
}

/// Who may call what on the auth service.
fn policy() -> Policy {
    const SERVICE: &str = auth_service_server::SERVICE_NAME;
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
    // A person's own password; a service token names no person.
    .rpc(SERVICE, "ChangePassword", Access::User)
    .rpc(SERVICE, "SetPassword", Access::Admin)
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
        let server = GrpcServer::bind(
            settings.common.server.clone(),
            &tls::Tls::load(&settings.common.tls)?,
        )
        .await?;
        let platform = Platform::start(&MANIFEST, &settings.common).await?;
        let config = &settings.auth;
        let backoff = |failures_before_delay| throttle::Backoff {
            failures_before_delay,
            first_delay: config.login_failure_delay,
            max_delay: config.login_failure_max_delay,
            decay: config.login_failure_decay,
        };
        let policy = app::AuthPolicy {
            tokens: config.tokens.clone(),
            access_token_ttl: config.access_token_ttl,
            refresh_token_ttl: config.refresh_token_ttl,
            refresh_family_lifetime: config.refresh_family_lifetime,
            service_token_ttl: config.service_token_ttl,
            login_throttle: throttle::LoginThrottle {
                per_account_and_source: backoff(config.login_failures_before_delay),
                per_source: backoff(config.login_source_failures_before_delay),
            },
            registration_pace: throttle::RegistrationPace {
                burst: config.register_burst_per_source,
                interval: config.register_interval_per_source,
            },
            service_clients: config.service_clients.clone(),
            key_encryption_key: config.key_encryption_key.clone(),
        };
        let passwords =
            passwords::Passwords::start(config.password_hash_concurrency as usize).await?;
        let admission = inflight::Admission::new(
            config.password_max_in_flight as usize,
            config.password_max_in_flight_per_source as usize,
        );
        let auth = app::Auth::new(
            platform.pool.clone(),
            passwords,
            admission,
            policy,
            &platform.topics,
        );

        keys::secure_at_rest(&platform.pool, &config.key_encryption_key).await?;
        keys::ensure_current(&platform.pool, &config.key_encryption_key).await?;
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
        platform.spawn_purge(
            &settings.common.retention,
            settings
                .retention
                .targets(settings.auth.refresh_family_lifetime),
            &shutdown,
        );
        // Its own tokens are verified against its own keys, read locally.
        let keys = Arc::new(KeyCache::new(
            keys::LocalKeys(platform.pool.clone()),
            Duration::from_secs(1),
        ));
        let verifier = Verifier::new(keys, &settings.auth.tokens);
        let served = server
            .with_access_control(AuthLayer::new(verifier, policy()))
            .add_service(AuthServiceServer::new(grpc::AuthApi {
                auth,
                client_addresses: source::ClientAddresses::new(
                    &settings.auth.client_address_header,
                    settings.auth.trusted_proxies.0.clone(),
                ),
            }))
            .reflect(api_auth::FILE_DESCRIPTOR_SET)
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
