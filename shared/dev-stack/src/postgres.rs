use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use sqlx::Connection as _;

use crate::process::{Spawn, Supervised};
use crate::{Certificates, free_port, tools};

/// A private PostgreSQL cluster in a temporary folder, on a free port of
/// 127.0.0.1, with `trust` authentication. From [`start`](Self::start),
/// durability is switched off (`fsync=off`): it exists for development and
/// tests, never for data. From [`start_durable`](Self::start_durable) it
/// commits as a deployment's server does, for benchmarks.
///
/// Dropping it stops the server and deletes the folder.
#[derive(Debug)]
pub struct PostgresServer {
    port: u16,
    process: Supervised,
    /// The data folder of a server that can be restarted
    /// ([`restart_immediately`](Self::restart_immediately)).
    restartable: Option<PathBuf>,
    /// For a server that speaks TLS only: the URL parameters that verify it
    /// (`sslmode=verify-full&sslrootcert=<CA>`).
    tls_parameters: Option<String>,
}

/// How the server process is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Launch {
    /// `postgres` itself is the supervised program.
    Direct,
    /// A keeper shell runs `postgres` and starts it again whenever it
    /// exits, until the keeper is told to stop: a restart keeps the folder,
    /// which the watchdog removes only when the keeper ends.
    Kept,
}

/// The keeper of [`Launch::Kept`]: runs `"$@"` (postgres and its
/// arguments) again each time it exits, until TERM, which it passes on as
/// INT (PostgreSQL's fast shutdown). (Its stop signal is TERM, not INT: a
/// shell started in the background ignores INT and cannot trap it.)
const KEEPER: &str = r#"
trap 'stopping=1; kill -INT "$pg" 2>/dev/null' TERM
while :; do
    "$@" & pg=$!
    while kill -0 "$pg" 2>/dev/null; do wait "$pg"; done
    [ -n "$stopping" ] && exit 0
    sleep 0.05
done
"#;

/// What a cluster is for: its `initdb` and server settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// Tests and development: nothing is ever synced to disk.
    Throwaway,
    /// Benchmarks: every commit is flushed (`fsync`, `synchronous_commit`),
    /// as on a deployment's server, and `pg_stat_statements` counts what
    /// the clients ran.
    Durable,
}

