//! A small WebDriver client: headless Chromium driven through Debian's
//! `chromedriver` over the W3C WebDriver protocol (JSON over HTTP/1.1), for
//! the dashboard's tests that click. Only what those tests use: open a
//! URL, find, click and type, run a script, wait for a condition in the
//! page, take a screenshot.
//!
//! Waiting happens in the page: [`Browser::wait_for`] runs an async script
//! that resolves on the first DOM change after which its condition holds
//! (a `MutationObserver`), bounded by WebDriver's script timeout. No sleeps.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// The key under which WebDriver names an element.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process with one Chromium session. Dropping it ends the
/// session and the driver.
pub(crate) struct Browser {
    driver: Child,
    address: String,
    session: String,
    profile: tempfile::TempDir,
}

/// An element of the page, by WebDriver's reference.
pub(crate) struct Element(String);

impl Browser {
    /// Starts chromedriver on a port of its choosing and a headless
    /// Chromium session with a fresh profile and a tall window (so that a
    /// screenshot holds the whole dashboard).
    pub(crate) async fn start() -> anyhow::Result<Self> {
        let mut driver = Command::new(dev_stack::tools::chromedriver()?)
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting chromedriver")?;
        let stdout = driver.stdout.take().context("chromedriver's stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let port = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                // "ChromeDriver was started successfully on port 36075."
                if let Some(rest) = line.split("successfully on port ").nth(1) {
                    return rest
                        .trim_end_matches('.')
                        .parse::<u16>()
                        .context("its port");
                }
            }
            bail!("chromedriver exited before it listened")
        })
        .await
        .context("chromedriver did not start within 30 s")??;
        // Its later output is not read: let it drain, so it never blocks.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let address = format!("127.0.0.1:{port}");
        let profile = tempfile::tempdir()?;
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": dev_stack::tools::chromium()?,
                    "args": [
                        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--disable-quic", "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--window-size=1280,2600",
                        format!("--user-data-dir={}", profile.path().display()),
                    ],
                },
            }}
        });
        let created = call(&address, "POST", "/session", Some(&capabilities)).await?;
        let session = created["sessionId"]
            .as_str()
            .context("a session id")?
            .to_owned();
        Ok(Self {
            driver,
            address,
            session,
            profile,
        })
    }

    async fn command(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let path = format!("/session/{}{path}", self.session);
        call(&self.address, method, &path, body).await
    }

    pub(crate) async fn open(&self, url: &str) -> anyhow::Result<()> {
        self.command("POST", "/url", Some(&json!({ "url": url })))
            .await
            .map(drop)
    }

    /// The page's URL as the browser has it now.
    pub(crate) async fn url(&self) -> anyhow::Result<String> {
        let url = self.command("GET", "/url", None).await?;
        url.as_str().map(str::to_owned).context("a URL")
    }

    pub(crate) async fn find(&self, css: &str) -> anyhow::Result<Element> {
        let found = self
            .command(
                "POST",
                "/element",
                Some(&json!({ "using": "css selector", "value": css })),
            )
            .await
            .with_context(|| format!("finding {css}"))?;
        let id = found[ELEMENT].as_str().context("an element reference")?;
        Ok(Element(id.to_owned()))
    }

    pub(crate) async fn click(&self, css: &str) -> anyhow::Result<()> {
        let element = self.find(css).await?;
        self.command(
            "POST",
            &format!("/element/{}/click", element.0),
            Some(&json!({})),
        )
        .await
        .with_context(|| format!("clicking {css}"))
        .map(drop)
    }

    pub(crate) async fn type_into(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let element = self.find(css).await?;
        self.command(
            "POST",
            &format!("/element/{}/value", element.0),
            Some(&json!({ "text": text })),
        )
        .await
        .with_context(|| format!("typing into {css}"))
        .map(drop)
    }

    /// The rendered text of the element `css`.
    pub(crate) async fn text(&self, css: &str) -> anyhow::Result<String> {
        let element = self.find(css).await?;
        let text = self
            .command("GET", &format!("/element/{}/text", element.0), None)
            .await?;
        text.as_str()
            .map(str::to_owned)
            .context("an element's text")
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    pub(crate) async fn run(&self, script: &str, args: Value) -> anyhow::Result<Value> {
        self.command(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": args })),
        )
        .await
    }

    /// Waits until the JavaScript expression `condition` is truthy in the
    /// page, re-checking on every change to the DOM, and returns its value;
    /// fails after `timeout`, with `what`.
    pub(crate) async fn wait_for(
        &self,
        what: &str,
        condition: &str,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        self.command(
            "POST",
            "/timeouts",
            Some(&json!({ "script": u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX) })),
        )
        .await?;
        let script = format!(
            "const done = arguments[arguments.length - 1];
             const check = () => {{ try {{ return ({condition}); }} catch (e) {{ return null; }} }};
             const now = check();
             if (now) return done(now);
             const observer = new MutationObserver(() => {{
               const value = check();
               if (value) {{ observer.disconnect(); done(value); }}
             }});
             observer.observe(document, {{ subtree: true, childList: true, attributes: true, characterData: true }});"
        );
        self.command(
            "POST",
            "/execute/async",
            Some(&json!({ "script": script, "args": [] })),
        )
        .await
        .with_context(|| format!("waiting for {what} ({condition})"))
    }

    /// Saves what the window shows as a PNG at `path`.
    pub(crate) async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        let png = self.command("GET", "/screenshot", None).await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().context("a screenshot")?)
            .context("decoding the screenshot")?;
        if let Some(folder) = path.parent() {
            std::fs::create_dir_all(folder)?;
        }
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the session (and its Chromium) before the driver is killed,
        // with a blocking request: a drop cannot wait on the runtime.
        let request = format!(
            "DELETE /session/{} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            self.session, self.address
        );
        if let Ok(mut stream) = std::net::TcpStream::connect(&self.address) {
            use std::io::{Read as _, Write as _};
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = stream.write_all(request.as_bytes());
            let _ = stream.read_to_end(&mut Vec::new());
        }
        let _ = self.driver.start_kill();
        let _ = &self.profile;
    }
}

/// Where a test keeps its screenshots: `<target>/dashboard-screenshots/`.
pub(crate) fn screenshot_path(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| dev_stack::tools::workspace_root().join("target"));
    target
        .join("dashboard-screenshots")
        .join(format!("{name}.png"))
}

/// One WebDriver command: its answer's `value`, or its error as an error.
async fn call(
    address: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<Value> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\n\
         content-type: application/json; charset=utf-8\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = BufReader::new(
        TcpStream::connect(address)
            .await
            .with_context(|| format!("connecting to chromedriver at {address}"))?,
    );
    stream.get_mut().write_all(request.as_bytes()).await?;
    // chromedriver says `Connection: close` but keeps the connection open:
    // the answer ends where its Content-Length says.
    let mut head = String::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await? == 0 {
            bail!("chromedriver closed the connection mid-answer");
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().context("a Content-Length")?;
        }
        head.push_str(&line);
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await?;
    let body = String::from_utf8(body).context("chromedriver's answer")?;
    let answer: Value =
        serde_json::from_str(&body).with_context(|| format!("{method} {path}: {head}: {body}"))?;
    let value = answer.get("value").cloned().unwrap_or(Value::Null);
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "{method} {path}: {}: {}",
            value["error"].as_str().unwrap_or(&head),
            value["message"].as_str().unwrap_or_default()
        );
    }
    Ok(value)
}
