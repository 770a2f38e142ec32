//! The README's walkthroughs, run as written against the real system.
//!
//! Each block that follows a `<!-- walkthrough: NAME -->` marker is run with
//! bash (`set -euo pipefail`), with `grpcurl` on the PATH and the default
//! ports replaced by the ports this test's services listen on. Blocks that
//! continue a shell session (using `$TOKEN`) run after the ones they need.

use std::process::Command;
use std::time::Duration;

use dev_stack::tools;
use e2e::{BINARIES, Stack};

fn walkthrough(name: &str) -> String {
    let readme = std::fs::read_to_string(tools::workspace_root().join("README.md")).unwrap();
    let marker = format!("<!-- walkthrough: {name} -->");
    let after = readme
        .split_once(&marker)
        .unwrap_or_else(|| panic!("no walkthrough {name}"))
        .1;
    let block = after
        .split_once("```sh\n")
        .expect("a sh block after the marker")
        .1;
    block
        .split_once("\n```")
        .expect("the block ends")
        .0
        .to_owned()
}

/// Runs the named walkthroughs, in order, as one bash script.
fn run(stack: &Stack, names: &[&str]) -> String {
    let mut script: String = names.iter().map(|name| walkthrough(name) + "\n").collect();
    for binary in BINARIES {
        script = script.replace(
            &format!("localhost:{}", binary.manifest.grpc_port),
            &format!("127.0.0.1:{}", stack.port(binary.name())),
        );
    }
    let grpcurl = tools::grpcurl().unwrap();
    let path = format!(
        "{}:{}",
        grpcurl.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // The scripts wait in loops; this bounds them.
    let output = Command::new("timeout")
        .arg(Duration::from_secs(120).as_secs().to_string())
        .args(["bash", "-euo", "pipefail", "-c", &script])
        .env("PATH", path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "walkthrough failed:\n{script}\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test]
async fn discovery_walkthrough() {
    let stack = Stack::start().await.unwrap();
    let output = run(&stack, &["discovery"]);
    assert!(
        output.contains("ordersaga.order.v1.OrderService"),
        "{output}"
    );
    assert!(output.contains("rpc CreateOrder"), "{output}");
    assert_eq!(
        output.matches("\"status\": \"SERVING\"").count(),
        2,
        "{output}"
    );
}

#[tokio::test]
async fn login_walkthrough() {
    let stack = Stack::start().await.unwrap();
    let output = run(&stack, &["login"]);
    assert!(output.contains("\"userId\""), "registered: {output}");
    // ListOrders answered (an empty list prints as `{}`), so the token worked.
    assert!(output.trim_end().ends_with('}'), "{output}");
}

#[tokio::test]
async fn happy_and_declined_walkthroughs() {
    let stack = Stack::start().await.unwrap();
    let output = run(&stack, &["login", "happy", "declined"]);
    assert!(output.contains("SAGA_STATE_COMPLETED"), "{output}");
    assert!(output.contains("\"step\": \"confirm-order\""), "{output}");
    assert!(output.contains("SAGA_STATE_COMPENSATED"), "{output}");
    assert!(
        output.contains("payment declined: card_declined"),
        "{output}"
    );
    assert!(output.contains("PAYMENT_STATUS_DECLINED"), "{output}");
}

#[tokio::test]
async fn operator_walkthrough() {
    let stack = Stack::start().await.unwrap();
    let output = run(&stack, &["login", "happy", "declined", "operator"]);
    assert!(output.contains("\"pauseRequested\": true"), "{output}");
    assert!(
        output.contains("steps open-order, process-payment may have taken effect"),
        "{output}"
    );
    // PauseSaga's answer (the pause requested), ResumeSaga's, then
    // CompensateSaga's, which turns the saga back between steps.
    assert_eq!(
        output.matches("\"state\": \"SAGA_STATE_RUNNING\"").count(),
        3,
        "{output}"
    );
    assert!(
        output.contains("process-payment: payment declined: card_declined"),
        "{output}"
    );
}
