//! `cargo xtask up` and `cargo xtask down`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use database::ServiceAccount;
use dev_stack::{Broker, Certificates, PostgresServer, ServiceProcess, ServingStatus, tools};
use messaging::Topics;
use registry::SERVICES;
use service_runtime::Manifest;

use crate::install;

#[derive(Debug, clap::Args)]
pub(crate) struct UpArgs {
    /// Return once everything is SERVING and leave it running; stop it with
    /// `cargo xtask down`.
    #[arg(long)]
    detach: bool,
    /// Build and run the services with the release profile.
    #[arg(long)]
    release: bool,
    /// Every connection over TLS: a local CA (in `target/dev-stack/tls`)
    /// and a certificate per service, gRPC with client certificates
    /// required, PostgreSQL with `sslmode=verify-full`.
    #[arg(long)]
    tls: bool,
    /// Internal: the detached supervisor process.
    #[arg(long, hide = true)]
    supervise: bool,
}

const DATABASE_NAME: &str = "ordersaga";

/// The local stack's operator account, printed at start.
const ADMIN_EMAIL: &str = "admin@ordersaga.local";
const ADMIN_PASSWORD: &str = "ordersaga-admin-password";
/// Seals the local stack's signing keys: public like the admin password,
/// and fixed, so the stack's database opens again on the next `up`.
const KEY_ENCRYPTION_KEY: &str = "b3JkZXJzYWdhLWxvY2FsLW9ubHkta2VrLXB1YmxpYyE=";

/// The local stack's client secret of a service that is a client of the
/// auth service.
fn client_secret(service: &Manifest) -> String {
    format!("local-{}-secret", service.name)
}

fn state_dir() -> PathBuf {
    tools::tools_dir()
        .parent()
        .expect("tools live in the target folder")
        .join("dev-stack")
}

fn supervisor_pid_file() -> PathBuf {
    state_dir().join("supervisor.pid")
}

fn ready_file() -> PathBuf {
    state_dir().join("ready.txt")
}

pub(crate) async fn up(args: UpArgs) -> anyhow::Result<()> {
    if args.detach {
        return detach(&args);
    }
    let stack = LocalStack::start(args.release, args.tls).await?;
    let summary = stack.summary();
    println!("{summary}");
    if args.supervise {
        std::fs::write(ready_file(), &summary)?;
    } else {
        println!("Press Ctrl-C to stop everything.");
    }
    stack.run_until_signal().await
}

