//! What an order costs when it goes through the whole system: the four real
//! binaries (built in release, default settings), a durable PostgreSQL and
//! the broker, all on this machine.
//!
//!     cargo bench -p e2e --bench order_flow [-- --rate 200 --paced-secs 20
//!         --saturation-secs 30 --clients 16 --backlog 1000 --pgbench-secs 10
//!         --history 0]
//!
//! The run, in order (about two minutes with the defaults):
//!
//! 1. PostgreSQL: a private cluster started for the run, durable (`fsync`
//!    and `synchronous_commit` on) with `pg_stat_statements`; or, when
//!    `DATABASE_URL` (a superuser URL) is set, that server.
//! 2. `pgbench` on that server, a one-row INSERT at 1 and at 32 clients:
//!    what the server and disk can commit, to compare the sagas against.
//! 3. The paced phase: `--rate` orders per second for `--paced-secs`,
//!    placed on schedule whatever the answers take (an open loop), to see
//!    latencies below saturation.
//! 4. The saturation phase: `--clients` customers placing orders as fast
//!    as they are answered for `--saturation-secs`. Orders are accepted
//!    faster than sagas finish, so a client holds back while more than
//!    `--backlog` sagas are unfinished (0: never): the queue stays bounded
//!    and so does the time to drain it. Over this phase, from its start
//!    until every saga it created is final, the run counts commits, SQL
//!    statements and CPU time by process, per saga.
//!
//! With `--history N`, N finished flows are copied into the database after
//! a warm-up of 20 orders and before the paced phase (`history.rs` says
//! how), so the same figures can be read on an empty database and on one
//! that has already seen a million orders.
//!
//! Latencies run from the order's creation to its saga's end (completed or
//! compensated), both timestamps read from the database afterwards, so
//! nothing is polled for timing. (A one-line progress display on stderr
//! polls a count of finished sagas a few times a second; those queries are
//! left out of the counts.)
//!
//! A benchmark, not a test: it prints figures and asserts only that every
//! saga completed.

// Printing its figures is the benchmark's job.
#![allow(clippy::print_stdout)]

mod history;

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use api_order::v1::order_service_client::OrderServiceClient;
use clap::Parser;
use dev_stack::{Broker, PostgresServer, TestEnv};
use e2e::{BINARIES, Stack, order_request};
use sqlx::Connection as _;
use testkit::grpc::{bearer, channel};
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(about = "Orders through the whole system: latency, throughput and cost per saga")]
struct Args {
    /// Orders per second in the paced phase (0 skips it).
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Length of the paced phase, in seconds.
    #[arg(long, default_value_t = 20)]
    paced_secs: u32,
    /// Length of the saturation phase, in seconds.
    #[arg(long, default_value_t = 30)]
    saturation_secs: u32,
    /// Concurrent customers, each on its own connection.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// In the saturation phase, unfinished sagas above which clients hold
    /// back (0: never).
    #[arg(long, default_value_t = 1000)]
    backlog: u64,
    /// Length of each pgbench run, in seconds (0 skips pgbench).
    #[arg(long, default_value_t = 10)]
    pgbench_secs: u32,
    /// Finished sagas (with all their rows) put in the database before the
    /// run, to show that a saga costs the same on a long-lived database.
    #[arg(long, default_value_t = 0)]
    history: u64,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

/// How long a PostgreSQL backend may keep its counters before they reach
/// `pg_stat_database`: an idle backend flushes them after 10 s
/// (`PGSTAT_IDLE_INTERVAL`), so commit counts are read after this.
const STATS_SETTLE: Duration = Duration::from_secs(12);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.clients > 0, "--clients must be at least 1");
    anyhow::ensure!(
        args.saturation_secs > 0,
        "--saturation-secs must be at least 1: the costs per saga come from that phase"
    );
    Box::pin(run(args)).await
}

