//! The system a chaos run breaks: one auth service, two order services,
//! two payment services and three orchestrators on a durable PostgreSQL
//! and a broker of their own, with a fault proxy on every connection the
//! run may cut or slow: each replica's to PostgreSQL, each orchestrator's
//! to the order and payment replicas it calls, and the load client's to
//! each order replica.
//!
//! The broker's connections have no proxy: a Kafka client learns the
//! broker's address from the broker itself and connects there, so a proxy
//! would only see the first connection. Pausing the broker (SIGSTOP) is
//! how the run takes it away.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use dev_stack::{Broker, FaultProxy, PostgresServer, ServiceProcess, ServingStatus, TestEnv};
use e2e::BINARIES;
use messaging::Topics;
use testkit::{Binary, Scenario};
use tokio::sync::Mutex;

/// The replicas of each service, in start order.
const REPLICAS: [(&str, usize); 4] = [
    (auth_service::NAME, 1),
    (order_service::NAME, 2),
    (payment_service::NAME, 2),
    (saga_orchestrator::NAME, 3),
];

/// Settings that make faults show quickly: a dead orchestrator's sagas
/// are taken over after 3 s (a replica stopped for longer is fenced off),
/// an attempt gives up after 2 s, and `tok_slow` answers after 3 s, later
/// than the saga waits. A large order waits at most 5 s for its review,
/// so that the load's late decisions race the timeout.
const TUNING: [(&str, &str, &str); 6] = [
    (saga_orchestrator::NAME, "SAGA_LEASE", "3s"),
    (saga_orchestrator::NAME, "SAGA_ATTEMPT_TIMEOUT", "2s"),
    (saga_orchestrator::NAME, "SAGA_RETRY_BACKOFF", "50ms"),
    (saga_orchestrator::NAME, "REVIEW_TIMEOUT", "5s"),
    (saga_orchestrator::NAME, "REVIEW_THRESHOLD", "100000"),
    (payment_service::NAME, "PROVIDER_SLOW_DELAY", "3s"),
];

/// `REVIEW_THRESHOLD` above: the load makes orders of at least this much
/// to have them reviewed.
pub(crate) const REVIEW_THRESHOLD_MINOR: i64 = 100_000;

/// What a fault can be aimed at: the replicas and links, by name. The
/// schedule picks among them by index, so it depends only on these lists.
#[derive(Debug, Clone)]
pub(crate) struct Topology {
    pub(crate) replicas: Vec<String>,
    /// (name, whether it carries gRPC and can lose answers).
    pub(crate) links: Vec<(String, bool)>,
}

impl Topology {
    pub(crate) fn new() -> Self {
        let mut replicas = Vec::new();
        let mut links = Vec::new();
        for (service, count) in REPLICAS {
            for n in 1..=count {
                let name = replica_name(service, n, count);
                links.push((format!("{name} → PostgreSQL"), false));
                if service == saga_orchestrator::NAME {
                    let (order, payment) = peers_of(n);
                    links.push((format!("{name} → order-{order}"), true));
                    links.push((format!("{name} → payment-{payment}"), true));
                }
                replicas.push(name);
            }
        }
        for n in 1..=2 {
            links.push((format!("load client → order-{n}"), true));
        }
        Self { replicas, links }
    }
}

fn replica_name(service: &str, n: usize, count: usize) -> String {
    if count == 1 {
        service.to_owned()
    } else {
        format!("{service}-{n}")
    }
}

/// The order and payment replicas (1-based) orchestrator `n` calls: each
/// its own pair, so that a fault on one replica stalls some orchestrators
/// and not others.
fn peers_of(n: usize) -> (usize, usize) {
    (1 + (n - 1) % 2, 1 + n % 2)
}

/// One replica: its process (replaced on restart) and what it was
/// started with.
#[derive(Debug)]
pub(crate) struct Replica {
    pub(crate) name: String,
    pub(crate) binary: Binary,
    pub(crate) process: ServiceProcess,
    env: Vec<(String, String)>,
    address: SocketAddr,
    /// Processes started so far (1 for the first).
    pub(crate) generation: u32,
}

/// A connection the run can cut, slow down or make lose answers.
#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) proxy: FaultProxy,
    /// Held while a fault acts on the link.
    pub(crate) busy: Mutex<()>,
}

