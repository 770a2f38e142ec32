//! W3C trace context and the correlation id as plain string headers, for
//! the places that are not gRPC: Kafka record headers and outbox rows (which
//! store the context of the request that wrote them until the relay
//! publishes them).

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::correlation::{self, CorrelationId};

/// Header carrying the W3C trace parent.
pub const TRACEPARENT: &str = "traceparent";
/// Header carrying the W3C trace state.
pub const TRACESTATE: &str = "tracestate";

/// String headers as they travel with a message.
pub type Headers = Vec<(String, String)>;

/// Headers for a message sent from the current context: the trace context of
/// the current span and the current correlation id.
pub fn current_headers() -> Headers {
    headers_for(&tracing::Span::current(), correlation::current().as_ref())
}

/// Headers for a message sent on behalf of `span` and `correlation`.
pub fn headers_for(span: &tracing::Span, correlation: Option<&CorrelationId>) -> Headers {
    let mut headers = Headers::new();
    TraceContextPropagator::new()
        .inject_context(&span.context(), &mut HeadersInjector(&mut headers));
    if let Some(id) = correlation {
        headers.push((correlation::HEADER.to_owned(), id.to_string()));
        headers.push((correlation::BAGGAGE_HEADER.to_owned(), id.to_baggage()));
    }
    headers
}

/// What a received message carries: its trace context (empty when it has
/// none) and its correlation id (if it has a valid one).
#[derive(Debug)]
pub struct Received {
    pub context: opentelemetry::Context,
    pub correlation: Option<CorrelationId>,
}

/// Reads the trace context and correlation id from received headers.
pub fn extract<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> Received {
    let headers: Vec<(&str, &str)> = headers.into_iter().collect();
    let context = TraceContextPropagator::new().extract(&HeadersExtractor(&headers));
    let header = |wanted: &str| {
        headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(wanted))
            .map(|(_, value)| *value)
    };
    let correlation = header(correlation::HEADER)
        .and_then(CorrelationId::parse)
        .or_else(|| header(correlation::BAGGAGE_HEADER).and_then(CorrelationId::from_baggage));
    Received {
        context,
        correlation,
    }
}

/// Makes `context` the parent of `span` and records the span's trace id in
/// its `trace_id` field, so every log line inside the span shows it.
pub fn adopt_parent(span: &tracing::Span, context: opentelemetry::Context) {
    let _ = span.set_parent(context);
    record_trace_id(span);
}

/// Records the span's W3C trace id in its `trace_id` field.
pub fn record_trace_id(span: &tracing::Span) {
    let trace_id = span.context().span().span_context().trace_id();
    span.record("trace_id", tracing::field::display(trace_id));
}

/// The W3C trace id of `span` in hex, as Jaeger shows it.
pub fn trace_id(span: &tracing::Span) -> String {
    span.context().span().span_context().trace_id().to_string()
}

struct HeadersInjector<'a>(&'a mut Headers);

impl Injector for HeadersInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_owned(), value));
    }
}

struct HeadersExtractor<'a>(&'a [(&'a str, &'a str)]);

impl Extractor for HeadersExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(key))
            .map(|(_, value)| *value)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| *name).collect()
    }
}