async fn run(args: Args) -> anyhow::Result<()> {
    let commit = commit_label();
    let load = load_average();
    let env = install_servers().await?;
    let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", env.postgres_base_url()))
        .await
        .context("connecting to PostgreSQL")?;
    let server = describe_server(&mut admin, env).await?;
    eprintln!("PostgreSQL: {}", server.description);

    let pgbench = if args.pgbench_secs == 0 {
        PgbenchResult::Skipped("skipped (--pgbench-secs 0)".to_owned())
    } else {
        pgbench(env, &mut admin, args.pgbench_secs).await?
    };

    // Default settings, logs at info included: what a deployment runs. The
    // scenario's test settings check health every 100 ms and leave a
    // consumer group after 2 s; these are the services' defaults
    // (service-runtime's and messaging's settings.rs).
    let mut stack = Stack::builder()
        .env_all("HEALTH_CHECK_INTERVAL", "1s")
        .env_all("KAFKA_SESSION_TIMEOUT", "10s")
        .start()
        .await?;
    let url = stack.service(order_service::NAME).url();
    let mut customers = Vec::new();
    for n in 0..args.clients {
        let token = stack
            .customer_token(&format!("bench-{n}@example.com"))
            .await?;
        customers.push(Customer {
            client: OrderServiceClient::new(channel(&url).await?),
            token,
        });
    }
    let progress = Progress::start(stack.scenario.inspect().await?);

    // Warm-up: connections, caches, the consumer group's assignment.
    progress.phase("warm-up");
    for n in 0..20 {
        customers[0].create(&format!("warm-up-{n}")).await?;
        progress.created.fetch_add(1, Ordering::Relaxed);
    }
    progress.drained().await?;
    if args.history > 0 {
        progress.phase("history");
        history::preload(&stack.scenario.database.admin_url(), args.history).await?;
    }

    let pool = stack.scenario.inspect().await?;
    let paced = if args.rate > 0 && args.paced_secs > 0 {
        progress.phase(&format!("paced {}/s", args.rate));
        let latencies = paced_phase(&customers, &progress, args.rate, args.paced_secs).await?;
        progress.drained().await?;
        Some(PhaseFigures::new(
            timeline(&pool, "paced-").await?,
            latencies,
        ))
    } else {
        None
    };

    // Counters at rest, once every backend has flushed its statistics.
    progress.phase("settling");
    progress.pause(STATS_SETTLE).await;
    let processes = Processes::of(&mut stack, env);
    if server.statements {
        sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(&mut admin)
            .await?;
    }
    let before = Counters::read(&mut admin, &processes, server.statements).await?;
    let own_before = progress.own_queries();
    progress.phase(&format!("saturation, {} clients", args.clients));
    let window_start = db_clock(&mut admin).await?;
    let latencies = saturation_phase(
        &customers,
        &progress,
        Duration::from_secs(args.saturation_secs.into()),
        args.backlog,
    )
    .await?;
    let window_end = db_clock(&mut admin).await?;
    progress.phase("draining");
    progress.drained().await?;
    let mut after = Counters::read(&mut admin, &processes, server.statements).await?;
    let top = if server.statements {
        top_statements(&mut admin, 12).await?
    } else {
        Vec::new()
    };
    progress.phase("settling");
    progress.pause(STATS_SETTLE).await;
    after.commits = read_commits(&mut admin).await?;
    // Our own transactions since the first reading, which the last one
    // counts: the progress queries, the two clock readings, and the
    // readings themselves (reset, statements, commits; statements, commits,
    // top statements) but for the last.
    let own_commits =
        progress.own_queries() - own_before + 2 + if server.statements { 6 } else { 2 };
    progress.finish();

    let saturation = PhaseFigures::new(timeline(&pool, "sat-").await?, latencies);
    anyhow::ensure!(
        saturation.orders() > 0,
        "no order was placed in the saturation phase"
    );
    let sagas = saturation.orders() as f64;
    let window = window_end - window_start;
    let sustained = saturation.finished_within(window_start, window_end) as f64 / window;

    let mut out = String::new();
    writeln!(
        out,
        "\norder_flow at {commit}, release build, {} CPUs, everything on this machine \
         (load average {load} before the run)",
        std::thread::available_parallelism().map_or(0, usize::from)
    )?;
    writeln!(out, "PostgreSQL: {}", server.description)?;
    writeln!(out, "pgbench one-row INSERT: {}\n", pgbench.summary())?;
    writeln!(
        out,
        "| phase | orders | created/s | created → final p50 / p99 | CreateOrder p50 / p99 | finished/s |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|")?;
    if let Some(paced) = &paced {
        paced.row(
            &mut out,
            &format!("paced, {}/s for {} s", args.rate, args.paced_secs),
            paced.orders() as f64 / paced.span(),
        )?;
    }
    saturation.row(
        &mut out,
        &format!(
            "saturation, {} clients for {} s{}",
            args.clients,
            args.saturation_secs,
            if args.backlog > 0 {
                format!(" (backlog ≤ {})", args.backlog)
            } else {
                String::new()
            }
        ),
        sustained,
    )?;
    writeln!(
        out,
        "\nPer saga over the saturation phase ({} sagas, its start until all were final):\n",
        saturation.orders()
    )?;
    writeln!(out, "| figure | per saga |")?;
    writeln!(out, "|---|---|")?;
    let commits = (after.commits - before.commits) as f64 - own_commits as f64;
    writeln!(out, "| commits | {:.1} |", commits / sagas)?;
    match (before.statements, after.statements) {
        (Some(before), Some(after)) => {
            writeln!(
                out,
                "| SQL statements | {:.1} |",
                (after.all - before.all) as f64 / sagas
            )?;
            writeln!(
                out,
                "| SQL statements without BEGIN/COMMIT/ROLLBACK | {:.1} |",
                (after.work - before.work) as f64 / sagas
            )?;
        }
        _ => writeln!(out, "| SQL statements | n/a (no pg_stat_statements) |")?,
    }
    let ms_per_tick = 1000.0 / clock_ticks_per_second();
    let mut total_ms = 0.0;
    for (index, (name, _)) in processes.cpu.iter().enumerate() {
        match (before.cpu[index], after.cpu[index]) {
            (Some(before), Some(after)) => {
                let ms = (after - before) as f64 * ms_per_tick / sagas;
                total_ms += ms;
                writeln!(out, "| CPU ms, {name} | {ms:.2} |")?;
            }
            _ => writeln!(out, "| CPU ms, {name} | n/a |")?,
        }
    }
    writeln!(out, "| CPU ms, all of the above | {total_ms:.2} |")?;
    if let (Some(before), Some(after)) = (before.machine, after.machine) {
        writeln!(
            out,
            "| CPU ms, the whole machine (every process) | {:.2} |",
            (after - before) as f64 * ms_per_tick / sagas
        )?;
    }
    for (name, pid) in &processes.rss {
        match peak_rss_mib(*pid) {
            Some(mib) => writeln!(out, "| peak RSS, {name} (whole run) | {mib:.0} MiB |")?,
            None => writeln!(out, "| peak RSS, {name} (whole run) | n/a |")?,
        }
    }
    match &pgbench {
        PgbenchResult::Ran { tps_32, .. } => writeln!(
            out,
            "\nSagas/s sustained: {sustained:.1}, {:.2} % of pgbench's one-row INSERTs/s at 32 clients ({tps_32:.0}).",
            sustained / tps_32 * 100.0
        )?,
        PgbenchResult::Skipped(why) => {
            writeln!(out, "\nSagas/s sustained: {sustained:.1}; pgbench: {why}.")?
        }
    }
    if !top.is_empty() {
        writeln!(
            out,
            "\nStatements the services ran most, calls per saga (saturation phase):\n"
        )?;
        for (calls, query) in top {
            writeln!(out, "{:>7.2}  {query}", calls as f64 / sagas)?;
        }
    }
    print!("{out}");
    std::io::stdout().flush()?;
    Ok(())
}

