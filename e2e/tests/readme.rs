//! The README's walkthroughs, run as written against the real system.
//!
//! Each block that follows a `<!-- walkthrough: NAME -->` marker is run with
//! bash (`set -euo pipefail`), with `grpcurl` on the PATH and the default
//! ports replaced by the ports this test's services listen on.

use std::process::Command;

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

fn run(stack: &Stack, script: &str) -> String {
    let mut script = script.to_owned();
    let defaults = [
        auth_service::DEFAULT_PORT,
        order_service::DEFAULT_PORT,
        payment_service::DEFAULT_PORT,
        saga_orchestrator::DEFAULT_PORT,
    ];
    for (binary, default) in BINARIES.iter().zip(defaults) {
        script = script.replace(
            &format!("localhost:{default}"),
            &format!("127.0.0.1:{}", stack.port(binary.name)),
        );
    }
    let grpcurl = tools::grpcurl().unwrap();
    let path = format!(
        "{}:{}",
        grpcurl.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
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
    let output = run(&stack, &walkthrough("discovery"));
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
