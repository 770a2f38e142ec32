//! The README's walkthroughs, run as written against the real system.
//!
//! Each block that follows a `<!-- walkthrough: NAME -->` marker is run with
//! bash (`set -euo pipefail`), with `grpcurl` on the PATH and the default
//! ports replaced by the ports this test's services listen on. Blocks that
//! continue a shell session (using `$TOKEN`) run after the ones they need.
//! Against a stack over TLS, `-plaintext` is replaced by the flags the
//! README gives for `cargo xtask up --tls` (the CA, and a client
//! certificate). The stack runs what a deployment runs by default: new
//! orders on the order saga's newest version.

use std::process::Command;
use std::time::Duration;

use dev_stack::tools;
use e2e::{BINARIES, Stack, StackBuilder};
use saga_orchestrator::order_saga;

/// The system as the README describes it: default settings.
fn as_deployed() -> StackBuilder {
    Stack::builder().order_saga_version(order_saga::NEWEST)
}

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
    if let Some(tls) = stack.tls() {
        let certificates = tls.certificates;
        script = script.replace(
            "grpcurl -plaintext",
            &format!(
                "grpcurl -cacert {} -cert {} -key {}",
                certificates.ca().display(),
                certificates.cert("client").display(),
                certificates.key("client").display()
            ),
        );
        assert!(!script.contains("-plaintext"), "{script}");
    }
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
    let stack = as_deployed().start().await.unwrap();
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
    let stack = as_deployed().start().await.unwrap();
    let output = run(&stack, &["login"]);
    assert!(output.contains("\"userId\""), "registered: {output}");
    // ListOrders answered (an empty list prints as `{}`), so the token worked.
    assert!(output.trim_end().ends_with('}'), "{output}");
}

#[tokio::test]
async fn happy_and_declined_walkthroughs() {
    let stack = as_deployed().start().await.unwrap();
    let started = std::time::Instant::now();
    let output = run(&stack, &["login", "happy", "declined"]);
    eprintln!("walkthrough in cleartext: {:?}", started.elapsed());
    assert!(output.contains("SAGA_STATE_COMPLETED"), "{output}");
    assert!(output.contains("\"step\": \"capture-payment\""), "{output}");
    assert!(output.contains("STATUS_SKIPPED"), "the review: {output}");
    assert!(output.contains("SAGA_STATE_COMPENSATED"), "{output}");
    assert!(
        output.contains("authorize-payment: payment declined: card_declined"),
        "{output}"
    );
    assert!(output.contains("PAYMENT_STATUS_DECLINED"), "{output}");
}

#[tokio::test]
async fn operator_walkthrough() {
    let stack = as_deployed().start().await.unwrap();
    let output = run(&stack, &["login", "happy", "declined", "operator"]);
    assert!(output.contains("\"pauseRequested\": true"), "{output}");
    assert!(
        output.contains("steps open-order, authorize-payment may have taken effect"),
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
        output.contains("authorize-payment: payment declined: card_declined"),
        "{output}"
    );
}

#[tokio::test]
async fn review_and_return_walkthrough() {
    let stack = as_deployed().start().await.unwrap();
    let output = run(&stack, &["login", "happy", "review"]);
    assert!(output.contains("ORDER_STATUS_PENDING_REVIEW"), "{output}");
    assert!(output.contains("ORDER_STATUS_REVIEW_APPROVED"), "{output}");
    assert!(
        output.contains("\"sagaType\": \"order-return\""),
        "{output}"
    );
    assert!(output.contains("PAYMENT_KIND_AUTHORIZATION"), "{output}");
    assert!(output.contains("PAYMENT_STATUS_REFUNDED"), "{output}");
}

/// The same walkthroughs against a stack where every connection is TLS:
/// gRPC with client certificates required (the tests' grpcurl presents
/// one), between the services too, PostgreSQL with `verify-full`, and
/// Kafka (`KAFKA_SECURITY_PROTOCOL=ssl`, each service presenting its own
/// certificate to a broker reached over TLS only): the sagas' events all
/// travel over it.
#[tokio::test]
async fn happy_and_declined_walkthroughs_over_tls() {
    let (certificates, infrastructure) = e2e::tls_infrastructure().await.unwrap();
    let stack = as_deployed()
        .tls(e2e::TlsStack {
            certificates,
            infrastructure,
            client_auth: true,
        })
        .start()
        .await
        .unwrap();
    assert!(
        infrastructure.kafka_tls().is_some(),
        "the broker is reached over TLS only"
    );
    let started = std::time::Instant::now();
    let output = run(&stack, &["login", "happy", "declined"]);
    eprintln!("walkthrough over TLS: {:?}", started.elapsed());
    assert!(output.contains("SAGA_STATE_COMPLETED"), "{output}");
    assert!(output.contains("\"step\": \"confirm-order\""), "{output}");
    assert!(output.contains("SAGA_STATE_COMPENSATED"), "{output}");
    assert!(output.contains("PAYMENT_STATUS_DECLINED"), "{output}");
}
