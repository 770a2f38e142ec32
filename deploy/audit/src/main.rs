//! `ordersaga-audit`: checks a deployment's money and sagas (see the
//! library's documentation for the invariants), prints a table, and exits
//! non-zero if any invariant is broken.

// Printing the table is the program's job.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "ordersaga-audit",
    version,
    about = "Checks that no money was lost, made up or left behind: ledger, provider, sagas, outboxes, read model"
)]
struct Args {
    /// An administrative URL of the deployment's database (a role that can
    /// read every service's schema), such as
    /// postgres://postgres:secret@127.0.0.1:5432/ordersaga.
    #[arg(long = "database-url", env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// A load client's record of the CreateOrder requests it made (JSON
    /// lines, as `cargo xtask chaos` writes them): every accepted one must
    /// exist exactly once.
    #[arg(long)]
    record: Option<PathBuf>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: &Args) -> anyhow::Result<bool> {
    let record = args
        .record
        .as_deref()
        .map(audit::Record::read)
        .transpose()?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&args.database_url)
        .await
        .context("connecting to the database (DATABASE_URL)")?;
    let inputs = audit::Inputs {
        record,
        fences: None,
    };
    let report = audit::audit(&pool, &inputs).await?;
    println!("{}", report.render());
    if report.passed() {
        println!("Every invariant holds.");
    } else {
        println!("Broken: {}.", report.failures().join(", "));
    }
    Ok(report.passed())
}
