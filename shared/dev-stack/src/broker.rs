use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::certs::{BROKER, CLIENT, KafkaTls};
use crate::process::{Spawn, Supervised};
use crate::tls_front::TlsFront;
use crate::{Certificates, free_port, tools};

/// A private Kafka-protocol broker (`tansu`) on a free port of 127.0.0.1,
/// keeping its data in memory, in cleartext or over TLS. Dropping it stops
/// the broker.
#[derive(Debug)]
pub struct Broker {
    /// Where clients connect: the broker itself, or its TLS listener.
    port: u16,
    /// The broker's own cleartext port, for `tansu topic create` (which
    /// speaks no TLS); the same as `port` without TLS.
    admin_port: u16,
    tansu: PathBuf,
    folder: PathBuf,
    /// What clients trust and present, over TLS.
    tls: Option<KafkaTls>,
    // Dropped before the process: connections close, then the broker stops.
    front: Option<TlsFront>,
    process: Supervised,
}

impl Broker {
    /// Starts a broker and returns once it accepts connections.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_retrying(None).await
    }

    /// Starts a broker that clients reach over TLS only, with
    /// `certificates`' certificate [`BROKER`] (`kafka`: it names
    /// `localhost` and `127.0.0.1`), and that requires each client to
    /// present a certificate from the same CA. [`tls`](Self::tls) is what
    /// the tests' own clients use (the [`CLIENT`] certificate). The
    /// broker's own cleartext port listens on 127.0.0.1 only, for topic
    /// administration; see `tls_front` for why TLS is not tansu's own.
    pub async fn start_tls(certificates: &Certificates) -> anyhow::Result<Self> {
        Self::start_retrying(Some(certificates)).await
    }

    async fn start_retrying(certificates: Option<&Certificates>) -> anyhow::Result<Self> {
        // As with PostgreSQL: a port taken in the meantime means another try.
        let mut attempt = 1;
        loop {
            match Self::start_once(certificates).await {
                Ok(broker) => return Ok(broker),
                Err(error) if attempt < 3 => {
                    tracing::warn!(%error, "broker did not start; trying another port");
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn start_once(certificates: Option<&Certificates>) -> anyhow::Result<Self> {
        let tansu = tools::tansu()?;
        let folder = tempfile::Builder::new()
            .prefix("ordersaga-broker-")
            .tempdir()?
            .keep();
        let admin_port = free_port()?;
        // Over TLS the address clients reach (and the broker advertises)
        // is the TLS listener's, bound now so that no one takes it.
        let front_listener = match certificates {
            Some(_) => Some(std::net::TcpListener::bind("127.0.0.1:0")?),
            None => None,
        };
        let port = match &front_listener {
            Some(listener) => listener.local_addr()?.port(),
            None => admin_port,
        };
        let listener = format!("tcp://127.0.0.1:{admin_port}");
        let advertised = format!("tcp://127.0.0.1:{port}");
        let process = Supervised::spawn(&Spawn {
            name: "tansu",
            program: &tansu,
            args: vec![
                "broker".into(),
                "--listener-url".into(),
                listener.clone(),
                "--advertised-listener-url".into(),
                advertised,
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
            admin_port,
            tansu,
            folder,
            tls: None,
            front: None,
            process,
        };
        broker.wait_ready(Duration::from_secs(30)).await?;
        if let (Some(certificates), Some(listener)) = (certificates, front_listener) {
            let target = std::net::SocketAddr::from(([127, 0, 0, 1], admin_port));
            broker.front = Some(TlsFront::start(listener, target, certificates, BROKER)?);
            broker.tls = Some(certificates.kafka_client(CLIENT));
        }
        Ok(broker)
    }

    /// Stops the broker and waits for it (dropping it stops it without
    /// waiting).
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.process.stop(Duration::from_secs(30))?;
        Ok(())
    }

    /// `host:port` for `bootstrap.servers` (the TLS listener over TLS).
    pub fn bootstrap_servers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's cleartext `host:port` on 127.0.0.1, which `tansu
    /// topic create` uses (the same as `bootstrap_servers` without TLS).
    pub fn admin_servers(&self) -> String {
        format!("127.0.0.1:{}", self.admin_port)
    }

    /// How clients reach the broker over TLS, if it speaks TLS: the CA,
    /// and the certificate the tests' own clients present.
    pub fn tls(&self) -> Option<&KafkaTls> {
        self.tls.as_ref()
    }

    /// The broker process, for fault injection (`STOP`, `CONT`, `KILL`).
    pub fn process(&self) -> &Supervised {
        &self.process
    }

    /// Creates topics (each with `partitions` partitions); existing ones are
    /// left as they are.
    pub fn create_topics(&self, names: &[String], partitions: u32) -> anyhow::Result<()> {
        create_topics_with(&self.tansu, &self.admin_servers(), names, partitions)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut backoff = Duration::from_millis(10);
        loop {
            match tokio::net::TcpStream::connect(("127.0.0.1", self.admin_port)).await {
                Ok(_) => return Ok(()),
                Err(error) => {
                    if !self.process.is_running() || tokio::time::Instant::now() > deadline {
                        let log = std::fs::read_to_string(self.folder.join("tansu.log"))
                            .unwrap_or_default();
                        bail!(
                            "broker on port {} did not come up: {error}\n{log}",
                            self.admin_port
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