/// The servers of the run: a private durable PostgreSQL, or the one
/// `DATABASE_URL` names, and a private broker.
async fn install_servers() -> anyhow::Result<&'static TestEnv> {
    match std::env::var("DATABASE_URL") {
        Ok(url) => {
            let base = server_url(&url)?;
            TestEnv::install_with_url(base, Broker::start().await?)
        }
        Err(_) => {
            let (postgres, broker) =
                tokio::try_join!(PostgresServer::start_durable(), Broker::start())?;
            TestEnv::install(postgres, broker)
        }
    }
}

/// `postgres://user:password@host:port` from a URL that may name a
/// database and options (the test stack appends database names itself).
fn server_url(url: &str) -> anyhow::Result<String> {
    let (scheme, rest) = url.split_once("://").context("DATABASE_URL is not a URL")?;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    anyhow::ensure!(
        authority.contains(':')
            && authority
                .rsplit('@')
                .next()
                .is_some_and(|a| a.contains(':')),
        "DATABASE_URL must name the host's port (postgres://user:password@127.0.0.1:5432)"
    );
    Ok(format!("{scheme}://{authority}"))
}

struct Server {
    description: String,
    /// Whether pg_stat_statements is there to count statements.
    statements: bool,
}

async fn describe_server(admin: &mut sqlx::PgConnection, env: &TestEnv) -> anyhow::Result<Server> {
    let (version, fsync, synchronous_commit): (String, String, String) = sqlx::query_as(
        "SELECT current_setting('server_version'), current_setting('fsync'),
                current_setting('synchronous_commit')",
    )
    .fetch_one(&mut *admin)
    .await?;
    // Present only if the server preloads the library; the extension is
    // created where we may.
    let _ = sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&mut *admin)
        .await;
    let statements = sqlx::query("SELECT 1 FROM pg_stat_statements LIMIT 1")
        .fetch_optional(&mut *admin)
        .await
        .is_ok();
    let whose = if env.postgres().is_some() {
        "private cluster"
    } else {
        "DATABASE_URL's server"
    };
    Ok(Server {
        description: format!(
            "{version}, {whose}, fsync={fsync}, synchronous_commit={synchronous_commit}, \
             pg_stat_statements {}",
            if statements { "on" } else { "unavailable" }
        ),
        statements,
    })
}