/// The running system.
#[derive(Debug)]
pub(crate) struct Cluster {
    pub(crate) env: &'static TestEnv,
    pub(crate) scenario: Scenario,
    /// In [`Topology`] order.
    pub(crate) replicas: Vec<Arc<Mutex<Replica>>>,
    /// In [`Topology`] order.
    pub(crate) links: Vec<Arc<Link>>,
    /// The service binaries.
    folder: PathBuf,
    /// Where each process logs.
    logs: PathBuf,
}

impl Cluster {
    /// Starts PostgreSQL (durable, restartable) and a broker, then every
    /// replica, each service's replicas at once, each service once the one
    /// before it serves.
    pub(crate) async fn start(folder: &Path, out: &Path) -> anyhow::Result<Self> {
        let (postgres, broker) =
            tokio::try_join!(PostgresServer::start_durable_restartable(), Broker::start())?;
        let env = TestEnv::separate(postgres, broker)?;
        let topics = Topics::new(env.unique_topic_prefix());
        env.create_topics(&registry::topics(&topics), 3)?;
        let scenario = Scenario {
            env,
            database: env.database().await?,
            topics,
        };
        let logs = out.join("logs");
        std::fs::create_dir_all(&logs)?;
        let topology = Topology::new();
        let mut links: Vec<Arc<Link>> = Vec::new();
        let mut replicas: Vec<Arc<Mutex<Replica>>> = Vec::new();
        let mut urls: Vec<(String, String)> = Vec::new();
        for (service, count) in REPLICAS {
            let binary = *BINARIES
                .iter()
                .find(|binary| binary.name() == service)
                .context("a known service")?;
            let url = scenario.database.provision(&binary.account()).await?;
            let mut starting = Vec::new();
            for n in 1..=count {
                let name = replica_name(service, n, count);
                let db = FaultProxy::start(scenario.database.address()).await?;
                let database_url = url.replace(
                    &scenario.database.address().to_string(),
                    &db.address().to_string(),
                );
                links.push(link(&topology, links.len(), db));
                let mut env = scenario.service_env(&database_url);
                // Auth directly; an orchestrator's order and payment
                // replicas through links of their own.
                let mut peer_urls: Vec<(&str, String)> = Vec::new();
                if let Some((_, url)) = urls.first() {
                    peer_urls.push((auth_service::NAME, url.clone()));
                }
                if service == saga_orchestrator::NAME {
                    let (order, payment) = peers_of(n);
                    for (peer, target) in [
                        (order_service::NAME, format!("order-{order}")),
                        (payment_service::NAME, format!("payment-{payment}")),
                    ] {
                        let (_, url) = urls
                            .iter()
                            .find(|(name, _)| *name == target)
                            .context("peers start first")?;
                        let proxy =
                            FaultProxy::start_grpc(url.trim_start_matches("http://").parse()?)
                                .await?;
                        peer_urls.push((peer, format!("http://{}", proxy.address())));
                        links.push(link(&topology, links.len(), proxy));
                    }
                }
                env.extend(e2e::peer_env(service, |peer| {
                    peer_urls
                        .iter()
                        .find(|(name, _)| *name == peer)
                        .map(|(_, url)| url.clone())
                        .unwrap_or_default()
                }));
                for (tuned, key, value) in TUNING {
                    if tuned == service {
                        env.retain(|(k, _)| k != key);
                        env.push((key.to_owned(), value.to_owned()));
                    }
                }
                starting.push((name, env));
            }
            let started = futures::future::try_join_all(starting.into_iter().map(|(name, env)| {
                let logs = logs.clone();
                let folder = folder.to_owned();
                async move {
                    let log = logs.join(format!("{name}.1.log"));
                    let mut process = ServiceProcess::start_logging_to(
                        &name,
                        &folder.join(service),
                        env.clone(),
                        &log,
                    )
                    .await
                    .with_context(|| format!("starting {name}"))?;
                    process
                        .wait_for_health("", ServingStatus::Serving, Duration::from_secs(60))
                        .await
                        .with_context(|| format!("waiting for {name}"))?;
                    anyhow::Ok((name, env, process))
                }
            }))
            .await?;
            for (name, env, process) in started {
                urls.push((name.clone(), process.url()));
                replicas.push(Arc::new(Mutex::new(Replica {
                    name,
                    binary,
                    address: process.address(),
                    process,
                    env,
                    generation: 1,
                })));
            }
        }
        for n in 1..=2 {
            let (_, url) = urls
                .iter()
                .find(|(name, _)| *name == format!("order-{n}"))
                .context("order replicas")?;
            let proxy = FaultProxy::start_grpc(url.trim_start_matches("http://").parse()?).await?;
            links.push(link(&topology, links.len(), proxy));
        }
        anyhow::ensure!(
            links.len() == topology.links.len() && replicas.len() == topology.replicas.len(),
            "the cluster does not match its topology"
        );
        Ok(Self {
            env,
            scenario,
            replicas,
            links,
            folder: folder.to_owned(),
            logs,
        })
    }

