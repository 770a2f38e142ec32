use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// Database settings shared by every service.
#[derive(Clone, clap::Args)]
pub struct DatabaseSettings {
    /// PostgreSQL URL of the service's own role, e.g.
    /// postgres://order_service:secret@localhost:5432/ordersaga
    #[arg(id = "database_url", long = "database-url", env = "DATABASE_URL", value_parser = parse_url, hide_env_values = true)]
    pub url: PgConnectOptions,

    /// Most connections the service keeps open.
    #[arg(long = "database-max-connections", env = "DATABASE_MAX_CONNECTIONS", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_connections: u32,

    /// How long start-up waits for the database before giving up.
    #[arg(long = "database-connect-timeout", env = "DATABASE_CONNECT_TIMEOUT", default_value = "30s",
          value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for DatabaseSettings {
    // The URL may carry a password: show only where it points.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("host", &self.url.get_host())
            .field("port", &self.url.get_port())
            .field("database", &self.url.get_database())
            .field("user", &self.url.get_username())
            .field("max_connections", &self.max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

fn parse_url(value: &str) -> Result<PgConnectOptions, String> {
    if !(value.starts_with("postgres://") || value.starts_with("postgresql://")) {
        return Err("expected a postgres:// URL".to_owned());
    }
    PgConnectOptions::from_str(value).map_err(|error| error.to_string())
}

/// Opens a pool confined to `schema` and waits until the database answers.
///
/// Every connection sets `search_path` at start-up, so queries name tables
/// without a schema and can reach no other. Start-up retries with backoff for
/// `connect_timeout`: replicas may start before the database is ready.
pub async fn connect(settings: &DatabaseSettings, schema: &str) -> anyhow::Result<PgPool> {
    let options = settings
        .url
        .clone()
        .options([("search_path", schema)])
        .application_name(schema);
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        // A request waits at most this long for a free connection; beyond
        // that the service is overloaded and should say so quickly.
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options);

    // The pool itself retries refused connections (with backoff) until its
    // acquire timeout; errors that retrying cannot fix, such as a wrong
    // password, come back at once.
    let deadline = tokio::time::Instant::now() + settings.connect_timeout;
    loop {
        match tokio::time::timeout_at(deadline, pool.acquire()).await {
            Ok(Ok(_connection)) => return Ok(pool),
            Ok(Err(sqlx::Error::PoolTimedOut)) if tokio::time::Instant::now() < deadline => {
                tracing::warn!("database not reachable yet; still trying");
            }
            Ok(Err(error)) => return Err(error).context("connecting to the database"),
            Err(_elapsed) => bail!(
                "database not reachable within {:?}",
                settings.connect_timeout
            ),
        }
    }
}