/// The commit measured, and the folders where the tree differs from it.
fn commit_label() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dev_stack::tools::workspace_root())
            .args(args)
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    let Some(commit) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "an unknown commit".to_owned();
    };
    let changes = git(&["diff", "HEAD", "--name-only"]).unwrap_or_default();
    // Each changed file's folder, at most two deep; nested ones left out.
    let mut folders: Vec<String> = changes
        .lines()
        .map(|path| {
            let parts: Vec<&str> = path.split('/').collect();
            match parts.len() {
                1 => path.to_owned(),
                n => parts[..(n - 1).min(2)].join("/"),
            }
        })
        .collect();
    folders.sort();
    folders.dedup();
    let nested = |folder: &String| {
        folders
            .iter()
            .any(|other| folder.starts_with(&format!("{other}/")))
    };
    let folders: Vec<&String> = folders.iter().filter(|folder| !nested(folder)).collect();
    if folders.is_empty() {
        commit
    } else {
        let folders: Vec<&str> = folders.iter().map(|folder| folder.as_str()).collect();
        format!("{commit} (uncommitted changes in {})", folders.join(", "))
    }
}

enum PgbenchResult {
    Ran { tps_1: f64, tps_32: f64 },
    Skipped(String),
}

impl PgbenchResult {
    fn summary(&self) -> String {
        match self {
            Self::Ran { tps_1, tps_32 } => {
                format!("{tps_1:.0} tps at 1 client, {tps_32:.0} tps at 32 clients")
            }
            Self::Skipped(why) => why.clone(),
        }
    }
}

/// pgbench's one-row INSERT into a scratch database of the same server, at
/// 1 client and at 32.
async fn pgbench(
    env: &TestEnv,
    admin: &mut sqlx::PgConnection,
    secs: u32,
) -> anyhow::Result<PgbenchResult> {
    let Some(program) = pgbench_program() else {
        eprintln!("pgbench not found (Debian: postgresql-client); going on without it");
        return Ok(PgbenchResult::Skipped("not found".to_owned()));
    };
    let database = format!(
        "bench_pgbench_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
        .execute(&mut *admin)
        .await?;
    let url = format!("{}/{database}", env.postgres_base_url());
    let result = async {
        let mut scratch = sqlx::PgConnection::connect(&url).await?;
        // pgbench's own table (`pgbench -i`), without the others.
        sqlx::raw_sql(
            "CREATE TABLE pgbench_history (tid int, bid int, aid int, delta int,
                                           mtime timestamp, filler char(22))",
        )
        .execute(&mut scratch)
        .await?;
        scratch.close().await?;
        let script = tempfile::Builder::new()
            .prefix("bench-pgbench-")
            .suffix(".sql")
            .tempfile()?;
        std::fs::write(
            script.path(),
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1,1,1,1,now());\n",
        )?;
        let mut tps = Vec::new();
        for (clients, threads) in [(1, 1), (32, 2)] {
            eprintln!("pgbench: {clients} clients for {secs} s");
            let output = tokio::process::Command::new(&program)
                .args(["-n", "-f"])
                .arg(script.path())
                .args(["-c", &clients.to_string(), "-j", &threads.to_string()])
                .args(["-T", &secs.to_string()])
                .arg(&url)
                .output()
                .await
                .with_context(|| format!("running {}", program.display()))?;
            let stdout = String::from_utf8_lossy(&output.stdout);
            if !output.status.success() {
                bail!(
                    "pgbench failed: {}{}",
                    stdout.trim(),
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
            tps.push(parse_tps(&stdout).with_context(|| format!("no tps in:\n{stdout}"))?);
        }
        anyhow::Ok(PgbenchResult::Ran {
            tps_1: tps[0],
            tps_32: tps[1],
        })
    }
    .await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {database} WITH (FORCE)"
    )))
    .execute(&mut *admin)
    .await?;
    result
}

