use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// A child process tied to its parent by a lifeline.
///
/// The program runs under a tiny `sh` watchdog whose stdin is a pipe held by
/// this value. When the pipe closes, because this value is dropped or
/// because the parent process died in any way (even SIGKILL), the watchdog
/// sends the stop signal, waits for the program and removes its scratch
/// folder. That is what lets a test binary keep one PostgreSQL for its whole
/// run in a `static` without ever leaking it.
#[derive(Debug)]
pub struct Supervised {
    name: String,
    pid: u32,
    watchdog: Child,
    lifeline: Option<ChildStdin>,
}

/// How to start a [`Supervised`] program.
#[derive(Debug)]
pub struct Spawn<'a> {
    /// Name for messages.
    pub name: &'a str,
    pub program: &'a Path,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Variables of ours the program must not inherit.
    pub env_remove: &'a [&'a str],
    /// Signal that stops the program gracefully (`TERM`, `INT`, ...).
    pub stop_signal: &'a str,
    /// Where stdout and stderr go.
    pub log: &'a Path,
    /// Run as this (uid, gid) instead of ours.
    pub user: Option<(u32, u32)>,
    /// Removed once the program has stopped.
    pub scratch: Option<&'a Path>,
}

/// The watchdog: starts the program, reports its pid, and stops it when
/// either the lifeline (fd 3, our stdin) closes or the program exits first.
const WATCHDOG: &str = r#"
exec 3<&0
"$@" >&2 </dev/null 3<&- & child=$!
echo "$child"
{ read -r _ <&3; kill -s "$STOP_SIGNAL" "$child" 2>/dev/null; } & guard=$!
exec 3<&-
wait "$child"; status=$?
kill "$guard" 2>/dev/null
[ -n "$SCRATCH" ] && rm -rf "$SCRATCH"
exit "$status"
"#;

impl Supervised {
    pub fn spawn(spec: &Spawn<'_>) -> anyhow::Result<Self> {
        let log =
            File::create(spec.log).with_context(|| format!("creating {}", spec.log.display()))?;
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(WATCHDOG)
            .arg(spec.name)
            .arg(spec.program)
            .args(&spec.args)
            .env("STOP_SIGNAL", spec.stop_signal)
            .env(
                "SCRATCH",
                spec.scratch.map(Path::as_os_str).unwrap_or_default(),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log);
        // Removed from what we pass on; `env` may still set them explicitly.
        for name in spec.env_remove {
            command.env_remove(name);
        }
        command.envs(spec.env.iter().map(|(k, v)| (k, v)));
        if let Some((uid, gid)) = spec.user {
            command.uid(uid).gid(gid);
        }
        let mut watchdog = command
            .spawn()
            .with_context(|| format!("starting {} ({})", spec.name, spec.program.display()))?;

        // The watchdog's only output is the program's pid.
        let stdout = watchdog.stdout.take().context("watchdog stdout")?;
        let mut first_line = String::new();
        BufReader::new(stdout)
            .read_line(&mut first_line)
            .context("reading the child's pid")?;
        let pid = first_line
            .trim()
            .parse()
            .with_context(|| format!("bad pid line {first_line:?}"))?;

        Ok(Self {
            name: spec.name.to_owned(),
            pid,
            lifeline: watchdog.stdin.take(),
            watchdog,
        })
    }

    /// The program's process id (not the watchdog's).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// True while the program is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.watchdog.try_wait(), Ok(None))
    }

    /// Sends a signal to the program, e.g. `STOP` and `CONT` to freeze and
    /// thaw it, or `KILL` to simulate a crash.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args(["-s", signal, &self.pid.to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -s {signal} {} ({}) failed", self.pid, self.name);
        }
        Ok(())
    }

    /// Stops the program with its stop signal and waits up to `grace` for it,
    /// killing it after that. Returns its exit code if it exited by itself.
    pub fn stop(&mut self, grace: Duration) -> anyhow::Result<Option<i32>> {
        drop(self.lifeline.take());
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = self.watchdog.try_wait()? {
                return Ok(status.code());
            }
            if Instant::now() >= deadline {
                let _ = self.signal("KILL");
                self.watchdog.wait()?;
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`stop`](Self::stop) for async callers: waits without blocking the
    /// runtime, whose other tasks (a client closing its connection to the
    /// program, say) may be what the program is waiting for.
    pub async fn stop_async(&mut self, grace: Duration) -> anyhow::Result<Option<i32>> {
        drop(self.lifeline.take());
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            if let Some(status) = self.watchdog.try_wait()? {
                return Ok(status.code());
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = self.signal("KILL");
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Supervised {
    /// Cuts the lifeline without waiting: the watchdog stops the program on
    /// its own, and waiting here could block an async runtime whose tasks
    /// the program is waiting for. Call [`stop`](Self::stop) to wait.
    fn drop(&mut self) {
        drop(self.lifeline.take());
    }
}
