use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::process::{Spawn, Supervised};
use crate::{free_port, tools};

/// A private Kafka-protocol broker (`tansu`) on a free port of 127.0.0.1,
/// keeping its data in memory. Dropping it stops the broker.
#[derive(Debug)]
pub struct Broker {
    port: u16,
    tansu: PathBuf,
    folder: PathBuf,
    process: Supervised,
}

impl Broker {
    /// Starts a broker and returns once it accepts connections.
    pub async fn start() -> anyhow::Result<Self> {
        // As with PostgreSQL: a port taken in the meantime means another try.
        let mut attempt = 1;
        loop {
            match Self::start_once().await {
                Ok(broker) => return Ok(broker),
                Err(error) if attempt < 3 => {
                    tracing::warn!(%error, "broker did not start; trying another port");
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn start_once() -> anyhow::Result<Self> {
        let tansu = tools::tansu()?;
        let folder = tempfile::Builder::new()
            .prefix("ordersaga-broker-")
            .tempdir()?
            .keep();
        let port = free_port()?;
        let listener = format!("tcp://127.0.0.1:{port}");
        let process = Supervised::spawn(&Spawn {
            name: "tansu",
            program: &tansu,
            args: vec![
                "broker".into(),
                "--listener-url".into(),
                listener.clone(),
                "--advertised-listener-url".into(),
                listener,
                "--storage-engine".into(),
                "memory://tansu/".into(),
            ],
            env: vec![],
            // tansu would export its own spans to a collector named in the
            // environment; it is infrastructure, not under study.
            env_remove: &["OTEL_EXPORTER_OTLP_ENDPOINT"],
            stop_signal: "TERM",
            log: &folder.join("tansu.log"),
            user: None,
            // Removed by the watchdog once the broker has stopped.
            scratch: Some(&folder),
        })?;
        let mut broker = Self {
            port,
            tansu,
            folder,
            process,
        };
        broker.wait_ready(Duration::from_secs(30)).await?;
        Ok(broker)
    }

    /// Stops the broker and waits for it (dropping it stops it without
    /// waiting).
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.process.stop(Duration::from_secs(30))?;
        Ok(())
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker process, for fault injection (`STOP`, `CONT`, `KILL`).
    pub fn process(&self) -> &Supervised {
        &self.process
    }

    /// Creates topics (each with `partitions` partitions); existing ones are
    /// left as they are.
    pub fn create_topics(&self, names: &[String], partitions: u32) -> anyhow::Result<()> {
        create_topics_with(&self.tansu, &self.bootstrap_servers(), names, partitions)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut backoff = Duration::from_millis(10);
        loop {
            match tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await {
                Ok(_) => return Ok(()),
                Err(error) => {
                    if !self.process.is_running() || tokio::time::Instant::now() > deadline {
                        let log = std::fs::read_to_string(self.folder.join("tansu.log"))
                            .unwrap_or_default();
                        bail!(
                            "broker on port {} did not come up: {error}\n{log}",
                            self.port
                        );
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
            }
        }
    }
}

/// Creates topics on a Kafka-protocol broker (existing ones are left as
/// they are), with `tansu topic create`. (Deployments use `ordersaga-ops
/// create-topics`, which speaks the Kafka admin API to any broker.)
pub(crate) fn create_topics_with(
    tansu: &std::path::Path,
    bootstrap_servers: &str,
    names: &[String],
    partitions: u32,
) -> anyhow::Result<()> {
    for name in names {
        let output = Command::new(tansu)
            .args(["topic", "create", "--broker"])
            .arg(format!("tcp://{bootstrap_servers}"))
            .args(["--partitions", &partitions.to_string()])
            .arg(name)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .output()
            .context("running tansu topic create")?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() && !stderr.contains("already exists") {
            bail!("creating topic {name} failed: {}", stderr.trim());
        }
    }
    Ok(())
}