/// The server's own pgbench, else the first on `$PATH`, else Debian's.
fn pgbench_program() -> Option<std::path::PathBuf> {
    dev_stack::tools::postgres_bin_dir()
        .ok()
        .map(|bin| bin.join("pgbench"))
        .filter(|path| path.is_file())
        .or_else(|| dev_stack::tools::find_in_path("pgbench"))
        .or_else(|| {
            Some("/usr/bin/pgbench".into()).filter(|path: &std::path::PathBuf| path.is_file())
        })
}

/// The figure of pgbench's `tps = 5487.203939 (without initial connection
/// time)` line.
fn parse_tps(output: &str) -> Option<f64> {
    output
        .lines()
        .find_map(|line| line.trim().strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|figure| figure.parse().ok())
}

#[derive(Clone)]
struct Customer {
    client: OrderServiceClient<Channel>,
    token: String,
}

impl Customer {
    /// Places one order and returns how long the answer took, in ms.
    async fn create(&mut self, idempotency_key: &str) -> anyhow::Result<f64> {
        let sent = Instant::now();
        self.client
            .create_order(bearer(
                order_request(idempotency_key, "tok_visa"),
                &self.token,
            ))
            .await
            .with_context(|| format!("placing order {idempotency_key}"))?;
        Ok(sent.elapsed().as_secs_f64() * 1000.0)
    }
}

/// `rate` orders a second for `secs`, each sent on schedule (round robin
/// over the customers' connections) whether or not earlier ones have been
/// answered. Returns the CreateOrder latencies.
async fn paced_phase(
    customers: &[Customer],
    progress: &Arc<Progress>,
    rate: u32,
    secs: u32,
) -> anyhow::Result<Vec<f64>> {
    let orders = u64::from(rate) * u64::from(secs);
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let start = tokio::time::Instant::now();
    let mut answers = tokio::task::JoinSet::new();
    for n in 0..orders {
        tokio::time::sleep_until(start + interval.mul_f64(n as f64)).await;
        let mut customer = customers[n as usize % customers.len()].clone();
        let progress = Arc::clone(progress);
        answers.spawn(async move {
            let latency = customer.create(&format!("paced-{n}")).await?;
            progress.created.fetch_add(1, Ordering::Relaxed);
            anyhow::Ok(latency)
        });
    }
    let mut latencies = Vec::with_capacity(orders as usize);
    while let Some(answer) = answers.join_next().await {
        latencies.push(answer??);
    }
    Ok(latencies)
}

/// Every customer placing orders as fast as answered for `length`, holding
/// back while more than `backlog` sagas are unfinished. Returns the
/// CreateOrder latencies.
async fn saturation_phase(
    customers: &[Customer],
    progress: &Arc<Progress>,
    length: Duration,
    backlog: u64,
) -> anyhow::Result<Vec<f64>> {
    let deadline = tokio::time::Instant::now() + length;
    let tasks = customers
        .iter()
        .cloned()
        .enumerate()
        .map(|(c, mut customer)| {
            let progress = Arc::clone(progress);
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut finished = progress.finished.subscribe();
                for n in 0.. {
                    if backlog > 0 {
                        while progress.created.load(Ordering::Relaxed)
                            > finished.borrow_and_update().0 + backlog
                            && tokio::time::Instant::now() < deadline
                        {
                            let _ = tokio::time::timeout_at(deadline, finished.changed()).await;
                        }
                    }
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    latencies.push(customer.create(&format!("sat-{c}-{n}")).await?);
                    progress.created.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(latencies)
            })
        });
    let mut latencies = Vec::new();
    for task in futures::future::join_all(tasks).await {
        latencies.extend(task??);
    }
    Ok(latencies)
}

/// The run's progress: orders created (counted by the clients) and sagas
/// finished (polled from the database), shown on one line of stderr.
struct Progress {
    started: Instant,
    phase: std::sync::Mutex<String>,
    created: AtomicU64,
    /// Sagas (completed, compensated or failed), as last polled.
    finished: tokio::sync::watch::Sender<(u64, u64)>,
    /// Queries the poller has run, to take out of the commit counts.
    own_queries: AtomicU64,
    paused: AtomicBool,
    done: AtomicBool,
}

/// How often the poller counts finished sagas (and so how late the end of
/// a drain is seen), and how often the line is redrawn.
const POLL: Duration = Duration::from_millis(250);
const REDRAW_EVERY: u32 = 4;

