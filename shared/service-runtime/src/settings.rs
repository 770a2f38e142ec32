//! Settings from the environment.
//!
//! Each service declares one `clap::Parser` struct that flattens
//! [`CommonSettings`] (what every service reads: the server, the database,
//! the broker, telemetry and the purge job) beside its own. Every field
//! has an environment variable and a flag; `--help` lists them all with
//! their defaults. [`load`] parses them once at start and, on a bad or
//! missing value, exits with status 2 and a message naming the variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};

/// What every service reads from its environment, flattened into each
/// service's settings beside what is particular to it.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonSettings {
    #[command(flatten)]
    pub server: ServerSettings,
    #[command(flatten)]
    pub database: database::DatabaseSettings,
    #[command(flatten)]
    pub kafka: messaging::KafkaSettings,
    #[command(flatten)]
    pub telemetry: telemetry::TelemetrySettings,
    #[command(flatten)]
    pub retention: crate::RetentionSettings,
    #[command(flatten)]
    pub tls: tls::TlsSettings,
}

/// Settings of the gRPC server every service runs.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerSettings {
    /// Address the gRPC server listens on (port 0 picks a free port).
    #[arg(long = "grpc-addr", env = "GRPC_ADDR", default_value = "0.0.0.0:50050")]
    pub grpc_addr: SocketAddr,

    /// Longest a request may run before it is answered DEADLINE_EXCEEDED
    /// (a client's shorter `grpc-timeout` wins).
    #[arg(long = "request-timeout", env = "REQUEST_TIMEOUT", default_value = "10s",
          value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// How long shutdown waits for in-flight requests and background work.
    #[arg(long = "shutdown-grace-period", env = "SHUTDOWN_GRACE_PERIOD", default_value = "20s",
          value_parser = humantime::parse_duration)]
    pub shutdown_grace_period: Duration,

    /// How often readiness (database and broker) is checked for the health
    /// service.
    #[arg(long = "health-check-interval", env = "HEALTH_CHECK_INTERVAL", default_value = "1s",
          value_parser = humantime::parse_duration)]
    pub health_check_interval: Duration,

    /// Address of the HTTP server for Prometheus metrics (`/metrics`), and
    /// on the orchestrator the dashboard.
    #[arg(
        long = "metrics-addr",
        env = "METRICS_ADDR",
        default_value = "0.0.0.0:9050"
    )]
    pub metrics_addr: SocketAddr,

    /// Longest an HTTP client may take to send a request's headers, and a
    /// handler to answer it (503 after that); an idle keep-alive connection
    /// is closed after as long.
    #[arg(long = "http-request-timeout", env = "HTTP_REQUEST_TIMEOUT", default_value = "10s",
          value_parser = humantime::parse_duration)]
    pub http_request_timeout: Duration,

    /// Most HTTP connections served at once (each serves one request at a
    /// time); further clients wait to be accepted.
    #[arg(long = "http-max-connections", env = "HTTP_MAX_CONNECTIONS", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub http_max_connections: u32,

    /// How long gauges read from the database (outbox backlog, sagas by
    /// state) are kept: a scrape refreshes them only when they are older,
    /// so scrapes, however many, query at most once per interval.
    #[arg(long = "metrics-refresh-interval", env = "METRICS_REFRESH_INTERVAL", default_value = "5s",
          value_parser = humantime::parse_duration)]
    pub metrics_refresh_interval: Duration,
}

impl ServerSettings {
    /// What the HTTP server needs of these settings.
    pub(crate) fn http(&self) -> crate::http::HttpLimits {
        crate::http::HttpLimits {
            request_timeout: self.http_request_timeout,
            max_connections: self.http_max_connections as usize,
            refresh_interval: self.metrics_refresh_interval,
        }
    }
}

/// The default metrics port of a service: its gRPC port minus 41000, so
/// 50051 goes with 9051.
pub fn default_metrics_port(grpc_port: u16) -> u16 {
    grpc_port.saturating_sub(41_000)
}

/// Parses settings from the command line and environment, with the
/// service's own default gRPC port. Exits the process on `--help`,
/// `--version`, or a bad setting.
pub fn load<S: clap::Parser>(default_grpc_port: u16) -> S {
    match try_load_from::<S, _, _>(std::env::args_os(), default_grpc_port) {
        Ok(settings) => settings,
        Err(LoadError::Display(error)) => error.exit(),
        Err(LoadError::Invalid(message)) => {
            eprintln!("configuration error: {message}");
            std::process::exit(2);
        }
    }
}

/// Why settings did not load.
#[derive(Debug)]
pub enum LoadError {
    /// Help or version was asked for, or an error clap explains best.
    Display(clap::Error),
    /// A setting is missing or has a bad value; the message names it.
    Invalid(String),
}

/// [`load`] without exiting, from explicit arguments (and the environment).
pub fn try_load_from<S, I, T>(args: I, default_grpc_port: u16) -> Result<S, LoadError>
where
    S: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let default_addr = format!("0.0.0.0:{default_grpc_port}");
    let default_metrics_addr = format!("0.0.0.0:{}", default_metrics_port(default_grpc_port));
    let mut command = S::command()
        .mut_arg("grpc_addr", |arg| arg.default_value(default_addr))
        .mut_arg("metrics_addr", |arg| {
            arg.default_value(default_metrics_addr)
        });
    let parsed = command
        .try_get_matches_from_mut(args)
        .and_then(|mut matches| S::from_arg_matches_mut(&mut matches));
    parsed.map_err(|error| describe(&command, error))
}

