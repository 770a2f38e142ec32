//! `cargo xtask chaos` and `cargo xtask audit`: they build and run the
//! chaos driver (the `chaos` binary of the `e2e` crate) and the auditor
//! (`ordersaga-audit`, of `deploy/audit`), so that xtask links neither.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};
use dev_stack::tools;

use crate::install;

#[derive(Debug, clap::Args)]
pub(crate) struct ChaosArgs {
    /// Build and run the services (and the driver) with the release profile.
    #[arg(long)]
    release: bool,
    /// For the driver: `--duration S`, `--rate R`, `--seed N`,
    /// `--fault-gap-min S`, `--fault-gap-max S`, `--quiesce-timeout S`,
    /// `--out DIR`, `--plan-only` (`cargo xtask chaos -- --help`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// Builds every binary, then runs the chaos driver with `args`.
pub(crate) fn chaos(args: &ChaosArgs) -> anyhow::Result<()> {
    install::ensure_tools()?;
    let mut build = cargo(&["build", "--quiet", "--workspace", "--bins"]);
    if args.release {
        build.arg("--release");
    }
    run(&mut build, "building the binaries")?;
    let driver = target_dir(args.release).join("chaos");
    let status = Command::new(&driver)
        .args(&args.args)
        .status()
        .with_context(|| format!("running {}", driver.display()))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(1) => {
            bail!("the chaos run broke an invariant, or did not quiesce (the table says which)")
        }
        _ => bail!("the chaos run failed ({status})"),
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct AuditArgs {
    /// For the auditor: `--database-url URL` (or `DATABASE_URL`, an
    /// administrative URL of the deployment's database), `--record FILE`
    /// (`cargo xtask audit -- --help`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// Builds and runs the auditor with `args`.
pub(crate) fn audit(args: &AuditArgs) -> anyhow::Result<()> {
    let mut command = cargo(&[
        "run",
        "--quiet",
        "-p",
        "audit",
        "--bin",
        "ordersaga-audit",
        "--",
    ]);
    command.args(&args.args);
    let status = command.status().context("running the auditor")?;
    match status.code() {
        Some(0) => Ok(()),
        Some(1) => bail!("the audit found broken invariants (the table says which)"),
        _ => bail!("the audit could not run ({status})"),
    }
}

fn cargo(args: &[&str]) -> Command {
    let mut command = tools::cargo();
    command.args(args).current_dir(tools::workspace_root());
    command
}

fn run(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = command.status().with_context(|| what.to_owned())?;
    if !status.success() {
        bail!("{what} failed");
    }
    Ok(())
}

fn target_dir(release: bool) -> PathBuf {
    tools::tools_dir()
        .parent()
        .expect("tools live in the target folder")
        .join(if release { "release" } else { "debug" })
}
