//! `chaos`: the whole system under a seeded schedule of faults and a mixed
//! load, then quiesced and audited.
//!
//!     cargo xtask chaos [--duration 120] [--rate 10] [--seed N]
//!         [--fault-gap-min 1] [--fault-gap-max 3] [--quiesce-timeout 300]
//!
//! 1. Starts a durable PostgreSQL and a broker of its own, then one auth,
//!    two order, two payment and three orchestrator replicas (`cluster`),
//!    with a fault proxy on each connection it may cut or slow.
//! 2. Registers customers and starts the load client, a child process
//!    that places orders of every kind the simulated provider knows,
//!    cancels some and compensates others as an operator (`load`).
//! 3. For `--duration` seconds injects the faults of the schedule the seed
//!    gives (`schedule`, `faults`): SIGKILL and restart of any replica,
//!    SIGSTOP of one, PostgreSQL's immediate restart, a paused broker,
//!    cut, slow and answer-losing connections, the load client killed.
//!    Meanwhile it samples every saga's fence.
//! 4. Heals everything, lets the load client finish what it started, and
//!    waits until every saga has ended and every outbox is drained.
//! 5. Audits (the `audit` crate: money, sagas, outboxes, read model,
//!    fences) and prints the table (`summary`). Exits non-zero if any
//!    invariant is broken or the system did not quiesce.
//!
//! Everything the run writes (the schedule, the load record, every
//! process's log, table dumps, the table) goes to `--out`, by default a
//! new `target/chaos/seed-N-<time>-<pid>`.

// Printing the table is the program's job.
#![allow(clippy::print_stdout)]

mod cluster;
mod faults;
mod load;
mod schedule;
mod summary;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::sync::Mutex;

use crate::cluster::{Cluster, Topology};
use crate::load::{Customer, LoadClient};
use crate::schedule::{Listing, Pace};

#[derive(Debug, Parser)]
#[command(
    name = "chaos",
    about = "The system under seeded faults and a mixed load, then audited",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    internal: Option<Internal>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Internal {
    /// The load client, which the run starts (and kills) itself.
    #[command(hide = true)]
    Load(load::LoadArgs),
}

#[derive(Debug, Clone, clap::Args)]
struct RunArgs {
    /// Seconds of faults and load.
    #[arg(long, default_value_t = 120)]
    duration: u64,
    /// New orders per second.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Seed of the fault schedule and of the orders (random if not given;
    /// the run prints it).
    #[arg(long)]
    seed: Option<u64>,
    /// Shortest gap between two faults' starts, in seconds.
    #[arg(long, default_value_t = 1.0)]
    fault_gap_min: f64,
    /// Longest gap between two faults' starts, in seconds.
    #[arg(long, default_value_t = 3.0)]
    fault_gap_max: f64,
    /// Seconds to wait, after the last fault, for every saga to end.
    #[arg(long, default_value_t = 300)]
    quiesce_timeout: u64,
    /// Where the schedule, the load record, the logs and the table go
    /// (default: a new target/chaos/seed-N-<time>-<pid>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The folder of the service binaries (default: this program's).
    #[arg(long)]
    binaries: Option<PathBuf>,
    /// Print the fault schedule and exit.
    #[arg(long)]
    plan_only: bool,
}

