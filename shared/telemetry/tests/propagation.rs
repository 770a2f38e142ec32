//! The trace context and the correlation id across a gRPC hop (client layer
//! into server layer) and through string headers (the Kafka form), with the
//! real OpenTelemetry pipeline installed.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use telemetry::correlation::{self, CorrelationId};
use telemetry::grpc::{ClientLayer, KnownMethods, ServerLayer};
use telemetry::{LogFormat, TelemetrySettings, propagation};
use tower::{Layer as _, Service as _, ServiceExt as _};

/// Log lines written while a test runs.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Whether a JSON log line has the string field `key` equal to `value`.
fn has_field(line: &str, key: &str, value: &str) -> bool {
    line.contains(&format!("\"{key}\":\"{value}\""))
}

fn install_telemetry() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let settings = TelemetrySettings {
        log_format: LogFormat::Json,
        log_level: "info".into(),
        otlp_endpoint: None,
        service_name: None,
    };
    let (subscriber, _provider) =
        telemetry::subscriber(&settings, "test", captured.clone()).unwrap();
    (captured, tracing::subscriber::set_default(subscriber))
}

/// What the handler behind the server layer saw.
#[derive(Debug, Default, Clone)]
struct Seen {
    scoped_correlation: Option<CorrelationId>,
    extension_correlation: Option<CorrelationId>,
    trace_id: String,
}

fn handler(
    seen: Arc<Mutex<Seen>>,
) -> tower::util::BoxCloneService<Request<()>, Response<()>, Infallible> {
    tower::util::BoxCloneService::new(tower::service_fn(move |request: Request<()>| {
        let seen = seen.clone();
        async move {
            tracing::info!("handling the request");
            *seen.lock().unwrap() = Seen {
                scoped_correlation: correlation::current(),
                extension_correlation: request.extensions().get::<CorrelationId>().cloned(),
                trace_id: propagation::trace_id(&tracing::Span::current()),
            };
            Ok::<_, Infallible>(Response::new(()))
        }
    }))
}

/// The server layer of a server serving the method [`grpc_request`] calls.
fn server_layer() -> ServerLayer {
    ServerLayer::new(KnownMethods::new([
        "ordersaga.order.v1.OrderService/GetOrder",
    ]))
}

fn grpc_request() -> Request<()> {
    Request::builder()
        .uri("http://order.test/ordersaga.order.v1.OrderService/GetOrder")
        .body(())
        .unwrap()
}

#[tokio::test]
async fn trace_and_correlation_survive_a_grpc_hop() {
    let (logs, _guard) = install_telemetry();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut client = ClientLayer.layer(server_layer().layer(handler(seen.clone())));

    let id = CorrelationId::parse("flow-42").unwrap();
    let caller = tracing::info_span!("caller", trace_id = tracing::field::Empty);
    let caller_trace = propagation::trace_id(&caller);
    let response = correlation::scope(id.clone(), async {
        let _entered = caller.enter();
        client
            .ready()
            .await
            .unwrap()
            .call(grpc_request())
            .await
            .unwrap()
    })
    .await;

    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.trace_id, caller_trace,
        "the server span continues the caller's trace"
    );
    assert_eq!(seen.scoped_correlation.as_ref(), Some(&id));
    assert_eq!(seen.extension_correlation.as_ref(), Some(&id));
    assert_eq!(response.headers()["x-correlation-id"], "flow-42");

    let handled: Vec<_> = logs
        .lines()
        .into_iter()
        .filter(|line| line.contains("handling the request"))
        .collect();
    assert_eq!(handled.len(), 1);
    assert!(
        has_field(&handled[0], "correlation_id", "flow-42"),
        "{}",
        handled[0]
    );
    assert!(
        has_field(&handled[0], "trace_id", &caller_trace),
        "{}",
        handled[0]
    );
}

#[tokio::test]
async fn the_server_makes_a_correlation_id_when_the_caller_sends_none_or_a_bad_one() {
    let (_logs, _guard) = install_telemetry();
    for sent in [None, Some(""), Some("has spaces"), Some(&*"x".repeat(129))] {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut server = server_layer().layer(handler(seen.clone()));
        let mut request = grpc_request();
        if let Some(value) = sent {
            request
                .headers_mut()
                .insert("x-correlation-id", value.parse().unwrap());
        }
        let response = server.ready().await.unwrap().call(request).await.unwrap();

        let made = seen
            .lock()
            .unwrap()
            .scoped_correlation
            .clone()
            .expect("a correlation id in scope");
        assert_ne!(Some(made.as_str()), sent);
        assert!(uuid::Uuid::parse_str(made.as_str()).is_ok(), "{made:?}");
        assert_eq!(response.headers()["x-correlation-id"], made.as_str());
    }
}

#[tokio::test]
async fn headers_carry_trace_and_correlation_to_a_consumer_span() {
    let (_logs, _guard) = install_telemetry();
    let producer = tracing::info_span!("producer");
    let id = CorrelationId::generate();
    let headers = propagation::headers_for(&producer, Some(&id));
    assert!(
        headers
            .iter()
            .any(|(name, value)| name == "traceparent" && value.starts_with("00-"))
    );

    let received = propagation::extract(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let consumer = tracing::info_span!("consumer", trace_id = tracing::field::Empty);
    propagation::adopt_parent(&consumer, received.context);
    assert_eq!(
        propagation::trace_id(&consumer),
        propagation::trace_id(&producer)
    );
    assert_eq!(received.correlation, Some(id));
}

#[tokio::test]
async fn the_log_level_filters_events_but_not_the_spans_that_carry_the_trace() {
    let captured = Captured::default();
    let settings = TelemetrySettings {
        log_format: LogFormat::Json,
        log_level: "warn,kept=info".into(),
        otlp_endpoint: None,
        service_name: None,
    };
    let (subscriber, _provider) =
        telemetry::subscriber(&settings, "test", captured.clone()).unwrap();
    let _guard = tracing::subscriber::set_default(subscriber);
    let span = tracing::info_span!("request", trace_id = tracing::field::Empty);
    let _entered = span.enter();
    for n in 0..3 {
        tracing::info!(target: "dropped", n, "below the log level");
        tracing::info!(target: "kept", n, "at the log level");
    }
    let lines = captured.lines();
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("at the log level"))
            .count(),
        3,
        "{lines:#?}"
    );
    assert!(!lines.iter().any(|l| l.contains("below the log level")));
    // The span still reaches OpenTelemetry: it has a real trace id.
    assert_ne!(propagation::trace_id(&span), "");
}
