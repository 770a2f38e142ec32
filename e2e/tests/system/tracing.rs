//! One OpenTelemetry trace per order, across the four binaries and the
//! Kafka hops, exported over OTLP to a collector that runs inside this test.

use std::collections::BTreeSet;
use std::time::Duration;

use e2e::{Stack, order_request};
use fake_opentelemetry_collector::{ExportedSpan, FakeCollectorServer};
use testkit::grpc::bearer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_one_trace_from_create_order_to_confirmation() {
    let mut collector = FakeCollectorServer::start().await.unwrap();
    let stack = Stack::builder()
        .env_all("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.endpoint())
        .env_all("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start()
        .await
        .unwrap();
    let customer = stack.customer_token("traced@example.com").await.unwrap();

    let mut request = bearer(order_request("traced", "tok_visa"), &customer);
    request
        .metadata_mut()
        .insert("x-correlation-id", "one-trace-flow".parse().unwrap());
    let order = stack
        .orders()
        .await
        .create_order(request)
        .await
        .unwrap()
        .into_inner();
    let saga = stack
        .settled_saga(&order.order_id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(saga.state(), api_saga::v1::SagaState::Completed);

    // Collect until the confirmation's server span has arrived.
    let mut spans: Vec<ExportedSpan> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !spans
        .iter()
        .any(|s| s.name == "ordersaga.order.v1.OrderService/ConfirmOrder")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the confirmation span never arrived"
        );
        spans.extend(collector.exported_spans(1, Duration::from_secs(1)).await);
    }
    // Spans of the saga's last steps may still be in flight; take a moment more.
    spans.extend(collector.exported_spans(1000, Duration::from_secs(1)).await);

    let create = spans
        .iter()
        .find(|s| s.name == "ordersaga.order.v1.OrderService/CreateOrder")
        .expect("the CreateOrder span");
    assert_eq!(create.kind, "SPAN_KIND_SERVER");
    assert!(carries_flow(create), "{:?}", create.attributes);
    let trace: Vec<&ExportedSpan> = spans
        .iter()
        .filter(|s| s.trace_id == create.trace_id)
        .collect();
    let names: BTreeSet<&str> = trace.iter().map(|s| s.name.as_str()).collect();
    let has = |name: &str| names.iter().any(|n| n.contains(name));

    // The order service, the relay and Kafka...
    assert!(
        has(&format!("{} publish", stack.scenario.topics.order_events())),
        "{names:#?}"
    );
    // ...the orchestrator consuming and driving the saga...
    assert!(
        has(&format!("{} process", stack.scenario.topics.order_events())),
        "{names:#?}"
    );
    assert!(has("order-processing process-payment action"), "{names:#?}");
    // ...the auth service issuing the orchestrator its token on the way...
    assert!(
        has("ordersaga.auth.v1.AuthService/IssueServiceToken"),
        "{names:#?}"
    );
    // ...the payment service charging, and the order service confirming.
    assert!(
        has("ordersaga.payment.v1.PaymentService/ProcessPayment"),
        "{names:#?}"
    );
    assert!(
        has("ordersaga.order.v1.OrderService/ConfirmOrder"),
        "{names:#?}"
    );

    // The Kafka hop is joined through `traceparent`: the consumer span's
    // parent is the relay's producer span.
    let producer = trace
        .iter()
        .find(|s| s.kind == "SPAN_KIND_PRODUCER")
        .unwrap();
    let consumer = trace
        .iter()
        .find(|s| s.kind == "SPAN_KIND_CONSUMER" && s.parent_span_id == producer.span_id);
    assert!(
        consumer.is_some(),
        "a consumer span is the child of the producer span"
    );
    // Every server span of the flow carries its correlation id.
    for span in trace
        .iter()
        .filter(|s| s.kind == "SPAN_KIND_SERVER" && !s.name.contains("AuthService"))
    {
        assert!(carries_flow(span), "{}: {:?}", span.name, span.attributes);
    }
}

/// Whether the span's `correlation_id` attribute is this test's flow (the
/// collector renders attribute values in their protobuf debug form).
fn carries_flow(span: &ExportedSpan) -> bool {
    span.attributes
        .get("correlation_id")
        .is_some_and(|value| value.contains("\"one-trace-flow\""))
}