impl PostgresServer {
    /// Initialises and starts a cluster, returning once it accepts queries.
    ///
    /// PostgreSQL refuses to run as root; when we are root it runs as the
    /// `postgres` system user, which owns the cluster's folder.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Durability::Throwaway).await
    }

    /// Like [`start`](Self::start), with `ssl=on` and the certificate of
    /// `postgres` from `certificates`, accepting TCP connections over TLS
    /// only (`hostssl` in `pg_hba.conf`). [`admin_url`](Self::admin_url)
    /// then verifies the server: `sslmode=verify-full`, `sslrootcert` the CA.
    pub async fn start_tls(certificates: &Certificates) -> anyhow::Result<Self> {
        Self::start_with_launch(Durability::Throwaway, Launch::Direct, Some(certificates)).await
    }

    /// Like [`start`](Self::start), but durable: `initdb` syncs its files,
    /// the server runs with PostgreSQL's defaults for `fsync`,
    /// `synchronous_commit` and `full_page_writes` (all on), and
    /// `pg_stat_statements` is loaded (`track=all`) with its extension
    /// created in the `postgres` database. For benchmarks: what a commit
    /// costs here is what it costs on a real server on the same disk.
    pub async fn start_durable() -> anyhow::Result<Self> {
        let server = Self::start_with(Durability::Durable).await?;
        let mut admin = sqlx::PgConnection::connect(&server.admin_url("postgres")).await?;
        sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&mut admin)
            .await
            .context("creating the pg_stat_statements extension")?;
        admin.close().await?;
        Ok(server)
    }

    /// Like [`start_durable`](Self::start_durable), for fault injection: the
    /// server can be [restarted](Self::restart_immediately) as a crash would
    /// restart it. [`process`](Self::process) is then the keeper that
    /// restarts it, not the postmaster.
    pub async fn start_durable_restartable() -> anyhow::Result<Self> {
        let server = Self::start_with_launch(Durability::Durable, Launch::Kept, None).await?;
        let mut admin = sqlx::PgConnection::connect(&server.admin_url("postgres")).await?;
        sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&mut admin)
            .await
            .context("creating the pg_stat_statements extension")?;
        admin.close().await?;
        Ok(server)
    }

    /// Restarts a server started by
    /// [`start_durable_restartable`](Self::start_durable_restartable) in
    /// immediate mode (`pg_ctl restart -m immediate`): the postmaster gets
    /// SIGQUIT, every session ends at once without a checkpoint, and a new
    /// postmaster on the same port and folder recovers from the WAL before
    /// it accepts connections. Returns once it accepts them again.
    pub async fn restart_immediately(&self) -> anyhow::Result<()> {
        let data = self
            .restartable
            .as_deref()
            .context("this server was not started restartable")?;
        let old = postmaster_pid(data).context("reading postmaster.pid")?;
        let status = Command::new("kill")
            .args(["-s", "QUIT", &old.to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -s QUIT {old} (the postmaster) failed");
        }
        // The keeper starts a new postmaster once the old one has exited;
        // the new one writes its own pid into the lock file.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while postmaster_pid(data).is_none_or(|pid| pid == old) {
            if tokio::time::Instant::now() > deadline {
                bail!("postgres did not start again after an immediate shutdown");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.wait_accepting(deadline).await
    }

    /// Waits until the server accepts connections, without looking at its
    /// process (for a restart, which the keeper runs).
    async fn wait_accepting(&self, deadline: tokio::time::Instant) -> anyhow::Result<()> {
        let url = self.admin_url("postgres");
        loop {
            match sqlx::PgConnection::connect(&url).await {
                Ok(connection) => {
                    connection.close().await?;
                    return Ok(());
                }
                Err(error) if tokio::time::Instant::now() > deadline => {
                    bail!("postgres on port {} did not come back: {error}", self.port);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    async fn start_with(durability: Durability) -> anyhow::Result<Self> {
        Self::start_with_launch(durability, Launch::Direct, None).await
    }

    async fn start_with_launch(
        durability: Durability,
        launch: Launch,
        tls: Option<&Certificates>,
    ) -> anyhow::Result<Self> {
        // The port is free when chosen but could be taken before the server
        // binds it; a server that dies at start is retried on another port.
        let mut attempt = 1;
        loop {
            match Self::start_once(durability, launch, tls).await {
                Ok(server) => return Ok(server),
                Err(error) if attempt < 3 => {
                    tracing::warn!(%error, "postgres did not start; trying another port");
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn start_once(
        durability: Durability,
        launch: Launch,
        tls: Option<&Certificates>,
    ) -> anyhow::Result<Self> {
        let bin = tools::postgres_bin_dir()?;
        let user = server_user()?;
        let folder = tempfile::Builder::new()
            .prefix("ordersaga-pg-")
            .tempdir()?
            .keep();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&folder, Some(uid), Some(gid))?;
        }
        let data = folder.join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb.arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        if durability == Durability::Throwaway {
            initdb.arg("--no-sync");
        }
        if let Some((uid, gid)) = user {
            initdb.uid(uid).gid(gid);
        }
        let output = initdb.output().context("running initdb")?;
        if !output.status.success() {
            let _ = std::fs::remove_dir_all(&folder);
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }

        let port = free_port()?;
        let log = folder.join("postgres.log");
        let postgres = bin.join("postgres");
        let mut args = match durability {
            Durability::Throwaway => server_args(&data, &folder, port),
            Durability::Durable => durable_server_args(&data, &folder, port),
        };
        let tls_parameters = match tls {
            Some(certificates) => {
                args.extend(tls_args(&data, certificates, user)?);
                Some(format!(
                    "sslmode=verify-full&sslrootcert={}",
                    certificates.ca().display()
                ))
            }
            None => None,
        };
        let (program, args, stop_signal) = match launch {
            // INT: fast shutdown, do not wait for clients.
            Launch::Direct => (postgres, args, "INT"),
            Launch::Kept => {
                let mut keeper = vec![
                    "-c".to_owned(),
                    KEEPER.to_owned(),
                    "postgres-keeper".to_owned(),
                    postgres.display().to_string(),
                ];
                keeper.extend(args);
                (PathBuf::from("sh"), keeper, "TERM")
            }
        };
        let process = Supervised::spawn(&Spawn {
            name: "postgres",
            program: &program,
            args,
            env: vec![],
            env_remove: &[],
            stop_signal,
            log: &log,
            user,
            // Removed by the watchdog once the server has stopped.
            scratch: Some(&folder),
        })?;
        let restartable = (launch == Launch::Kept).then(|| data.clone());
        let mut server = Self {
            port,
            process,
            restartable,
            tls_parameters,
        };
        if let Err(error) = server.wait_ready(Duration::from_secs(30)).await {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(error.context(format!("postgres log:\n{log}")));
        }
        Ok(server)
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of the `postgres` superuser on `database` (verifying the
    /// server's certificate, for a server started with TLS).
    pub fn admin_url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}{}",
            self.port,
            self.url_parameters()
        )
    }

    /// What follows the database name in a URL to this server: `?` and the
    /// TLS parameters for a server started with TLS, else nothing.
    pub fn url_parameters(&self) -> String {
        self.tls_parameters
            .as_ref()
            .map(|parameters| format!("?{parameters}"))
            .unwrap_or_default()
    }

    /// The server process, for fault injection (`STOP`, `CONT`, `KILL`).
    pub fn process(&self) -> &Supervised {
        &self.process
    }

    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let url = self.admin_url("postgres");
        let deadline = tokio::time::Instant::now() + timeout;
        let mut backoff = Duration::from_millis(10);
        loop {
            match sqlx::PgConnection::connect(&url).await {
                Ok(connection) => {
                    connection.close().await?;
                    return Ok(());
                }
                Err(error) => {
                    if !self.process.is_running() || tokio::time::Instant::now() > deadline {
                        bail!("postgres on port {} did not come up: {error}", self.port);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
            }
        }
    }
}

impl PostgresServer {
    /// Stops the server and waits for it (dropping it stops it without
    /// waiting); the watchdog removes the folder.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.process.stop(Duration::from_secs(30))?;
        Ok(())
    }
}

fn server_args(data: &Path, socket_dir: &Path, port: u16) -> Vec<String> {
    with_settings(
        data,
        socket_dir,
        port,
        &[
            // Throwaway data: trade durability for speed.
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
            // Room for every test's statements in one run, for the test that
            // keeps what a saga costs within its budget.
            "pg_stat_statements.max=20000",
        ],
    )
}

/// The durable server: PostgreSQL's own defaults for everything that
/// decides what a commit costs, stated, not left to a configuration file,
/// since measuring them is the point.
fn durable_server_args(data: &Path, socket_dir: &Path, port: u16) -> Vec<String> {
    with_settings(
        data,
        socket_dir,
        port,
        &["fsync=on", "synchronous_commit=on", "full_page_writes=on"],
    )
}

/// The server's arguments: what every cluster of ours runs with, then
/// `settings`.
fn with_settings(data: &Path, socket_dir: &Path, port: u16, settings: &[&str]) -> Vec<String> {
    let mut args = vec![
        "-D".to_owned(),
        data.display().to_string(),
        "-p".to_owned(),
        port.to_string(),
        "-k".to_owned(),
        socket_dir.display().to_string(),
    ];
    let common = [
        "listen_addresses=127.0.0.1",
        // Tests and benchmarks run many services with their own pools at
        // once; it does not change what a commit costs.
        "max_connections=400",
        "log_min_messages=warning",
        // Statement counts per database and role, statements inside
        // functions (triggers) included.
        "shared_preload_libraries=pg_stat_statements",
        "pg_stat_statements.track=all",
    ];
    for setting in common.iter().chain(settings) {
        args.push("-c".to_owned());
        args.push((*setting).to_owned());
    }
    args
}

/// The settings that make the server in `data` speak TLS with the
/// certificate of `postgres` (copied into `data`, owned by the server's
/// user, which PostgreSQL insists on for the key), and accept TCP
/// connections over TLS only.
fn tls_args(
    data: &Path,
    certificates: &Certificates,
    user: Option<(u32, u32)>,
) -> anyhow::Result<Vec<String>> {
    let cert = data.join("server.crt");
    let key = data.join("server.key");
    std::fs::copy(certificates.cert("postgres"), &cert)
        .context("copying the server certificate")?;
    std::fs::copy(certificates.key("postgres"), &key).context("copying the server key")?;
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
    )
    .context("writing pg_hba.conf")?;
    for file in [&cert, &key] {
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(file, Some(uid), Some(gid))?;
        }
    }
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok([
        "ssl=on".to_owned(),
        format!("ssl_cert_file={}", cert.display()),
        format!("ssl_key_file={}", key.display()),
    ]
    .into_iter()
    .flat_map(|setting| ["-c".to_owned(), setting])
    .collect())
}

/// The postmaster's pid, from the first line of its lock file in `data`.
fn postmaster_pid(data: &Path) -> Option<u32> {
    let lock = std::fs::read_to_string(data.join("postmaster.pid")).ok()?;
    lock.lines().next()?.trim().parse().ok()
}

/// `Some((uid, gid))` of the `postgres` system user when we are root (the
/// server will not run as root), `None` otherwise.
fn server_user() -> anyhow::Result<Option<(u32, u32)>> {
    let we_are_root = std::fs::metadata("/proc/self")
        .map(|meta| meta.uid() == 0)
        .unwrap_or(false);
    if !we_are_root {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.first() == Some(&"postgres") && fields.len() > 3 {
            return Ok(Some((fields[2].parse()?, fields[3].parse()?)));
        }
    }
    bail!("running as root, and PostgreSQL will not: create a `postgres` system user to run it as")
}
