//! The command line of `ordersaga-ops`, in the library so that
//! `cargo xtask deploy-check` can read the settings each job takes.

use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ordersaga-ops",
    version,
    about = "One-off jobs of an ordersaga deployment"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create (or bring up to date) each service's role and schema.
    Provision {
        /// Administrative URL of the database the services share.
        #[arg(
            long = "admin-database-url",
            env = "ADMIN_DATABASE_URL",
            hide_env_values = true
        )]
        admin_url: String,
        #[command(flatten)]
        passwords: crate::Passwords,
        /// How long to wait for the database to answer.
        #[arg(long, env = "OPS_WAIT", default_value = "120s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// Create every topic and dead-letter topic that does not exist yet.
    CreateTopics {
        /// Bootstrap brokers, comma separated `host:port`.
        #[arg(long = "kafka-brokers", env = "KAFKA_BROKERS")]
        brokers: String,
        /// Prefix of every topic name.
        #[arg(
            long = "kafka-topic-prefix",
            env = "KAFKA_TOPIC_PREFIX",
            default_value = ""
        )]
        prefix: String,
        /// TLS to the brokers, as the services have it.
        #[command(flatten)]
        security: messaging::KafkaSecurity,
        #[command(flatten)]
        layout: crate::TopicLayout,
        /// How long to wait for the brokers to answer.
        #[arg(long, env = "OPS_WAIT", default_value = "120s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// Exit 0 if a service's gRPC health check says SERVING.
    Healthcheck {
        /// `host:port` of the gRPC server.
        #[arg(long, default_value = "127.0.0.1:50051")]
        address: String,
        /// Service to ask about ("" for the whole server).
        #[arg(long, default_value = "")]
        service: String,
        /// The service's own TLS settings (the container's), to call it
        /// over TLS when GRPC_TLS_CA is set.
        #[command(flatten)]
        tls: tls::TlsSettings,
    },
}

impl Cli {
    /// Runs the chosen job.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Provision {
                admin_url,
                passwords,
                wait,
            } => crate::provision(&admin_url, &passwords, wait).await,
            Command::CreateTopics {
                brokers,
                prefix,
                security,
                layout,
                wait,
            } => crate::create_topics(&brokers, &security, &prefix, &layout, wait).await,
            Command::Healthcheck {
                address,
                service,
                tls,
            } => crate::health_check(&address, &service, &tls::Tls::load(&tls)?).await,
        }
    }
}