/// Customers placing orders.
const CUSTOMERS: usize = 12;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let outcome = runtime.block_on(async {
        match cli.internal {
            Some(Internal::Load(args)) => load::run(args).await.map(|()| true),
            None => Box::pin(run(cli.run)).await,
        }
    });
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<bool> {
    anyhow::ensure!(args.rate > 0.0, "--rate must be above 0");
    anyhow::ensure!(
        args.fault_gap_min > 0.0 && args.fault_gap_max >= args.fault_gap_min,
        "--fault-gap-min must be above 0 and at most --fault-gap-max"
    );
    let seed = args.seed.unwrap_or_else(rand::random);
    let length = Duration::from_secs(args.duration);
    let pace = Pace {
        min_gap: Duration::from_secs_f64(args.fault_gap_min),
        max_gap: Duration::from_secs_f64(args.fault_gap_max),
    };
    let topology = Topology::new();
    let plan = schedule::plan(seed, length, pace, &topology);
    if args.plan_only {
        print!("{}", Listing(&plan, &topology));
        return Ok(true);
    }
    let here = std::env::current_exe()?
        .parent()
        .context("this program's folder")?
        .to_owned();
    // A folder of the run's own: runs of one seed may go on at once (the
    // tests of two checkouts sharing a target folder).
    let out = match &args.out {
        Some(out) => out.clone(),
        None => here
            .parent()
            .context("the target folder")?
            .join("chaos")
            .join(format!(
                "seed-{seed}-{}-{}",
                chrono::Utc::now().format("%Y%m%dT%H%M%S"),
                std::process::id()
            )),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    anyhow::ensure!(
        !out.join("record.jsonl").exists(),
        "{} holds an earlier run: give another --out",
        out.display()
    );
    std::fs::write(
        out.join("schedule.txt"),
        Listing(&plan, &topology).to_string(),
    )?;
    eprintln!(
        "chaos: seed {seed}, {} faults over {} s, {} orders/s; everything goes to {}",
        plan.len(),
        args.duration,
        args.rate,
        out.display()
    );

    let binaries = args.binaries.clone().unwrap_or(here);
    let cluster = Arc::new(Cluster::start(&binaries, &out).await?);
    eprintln!("chaos: the cluster serves");
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(3)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&cluster.admin_url())
        .await?;

    let customers = register_customers(&cluster).await?;
    let customers_file = out.join("customers.json");
    std::fs::write(&customers_file, serde_json::to_vec(&customers)?)?;
    let record_file = out.join("record.jsonl");
    let orders: Vec<String> = (1..=2).map(|n| cluster.order_url_for_load(n)).collect();
    let load = Arc::new(Mutex::new(LoadClient::new(
        &record_file,
        &customers_file,
        &orders,
        &cluster.urls_of(saga_orchestrator::NAME).await,
        &cluster.urls_of(auth_service::NAME).await[0],
        args.rate,
        seed,
        &out.join("logs"),
    )?));

    // Fences, sampled the whole time.
    let fences = Arc::new(Mutex::new(audit::FenceWatch::new()));
    let sampler = tokio::spawn({
        let fences = Arc::clone(&fences);
        let admin = admin.clone();
        async move {
            let mut ticks = tokio::time::interval(Duration::from_millis(250));
            loop {
                ticks.tick().await;
                let mut watch = fences.lock().await;
                // PostgreSQL may be restarting: the next sample will do.
                let _ = watch.sample(&admin).await;
            }
        }
    });

    let start = tokio::time::Instant::now();
    let started_at = chrono::Utc::now();
    let exits = Arc::new(faults::Exits::default());
    let watcher = tokio::spawn(faults::watch_exits(
        Arc::clone(&cluster),
        Arc::clone(&exits),
        start,
    ));
    let progress = tokio::spawn(progress(admin.clone(), record_file.clone(), start));
    load.lock().await.start(false)?;
    let planned = plan.len();
    let done = faults::run(
        plan,
        Arc::clone(&cluster),
        Arc::clone(&load),
        &topology,
        start,
    )
    .await;
    // The load runs for the whole length, even if the last fault came early.
    tokio::time::sleep_until(start + length).await;
    let ended_at = chrono::Utc::now();
    let faulted = start.elapsed();
    eprintln!(
        "chaos: faults over after {:.1} s; letting the load client finish",
        faulted.as_secs_f64()
    );

    // The load client finishes what it started; a client killed at the
    // very end leaves requests unanswered, which one more sends again.
    let settle = tokio::time::Instant::now();
    let finished = load.lock().await.stop(Duration::from_secs(120)).await?;
    let unanswered = audit::Record::read(&record_file)?.unanswered().count();
    if !finished || unanswered > 0 {
        eprintln!("chaos: {unanswered} CreateOrders unanswered; a last load client sends them");
        let mut load = load.lock().await;
        load.start(true)?;
        load.finish(Duration::from_secs(120)).await?;
    }
    let quiesce_timeout = Duration::from_secs(args.quiesce_timeout);
    let quiesced = quiesce(&admin, quiesce_timeout).await;
    let quiesced_after = quiesced.then(|| settle.elapsed());
    watcher.abort();
    progress.abort();
    sampler.abort();
    match quiesced_after {
        Some(after) => eprintln!("chaos: quiet {:.1} s after the faults", after.as_secs_f64()),
        None => eprintln!("chaos: not quiet within {quiesce_timeout:?}; auditing anyway"),
    }

    let record = audit::Record::read(&record_file)?;
    let fences = fences.lock().await.clone();
    let report = audit::audit(
        &admin,
        &audit::Inputs {
            record: Some(record.clone()),
            fences: Some(fences),
        },
    )
    .await?;
    let window = (ended_at - started_at).as_seconds_f64().max(1.0);
    let accepted = record
        .accepted
        .values()
        .filter_map(|answers| answers.first())
        .filter(|answer| {
            (started_at.timestamp_millis()..=ended_at.timestamp_millis()).contains(&answer.at_ms)
        })
        .count();
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM saga.saga_instances WHERE finished_at BETWEEN $1 AND $2",
    )
    .bind(started_at)
    .bind(ended_at)
    .fetch_one(&admin)
    .await?;
    let reasons: Vec<(String, i64)> = sqlx::query_as(
        "SELECT coalesce(left(failure_reason, 90), '(none)'), count(*) FROM saga.saga_instances
         WHERE state <> 'completed' GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 12",
    )
    .fetch_all(&admin)
    .await?;
    let resent_keys: Vec<String> = record.resent.keys().cloned().collect();
    let created: Vec<(String, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT key, created_at FROM orders.idempotency_keys WHERE key = ANY($1)")
            .bind(&resent_keys)
            .fetch_all(&admin)
            .await?;
    let already = created
        .iter()
        .filter(|(key, at)| {
            record
                .resent
                .get(key)
                .is_some_and(|resent| at.timestamp_millis() < *resent)
        })
        .count();
    let exits = exits
        .which
        .lock()
        .map(|which| which.clone())
        .unwrap_or_default();
    let load_clients = load.lock().await.generation;
    let summary = summary::Run {
        seed,
        length,
        pace,
        rate: args.rate,
        commit: commit(),
        planned,
        faults: &done,
        load_clients,
        record: &record,
        report: &report,
        quiesced_after,
        quiesce_timeout,
        accepted_per_second: accepted as f64 / window,
        ended_per_second: ended as f64 / window,
        exits,
        reasons,
        resent: (resent_keys.len(), already),
    }
    .render();
    std::fs::write(out.join("summary.md"), &summary)?;
    if let Err(error) = dump(&admin, &out.join("db")).await {
        eprintln!("chaos: dumping the tables: {error:#}");
    }
    let log: String = done
        .iter()
        .map(|fault| {
            format!(
                "{:>8.3} s  {}{}{}\n",
                fault.began.as_secs_f64(),
                fault.description,
                fault
                    .recovery
                    .map(|r| format!("; back after {:.2} s", r.as_secs_f64()))
                    .unwrap_or_default(),
                fault
                    .error
                    .as_ref()
                    .map(|e| format!("; FAILED: {e}"))
                    .unwrap_or_default()
            )
        })
        .collect();
    std::fs::write(out.join("faults.txt"), log)?;
    println!("{summary}");
    // A run in which no order went through under faults, or no fault was
    // carried out, proves nothing, whatever its invariants say.
    let carried_out = done.iter().filter(|fault| fault.error.is_none()).count();
    let exercised = accepted > 0 && ended > 0 && carried_out > 0;
    if !exercised {
        println!(
            "NOT EXERCISED: {accepted} orders accepted and {ended} sagas ended under faults, \
             {carried_out} of {planned} faults carried out."
        );
    }
    let passed = report.passed() && quiesced_after.is_some() && exercised;
    println!(
        "{} (seed {seed}; everything the run wrote is in {})",
        if passed {
            "Every invariant holds."
        } else {
            "BROKEN: see above."
        },
        out.display()
    );
    Ok(passed)
}

