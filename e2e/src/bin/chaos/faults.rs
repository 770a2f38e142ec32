//! Carrying out the schedule: each fault at its time, in a task of its
//! own, so that faults overlap; two faults on one target take turns (a
//! replica is not killed while it is stopped). Every fault heals itself
//! before its task ends: the replica runs again, the link forwards, the
//! broker and PostgreSQL answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::cluster::{Cluster, Topology};
use crate::load::LoadClient;
use crate::schedule::{Fault, Kind, Planned};

/// A fault as it happened.
#[derive(Debug, Clone)]
pub(crate) struct Done {
    pub(crate) kind: Kind,
    pub(crate) description: String,
    /// When it began, from the start of the run (later than planned if its
    /// target was busy).
    pub(crate) began: Duration,
    /// How long its target took to come back, for restarts.
    pub(crate) recovery: Option<Duration>,
    /// What went wrong carrying it out, if anything did.
    pub(crate) error: Option<String>,
}

/// The targets that are not a replica or a link.
#[derive(Debug, Default)]
struct Shared {
    postgres: Mutex<()>,
    broker: Mutex<()>,
}

/// Runs `plan` from `start`, and returns once every fault has healed.
pub(crate) async fn run(
    plan: Vec<Planned>,
    cluster: Arc<Cluster>,
    load: Arc<Mutex<LoadClient>>,
    topology: &Topology,
    start: tokio::time::Instant,
) -> Vec<Done> {
    let shared = Arc::new(Shared::default());
    let mut tasks = Vec::new();
    for planned in plan {
        tokio::time::sleep_until(start + planned.at).await;
        let description = planned.fault.describe(topology);
        eprintln!("[{:>7.1} s] {description}", start.elapsed().as_secs_f64());
        let cluster = Arc::clone(&cluster);
        let load = Arc::clone(&load);
        let shared = Arc::clone(&shared);
        tasks.push(tokio::spawn(async move {
            let kind = planned.fault.kind();
            let (began, outcome) = inject(&planned.fault, &cluster, &load, &shared, start).await;
            let (recovery, error) = match outcome {
                Ok(recovery) => (recovery, None),
                Err(error) => {
                    eprintln!("fault {description}: {error:#}");
                    (None, Some(format!("{error:#}")))
                }
            };
            Done {
                kind,
                description,
                began,
                recovery,
                error,
            }
        }));
    }
    let mut done = Vec::new();
    for task in tasks {
        match task.await {
            Ok(fault) => done.push(fault),
            Err(error) => eprintln!("a fault's task failed: {error}"),
        }
    }
    done
}

/// Carries out one fault and heals it; returns when it began and, for a
/// restart, how long the target took to serve again.
async fn inject(
    fault: &Fault,
    cluster: &Cluster,
    load: &Mutex<LoadClient>,
    shared: &Shared,
    start: tokio::time::Instant,
) -> (Duration, anyhow::Result<Option<Duration>>) {
    match fault {
        Fault::Kill { replica, down } => {
            let mut replica = cluster.replicas[*replica].lock().await;
            let began = start.elapsed();
            let outcome = async {
                replica.process.process().signal("KILL")?;
                let deadline = Instant::now() + Duration::from_secs(10);
                while replica.process.process().is_running() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                tokio::time::sleep(*down).await;
                Ok(Some(cluster.restart(&mut replica).await?))
            }
            .await;
            (began, outcome)
        }
        Fault::Stop { replica, hold } => {
            let mut replica = cluster.replicas[*replica].lock().await;
            let began = start.elapsed();
            let outcome = async {
                replica.process.process().signal("STOP")?;
                tokio::time::sleep(*hold).await;
                replica.process.process().signal("CONT")?;
                Ok(None)
            }
            .await;
            (began, outcome)
        }
        Fault::RestartPostgres => {
            let _turn = shared.postgres.lock().await;
            let began = start.elapsed();
            let outcome = async {
                let postgres = cluster
                    .env
                    .postgres()
                    .ok_or_else(|| anyhow::anyhow!("the run's PostgreSQL is not its own"))?;
                let clock = Instant::now();
                postgres.restart_immediately().await?;
                Ok(Some(clock.elapsed()))
            }
            .await;
            (began, outcome)
        }
        Fault::PauseBroker { hold } => {
            let _turn = shared.broker.lock().await;
            let began = start.elapsed();
            let outcome = async {
                let broker = cluster
                    .env
                    .broker()
                    .ok_or_else(|| anyhow::anyhow!("the run's broker is not its own"))?;
                broker.process().signal("STOP")?;
                tokio::time::sleep(*hold).await;
                broker.process().signal("CONT")?;
                Ok(None)
            }
            .await;
            (began, outcome)
        }
        Fault::Cut { link, hold }
        | Fault::Delay { link, hold, .. }
        | Fault::LoseAnswers { link, hold } => {
            let link = &cluster.links[*link];
            let _turn = link.busy.lock().await;
            let began = start.elapsed();
            match fault {
                Fault::Cut { .. } => link.proxy.cut(),
                Fault::Delay { latency, .. } => link.proxy.delay(*latency),
                _ => link.proxy.lose_answers(),
            }
            tokio::time::sleep(*hold).await;
            link.proxy.restore();
            (began, Ok(None))
        }
        Fault::KillLoadClient { stall, down } => {
            let mut load = load.lock().await;
            let links = cluster.load_links();
            let mut turns = Vec::new();
            for link in links {
                turns.push(link.busy.lock().await);
            }
            let began = start.elapsed();
            let outcome = async {
                for link in links {
                    link.proxy.lose_answers();
                }
                tokio::time::sleep(*stall).await;
                let killed = load.kill().await;
                for link in links {
                    link.proxy.restore();
                }
                drop(turns);
                killed?;
                tokio::time::sleep(*down).await;
                load.start(false)?;
                Ok(None)
            }
            .await;
            (began, outcome)
        }
    }
}

/// Replicas that exited without being killed, restarted each time.
#[derive(Debug, Default)]
pub(crate) struct Exits {
    pub(crate) count: AtomicU32,
    pub(crate) which: std::sync::Mutex<Vec<String>>,
}

/// Every second, restarts any replica that is not running and that no
/// fault is acting on: a replica that exits by itself is a finding, and
/// the run goes on with it restarted.
pub(crate) async fn watch_exits(
    cluster: Arc<Cluster>,
    exits: Arc<Exits>,
    start: tokio::time::Instant,
) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    loop {
        ticks.tick().await;
        for replica in &cluster.replicas {
            let Ok(mut replica) = replica.try_lock() else {
                continue;
            };
            if replica.process.process().is_running() {
                continue;
            }
            exits.count.fetch_add(1, Ordering::Relaxed);
            let what = format!(
                "{} (process {}) at {:.1} s",
                replica.name,
                replica.generation,
                start.elapsed().as_secs_f64()
            );
            eprintln!("{what} exited by itself; starting it again");
            if let Ok(mut which) = exits.which.lock() {
                which.push(what);
            }
            if let Err(error) = cluster.restart(&mut replica).await {
                eprintln!("{error:#}");
            }
        }
    }
}
