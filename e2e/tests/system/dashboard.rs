//! The operators' dashboard in a real browser: headless Chromium, driven
//! through chromedriver, clicks the page the orchestrator serves while real
//! sagas run. What a click does is checked through SagaService, not only on
//! the page. Each test keeps a screenshot in
//! `target/dashboard-screenshots/`.

use std::time::Duration;

use api_saga::v1::{Saga, SagaState};
use e2e::Stack;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::webdriver::{Browser, screenshot_path};

const WAIT: Duration = Duration::from_secs(30);

/// A stack whose `tok_flaky` payments fail for as long as the test runs:
/// their sagas stay in `process-payment`, before the pivot, retrying.
async fn stack_with_a_stuck_payment() -> Stack {
    Stack::builder()
        .env("payment", "PROVIDER_FLAKY_FAILURES", "1000000")
        .env("saga-orchestrator", "SAGA_STEP_MAX_ATTEMPTS", "1000000")
        .env("saga-orchestrator", "SAGA_STEP_DEADLINE", "1h")
        .env("saga-orchestrator", "SAGA_RETRY_MAX_BACKOFF", "500ms")
        .env(
            "saga-orchestrator",
            "DASHBOARD_TRACE_URL",
            "http://jaeger.example:16686/trace/{trace_id}",
        )
        .start()
        .await
        .unwrap()
}