    /// The admin URL of the run's database.
    pub(crate) fn admin_url(&self) -> String {
        self.scenario.database.admin_url()
    }

    /// The load client's links to the order replicas (the last two).
    pub(crate) fn load_links(&self) -> &[Arc<Link>] {
        &self.links[self.links.len() - 2..]
    }

    /// The address the load client reaches order replica `n` (1-based) at:
    /// through its link.
    pub(crate) fn order_url_for_load(&self, n: usize) -> String {
        format!("http://{}", self.load_links()[n - 1].proxy.address())
    }

    /// The gRPC URL of every replica of `service`, directly.
    pub(crate) async fn urls_of(&self, service: &str) -> Vec<String> {
        let mut urls = Vec::new();
        for replica in &self.replicas {
            let replica = replica.lock().await;
            if replica.binary.name() == service {
                urls.push(format!("http://{}", replica.address));
            }
        }
        urls
    }

    /// Starts `replica` again on its address, after it died or was killed,
    /// and waits until it serves. A start that fails (its database was
    /// being restarted, say) is tried again, up to five times.
    pub(crate) async fn restart(&self, replica: &mut Replica) -> anyhow::Result<Duration> {
        let began = Instant::now();
        let mut env = replica.env.clone();
        env.retain(|(key, _)| key != "GRPC_ADDR" && key != "LOG_FORMAT");
        env.push(("GRPC_ADDR".into(), replica.address.to_string()));
        env.push(("LOG_FORMAT".into(), "json".into()));
        let mut last = None;
        for _ in 0..5 {
            replica.generation += 1;
            let log = self
                .logs
                .join(format!("{}.{}.log", replica.name, replica.generation));
            let program = self.folder.join(replica.binary.name());
            let started = async {
                let mut process =
                    ServiceProcess::start_logging_to(&replica.name, &program, env.clone(), &log)
                        .await?;
                process
                    .wait_for_health("", ServingStatus::Serving, Duration::from_secs(60))
                    .await?;
                anyhow::Ok(process)
            }
            .await;
            match started {
                Ok(process) => {
                    replica.process = process;
                    return Ok(began.elapsed());
                }
                Err(error) => {
                    last = Some(error);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow::anyhow!("no attempt"))
            .context(format!("{} did not start again", replica.name)))
    }
}

fn link(topology: &Topology, index: usize, proxy: FaultProxy) -> Arc<Link> {
    debug_assert!(index < topology.links.len(), "a link of the topology");
    Arc::new(Link {
        proxy,
        busy: Mutex::new(()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_orchestrator_calls_its_own_pair_of_replicas() {
        assert_eq!(peers_of(1), (1, 2));
        assert_eq!(peers_of(2), (2, 1));
        assert_eq!(peers_of(3), (1, 2));
        let topology = Topology::new();
        assert_eq!(topology.replicas.len(), 8);
        // Eight to PostgreSQL, two per orchestrator, two for the load client.
        assert_eq!(topology.links.len(), 8 + 6 + 2);
    }

    #[test]
    fn the_load_knows_the_review_threshold_the_orchestrators_are_given() {
        let given = TUNING
            .iter()
            .find(|(_, key, _)| *key == "REVIEW_THRESHOLD")
            .map(|(_, _, value)| value.parse::<i64>().unwrap());
        assert_eq!(given, Some(REVIEW_THRESHOLD_MINOR));
    }
}