impl Progress {
    fn start(pool: sqlx::PgPool) -> Arc<Self> {
        let progress = Arc::new(Self {
            started: Instant::now(),
            phase: std::sync::Mutex::new(String::new()),
            created: AtomicU64::new(0),
            finished: tokio::sync::watch::Sender::new((0, 0)),
            own_queries: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            done: AtomicBool::new(false),
        });
        let poller = Arc::clone(&progress);
        tokio::spawn(async move {
            if let Err(error) = poller.poll(pool).await {
                eprintln!("\nprogress poller stopped: {error:#}");
            }
        });
        progress
    }

    async fn poll(&self, pool: sqlx::PgPool) -> anyhow::Result<()> {
        // One connection, so the poller's queries are easy to count.
        let mut connection = pool.acquire().await?;
        // Sagas finished since the run began: an index range however much
        // history the database holds.
        let since: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&mut *connection)
            .await?;
        let mut ticks = tokio::time::interval(POLL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last = (Instant::now(), 0);
        for tick in 0u32.. {
            ticks.tick().await;
            if self.done.load(Ordering::Relaxed) {
                break;
            }
            // While paused the server is left alone, so that its statistics
            // can settle; the line still shows the time.
            if !self.paused.load(Ordering::Relaxed) {
                let (completed, other): (i64, i64) = sqlx::query_as(
                    "SELECT count(*) FILTER (WHERE state = 'completed'),
                            count(*) FILTER (WHERE state IN ('compensated', 'failed'))
                       FROM saga.saga_instances WHERE finished_at >= $1",
                )
                .bind(since)
                .fetch_one(&mut *connection)
                .await?;
                self.own_queries.fetch_add(1, Ordering::Relaxed);
                self.finished
                    .send_replace(((completed + other) as u64, other as u64));
            }
            if tick % REDRAW_EVERY == 0 {
                let finished = self.finished.borrow().0;
                let rate = (finished - last.1) as f64 / last.0.elapsed().as_secs_f64();
                last = (Instant::now(), finished);
                eprint!(
                    "\r\x1b[K{:>6.1} s  {:<28} created {:>6}  finished {:>6}  {:>6.0} sagas/s",
                    self.started.elapsed().as_secs_f64(),
                    self.phase.lock().expect("not poisoned"),
                    self.created.load(Ordering::Relaxed),
                    finished,
                    rate
                );
            }
        }
        Ok(())
    }

    fn phase(&self, name: &str) {
        *self.phase.lock().expect("not poisoned") = name.to_owned();
    }

    fn own_queries(&self) -> u64 {
        self.own_queries.load(Ordering::Relaxed)
    }

    /// Stops polling for `length`.
    async fn pause(&self, length: Duration) {
        self.paused.store(true, Ordering::Relaxed);
        tokio::time::sleep(length).await;
        self.paused.store(false, Ordering::Relaxed);
    }

    /// Waits until every saga of the orders created so far is final, and
    /// fails if any did not complete.
    async fn drained(&self) -> anyhow::Result<()> {
        let created = self.created.load(Ordering::Relaxed);
        let mut finished = self.finished.subscribe();
        let waited = tokio::time::timeout(
            Duration::from_secs(600),
            finished.wait_for(|(finished, _)| *finished >= created),
        )
        .await
        .is_ok_and(|changed| changed.is_ok());
        let (finished, other) = *finished.borrow();
        anyhow::ensure!(other == 0, "{other} sagas did not complete");
        anyhow::ensure!(
            waited,
            "only {finished} of {created} sagas finished in 10 minutes"
        );
        Ok(())
    }

    fn finish(&self) {
        self.done.store(true, Ordering::Relaxed);
        eprintln!();
    }
}

/// Per order, in seconds since the epoch: created (the order service) and
/// final (the orchestrator).
struct PhaseFigures {
    timeline: Vec<(f64, f64)>,
    create_latencies: Vec<f64>,
}

impl PhaseFigures {
    fn new(timeline: Vec<(f64, f64)>, create_latencies: Vec<f64>) -> Self {
        Self {
            timeline,
            create_latencies,
        }
    }

    fn orders(&self) -> usize {
        self.timeline.len()
    }

    /// First creation to last end, in seconds.
    fn span(&self) -> f64 {
        self.latest(|t| t.1) - self.earliest(|t| t.0)
    }

    /// The smallest and the largest of one timestamp over the timeline.
    fn earliest(&self, at: fn(&(f64, f64)) -> f64) -> f64 {
        self.timeline.iter().map(at).fold(f64::INFINITY, f64::min)
    }