/// Turns clap's error about a flag into one about the environment variable
/// (what operators actually set), keeping clap's reason.
fn describe(command: &clap::Command, error: clap::Error) -> LoadError {
    let setting_of = |flag: &str| {
        argument(command, flag)
            .and_then(|arg| {
                let long = arg.get_long()?;
                Some(match arg.get_env() {
                    Some(env) => format!("{} (--{long})", env.to_string_lossy()),
                    None => format!("--{long}"),
                })
            })
            .unwrap_or_else(|| flag.to_owned())
    };
    match error.kind() {
        ErrorKind::InvalidValue | ErrorKind::ValueValidation => {
            let flag = match error.get(ContextKind::InvalidArg) {
                Some(ContextValue::String(flag)) => Some(flag.as_str()),
                _ => None,
            };
            let setting = flag.map_or_else(|| "a setting".to_owned(), setting_of);
            let reason = std::error::Error::source(&error)
                .map_or_else(|| "not an accepted value".to_owned(), ToString::to_string);
            // A secret's value stays out of logs, whatever is wrong with it;
            // its parser's reason must not quote it either.
            if flag.is_some_and(|flag| is_secret(command, flag)) {
                return LoadError::Invalid(format!("{setting} has an invalid value: {reason}"));
            }
            let value = match error.get(ContextKind::InvalidValue) {
                Some(ContextValue::String(value)) => value.clone(),
                _ => String::new(),
            };
            LoadError::Invalid(format!(
                "{setting} has an invalid value {value:?}: {reason}"
            ))
        }
        ErrorKind::MissingRequiredArgument => {
            let missing = match error.get(ContextKind::InvalidArg) {
                Some(ContextValue::Strings(flags)) => flags
                    .iter()
                    .map(|flag| setting_of(flag))
                    .collect::<Vec<_>>(),
                _ => vec!["a required setting".to_owned()],
            };
            LoadError::Invalid(format!("missing {}", missing.join(", ")))
        }
        _ => LoadError::Display(error),
    }
}

/// The argument clap's error names as `--flag <VALUE>` (or `--flag=...`).
fn argument<'a>(command: &'a clap::Command, flag: &str) -> Option<&'a clap::Arg> {
    let long = flag
        .trim_start_matches("--")
        .split([' ', '='])
        .next()
        .unwrap_or_default();
    command
        .get_arguments()
        .find(|arg| arg.get_long() == Some(long))
}

/// Whether the setting of `flag` is a secret (`hide_env_values`).
fn is_secret(command: &clap::Command, flag: &str) -> bool {
    argument(command, flag).is_some_and(clap::Arg::is_hide_env_values_set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Example {
        #[command(flatten)]
        server: ServerSettings,
        /// A required URL.
        #[arg(long = "database-url", env = "EXAMPLE_DATABASE_URL")]
        database_url: String,
    }

    fn load(args: &[&str]) -> Result<Example, LoadError> {
        try_load_from::<Example, _, _>(
            std::iter::once("example").chain(args.iter().copied()),
            50099,
        )
    }

    fn invalid(args: &[&str]) -> String {
        match load(args) {
            Err(LoadError::Invalid(message)) => message,
            other => panic!("expected an invalid setting, got {other:?}"),
        }
    }

    #[test]
    fn defaults_use_the_services_port() {
        let settings = load(&["--database-url", "postgres://x"]).unwrap();
        assert_eq!(settings.server.grpc_addr, "0.0.0.0:50099".parse().unwrap());
        assert_eq!(settings.server.request_timeout, Duration::from_secs(10));
        assert_eq!(
            settings.server.http_request_timeout,
            Duration::from_secs(10)
        );
        assert_eq!(settings.server.http_max_connections, 64);
        assert_eq!(
            settings.server.metrics_refresh_interval,
            Duration::from_secs(5)
        );
    }

    #[test]
    fn a_bad_value_names_the_environment_variable() {
        let message = invalid(&["--database-url", "postgres://x", "--grpc-addr", "nowhere"]);
        assert!(
            message.starts_with("GRPC_ADDR (--grpc-addr) has an invalid value \"nowhere\""),
            "{message}"
        );
        let message = invalid(&[
            "--database-url",
            "postgres://x",
            "--request-timeout",
            "soon",
        ]);
        assert!(message.contains("REQUEST_TIMEOUT"), "{message}");
        let message = invalid(&[
            "--database-url",
            "postgres://x",
            "--http-max-connections",
            "0",
        ]);
        assert!(message.starts_with("HTTP_MAX_CONNECTIONS"), "{message}");
    }

    #[test]
    fn a_bad_secret_is_named_but_not_quoted() {
        fn too_short(value: &str) -> Result<String, String> {
            Err(format!("{} characters is too short", value.len()))
        }
        #[derive(Debug, clap::Parser)]
        struct WithSecret {
            #[command(flatten)]
            _server: ServerSettings,
            #[arg(long = "client-secret", env = "EXAMPLE_CLIENT_SECRET", hide_env_values = true,
                  value_parser = too_short)]
            _client_secret: String,
        }
        let error = try_load_from::<WithSecret, _, _>(
            ["example", "--client-secret", "hunter2-but-longer"],
            50099,
        )
        .unwrap_err();
        let LoadError::Invalid(message) = error else {
            panic!("expected an invalid setting, got {error:?}");
        };
        assert_eq!(
            message,
            "EXAMPLE_CLIENT_SECRET (--client-secret) has an invalid value: 18 characters is too short"
        );
    }

    #[test]
    fn a_missing_setting_is_named() {
        let message = invalid(&[]);
        assert_eq!(message, "missing EXAMPLE_DATABASE_URL (--database-url)");
    }
}