/// The tables an investigation starts from, as CSV: (file, query).
const DUMPS: [(&str, &str); 7] = [
    (
        "saga_instances.csv",
        "SELECT saga_id, business_key, state, failure_reason, compensation_requested, position, fence,
                lease_owner, lease_expires_at, next_run_at, forward_only_since, overdue_step, overdue_since,
                created_at, updated_at, finished_at
         FROM saga.saga_instances ORDER BY created_at",
    ),
    (
        "saga_steps.csv",
        "SELECT saga_id, step, kind, status, attempts, outcome_unknown, last_error, output, started_at,
                finished_at, next_attempt_at, deadline_at
         FROM saga.saga_steps ORDER BY saga_id, seq",
    ),
    ("payments.csv", "SELECT * FROM payments.payments ORDER BY created_at"),
    (
        "provider_charges.csv",
        "SELECT * FROM payments.simulated_provider_charges ORDER BY idempotency_key",
    ),
    ("orders.csv", "SELECT * FROM orders.order_view ORDER BY created_at"),
    (
        "order_events.csv",
        "SELECT stream_id, version, event_type, recorded_at FROM orders.events ORDER BY global_position",
    ),
    (
        "idempotency_keys.csv",
        "SELECT customer_id, key, order_id, created_at FROM orders.idempotency_keys ORDER BY created_at",
    ),
];