/// Starts `up --supervise` in a session of its own and waits for it to be
/// ready (or to fail).
fn detach(args: &UpArgs) -> anyhow::Result<()> {
    if let Some(pid) = running_supervisor() {
        bail!("a stack is already running (supervisor pid {pid}); `cargo xtask down` stops it");
    }
    std::fs::create_dir_all(state_dir())?;
    let _ = std::fs::remove_file(ready_file());
    let log_path = state_dir().join("supervisor.log");
    let log = std::fs::File::create(&log_path)?;
    let mut command = Command::new("setsid");
    command
        .arg(std::env::current_exe()?)
        .args(["up", "--supervise"]);
    if args.release {
        command.arg("--release");
    }
    if args.tls {
        command.arg("--tls");
    }
    let mut supervisor = command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the supervisor (needs `setsid`, from util-linux)")?;
    std::fs::write(supervisor_pid_file(), supervisor.id().to_string())?;
    loop {
        if let Ok(summary) = std::fs::read_to_string(ready_file()) {
            println!("{summary}");
            println!(
                "Running in the background; `cargo xtask down` stops it. Supervisor log: {}",
                log_path.display()
            );
            return Ok(());
        }
        if let Some(status) = supervisor.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!("the stack did not come up ({status}):\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) async fn down() -> anyhow::Result<()> {
    let Some(pid) = running_supervisor() else {
        println!("no stack is running");
        return Ok(());
    };
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while is_alive(pid) {
        if tokio::time::Instant::now() > deadline {
            bail!("the supervisor (pid {pid}) did not stop within a minute");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_file(supervisor_pid_file());
    println!("stopped");
    Ok(())
}

fn running_supervisor() -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(supervisor_pid_file())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    is_alive(pid).then_some(pid)
}

fn is_alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; only a live process has a cwd.
    std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok()
}

/// Everything `up` started. Dropping it stops everything.
struct LocalStack {
    // Fields drop in order: services first, then their infrastructure.
    services: Vec<ServiceProcess>,
    database_url: String,
    brokers: String,
    logs: PathBuf,
    /// The local CA and its certificates, when every connection is TLS.
    certificates: Option<Certificates>,
    broker: Option<Broker>,
    postgres: Option<PostgresServer>,
}

/// The names `up --tls` makes certificates for, beside the services:
/// PostgreSQL's, the broker's, and one for grpcurl (or any client) to
/// present.
const TLS_NAMES: [&str; 3] = [
    "postgres",
    dev_stack::certs::BROKER,
    dev_stack::certs::CLIENT,
];

fn tls_dir() -> PathBuf {
    state_dir().join("tls")
}

/// A new local CA, with a certificate for each service and each of
/// [`TLS_NAMES`], in [`tls_dir`].
fn local_certificates() -> anyhow::Result<Certificates> {
    let names: Vec<&str> = SERVICES
        .iter()
        .map(|service| service.name)
        .chain(TLS_NAMES)
        .collect();
    Certificates::generate_in(&tls_dir(), "ordersaga local CA", &names)
}

/// `cargo xtask certs`: the CA and certificates of `up --tls`, without
/// starting anything, for `docker-compose.tls.yml` to mount.
pub(crate) fn certs() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let certificates = local_certificates()?;
    // The containers run as an unprivileged user of the image, which reads
    // its key through the bind mount: these keys of a local-only CA are
    // made readable to it (PostgreSQL's container copies its own key to
    // a private file before it starts).
    for name in SERVICES.iter().map(|service| service.name).chain(TLS_NAMES) {
        std::fs::set_permissions(
            certificates.key(name),
            std::fs::Permissions::from_mode(0o644),
        )?;
    }
    // Apache Kafka reads its key and certificate from one PEM file
    // (`ssl.keystore.type=PEM`), the key first: docker-compose.tls.yml.
    let broker = dev_stack::certs::BROKER;
    let keystore = certificates.dir().join(format!("{broker}-keystore.pem"));
    std::fs::write(
        &keystore,
        std::fs::read_to_string(certificates.key(broker))?
            + &std::fs::read_to_string(certificates.cert(broker))?,
    )
    .with_context(|| format!("writing {}", keystore.display()))?;
    std::fs::set_permissions(&keystore, std::fs::Permissions::from_mode(0o644))?;
    std::fs::set_permissions(certificates.dir(), std::fs::Permissions::from_mode(0o755))?;
    println!(
        "a local CA ({}) and certificates for {} in {}",
        certificates.ca().display(),
        SERVICES
            .iter()
            .map(|service| service.name)
            .chain(TLS_NAMES)
            .collect::<Vec<_>>()
            .join(", "),
        certificates.dir().display()
    );
    Ok(())
}

impl LocalStack {
    async fn start(release: bool, tls: bool) -> anyhow::Result<Self> {
        eprintln!("checking tools");
        install::ensure_tools()?;
        eprintln!("building the services");
        build_services(release)?;
        let certificates = if tls {
            eprintln!(
                "making a local CA and certificates in {}",
                tls_dir().display()
            );
            Some(local_certificates()?)
        } else {
            None
        };

        let (postgres, admin_url) = match std::env::var("DATABASE_URL") {
            Ok(url) => (None, url),
            Err(_) => {
                eprintln!("starting PostgreSQL");
                let postgres = match &certificates {
                    Some(certificates) => PostgresServer::start_tls(certificates).await?,
                    None => PostgresServer::start().await?,
                };
                let admin = postgres.admin_url("postgres");
                create_database(&admin, DATABASE_NAME).await?;
                let url = postgres.admin_url(DATABASE_NAME);
                (Some(postgres), url)
            }
        };
        let (broker, brokers) = match std::env::var("KAFKA_BROKERS") {
            Ok(brokers) => (None, brokers),
            Err(_) => {
                eprintln!("starting the broker");
                let broker = match &certificates {
                    Some(certificates) => Broker::start_tls(certificates).await?,
                    None => Broker::start().await?,
                };
                let brokers = broker.bootstrap_servers();
                (Some(broker), brokers)
            }
        };
        // How the topics job and the services reach the broker: ours over
        // TLS with the local CA, each with a certificate of its own; one of
        // the user's as the environment says (the services inherit it).
        let security = match broker.as_ref().and_then(Broker::tls) {
            Some(tls) => messaging::KafkaSecurity::tls(&tls.ca)
                .with_client_certificate(&tls.certificate, &tls.key),
            None => messaging::KafkaSecurity::from_env()?,
        };
        // The same job a deployment runs (docker-compose.yml, k8s/).
        let topics = Topics::new(std::env::var("KAFKA_TOPIC_PREFIX").unwrap_or_default());
        let layout = ops::TopicLayout {
            partitions: 3,
            replication_factor: 1,
        };
        ops::create_topics(
            &brokers,
            &security,
            topics.prefix(),
            &layout,
            Duration::from_secs(30),
        )
        .await?;

        let logs = state_dir().join("logs");
        std::fs::create_dir_all(&logs)?;
        let admin = sqlx::PgPool::connect(&admin_url)
            .await
            .context("connecting to PostgreSQL")?;
        let target = target_dir(release);
        let mut services = Vec::new();
        for service in SERVICES {
            let account = service.account(format!("{}-dev-password", service.name));
            database::provision(&admin, &account).await?;
            let scheme = if certificates.is_some() {
                "https"
            } else {
                "http"
            };
            let mut env = service_env(
                service,
                &url_for(&admin_url, &account)?,
                &brokers,
                topics.prefix(),
                scheme,
            );
            if let Some(certificates) = &certificates {
                env.extend(certificates.grpc_env(service.name));
                env.push(("GRPC_TLS_CLIENT_AUTH".to_owned(), "true".to_owned()));
            }
            // Our broker over TLS: each service presents its own certificate.
            if broker.as_ref().and_then(Broker::tls).is_some()
                && let Some(certificates) = &certificates
            {
                env.extend(certificates.kafka_client(service.name).env());
            }

            eprintln!("starting {}", service.name);
            let log = logs.join(format!("{}.log", service.name));
            let process = ServiceProcess::start_logging_to(
                service.name,
                &target.join(service.name),
                env,
                &log,
            )
            .await?;
            services.push(process);
        }
        admin.close().await;
        for process in &mut services {
            process
                .wait_for_health("", ServingStatus::Serving, Duration::from_secs(60))
                .await?;
        }
        Ok(Self {
            services,
            database_url: admin_url,
            brokers,
            logs,
            certificates,
            broker,
            postgres,
        })
    }

    fn summary(&self) -> String {
        let grpcurl = tools::grpcurl()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "grpcurl".into());
        let mut text = String::from("\nordersaga is up and SERVING:\n");
        for (service, process) in SERVICES.iter().zip(&self.services) {
            text.push_str(&format!(
                "  {:<18} localhost:{}\n",
                service.name,
                process.address().port()
            ));
        }
        text.push_str(&format!("  {:<18} {}\n", "PostgreSQL", self.database_url));
        text.push_str(&format!("  {:<18} {}\n", "Kafka broker", self.brokers));
        text.push_str(&format!(
            "  {:<18} http://localhost:{}/\n",
            "saga dashboard",
            saga_orchestrator::MANIFEST.http_port()
        ));
        let metrics: Vec<String> = SERVICES
            .iter()
            .map(|service| format!("http://localhost:{}/metrics", service.http_port()))
            .collect();
        text.push_str(&format!("  {:<18} {}\n", "metrics", metrics.join(" ")));
        text.push_str(&format!("  {:<18} {}\n", "logs", self.logs.display()));
        text.push_str(&format!(
            "  {:<18} {ADMIN_EMAIL} / {ADMIN_PASSWORD}\n",
            "admin login"
        ));
        let plaintext = match &self.certificates {
            Some(certificates) => {
                text.push_str(&format!(
                    "  {:<18} {} (CA: ca.pem; client certificates required, by the broker too)\n",
                    "TLS",
                    certificates.dir().display()
                ));
                format!(
                    "-cacert {} -cert {} -key {}",
                    certificates.ca().display(),
                    certificates.cert("client").display(),
                    certificates.key("client").display()
                )
            }
            None => "-plaintext".to_owned(),
        };
        text.push_str(if self.certificates.is_some() {
            "\n  WARNING: this admin password is public (it is in the source), and so\n  \
             is the local CA's key: this stack is for local use only. A deployment\n  \
             sets AUTH_ADMIN_PASSWORD and AUTH_KEY_ENCRYPTION_KEY itself, and its\n  \
             certificates come from its own CA (see k8s/ and docker-compose.tls.yml).\n"
        } else {
            "\n  WARNING: this admin password is public (it is in the source) and every\n  \
             port is plaintext: this stack is for local use only. A deployment sets\n  \
             AUTH_ADMIN_PASSWORD and AUTH_KEY_ENCRYPTION_KEY itself (see k8s/ and\n  \
             docker-compose.yml).\n"
        });

        text.push_str("\nTry (grpcurl was fetched for you):\n");
        for service in SERVICES {
            text.push_str(&format!(
                "  {grpcurl} {plaintext} localhost:{} list\n",
                service.grpc_port
            ));
        }
        text.push_str(&format!(
            "  {grpcurl} {plaintext} localhost:{} grpc.health.v1.Health/Check\n",
            order_service::MANIFEST.grpc_port
        ));
        text
    }

    /// Runs until SIGINT or SIGTERM, or until a service dies, then stops
    /// everything (services first).
    async fn run_until_signal(mut self) -> anyhow::Result<()> {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut check = tokio::time::interval(Duration::from_secs(1));
        let died = loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break None,
                _ = terminate.recv() => break None,
                _ = check.tick() => {
                    if let Some(index) = self.services.iter_mut().position(|s| !s.process().is_running()) {
                        break Some(SERVICES[index].name);
                    }
                }
            }
        };
        eprintln!("stopping");
        for process in self.services.iter_mut().rev() {
            let _ = process.stop(Duration::from_secs(30)).await;
        }
        if let Some(broker) = self.broker.take() {
            broker.stop()?;
        }
        if let Some(postgres) = self.postgres.take() {
            postgres.stop()?;
        }
        let _ = std::fs::remove_file(ready_file());
        match died {
            Some(name) => bail!("{name} exited unexpectedly; see {}", self.logs.display()),
            None => Ok(()),
        }
    }
}

