//! Making sure the machine has what the stack and the tests run.

use std::process::Command;

use anyhow::{Context as _, bail};
use dev_stack::tools;

/// PostgreSQL server binaries, the broker and grpcurl: located, or fetched
/// (PostgreSQL with apt-get on Debian and Ubuntu, when we may).
pub(crate) fn ensure_tools() -> anyhow::Result<()> {
    if tools::postgres_bin_dir().is_err() {
        apt_install(
            "postgresql",
            "PostgreSQL server binaries (initdb, postgres)",
        )?;
        tools::postgres_bin_dir()?;
    }
    tools::tansu()?;
    tools::grpcurl()?;
    Ok(())
}

/// What the tests need beyond [`ensure_tools`]: a headless Chromium for the
/// dashboard's browser test.
pub(crate) fn ensure_test_tools() -> anyhow::Result<()> {
    ensure_tools()?;
    if tools::chromium().is_err() {
        apt_install("chromium", "Chromium (for the dashboard's browser test)")?;
        tools::chromium()?;
    }
    if tools::chromedriver().is_err() {
        apt_install(
            "chromium-driver",
            "chromedriver (for the dashboard's click tests)",
        )?;
        tools::chromedriver()?;
    }
    Ok(())
}

/// Prometheus' `promtool`, for the deploy check of the alert rules:
/// located, or fetched with Debian's `prometheus` package.
pub(crate) fn promtool() -> anyhow::Result<std::path::PathBuf> {
    if let Some(promtool) = tools::find_in_path("promtool") {
        return Ok(promtool);
    }
    apt_install("prometheus", "promtool (Prometheus' rule checker)")?;
    tools::find_in_path("promtool").context("the prometheus package installed no promtool")
}

fn apt_install(package: &str, what: &str) -> anyhow::Result<()> {
    if tools::find_in_path("apt-get").is_none() {
        bail!(
            "{what} missing, and there is no apt-get to install them: install {package} and retry"
        );
    }
    eprintln!("{what} not found; installing Debian's {package} package");
    let sudo: &[&str] = if running_as_root() { &[] } else { &["sudo"] };
    for args in [
        &["apt-get", "update", "-qq"][..],
        &["apt-get", "install", "-y", "-qq", package][..],
    ] {
        let mut full: Vec<&str> = sudo.to_vec();
        full.extend_from_slice(args);
        let status = Command::new(full[0])
            .args(&full[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .with_context(|| format!("running {}", full.join(" ")))?;
        if !status.success() {
            bail!("{} failed", full.join(" "));
        }
    }
    Ok(())
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self")
        .map(|meta| meta.uid() == 0)
        .unwrap_or(false)
}
