use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::process::{Spawn, Supervised};

/// One of our service binaries, running as a child process.
///
/// It listens on a port the kernel picks (`GRPC_ADDR=127.0.0.1:0`); the
/// address is read from the service's own "listening" log line. Started
/// with TLS settings (`GRPC_TLS_*`), it is called over TLS as itself: with
/// its CA and its own certificate, like `ordersaga-ops healthcheck` in its
/// container.
#[derive(Debug)]
pub struct ServiceProcess {
    name: String,
    process: Supervised,
    address: SocketAddr,
    tls: tls::Tls,
    log: PathBuf,
    _folder: tempfile::TempDir,
}

impl ServiceProcess {
    /// Starts `binary` with `env` (plus JSON logs and a free port) and
    /// returns once it listens. It may not be SERVING yet: see
    /// [`wait_for_health`](Self::wait_for_health).
    pub async fn start(
        name: &str,
        binary: &Path,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<Self> {
        let folder = tempfile::Builder::new()
            .prefix(&format!("ordersaga-{name}-"))
            .tempdir()?;
        let log = folder.path().join(format!("{name}.log"));
        Self::start_with_log(name, binary, env, &log, folder).await
    }

    /// Like [`start`](Self::start), logging to `log` (kept after the process
    /// stops).
    pub async fn start_logging_to(
        name: &str,
        binary: &Path,
        env: Vec<(String, String)>,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let folder = tempfile::Builder::new()
            .prefix(&format!("ordersaga-{name}-"))
            .tempdir()?;
        Self::start_with_log(name, binary, env, log, folder).await
    }

    async fn start_with_log(
        name: &str,
        binary: &Path,
        mut env: Vec<(String, String)>,
        log: &Path,
        folder: tempfile::TempDir,
    ) -> anyhow::Result<Self> {
        let tls = tls_of(&env).with_context(|| format!("the TLS settings of {name}"))?;
        // A fixed address is used as given; otherwise the kernel picks a port
        // and the service's JSON "listening" line tells which.
        let fixed: Option<SocketAddr> = env
            .iter()
            .find(|(k, _)| k == "GRPC_ADDR")
            .and_then(|(_, v)| v.parse().ok())
            .filter(|address: &SocketAddr| address.port() != 0);
        if fixed.is_none() {
            env.retain(|(k, _)| k != "GRPC_ADDR" && k != "LOG_FORMAT");
            env.push(("GRPC_ADDR".into(), "127.0.0.1:0".into()));
            env.push(("LOG_FORMAT".into(), "json".into()));
        }
        let mut process = Supervised::spawn(&Spawn {
            name,
            program: binary,
            args: vec![],
            env,
            env_remove: &["OTEL_EXPORTER_OTLP_ENDPOINT"],
            stop_signal: "TERM",
            log,
            user: None,
            scratch: None,
        })?;
        let address = match fixed {
            // Reach a wildcard listener through loopback.
            Some(address) if address.ip().is_unspecified() => {
                SocketAddr::from(([127, 0, 0, 1], address.port()))
            }
            Some(address) => address,
            None => wait_for_listening(&mut process, log, Duration::from_secs(60))
                .await
                .with_context(|| format!("{name} did not start; its log:\n{}", read(log)))?,
        };
        Ok(Self {
            name: name.to_owned(),
            process,
            address,
            tls,
            log: log.to_owned(),
            _folder: folder,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://127.0.0.1:<port>` for gRPC clients, `https://` when the
    /// service was started with TLS settings.
    pub fn url(&self) -> String {
        format!("{}://{}", self.tls.scheme(), self.address)
    }

    /// How to call the service: over TLS as the service itself (its CA and
    /// certificate) if it was started with TLS settings, else cleartext.
    pub fn tls(&self) -> &tls::Tls {
        &self.tls
    }

    /// The process, for signals (`KILL` to crash it).
    pub fn process(&mut self) -> &mut Supervised {
        &mut self.process
    }

    /// Where the service's HTTP server (metrics, dashboard) listens, from
    /// its "HTTP server listening" log line (JSON logs only).
    pub fn http_address(&self) -> Option<SocketAddr> {
        self.logs().lines().find_map(|line| {
            let entry = serde_json::from_str::<serde_json::Value>(line).ok()?;
            (entry["message"] == "HTTP server listening")
                .then(|| entry["address"].as_str()?.parse().ok())?
        })
    }

    /// Everything the service has logged so far.
    pub fn logs(&self) -> String {
        read(&self.log)
    }

    /// The health status of `service` ("" for the whole server).
    pub async fn health(&self, service: &str) -> anyhow::Result<ServingStatus> {
        let channel = self
            .tls
            .endpoint(&self.url())?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(2))
            .connect()
            .await?;
        let mut client = HealthClient::new(channel);
        let response = client
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await?;
        Ok(response.into_inner().status())
    }

    /// Waits until the health of `service` is `status`.
    pub async fn wait_for_health(
        &mut self,
        service: &str,
        status: ServingStatus,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = None;
        while tokio::time::Instant::now() < deadline {
            if !self.process.is_running() {
                bail!("{} exited; its log:\n{}", self.name, self.logs());
            }
            match self.health(service).await {
                Ok(current) if current == status => return Ok(()),
                other => last = Some(format!("{other:?}")),
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!(
            "{} health of {service:?} was not {status:?} within {timeout:?} (last: {last:?})",
            self.name
        )
    }

    /// Waits until the service has logged `text`, and returns the log.
    pub async fn wait_for_log(&mut self, text: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let logs = self.logs();
            if logs.contains(text) {
                return Ok(logs);
            }
            if !self.process.is_running() {
                bail!(
                    "{} exited before logging {text:?}; its log:\n{logs}",
                    self.name
                );
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{} did not log {text:?} within {timeout:?}; its log:\n{logs}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Sends SIGTERM and waits for the exit code (`None` if it had to be
    /// killed after `grace`).
    pub async fn stop(&mut self, grace: Duration) -> anyhow::Result<Option<i32>> {
        self.process.stop_async(grace).await
    }
}

impl Drop for ServiceProcess {
    /// A failing test shows what the service logged: usually the reason.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- log of {} -----\n{}----- end of {} log -----",
                self.name,
                self.logs(),
                self.name
            );
        }
    }
}

/// Reads the log until the "listening" line appears, and parses its address.
async fn wait_for_listening(
    process: &mut Supervised,
    log: &Path,
    timeout: Duration,
) -> anyhow::Result<SocketAddr> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        for line in read(log).lines() {
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if entry["message"] == "gRPC server listening"
                && let Some(address) = entry["address"].as_str()
            {
                return address.parse().context("listening address");
            }
        }
        if !process.is_running() {
            bail!("exited before listening");
        }
        if tokio::time::Instant::now() > deadline {
            bail!("not listening after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The client TLS a service started with `env` is called with: its own
/// certificate and CA, from its `GRPC_TLS_*` settings.
fn tls_of(env: &[(String, String)]) -> anyhow::Result<tls::Tls> {
    let path = |key: &str| {
        env.iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, value)| PathBuf::from(value))
    };
    tls::Tls::load(&tls::TlsSettings {
        cert: path("GRPC_TLS_CERT"),
        key: path("GRPC_TLS_KEY"),
        ca: path("GRPC_TLS_CA"),
        client_auth: false,
    })
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