/// The environment of `service` on the local stack: its database and the
/// broker, its default port, and what is particular to it: who the admin
/// is, how services find and authenticate to each other.
fn service_env(
    service: &Manifest,
    database_url: &str,
    brokers: &str,
    topic_prefix: &str,
    scheme: &str,
) -> Vec<(String, String)> {
    let mut env: Vec<(&'static str, String)> = vec![
        ("DATABASE_URL", database_url.to_owned()),
        ("KAFKA_BROKERS", brokers.to_owned()),
        ("KAFKA_TOPIC_PREFIX", topic_prefix.to_owned()),
        ("GRPC_ADDR", format!("0.0.0.0:{}", service.grpc_port)),
        ("LOG_FORMAT", "pretty".to_owned()),
    ];
    if service.name == auth_service::NAME {
        let clients: Vec<String> = registry::service_clients()
            .map(|client| {
                auth_service::ServiceClients::entry(
                    client.name,
                    &client_secret(client),
                    client.scopes.iter().copied(),
                )
            })
            .collect();
        env.extend([
            ("AUTH_ADMIN_EMAIL", ADMIN_EMAIL.to_owned()),
            ("AUTH_ADMIN_PASSWORD", ADMIN_PASSWORD.to_owned()),
            ("AUTH_KEY_ENCRYPTION_KEY", KEY_ENCRYPTION_KEY.to_owned()),
            ("AUTH_SERVICE_CLIENTS", clients.join(",")),
        ]);
    }
    for peer in service.peers {
        let port = registry::service(peer.service).map_or(0, |callee| callee.grpc_port);
        env.push((peer.url_env, format!("{scheme}://127.0.0.1:{port}")));
    }
    if service.is_service_client() {
        env.push(("SERVICE_CLIENT_ID", service.name.to_owned()));
        env.push(("SERVICE_CLIENT_SECRET", client_secret(service)));
    }
    env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

fn build_services(release: bool) -> anyhow::Result<()> {
    let mut command = tools::cargo();
    command.args(["build", "--quiet"]);
    for service in SERVICES {
        command.args(["--bin", service.name]);
    }
    if release {
        command.arg("--release");
    }
    let status = command
        .current_dir(tools::workspace_root())
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building the services failed");
    }
    Ok(())
}

