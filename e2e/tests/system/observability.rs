//! Metrics and the dashboard while sagas run: Prometheus text on each
//! service's HTTP port, and the orchestrator's dashboard page as headless
//! Chromium renders it.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use e2e::{Stack, http_get, order_request};
use testkit::grpc::bearer;

/// The service's metrics, as `name{labels} -> value`.
async fn scrape(stack: &Stack, service: &str) -> HashMap<String, f64> {
    let address = stack
        .service(service)
        .http_address()
        .expect("the service logged its HTTP address");
    let body = http_get(&format!("http://{address}/metrics"), None).await;
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of every series of `name` with the given label (all if none).
fn total(metrics: &HashMap<String, f64>, name: &str, label: &str) -> f64 {
    metrics
        .iter()
        .filter(|(series, _)| series.starts_with(&format!("{name}{{")) || series.as_str() == name)
        .filter(|(series, _)| series.contains(label))
        .map(|(_, value)| value)
        .sum()
}

#[tokio::test]
async fn metrics_change_as_sagas_run() {
    let stack = Stack::start().await.unwrap();
    let customer = stack.customer_token("metrics@example.com").await.unwrap();
    let before = scrape(&stack, "saga-orchestrator").await;
    assert_eq!(total(&before, "sagas_finished_total", "completed"), 0.0);

    let mut orders = Vec::new();
    for (n, token) in ["tok_visa", "tok_visa", "tok_declined"].iter().enumerate() {
        let request = bearer(order_request(&format!("metrics-{n}"), token), &customer);
        orders.push(
            stack
                .orders()
                .await
                .create_order(request)
                .await
                .unwrap()
                .into_inner()
                .order_id,
        );
    }
    for order_id in &orders {
        stack
            .settled_saga(order_id, Duration::from_secs(60))
            .await
            .unwrap();
    }

    let orchestrator = scrape(&stack, "saga-orchestrator").await;
    assert_eq!(
        total(&orchestrator, "sagas_finished_total", "state=\"completed\""),
        2.0,
        "{orchestrator:#?}"
    );
    assert_eq!(
        total(
            &orchestrator,
            "sagas_finished_total",
            "state=\"compensated\""
        ),
        1.0
    );
    assert_eq!(
        total(&orchestrator, "saga_compensations_started_total", ""),
        1.0
    );
    assert!(
        total(
            &orchestrator,
            "saga_step_duration_seconds_count",
            "step=\"process-payment\""
        ) >= 3.0
    );
    assert_eq!(
        total(
            &orchestrator,
            "saga_step_failures_total",
            "reason=\"permanent\""
        ),
        1.0
    );
    assert!(
        total(
            &orchestrator,
            "events_consumed_total",
            "outcome=\"handled\""
        ) >= 3.0
    );
    assert!(orchestrator.contains_key("sagas_active{state=\"running\"}"));
    assert!(orchestrator.contains_key("outbox_backlog"));

    let order = scrape(&stack, "order").await;
    assert_eq!(
        total(
            &order,
            "grpc_server_requests_total",
            "method=\"ordersaga.order.v1.OrderService/CreateOrder\""
        ),
        3.0
    );
    assert!(total(&order, "grpc_server_requests_total", "ConfirmOrder") >= 2.0);
    assert!(
        total(
            &order,
            "grpc_server_request_duration_seconds_count",
            "CreateOrder"
        ) >= 3.0
    );
    assert!(
        total(&order, "outbox_published_total", "") >= 5.0,
        "placed, confirmed, rejected events"
    );
    let payment = scrape(&stack, "payment").await;
    assert!(total(&payment, "grpc_server_requests_total", "code=\"Ok\"") >= 3.0);
}

#[tokio::test]
async fn the_dashboard_shows_live_sagas_and_a_flows_trace() {
    let stack = Stack::builder()
        .env("payment", "PROVIDER_FLAKY_FAILURES", "1000")
        .env("saga-orchestrator", "SAGA_STEP_MAX_ATTEMPTS", "1000")
        .env("saga-orchestrator", "SAGA_STEP_DEADLINE", "10m")
        .start()
        .await
        .unwrap();
    let customer = stack.customer_token("dashboard@example.com").await.unwrap();
    let admin = stack.admin_token().await.unwrap();
    let place = |key: &str, token: &str| {
        let request = bearer(order_request(key, token), &customer);
        let stack = &stack;
        async move {
            stack
                .orders()
                .await
                .create_order(request)
                .await
                .unwrap()
                .into_inner()
        }
    };
    let happy = place("dash-happy", "tok_visa").await;
    let declined = place("dash-declined", "tok_declined").await;
    let stuck = place("dash-stuck", "tok_flaky").await;
    stack
        .settled_saga(&happy.order_id, Duration::from_secs(60))
        .await
        .unwrap();
    stack
        .settled_saga(&declined.order_id, Duration::from_secs(60))
        .await
        .unwrap();
    stack
        .saga_reaching(&stuck.order_id, "process-payment", Duration::from_secs(60))
        .await
        .unwrap();
    // The other services' events reach the trace view through the topics,
    // the saga's at once: wait until it has the whole happy flow, as the
    // page will show it.
    let address = stack.service("saga-orchestrator").http_address().unwrap();
    let trace_url = format!(
        "http://{address}/api/trace?correlation={}",
        happy.correlation_id
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let whole = |trace: &str| {
        ["order placed", "payment captured", "saga completed"]
            .iter()
            .all(|line| trace.contains(line))
    };
    while !whole(&http_get(&trace_url, Some(&admin)).await) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the trace view never caught up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let page = format!(
        "http://{address}/#token={admin}&correlation={}",
        happy.correlation_id
    );
    let dom = render(&page);
    let text = |id: &str| element_text(&dom, id);
    assert_eq!(text("running"), "1", "the stuck flow is running");
    assert_eq!(text("completed"), "1");
    assert_eq!(text("compensated"), "1");
    assert_eq!(text("completion-rate"), "50%");
    assert!(
        text("failure-reasons").contains("payment declined: card_declined"),
        "{}",
        text("failure-reasons")
    );
    assert!(
        text("flows").contains(&stuck.order_id) && text("flows").contains("process-payment"),
        "{}",
        text("flows")
    );
    assert!(
        text("recent").contains(&happy.order_id) && text("recent").contains(&declined.order_id)
    );
    let trace = text("trace");
    assert!(trace.contains("order placed: 27.99 EUR"), "{trace}");
    assert!(
        trace.contains("payment captured: 27.99 EUR") && trace.contains("saga completed"),
        "{trace}"
    );
    assert!(!text("events").is_empty());

    // Without a token the page asks for one and shows no data.
    let anonymous = render(&format!("http://{address}/"));
    assert!(anonymous.contains("Paste an admin access token"));
    assert_eq!(element_text(&anonymous, "completed"), "–");
}

/// The DOM of `url` after its scripts ran, from headless Chromium.
fn render(url: &str) -> String {
    let profile = tempfile_dir();
    let output = Command::new(dev_stack::tools::chromium().unwrap())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(url)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        output.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ordersaga-chromium-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The text inside the element with `id` (tags stripped).
fn element_text(dom: &str, id: &str) -> String {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id}"));
    let open_end = start + dom[start..].find('>').unwrap() + 1;
    let tag = dom[..start]
        .rsplit('<')
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let close = dom[open_end..].find(&format!("</{tag}>")).unwrap();
    let inner = &dom[open_end..open_end + close];
    let mut text = String::new();
    let mut in_tag = false;
    for c in inner.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                text.push(' ');
            }
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
