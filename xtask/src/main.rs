//! Developer commands for this workspace.
//!
//! - `cargo xtask up [--detach] [--tls]`: PostgreSQL, a Kafka-protocol
//!   broker and the four services on their default ports, until Ctrl-C (or
//!   until `cargo xtask down` with `--detach`); with `--tls`, over TLS.
//! - `cargo xtask certs`: the local CA and certificates of `up --tls`.
//! - `cargo xtask test`: format check, clippy, the deployment check, and
//!   every test against a private PostgreSQL and broker: what CI runs.
//! - `cargo xtask deploy-check`: docker-compose.yml and every Kubernetes
//!   overlay validated, and checked against the services' settings.
//! - `cargo xtask chaos [--duration S] [--rate R] [--seed N]`: several
//!   replicas of every service under seeded faults, then audited.
//! - `cargo xtask audit [--database-url URL] [--record FILE]`: the money
//!   audit, against any deployment's database.

// A command-line tool: printing to stdout is its job.
#![allow(clippy::print_stdout)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod chaos;
mod checks;
mod deploy;
mod docs;
mod install;
mod stack;

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Developer commands for ordersaga")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start PostgreSQL, the broker and the four services, and print how to call them.
    Up(stack::UpArgs),
    /// Stop a stack started with `up --detach`.
    Down,
    /// Make the local CA and certificates of `up --tls` (for
    /// docker-compose.tls.yml) without starting anything.
    Certs,
    /// Format check, clippy, the deployment check and every test (what CI runs).
    Test(checks::TestArgs),
    /// Validate docker-compose.yml and the Kubernetes overlays, and check
    /// them against the settings each service reads.
    DeployCheck,
    /// Run several replicas of every service under a seeded schedule of
    /// faults and a mixed load, then audit the money and the sagas.
    Chaos(chaos::ChaosArgs),
    /// Audit a deployment's database: ledger, provider, sagas, outboxes,
    /// read model, fences.
    Audit(chaos::AuditArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Up(args) => stack::up(args).await,
            Command::Down => stack::down().await,
            Command::Certs => stack::certs(),
            Command::Test(args) => checks::test(args).await,
            Command::DeployCheck => deploy::check().await,
            Command::Chaos(args) => chaos::chaos(&args),
            Command::Audit(args) => chaos::audit(&args),
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