fn target_dir(release: bool) -> PathBuf {
    let target = tools::tools_dir()
        .parent()
        .expect("tools live in the target folder")
        .to_owned();
    target.join(if release { "release" } else { "debug" })
}

async fn create_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect(admin_url).await?;
    let exists: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(&pool)
        .await?;
    if exists.is_none() {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await?;
    }
    pool.close().await;
    Ok(())
}

/// The administrative URL with the service role's credentials instead.
fn url_for(admin_url: &str, account: &ServiceAccount) -> anyhow::Result<String> {
    let mut url = url::Url::parse(admin_url).context("DATABASE_URL is not a URL")?;
    url.set_username(account.role)
        .map_err(|()| anyhow::anyhow!("cannot set the user of {admin_url}"))?;
    url.set_password(Some(&account.password))
        .map_err(|()| anyhow::anyhow!("cannot set the password"))?;
    Ok(url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::settings::{Container, check_env};

    #[test]
    fn each_service_gets_what_it_cannot_start_without_and_nothing_it_does_not_read() {
        for service in SERVICES {
            let env = service_env(
                service,
                "postgres://x@localhost/db",
                "localhost:9092",
                "",
                "http",
            );
            let problems = check_env(&Container {
                place: service.name.to_owned(),
                command: vec![service.name.to_owned()],
                env: env.into_iter().map(|(key, _)| key).collect(),
            });
            assert_eq!(problems, Vec::<String>::new());
        }
    }

    #[test]
    fn every_service_client_is_registered_with_auth_under_its_secret() {
        let auth = service_env(&auth_service::MANIFEST, "", "", "", "http");
        let (_, clients) = auth
            .iter()
            .find(|(key, _)| key == "AUTH_SERVICE_CLIENTS")
            .expect("auth is told its clients");
        let clients = auth_service::ServiceClients::parse(clients).expect("a valid list");
        for client in registry::service_clients() {
            let env = service_env(client, "", "", "", "http");
            let value = |key: &str| {
                env.iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            let granted = clients
                .authenticate(&value("SERVICE_CLIENT_ID"), &value("SERVICE_CLIENT_SECRET"))
                .unwrap_or_else(|| panic!("{} cannot authenticate", client.name));
            let mut granted: Vec<_> = granted.iter().collect();
            let mut asked = client.scopes.to_vec();
            granted.sort();
            asked.sort();
            assert_eq!(granted, asked, "{}", client.name);
        }
    }
}