#[tokio::test]
async fn clicking_compensate_compensates_the_saga_and_a_refusal_is_shown() {
    let stack = stack_with_a_stuck_payment().await;
    let customer = stack.customer_token("clicks@example.com").await.unwrap();
    let admin = stack.admin_token().await.unwrap();
    let order_id = stack
        .place_order(&customer, "click-stuck", "tok_flaky")
        .await
        .order_id;
    let saga = stack
        .saga_reaching(&order_id, "process-payment", WAIT)
        .await
        .unwrap();
    let address = stack.service("saga-orchestrator").http_address().unwrap();

    let browser = Browser::start().await.unwrap();
    browser
        .open(&format!(
            "http://{address}/#token={admin}&correlation={}",
            saga.correlation_id
        ))
        .await
        .unwrap();
    browser
        .wait_for(
            "the saga panel",
            "document.getElementById('saga-state').textContent === 'running'",
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(browser.text("#saga-order").await.unwrap(), order_id);
    // The token left the URL as soon as the page read it.
    let url = browser.url().await.unwrap();
    assert!(!url.contains("token"), "{url}");
    assert!(!url.contains(&admin), "{url}");
    assert!(
        url.ends_with(&format!("#correlation={}", saga.correlation_id)),
        "{url}"
    );
    // The timeline has the retried step's attempts, and a trace link.
    let attempts = browser
        .wait_for(
            "the payment's attempts on the timeline",
            "document.querySelectorAll('#timeline rect.attempt[data-step=\"process-payment\"].failed').length >= 2 \
             && document.querySelectorAll('#timeline rect.attempt[data-step=\"process-payment\"].failed').length",
            WAIT,
        )
        .await
        .unwrap();
    assert!(attempts.as_u64().unwrap() >= 2, "{attempts}");
    let link = browser
        .run(
            "return document.getElementById('saga-trace').href;",
            serde_json::json!([]),
        )
        .await
        .unwrap();
    let link = link.as_str().unwrap();
    assert!(
        link.starts_with("http://jaeger.example:16686/trace/") && link.len() == 34 + 32,
        "{link}"
    );

    // Retry is refused for a running saga, in the RPC's words.
    browser.click("#action-retry").await.unwrap();
    browser
        .wait_for(
            "the confirmation",
            "document.getElementById('confirm').open",
            WAIT,
        )
        .await
        .unwrap();
    browser.click("#confirm-ok").await.unwrap();
    let refusal = browser
        .wait_for(
            "the refusal",
            "document.getElementById('action-result').className === 'refused' \
             && document.getElementById('action-result').textContent",
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(
        refusal.as_str().unwrap(),
        "retry refused: FAILED_PRECONDITION: only a FAILED saga can be retried; it is running"
    );
    assert_eq!(
        stack.saga_status(&order_id, &admin).await.unwrap().state(),
        SagaState::Running
    );

    // Compensate, confirmed with a reason: the saga turns back.
    browser.click("#action-compensate").await.unwrap();
    browser
        .wait_for(
            "the confirmation",
            "document.getElementById('confirm').open",
            WAIT,
        )
        .await
        .unwrap();
    browser
        .type_into("#confirm-reason", "customer called")
        .await
        .unwrap();
    browser.click("#confirm-ok").await.unwrap();
    let done = browser
        .wait_for(
            "the answer",
            "document.getElementById('action-result').className === 'ok' \
             && document.getElementById('action-result').textContent",
            WAIT,
        )
        .await
        .unwrap();
    assert!(
        done.as_str()
            .unwrap()
            .starts_with("compensate: done; the saga is "),
        "{done}"
    );
    let settled = stack.settled_saga(&order_id, WAIT).await.unwrap();
    assert_eq!(settled.state(), SagaState::Compensated, "{settled:#?}");
    assert_eq!(
        settled.failure_reason,
        "compensated by an operator: customer called"
    );
    // The page follows: compensations on the timeline, the turn marked.
    browser
        .wait_for(
            "the compensation on the timeline",
            "document.getElementById('saga-state').textContent === 'compensated' \
             && document.querySelector('#timeline rect.attempt.compensation.succeeded') \
             && document.querySelector('#timeline line.turned-back')",
            WAIT,
        )
        .await
        .unwrap();
    let path = screenshot_path("saga-compensated");
    browser.screenshot(&path).await.unwrap();
    eprintln!("screenshot: {}", path.display());
}

#[tokio::test]
async fn the_charts_draw_the_last_hours_sagas_and_the_page_sends_its_policy() {
    let stack = stack_with_a_stuck_payment().await;
    let customer = stack.customer_token("charts@example.com").await.unwrap();
    let completed = stack
        .place_order(&customer, "chart-visa", "tok_visa")
        .await
        .order_id;
    let declined = stack
        .place_order(&customer, "chart-declined", "tok_declined")
        .await
        .order_id;
    let stuck = stack
        .place_order(&customer, "chart-stuck", "tok_flaky")
        .await
        .order_id;
    for order_id in [&completed, &declined] {
        stack.settled_saga(order_id, WAIT).await.unwrap();
    }
    stack
        .saga_reaching(&stuck, "process-payment", WAIT)
        .await
        .unwrap();
    let admin = stack.admin_token().await.unwrap();
    let address = stack.service("saga-orchestrator").http_address().unwrap();

    // The page's answer carries its Content-Security-Policy.
    let head = response_head(&address.to_string(), "/").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let policy = head
        .lines()
        .find_map(|line| line.strip_prefix("content-security-policy: "))
        .unwrap_or_else(|| panic!("no Content-Security-Policy: {head}"));
    assert!(
        policy.contains("script-src 'self'") && policy.contains("default-src 'none'"),
        "{policy}"
    );
    assert!(!policy.contains("unsafe-inline"), "{policy}");

    let browser = Browser::start().await.unwrap();
    browser
        .open(&format!("http://{address}/#token={admin}"))
        .await
        .unwrap();
    let url = browser.url().await.unwrap();
    assert!(!url.contains("token"), "{url}");
    // One completed and one compensated saga this minute: a dot each.
    browser
        .wait_for(
            "the throughput chart's points",
            "document.querySelector('#chart-throughput circle[data-series=\"completed\"]') \
             && document.querySelector('#chart-throughput circle[data-series=\"compensated\"]')",
            WAIT,
        )
        .await
        .unwrap();
    let points = browser
        .run(
            "return document.querySelector('#chart-throughput polyline[data-series=\"completed\"]').getAttribute('points').split(' ').length;",
            serde_json::json!([]),
        )
        .await
        .unwrap();
    assert_eq!(points.as_u64(), Some(60), "a point per minute of the hour");
    // The stuck saga is in flight; the payment step has a latency bar.
    browser
        .wait_for(
            "the in-flight count",
            "document.getElementById('in-flight').textContent === '1'",
            WAIT,
        )
        .await
        .unwrap();
    browser
        .wait_for(
            "the payment step's latency",
            "document.querySelector('#chart-latency rect.p99[data-step=\"process-payment\"]')",
            WAIT,
        )
        .await
        .unwrap();
    browser
        .wait_for(
            "the backlog charts",
            "document.querySelector('#chart-outbox polyline') && document.querySelector('#chart-lag polyline')",
            WAIT,
        )
        .await
        .unwrap();
    let path = screenshot_path("charts");
    browser.screenshot(&path).await.unwrap();
    eprintln!("screenshot: {}", path.display());
}

/// The status line and headers of GET `path`, as the server sent them.
async fn response_head(address: &str, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, _) = response.split_once("\r\n\r\n").unwrap();
    head.to_ascii_lowercase().replace("http/1.1", "HTTP/1.1")
}

/// Waits until GetSagaStatus shows the saga of `order_id` in `state`.
async fn saga_in_state(stack: &Stack, admin: &str, order_id: &str, state: SagaState) -> Saga {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let saga = stack.saga_status(order_id, admin).await.unwrap();
        if saga.state() == state {
            return saga;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the saga never became {state:?}: {saga:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_stuck_saga_found_by_search_is_paused_resumed_and_terminated_by_clicks() {
    let stack = Stack::builder()
        .env("payment", "PROVIDER_FLAKY_FAILURES", "1000000")
        .env("saga-orchestrator", "SAGA_STEP_MAX_ATTEMPTS", "1000000")
        .env("saga-orchestrator", "SAGA_STEP_DEADLINE", "1h")
        .env("saga-orchestrator", "SAGA_RETRY_MAX_BACKOFF", "500ms")
        .env("saga-orchestrator", "SAGA_STUCK_AFTER", "1s")
        .start()
        .await
        .unwrap();
    let customer = stack.customer_token("operator@example.com").await.unwrap();
    let admin = stack.admin_token().await.unwrap();
    let order_id = stack
        .place_order(&customer, "ops-stuck", "tok_flaky")
        .await
        .order_id;
    stack
        .saga_reaching(&order_id, "process-payment", WAIT)
        .await
        .unwrap();
    let address = stack.service("saga-orchestrator").http_address().unwrap();
    let browser = Browser::start().await.unwrap();
    browser
        .open(&format!("http://{address}/#token={admin}"))
        .await
        .unwrap();

    // Retrying without success is no progress: the saga is flagged stuck,
    // and the page lists it highlighted.
    let listed = format!(
        "[...document.querySelectorAll('#stuck-sagas tr.stuck')].some((r) => r.textContent.includes('{order_id}'))"
    );
    browser
        .wait_for("the stuck saga", &listed, WAIT)
        .await
        .unwrap();
    assert_eq!(browser.text("#stuck").await.unwrap(), "1");

    // A filter ListSagas refuses is refused on the page, naming the field.
    browser.type_into("#search-reason", "ab").await.unwrap();
    browser.click("#search-go").await.unwrap();
    let refusal = browser
        .wait_for(
            "the search's refusal",
            "document.getElementById('search-result').textContent.includes('INVALID_ARGUMENT') \
             && document.getElementById('search-result').textContent",
            WAIT,
        )
        .await
        .unwrap();
    assert!(
        refusal
            .as_str()
            .unwrap()
            .contains("failure_reason_contains"),
        "{refusal}"
    );
    browser
        .run(
            "document.getElementById('search-reason').value = '';",
            serde_json::json!([]),
        )
        .await
        .unwrap();
    // Running, stuck, this order: found, highlighted.
    browser
        .click("#search-states option[value=running]")
        .await
        .unwrap();
    browser.type_into("#search-order", &order_id).await.unwrap();
    browser.click("#search-stuck").await.unwrap();
    browser.click("#search-go").await.unwrap();
    let found = format!(
        "document.querySelectorAll('#search-results tr').length === 1 \
         && document.querySelector('#search-results tr.stuck a')?.textContent === '{order_id}'"
    );
    browser
        .wait_for("the search's answer", &found, WAIT)
        .await
        .unwrap();
    browser.click("#search-results tr.stuck a").await.unwrap();
    browser
        .wait_for(
            "the saga, flagged stuck",
            "document.getElementById('saga-state').textContent === 'running' \
             && !document.getElementById('saga-stuck').hidden",
            WAIT,
        )
        .await
        .unwrap();

    let act = |action: &'static str| {
        let browser = &browser;
        async move {
            browser
                .run(
                    "document.getElementById('action-result').textContent = '';",
                    serde_json::json!([]),
                )
                .await
                .unwrap();
            browser.click(&format!("#action-{action}")).await.unwrap();
            browser
                .wait_for(
                    "the confirmation",
                    "document.getElementById('confirm').open",
                    WAIT,
                )
                .await
                .unwrap();
        }
    };
    let answer = || async {
        browser
            .wait_for(
                "the answer",
                "document.getElementById('action-result').textContent",
                WAIT,
            )
            .await
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned()
    };

    // Pause: the saga stops between steps.
    act("pause").await;
    browser.click("#confirm-ok").await.unwrap();
    assert!(answer().await.starts_with("pause: done"));
    saga_in_state(&stack, &admin, &order_id, SagaState::Paused).await;
    browser
        .wait_for(
            "the paused saga",
            "document.getElementById('saga-state').textContent === 'paused'",
            WAIT,
        )
        .await
        .unwrap();

    // Resume: it goes on where it stopped.
    act("resume").await;
    browser.click("#confirm-ok").await.unwrap();
    assert!(answer().await.starts_with("resume: done"));
    saga_in_state(&stack, &admin, &order_id, SagaState::Running).await;

    // Terminate asks for a reason, and is refused while the open order is
    // in effect, until the operator takes it on.
    act("terminate").await;
    browser.click("#confirm-ok").await.unwrap();
    let still_asking = browser
        .run(
            "return document.getElementById('confirm').open;",
            serde_json::json!([]),
        )
        .await
        .unwrap();
    assert_eq!(
        still_asking,
        serde_json::json!(true),
        "no reason, no request"
    );
    browser
        .type_into("#confirm-reason", "provider incident")
        .await
        .unwrap();
    browser.click("#confirm-ok").await.unwrap();
    let refused = answer().await;
    assert!(
        refused.starts_with("terminate refused: FAILED_PRECONDITION: step")
            && refused.contains("open-order"),
        "{refused}"
    );
    assert_eq!(
        stack.saga_status(&order_id, &admin).await.unwrap().state(),
        SagaState::Running
    );
    act("terminate").await;
    browser
        .type_into("#confirm-reason", "provider incident")
        .await
        .unwrap();
    browser.click("#confirm-effects").await.unwrap();
    browser.click("#confirm-ok").await.unwrap();
    assert!(answer().await.starts_with("terminate: done"));
    let terminated = saga_in_state(&stack, &admin, &order_id, SagaState::Terminated).await;
    assert_eq!(
        terminated.failure_reason,
        "terminated by an operator: provider incident"
    );
    browser
        .wait_for(
            "the terminated saga",
            "document.getElementById('saga-state').textContent === 'terminated'",
            WAIT,
        )
        .await
        .unwrap();
    let path = screenshot_path("saga-terminated");
    browser.screenshot(&path).await.unwrap();
    eprintln!("screenshot: {}", path.display());
}