    fn latest(&self, at: fn(&(f64, f64)) -> f64) -> f64 {
        self.timeline
            .iter()
            .map(at)
            .fold(f64::NEG_INFINITY, f64::max)
    }

    fn finished_within(&self, from: f64, to: f64) -> usize {
        self.timeline
            .iter()
            .filter(|(_, end)| (from..=to).contains(end))
            .count()
    }

    fn row(&self, out: &mut String, name: &str, finished_per_sec: f64) -> std::fmt::Result {
        let first = self.earliest(|t| t.0);
        let last = self.latest(|t| t.0);
        let end_to_end = percentiles(
            self.timeline
                .iter()
                .map(|(c, f)| (f - c) * 1000.0)
                .collect(),
        );
        let create = percentiles(self.create_latencies.clone());
        writeln!(
            out,
            "| {name} | {} | {:.0} | {} / {} | {} / {} | {finished_per_sec:.1} |",
            self.orders(),
            self.orders() as f64 / (last - first),
            ms(end_to_end.p50),
            ms(end_to_end.p99),
            ms(create.p50),
            ms(create.p99),
        )
    }
}

struct Percentiles {
    p50: f64,
    p99: f64,
}

fn percentiles(mut samples: Vec<f64>) -> Percentiles {
    if samples.is_empty() {
        return Percentiles {
            p50: f64::NAN,
            p99: f64::NAN,
        };
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Percentiles {
        p50: at(0.50),
        p99: at(0.99),
    }
}

/// Milliseconds, in seconds past ten thousand.
fn ms(value: f64) -> String {
    if value >= 10_000.0 {
        format!("{:.1} s", value / 1000.0)
    } else if value >= 100.0 {
        format!("{value:.0} ms")
    } else {
        format!("{value:.1} ms")
    }
}

/// Creation and end of every order whose idempotency key starts with
/// `prefix`; fails if any saga is not final.
async fn timeline(pool: &sqlx::PgPool, prefix: &str) -> anyhow::Result<Vec<(f64, f64)>> {
    let rows: Vec<(f64, Option<f64>)> = sqlx::query_as(
        "SELECT extract(epoch FROM o.created_at)::float8,
                extract(epoch FROM s.finished_at)::float8
           FROM saga.saga_instances s
           JOIN orders.order_view o ON o.order_id::text = s.business_key
           JOIN orders.idempotency_keys k ON k.order_id = o.order_id
          WHERE k.key LIKE $1 || '%'",
    )
    .bind(prefix)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(created, finished)| Ok((created, finished.context("a saga without an end")?)))
        .collect()
}

/// The database server's clock, in seconds since the epoch: the one the
/// sagas' timestamps come from.
async fn db_clock(admin: &mut sqlx::PgConnection) -> anyhow::Result<f64> {
    Ok(
        sqlx::query_scalar("SELECT extract(epoch FROM clock_timestamp())::float8")
            .fetch_one(admin)
            .await?,
    )
}

/// The processes whose CPU time and memory are counted, by name.
struct Processes {
    /// Each with how to read its CPU ticks (`None`: not on this machine).
    cpu: Vec<(String, Option<CpuSource>)>,
    rss: Vec<(String, u32)>,
}

#[derive(Clone, Copy)]
enum CpuSource {
    /// utime + stime.
    Process(u32),
    /// A PostgreSQL postmaster: its own and its reaped children's time,
    /// plus that of the children still alive (the backends).
    Postmaster(u32),
}

impl Processes {
    fn of(stack: &mut Stack, env: &TestEnv) -> Self {
        let mut cpu = Vec::new();
        let mut rss = Vec::new();
        for binary in BINARIES {
            let pid = stack.service_mut(binary.name()).process().pid();
            cpu.push((binary.name().to_owned(), Some(CpuSource::Process(pid))));
            rss.push((binary.name().to_owned(), pid));
        }
        cpu.push((
            "postgres".to_owned(),
            env.postgres()
                .map(|server| CpuSource::Postmaster(server.process().pid())),
        ));
        let broker = env.broker().map(|broker| broker.process().pid());
        cpu.push(("broker".to_owned(), broker.map(CpuSource::Process)));
        if let Some(pid) = broker {
            rss.push(("broker".to_owned(), pid));
        }
        cpu.push((
            "benchmark client".to_owned(),
            Some(CpuSource::Process(std::process::id())),
        ));
        Self { cpu, rss }
    }
}

