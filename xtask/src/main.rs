//! Developer commands for this workspace.
//!
//! - `cargo xtask up [--detach]`: PostgreSQL, a Kafka-protocol broker and
//!   the four services on their default ports, until Ctrl-C (or until
//!   `cargo xtask down` with `--detach`).
//! - `cargo xtask test`: format check, clippy, and every test against a
//!   private PostgreSQL and broker: what CI runs.

// A command-line tool: printing to stdout is its job.
#![allow(clippy::print_stdout)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod checks;
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
    /// Format check, clippy and every test (what CI runs).
    Test(checks::TestArgs),
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
            Command::Test(args) => checks::test(args).await,
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
