//! The deployment's one-off jobs, shared by `docker-compose.yml`, the
//! Kubernetes manifests, `cargo xtask up` and the tests, so that all of
//! them provision and create topics with the same code:
//!
//! - [`provision`]: each service's role and schema (replica-safe);
//! - [`create_topics`]: every topic and dead-letter topic (idempotent);
//! - [`health_check`]: a gRPC health check, for container health checks.

pub mod cli;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use database::ServiceAccount;
use messaging::Topics;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use service_runtime::Manifest;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Every service's account, with the password it is given.
pub fn accounts(passwords: &Passwords) -> Vec<ServiceAccount> {
    registry::SERVICES
        .iter()
        .map(|manifest| manifest.account(passwords.of(manifest)))
        .collect()
}

/// The database password of each service's role: a setting per service,
/// named by its manifest (`AUTH_DB_PASSWORD`, `--auth-db-password`...).
#[derive(Clone, Default)]
pub struct Passwords(BTreeMap<&'static str, String>);

impl Passwords {
    /// The password of `manifest`'s role (empty if none was given, which
    /// the command line does not allow).
    pub fn of(&self, manifest: &Manifest) -> String {
        self.0.get(manifest.name).cloned().unwrap_or_default()
    }
}

/// Passwords by service name.
impl FromIterator<(&'static str, String)> for Passwords {
    fn from_iter<I: IntoIterator<Item = (&'static str, String)>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// The flag of a password variable: `AUTH_DB_PASSWORD` → `auth-db-password`.
fn flag_of(env: &str) -> String {
    env.to_ascii_lowercase().replace('_', "-")
}

impl clap::Args for Passwords {
    fn augment_args(command: clap::Command) -> clap::Command {
        registry::SERVICES
            .iter()
            .fold(command, |command, manifest| {
                command.arg(
                    clap::Arg::new(manifest.password_env)
                        .long(flag_of(manifest.password_env))
                        .env(manifest.password_env)
                        .hide_env_values(true)
                        .required(true)
                        .help(format!("Password of the {} role", manifest.role)),
                )
            })
    }

    fn augment_args_for_update(command: clap::Command) -> clap::Command {
        Self::augment_args(command)
    }
}

impl clap::FromArgMatches for Passwords {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut passwords = Self::default();
        passwords.update_from_arg_matches(matches)?;
        Ok(passwords)
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        for manifest in registry::SERVICES {
            if let Some(password) = matches.get_one::<String>(manifest.password_env) {
                self.0.insert(manifest.name, password.clone());
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passwords(<redacted>)")
    }
}

/// Creates (or brings up to date) every service's role and schema in the
/// database `admin_url` names, waiting up to `wait` for it to answer.
pub async fn provision(
    admin_url: &str,
    passwords: &Passwords,
    wait: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + wait;
    let admin = loop {
        match sqlx::PgPool::connect(admin_url).await {
            Ok(pool) => break pool,
            Err(error) if tokio::time::Instant::now() < deadline => {
                eprintln!("database not reachable yet ({error}); retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => {
                return Err(error).context("connecting to the database as its administrator");
            }
        }
    };
    for account in accounts(passwords) {
        database::provision(&admin, &account).await?;
    }
    admin.close().await;
    Ok(())
}

/// How the topics are laid out.
#[derive(Debug, Clone, clap::Args)]
pub struct TopicLayout {
    /// Partitions of each topic: the most replicas of a consumer that can
    /// share its work.
    #[arg(long = "kafka-topic-partitions", env = "KAFKA_TOPIC_PARTITIONS", default_value_t = 6,
          value_parser = clap::value_parser!(i32).range(1..=1000))]
    pub partitions: i32,

    /// Copies of each partition (3 on a production cluster).
    #[arg(long = "kafka-replication-factor", env = "KAFKA_REPLICATION_FACTOR", default_value_t = 1,
          value_parser = clap::value_parser!(i32).range(1..=10))]
    pub replication_factor: i32,
}

/// Every topic the system uses, with its dead-letter topics.
pub fn topics(prefix: &str) -> Vec<String> {
    registry::topics(&Topics::new(prefix))
}

/// Creates every topic that does not exist yet, waiting up to `wait` for
/// the brokers (reached as `security` says).
pub async fn create_topics(
    brokers: &str,
    security: &messaging::KafkaSecurity,
    prefix: &str,
    layout: &TopicLayout,
    wait: Duration,
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = messaging::client_config(brokers, security)?
        .create()
        .context("creating a Kafka admin client")?;
    let names = topics(prefix);
    let new_topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| {
            NewTopic::new(
                name,
                layout.partitions,
                TopicReplication::Fixed(layout.replication_factor),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match admin.create_topics(&new_topics, &options).await {
            Ok(results) => {
                for result in results {
                    match result {
                        Ok(name) => eprintln!("created topic {name}"),
                        Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                            eprintln!("topic {name} exists")
                        }
                        Err((name, code)) => bail!("creating topic {name}: {code}"),
                    }
                }
                return Ok(());
            }
            Err(error) if tokio::time::Instant::now() < deadline => {
                eprintln!("brokers not reachable yet ({error}); retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => return Err(error).context("creating topics"),
        }
    }
}

/// Whether the gRPC server at `address` reports `service` ("" for all)
/// SERVING, asked over TLS when `tls` has a CA.
pub async fn health_check(address: &str, service: &str, tls: &tls::Tls) -> anyhow::Result<()> {
    let channel = tls
        .endpoint(&format!("{}://{address}", tls.scheme()))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .with_context(|| format!("connecting to {address}"))?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?
        .into_inner()
        .status();
    if status != ServingStatus::Serving {
        bail!("{address} reports {}", status.as_str_name());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};

    #[test]
    fn the_command_line_is_well_formed() {
        crate::cli::Cli::command().debug_assert();
    }

    #[test]
    fn provision_takes_a_password_per_service() {
        let passwords = ["AUTH", "ORDER", "PAYMENT", "SAGA"].map(|service| {
            format!(
                "--{}-db-password=secret-of-{service}",
                service.to_lowercase()
            )
        });
        let cli = crate::cli::Cli::try_parse_from(
            [
                "ordersaga-ops",
                "provision",
                "--admin-database-url=postgres://x",
            ]
            .into_iter()
            .map(str::to_owned)
            .chain(passwords),
        )
        .unwrap();
        let crate::cli::Command::Provision { passwords, .. } = cli.command else {
            panic!("not provision");
        };
        let roles: Vec<(&str, String)> = crate::accounts(&passwords)
            .into_iter()
            .map(|account| (account.role, account.password))
            .collect();
        assert_eq!(
            roles,
            [
                ("auth_service", "secret-of-AUTH".to_owned()),
                ("order_service", "secret-of-ORDER".to_owned()),
                ("payment_service", "secret-of-PAYMENT".to_owned()),
                ("saga_service", "secret-of-SAGA".to_owned()),
            ]
        );
    }
}