impl CpuSource {
    fn ticks(self) -> Option<u64> {
        match self {
            Self::Process(pid) => {
                let stat = proc_stat(pid)?;
                Some(stat.utime + stat.stime)
            }
            Self::Postmaster(pid) => {
                let own = proc_stat(pid)?;
                let children: u64 = std::fs::read_dir("/proc")
                    .ok()?
                    .flatten()
                    .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
                    .filter_map(proc_stat)
                    .filter(|child| child.ppid == pid)
                    .map(|child| child.utime + child.stime)
                    .sum();
                Some(own.utime + own.stime + own.cutime + own.cstime + children)
            }
        }
    }
}

/// The fields of `/proc/PID/stat` we read (14 to 17, and the parent, 4).
struct ProcStat {
    ppid: u32,
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name (field 2) is in parentheses and may hold spaces: count the
    // fields from after its closing one, where field 3 begins.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(ProcStat {
        ppid: u32::try_from(field(4)?).ok()?,
        utime: field(14)?,
        stime: field(15)?,
        cutime: field(16)?,
        cstime: field(17)?,
    })
}

/// Busy time of all CPUs in clock ticks: the first line of `/proc/stat`
/// without its idle and iowait fields (and guest time, counted in user).
fn machine_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal guest guest_nice
    Some(
        [0, 1, 2, 5, 6, 7]
            .iter()
            .filter_map(|&i| fields.get(i))
            .sum(),
    )
}

/// The 1-minute load average, before the run starts.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|load| load.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// `VmHWM` of `/proc/PID/status`: the most resident memory the process has
/// had, in MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// Clock ticks per second of `/proc/PID/stat` (`getconf CLK_TCK`; 100 on
/// Linux if that fails).
fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8_lossy(&output.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The counters read before and after the saturation phase.
struct Counters {
    commits: i64,
    statements: Option<Statements>,
    /// By process, in the order of [`Processes::cpu`].
    cpu: Vec<Option<u64>>,
    /// Of every process: to see whether anything else ran meanwhile.
    machine: Option<u64>,
}

/// Calls of the services' statements since the last reset.
#[derive(Clone, Copy)]
struct Statements {
    all: i64,
    /// Without transaction control (BEGIN, COMMIT, ROLLBACK).
    work: i64,
}

/// Transaction control, as pg_stat_statements records it.
const TRANSACTION_CONTROL: &str = r"^\s*(BEGIN|START TRANSACTION|COMMIT|END|ROLLBACK)\y";

impl Counters {
    /// Reads the counters (the statements' only with `statements`).
    async fn read(
        admin: &mut sqlx::PgConnection,
        processes: &Processes,
        statements: bool,
    ) -> anyhow::Result<Self> {
        let cpu = processes
            .cpu
            .iter()
            .map(|(_, source)| source.and_then(CpuSource::ticks))
            .collect();
        let statements = if statements {
            let (all, work): (i64, i64) = sqlx::query_as(
                "SELECT coalesce(sum(calls), 0)::int8,
                        coalesce(sum(calls) FILTER (WHERE upper(query) !~ $2), 0)::int8
                   FROM pg_stat_statements
                  WHERE userid IN (SELECT oid FROM pg_roles WHERE rolname = ANY($1))",
            )
            .bind(service_roles())
            .bind(TRANSACTION_CONTROL)
            .fetch_one(&mut *admin)
            .await
            .context("reading pg_stat_statements")?;
            Some(Statements { all, work })
        } else {
            None
        };
        Ok(Self {
            commits: read_commits(admin).await?,
            statements,
            cpu,
            machine: machine_ticks(),
        })
    }
}

fn service_roles() -> Vec<String> {
    BINARIES
        .iter()
        .map(|binary| binary.manifest.role.to_owned())
        .collect()
}

async fn read_commits(admin: &mut sqlx::PgConnection) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT sum(xact_commit)::int8 FROM pg_stat_database")
            .fetch_one(admin)
            .await?,
    )
}

/// The services' statements run most often, with their calls.
async fn top_statements(
    admin: &mut sqlx::PgConnection,
    limit: i64,
) -> anyhow::Result<Vec<(i64, String)>> {
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT sum(calls)::int8, regexp_replace(query, '\\s+', ' ', 'g')
           FROM pg_stat_statements
          WHERE userid IN (SELECT oid FROM pg_roles WHERE rolname = ANY($1))
          GROUP BY 2 ORDER BY 1 DESC LIMIT $2",
    )
    .bind(service_roles())
    .bind(limit)
    .fetch_all(admin)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(calls, query)| {
            let short: String = query.chars().take(110).collect();
            (calls, short)
        })
        .collect())
}
