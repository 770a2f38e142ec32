//! `cargo xtask test`: everything CI checks, in the order that fails fastest.

use std::process::Command;

use anyhow::{Context as _, bail};
use dev_stack::{Broker, KAFKA_ENV, POSTGRES_ENV, PostgresServer, tools};

use crate::install;

#[derive(Debug, clap::Args)]
pub(crate) struct TestArgs {
    /// Skip the format check and clippy.
    #[arg(long)]
    no_lint: bool,
    /// Test name filters, passed on to the test runner.
    filters: Vec<String>,
}

pub(crate) async fn test(args: TestArgs) -> anyhow::Result<()> {
    if !args.no_lint {
        cargo(&["fmt", "--all", "--", "--check"])
            .context("code is not formatted: run `cargo fmt --all`")?;
        cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--quiet",
            "--",
            "-D",
            "warnings",
        ])?;
    }
    // Manifests that drift from the services fail here, before the tests.
    crate::deploy::check().await?;
    install::ensure_test_tools()?;
    // The end-to-end tests run the service binaries; building them here,
    // with the same command those tests use, keeps that out of their time.
    cargo(&["build", "--quiet", "--workspace", "--bins"])?;

    // One PostgreSQL and one broker for the whole run; every test takes its
    // own database and topic names on them.
    let (postgres, broker) = tokio::try_join!(PostgresServer::start(), Broker::start())?;
    let postgres_url = format!("postgres://postgres@127.0.0.1:{}", postgres.port());
    let environment = [
        (POSTGRES_ENV, postgres_url.as_str()),
        (KAFKA_ENV, &broker.bootstrap_servers()),
    ];

    let mut command = if nextest_available() {
        let mut command = cargo_command(&["nextest", "run", "--workspace", "--no-fail-fast"]);
        command.args(&args.filters);
        command
    } else {
        eprintln!("cargo-nextest not found; running the tests with `cargo test`");
        let mut command = cargo_command(&["test", "--workspace", "--no-fail-fast"]);
        if !args.filters.is_empty() {
            command.arg("--").args(&args.filters);
        }
        command
    };
    let status = command
        .envs(environment)
        .status()
        .context("running the tests")?;
    broker.stop()?;
    postgres.stop()?;
    if !status.success() {
        bail!("tests failed");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let status = cargo_command(args)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(())
}

fn cargo_command(args: &[&str]) -> Command {
    let mut command = tools::cargo();
    command.args(args).current_dir(tools::workspace_root());
    command
}

fn nextest_available() -> bool {
    cargo_command(&["nextest", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}
