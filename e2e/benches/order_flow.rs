//! How fast an order goes through the whole system: the four real binaries
//! (built in release), PostgreSQL and the broker, as `cargo xtask test`
//! runs them.
//!
//!     cargo bench -p e2e --bench order_flow [-- ORDERS [CLIENTS [RATE]]]
//!
//! It measures, for `ORDERS` orders (default 2000) placed by `CLIENTS`
//! concurrent customers (default 16), each on its own connection, as fast
//! as they are answered or, with `RATE`, at that many orders per second in
//! all (to see latencies below saturation):
//!
//! - CreateOrder latency, as the client sees it;
//! - the saga's end-to-end latency, from the order's creation (the order
//!   service's clock) to the saga's completion (the orchestrator's), both
//!   read from the database afterwards, so nothing is polled while timing;
//! - throughput: orders confirmed per second, first creation to last
//!   completion.
//!
//! A benchmark, not a test: it prints figures and asserts only that every
//! saga completed.

// Printing its figures is the benchmark's job.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use api_order::v1::order_service_client::OrderServiceClient;
use e2e::{Stack, order_request};
use testkit::grpc::{bearer, channel};

struct Percentiles {
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
}

fn percentiles(mut samples: Vec<f64>) -> Percentiles {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Percentiles {
        p50: at(0.50),
        p95: at(0.95),
        p99: at(0.99),
        max: at(1.0),
    }
}

fn print_row(what: &str, ms: &Percentiles) {
    println!(
        "{what:<32} p50 {:>7.2} ms   p95 {:>7.2} ms   p99 {:>7.2} ms   max {:>7.2} ms",
        ms.p50, ms.p95, ms.p99, ms.max
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with("--"))
        .map(|arg| arg.parse::<usize>());
    let orders = args.next().transpose()?.unwrap_or(2000);
    let clients = args.next().transpose()?.unwrap_or(16).max(1);
    let rate = args.next().transpose()?.filter(|rate| *rate > 0);

    // Default settings, logs at info included: what a deployment runs.
    let stack = Stack::start().await?;
    let url = stack.service(order_service::NAME).url();
    let mut customers = Vec::new();
    for n in 0..clients {
        let token = stack
            .customer_token(&format!("bench-{n}@example.com"))
            .await?;
        customers.push((OrderServiceClient::new(channel(&url).await?), token));
    }

    // Warm-up: connections, caches, the consumer group's assignment.
    let (client, token) = &mut customers[0];
    for n in 0..20 {
        client
            .create_order(bearer(
                order_request(&format!("warm-up-{n}"), "tok_visa"),
                token,
            ))
            .await?;
    }
    let pool = stack.scenario.inspect().await?;
    wait_for_sagas(&pool, 20).await?;

    let pace = match rate {
        Some(rate) => format!("at {rate} orders/s"),
        None => "as fast as answered".to_owned(),
    };
    println!("\n{orders} orders by {clients} concurrent customers, {pace} (release build)");
    let started = Instant::now();
    let per_client = orders.div_ceil(clients);
    let tasks = customers
        .into_iter()
        .enumerate()
        .map(|(c, (mut client, token))| {
            // Each client's share of the rate, if any.
            let mut pacer = rate.map(|rate| {
                let mut interval =
                    tokio::time::interval(Duration::from_secs_f64(clients as f64 / rate as f64));
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                interval
            });
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_client);
                for n in (c * per_client..((c + 1) * per_client).min(orders))
                    .map(|n| format!("bench-{n}"))
                {
                    if let Some(pacer) = &mut pacer {
                        pacer.tick().await;
                    }
                    let sent = Instant::now();
                    client
                        .create_order(bearer(order_request(&n, "tok_visa"), &token))
                        .await?;
                    latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                }
                anyhow::Ok(latencies)
            })
        });
    let mut create_latencies = Vec::with_capacity(orders);
    for task in futures::future::join_all(tasks).await {
        create_latencies.extend(task??);
    }
    let created = started.elapsed();
    wait_for_sagas(&pool, 20 + orders as i64).await?;

    // Per order, in seconds since the epoch: created (the order service's
    // clock), saga started and saga completed (the orchestrator's).
    let timeline: Vec<(f64, f64, f64)> = sqlx::query_as(
        "SELECT extract(epoch FROM o.created_at)::float8,
                extract(epoch FROM s.created_at)::float8,
                extract(epoch FROM s.finished_at)::float8
           FROM saga.saga_instances s
           JOIN orders.order_view o ON o.order_id::text = s.business_key
           JOIN orders.idempotency_keys k ON k.order_id = o.order_id
          WHERE k.key LIKE 'bench-%'",
    )
    .fetch_all(&pool)
    .await?;
    let ms = |hop: fn(&(f64, f64, f64)) -> f64| -> Vec<f64> {
        timeline.iter().map(|times| hop(times) * 1000.0).collect()
    };
    let first_created = timeline.iter().map(|t| t.0).fold(f64::INFINITY, f64::min);
    let last_completed = timeline
        .iter()
        .map(|t| t.2)
        .fold(f64::NEG_INFINITY, f64::max);
    let span = last_completed - first_created;

    print_row("CreateOrder (client)", &percentiles(create_latencies));
    print_row(
        "created -> saga started",
        &percentiles(ms(|(created, started, _)| started - created)),
    );
    print_row(
        "saga started -> completed",
        &percentiles(ms(|(_, started, completed)| completed - started)),
    );
    print_row(
        "created -> saga completed",
        &percentiles(ms(|(created, _, completed)| completed - created)),
    );
    println!(
        "{:<32} {:.0} orders/s created, {:.0} orders/s confirmed end to end",
        "throughput",
        orders as f64 / created.as_secs_f64(),
        orders as f64 / span
    );
    Ok(())
}

/// Waits until `count` sagas have completed (and fails if any did not).
async fn wait_for_sagas(pool: &sqlx::PgPool, count: i64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (completed, other): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state = 'completed'),
                    count(*) FILTER (WHERE state IN ('compensated', 'failed'))
               FROM saga.saga_instances",
        )
        .fetch_one(pool)
        .await?;
        anyhow::ensure!(other == 0, "{other} sagas did not complete");
        if completed >= count {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {completed} of {count} sagas completed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