/// Writes [`DUMPS`] into `folder`.
async fn dump(admin: &sqlx::PgPool, folder: &Path) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    use sqlx::postgres::PgPoolCopyExt as _;
    std::fs::create_dir_all(folder)?;
    for (file, query) in DUMPS {
        let statement = format!("COPY ({query}) TO STDOUT WITH CSV HEADER");
        let mut stream = admin.copy_out_raw(&statement).await?;
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            bytes.extend_from_slice(&chunk?);
        }
        std::fs::write(folder.join(file), bytes)?;
    }
    Ok(())
}

/// Registers the customers through the auth service.
async fn register_customers(cluster: &Cluster) -> anyhow::Result<Vec<Customer>> {
    let url = &cluster.urls_of(auth_service::NAME).await[0];
    let mut auth = api_auth::v1::auth_service_client::AuthServiceClient::new(
        testkit::grpc::channel(url).await?,
    );
    let mut customers = Vec::new();
    for n in 0..CUSTOMERS {
        let email = format!("chaos-customer-{n}@example.com");
        let user = auth
            .register(api_auth::v1::RegisterRequest {
                email: email.clone(),
                password: e2e::CUSTOMER_PASSWORD.to_owned(),
                display_name: format!("Chaos customer {n}"),
            })
            .await
            .context("registering a customer")?
            .into_inner();
        customers.push(Customer {
            email,
            id: uuid::Uuid::parse_str(&user.user_id)?,
        });
    }
    Ok(customers)
}

/// Waits until no saga is running or compensating, every order has its
/// saga, every return asked for has its saga, and every outbox is drained.
async fn quiesce(admin: &sqlx::PgPool, timeout: Duration) -> bool {
    use prost::Name as _;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        let counts: Result<(i64, i64, i64, i64, i64), _> = sqlx::query_as(
            "SELECT (SELECT count(*) FROM saga.saga_instances WHERE state IN ('running', 'compensating')),
                    (SELECT count(DISTINCT stream_id) FROM orders.events),
                    (SELECT count(*) FROM saga.saga_instances WHERE saga_type = $1),
                    (SELECT count(DISTINCT stream_id) FROM orders.events WHERE event_type = $2),
                    (SELECT count(*) FROM saga.saga_instances WHERE saga_type = $3)",
        )
        .bind(saga_orchestrator::order_saga::SAGA_TYPE)
        .bind(api_order::v1::OrderReturnRequested::full_name())
        .bind(saga_orchestrator::return_saga::SAGA_TYPE)
        .fetch_one(admin)
        .await;
        let backlog = audit::outbox_backlog(admin).await;
        if let (Ok((open, orders, sagas, returning, returns)), Ok(backlog)) = (&counts, &backlog) {
            if *open == 0 && orders == sagas && returning == returns && *backlog == 0 {
                return true;
            }
            let now = format!(
                "{open} sagas open, {orders} orders and {sagas} order sagas, \
                 {returning} returns asked for and {returns} return sagas, {backlog} events in outboxes"
            );
            if now != last {
                eprintln!("chaos: settling: {now}");
                last = now;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    false
}

/// A line on stderr every ten seconds.
async fn progress(admin: sqlx::PgPool, record: PathBuf, start: tokio::time::Instant) {
    let mut ticks = tokio::time::interval(Duration::from_secs(10));
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let accepted = count_accepted(&record);
        let sagas: Result<(i64, i64), _> = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE state IN ('completed', 'compensated'))
             FROM saga.saga_instances",
        )
        .fetch_one(&admin)
        .await;
        let sagas = sagas.map_or_else(
            |_| "sagas: (database unavailable)".to_owned(),
            |(all, ended)| format!("sagas: {ended} ended of {all}"),
        );
        eprintln!(
            "[{:>7.1} s] orders accepted: {accepted}; {sagas}",
            start.elapsed().as_secs_f64()
        );
    }
}

fn count_accepted(record: &Path) -> usize {
    std::fs::read_to_string(record)
        .map(|text| text.matches("\"entry\":\"accepted\"").count())
        .unwrap_or(0)
}

/// The commit the run was built from, with `+dirty` if the tree differs.
fn commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(dev_stack::tools::workspace_root())
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    let head = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".to_owned());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|status| !status.is_empty());
    if dirty { format!("{head}+dirty") } else { head }
}
