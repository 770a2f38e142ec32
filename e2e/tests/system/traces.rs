//! TraceService: every service's events of one flow, in order, for a happy
//! and a compensated saga, each naming its cause; a live tail; the flows in
//! progress.

use std::time::Duration;

use api_order::v1::GetOrderRequest;
use api_trace::v1::{
    GetTraceByCorrelationRequest, GetTraceByOrderRequest, ListActiveFlowsRequest,
    StreamEventsRequest, Trace, TraceEvent,
};
use e2e::{Stack, order_request};
use futures::StreamExt as _;
use testkit::grpc::bearer;
use tonic::Code;

/// The trace of `order_id` once it holds an event of each of `wanted`
/// (short type names). The other services' events come through the
/// topics, so they may arrive a moment after the saga's own, which the
/// orchestrator records as it makes them.
async fn trace_with(stack: &Stack, admin: &str, order_id: &str, wanted: &[&str]) -> Trace {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let request = GetTraceByOrderRequest {
            order_id: order_id.to_owned(),
        };
        if let Ok(trace) = stack
            .traces()
            .await
            .get_trace_by_order(bearer(request, admin))
            .await
        {
            let trace = trace.into_inner();
            let present = types(&trace);
            if wanted.iter().all(|w| present.contains(w)) {
                return trace;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the trace never got all of {wanted:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn types(trace: &Trace) -> Vec<&str> {
    trace
        .events
        .iter()
        .map(|e| e.event_type.rsplit('.').next().unwrap())
        .collect()
}

#[tokio::test]
async fn a_happy_flow_reads_as_one_trace_across_the_services() {
    let stack = Stack::start().await.unwrap();
    let customer = stack
        .customer_token("trace-happy@example.com")
        .await
        .unwrap();
    let admin = stack.admin_token().await.unwrap();
    let order = stack
        .orders()
        .await
        .create_order(bearer(order_request("t1", "tok_visa"), &customer))
        .await
        .unwrap()
        .into_inner();

    let trace = trace_with(
        &stack,
        &admin,
        &order.order_id,
        &[
            "OrderPlaced",
            "SagaStarted",
            "PaymentCaptured",
            "OrderConfirmed",
            "SagaCompleted",
        ],
    )
    .await;
    assert_eq!(trace.order_id, order.order_id);
    assert_eq!(trace.correlation_id, order.correlation_id);
    let types = types(&trace);
    assert_eq!(types.first(), Some(&"OrderPlaced"), "{types:?}");
    assert_eq!(types.last(), Some(&"SagaCompleted"), "{types:?}");
    for expected in ["SagaStarted", "PaymentCaptured", "OrderConfirmed"] {
        assert!(types.contains(&expected), "{types:?}");
    }
    let position = |t: &str| types.iter().position(|x| *x == t).unwrap();
    assert!(
        position("PaymentCaptured") < position("OrderConfirmed"),
        "causal order: {types:?}"
    );
    let services: std::collections::BTreeSet<&str> =
        trace.events.iter().map(|e| e.service.as_str()).collect();
    assert_eq!(
        services,
        ["order", "payment", "saga-orchestrator"]
            .into_iter()
            .collect()
    );
    assert!(
        trace
            .events
            .iter()
            .all(|e| e.correlation_id == order.correlation_id)
    );
    assert!(
        trace.events[0]
            .since_previous
            .as_ref()
            .is_none_or(|d| d.seconds == 0 && d.nanos == 0)
    );
    assert!(
        trace
            .events
            .iter()
            .all(|e| e.since_start.is_some() && !e.summary.is_empty())
    );
    assert!(
        trace.events[0]
            .summary
            .starts_with("order placed: 27.99 EUR"),
        "{}",
        trace.events[0].summary
    );
    assert!(trace.total_duration.is_some());

    let by_correlation = GetTraceByCorrelationRequest {
        correlation_id: order.correlation_id.clone(),
    };
    let same = stack
        .traces()
        .await
        .get_trace_by_correlation(bearer(by_correlation, &admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(same.events.len(), trace.events.len());
    let unknown = GetTraceByCorrelationRequest {
        correlation_id: "nobody-knows".into(),
    };
    assert_eq!(
        stack
            .traces()
            .await
            .get_trace_by_correlation(bearer(unknown, &admin))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let customer_call = GetTraceByOrderRequest {
        order_id: order.order_id.clone(),
    };
    assert_eq!(
        stack
            .traces()
            .await
            .get_trace_by_order(bearer(customer_call, &customer))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
}

#[tokio::test]
async fn a_compensated_flow_shows_the_failure_and_the_undoing() {
    let stack = Stack::start().await.unwrap();
    let customer = stack
        .customer_token("trace-declined@example.com")
        .await
        .unwrap();
    let admin = stack.admin_token().await.unwrap();
    let order = stack
        .orders()
        .await
        .create_order(bearer(order_request("t2", "tok_declined"), &customer))
        .await
        .unwrap()
        .into_inner();

    let expected = [
        "OrderPlaced",
        "PaymentDeclined",
        "SagaStepFailed",
        "SagaCompensationStarted",
        "OrderRejected",
        "SagaCompensated",
    ];
    let trace = trace_with(&stack, &admin, &order.order_id, &expected).await;
    let types = types(&trace);
    for expected in expected {
        assert!(types.contains(&expected), "{expected} missing: {types:?}");
    }
    let declined = trace
        .events
        .iter()
        .find(|e| e.event_type.ends_with("PaymentDeclined"))
        .unwrap();
    assert_eq!(declined.summary, "payment declined: card_declined");
    let failed = trace
        .events
        .iter()
        .find(|e| e.event_type.ends_with("SagaStepFailed"))
        .unwrap();
    assert!(
        failed.summary.contains("process-payment"),
        "{}",
        failed.summary
    );
}

#[tokio::test]
async fn stream_events_delivers_what_happens_after_it_opened() {
    let stack = Stack::start().await.unwrap();
    let customer = stack
        .customer_token("trace-live@example.com")
        .await
        .unwrap();
    let admin = stack.admin_token().await.unwrap();
    let filter = StreamEventsRequest {
        correlation_id: "live-flow".into(),
        event_types: vec![],
    };
    let mut stream = stack
        .traces()
        .await
        .stream_events(bearer(filter, &admin))
        .await
        .unwrap()
        .into_inner();

    let mut request = bearer(order_request("live", "tok_visa"), &customer);
    request
        .metadata_mut()
        .insert("x-correlation-id", "live-flow".parse().unwrap());
    stack.orders().await.create_order(request).await.unwrap();

    // Each topic is consumed on its own, so events of different services
    // arrive in any order; wait for one of each.
    let expected = [
        "OrderPlaced",
        "PaymentCaptured",
        "OrderConfirmed",
        "SagaCompleted",
    ];
    let mut seen: Vec<String> = Vec::new();
    let all_seen = |seen: &[String]| expected.iter().all(|t| seen.iter().any(|s| s.ends_with(t)));
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(event) = stream.next().await {
            let event = event.unwrap();
            assert_eq!(event.correlation_id, "live-flow");
            seen.push(event.event_type);
            if all_seen(&seen) {
                break;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the stream stopped short: {seen:?}"));

    let only = StreamEventsRequest {
        correlation_id: String::new(),
        event_types: vec!["ordersaga.order.v1.OrderConfirmed".into()],
    };
    let mut confirmations = stack
        .traces()
        .await
        .stream_events(bearer(only, &admin))
        .await
        .unwrap()
        .into_inner();
    stack
        .orders()
        .await
        .create_order(bearer(order_request("live-2", "tok_visa"), &customer))
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(30), confirmations.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.event_type, "ordersaga.order.v1.OrderConfirmed");
}

#[tokio::test]
async fn flows_in_progress_are_listed_with_their_current_step() {
    let stack = Stack::builder()
        .env("payment", "PROVIDER_FLAKY_FAILURES", "1000")
        .env("saga-orchestrator", "SAGA_STEP_MAX_ATTEMPTS", "1000")
        .env("saga-orchestrator", "SAGA_STEP_DEADLINE", "10m")
        .start()
        .await
        .unwrap();
    let customer = stack
        .customer_token("trace-stuck@example.com")
        .await
        .unwrap();
    let admin = stack.admin_token().await.unwrap();
    let order = stack
        .orders()
        .await
        .create_order(bearer(order_request("t3", "tok_flaky"), &customer))
        .await
        .unwrap()
        .into_inner();
    stack
        .saga_reaching(&order.order_id, "process-payment", Duration::from_secs(30))
        .await
        .unwrap();

    let flows = stack
        .traces()
        .await
        .list_active_flows(bearer(ListActiveFlowsRequest::default(), &admin))
        .await
        .unwrap()
        .into_inner();
    let flow = flows
        .flows
        .iter()
        .find(|f| f.order_id == order.order_id)
        .expect("the stuck flow");
    assert_eq!(
        (flow.state.as_str(), flow.current_step.as_str()),
        ("RUNNING", "process-payment")
    );
    assert_eq!(flow.correlation_id, order.correlation_id);
    assert!(flow.age.is_some());
}

/// What caused `event`, from the trace: the event of the trace it names
/// (with its position), if it names one.
fn cause_in<'a>(trace: &'a Trace, event: &TraceEvent) -> Option<(usize, &'a TraceEvent)> {
    trace
        .events
        .iter()
        .enumerate()
        .find(|(_, e)| e.event_id == event.causation_id)
}

/// The one event of `trace` of the short type `wanted` whose causation
/// starts with `prefix`.
fn caused_by<'a>(trace: &'a Trace, wanted: &str, prefix: &str) -> &'a TraceEvent {
    let found: Vec<&TraceEvent> = trace
        .events
        .iter()
        .filter(|e| e.event_type.ends_with(&format!(".{wanted}")))
        .filter(|e| e.causation_id.starts_with(prefix))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {wanted} caused by {prefix}…: {:#?}",
        trace.events
    );
    found[0]
}

/// Every event of a trace names its cause: an earlier event of the same
/// trace, the client's request, or one attempt of a step of the saga.
fn assert_every_cause_is_known(trace: &Trace, saga_id: &str, client_request: &str) {
    let attempt = is_attempt_of(saga_id);
    for (position, event) in trace.events.iter().enumerate() {
        match cause_in(trace, event) {
            Some((cause, _)) => assert!(
                cause < position,
                "{} names a later event as its cause",
                event.event_type
            ),
            None => assert!(
                event.causation_id == client_request || attempt(&event.causation_id),
                "{} names an unknown cause {:?}",
                event.event_type,
                event.causation_id
            ),
        }
    }
}

/// Whether `id` names an attempt of a step of saga `saga_id`:
/// `<saga id>/<step>/<action|compensation>/<attempt>`.
fn is_attempt_of(saga_id: &str) -> impl Fn(&str) -> bool + '_ {
    move |id: &str| {
        let parts: Vec<&str> = id.split('/').collect();
        matches!(
            parts.as_slice(),
            [saga, step, "action" | "compensation", attempt]
                if *saga == saga_id
                    && ["open-order", "process-payment", "confirm-order"].contains(step)
                    && attempt.parse::<u32>().is_ok_and(|n| n >= 1)
        )
    }
}

#[tokio::test]
async fn each_event_names_the_event_or_request_that_caused_it() {
    let stack = Stack::start().await.unwrap();
    let customer = stack
        .customer_token("trace-causes@example.com")
        .await
        .unwrap();
    let admin = stack.admin_token().await.unwrap();
    let mut orders = stack.orders().await;

    // The client names its request; the answer echoes the name.
    let mut create = bearer(order_request("t-causes", "tok_visa"), &customer);
    create
        .metadata_mut()
        .insert("x-request-id", "client-request-1".parse().unwrap());
    let created = orders.create_order(create).await.unwrap();
    assert_eq!(
        created.metadata().get("x-request-id").unwrap(),
        "client-request-1"
    );
    let order = created.into_inner();
    // A request without a name gets a fresh UUIDv7.
    let unnamed = orders
        .get_order(bearer(
            GetOrderRequest {
                order_id: order.order_id.clone(),
            },
            &customer,
        ))
        .await
        .unwrap();
    let generated = unnamed.metadata().get("x-request-id").unwrap();
    let generated = uuid::Uuid::parse_str(generated.to_str().unwrap()).unwrap();
    assert_eq!(generated.get_version_num(), 7);

    let trace = trace_with(
        &stack,
        &admin,
        &order.order_id,
        &[
            "OrderPlaced",
            "PaymentCaptured",
            "OrderConfirmed",
            "SagaCompleted",
        ],
    )
    .await;
    let of_type = |wanted: &str| {
        trace
            .events
            .iter()
            .find(|e| e.event_type.ends_with(&format!(".{wanted}")))
            .unwrap_or_else(|| panic!("no {wanted}: {:#?}", trace.events))
    };
    let placed = of_type("OrderPlaced");
    assert_eq!(
        placed.causation_id, "client-request-1",
        "the client's request"
    );
    let started = of_type("SagaStarted");
    assert_eq!(
        started.causation_id, placed.event_id,
        "the saga is started by the placement it consumed"
    );
    let saga_id = started.aggregate_id.as_str();

    // Each step's outcome names its attempt, which is also the request id
    // of the attempt's call, so what the call recorded names it too.
    let opened = caused_by(
        &trace,
        "SagaStepSucceeded",
        &format!("{saga_id}/open-order/action/"),
    );
    let charged = caused_by(
        &trace,
        "SagaStepSucceeded",
        &format!("{saga_id}/process-payment/action/"),
    );
    let confirmed_step = caused_by(
        &trace,
        "SagaStepSucceeded",
        &format!("{saga_id}/confirm-order/action/"),
    );
    assert_ne!(opened.event_id, charged.event_id);
    assert_eq!(
        of_type("PaymentCaptured").causation_id,
        charged.causation_id
    );
    assert_eq!(
        of_type("OrderConfirmed").causation_id,
        confirmed_step.causation_id
    );
    assert_eq!(
        of_type("SagaCompleted").causation_id,
        confirmed_step.event_id,
        "the saga completes because its last step succeeded"
    );
    assert_every_cause_is_known(&trace, saga_id, "client-request-1");

    // A declined payment: the compensation is caused by the failed step,
    // and the rejection by the compensation's attempt.
    let declined = orders
        .create_order(bearer(
            order_request("t-causes-declined", "tok_declined"),
            &customer,
        ))
        .await
        .unwrap()
        .into_inner();
    let trace = trace_with(
        &stack,
        &admin,
        &declined.order_id,
        &["PaymentDeclined", "OrderRejected", "SagaCompensated"],
    )
    .await;
    let started = trace
        .events
        .iter()
        .find(|e| e.event_type.ends_with(".SagaStarted"))
        .unwrap();
    let saga_id = started.aggregate_id.as_str();
    let placed_request = trace.events[0].causation_id.clone();
    assert!(!placed_request.is_empty());
    let failed = caused_by(
        &trace,
        "SagaStepFailed",
        &format!("{saga_id}/process-payment/action/"),
    );
    assert_eq!(
        caused_by(
            &trace,
            "PaymentDeclined",
            &format!("{saga_id}/process-payment/action/")
        )
        .causation_id,
        failed.causation_id
    );
    assert_eq!(
        caused_by(&trace, "SagaCompensationStarted", "").causation_id,
        failed.event_id,
        "the saga turns back because the charge failed"
    );
    let closed = caused_by(
        &trace,
        "SagaStepSucceeded",
        &format!("{saga_id}/open-order/compensation/"),
    );
    assert_eq!(
        caused_by(&trace, "OrderRejected", "").causation_id,
        closed.causation_id
    );
    assert_eq!(
        caused_by(&trace, "SagaCompensated", "").causation_id,
        closed.event_id
    );
    assert_every_cause_is_known(&trace, saga_id, &placed_request);
}
