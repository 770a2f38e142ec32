//! Tower layers that carry the trace context and the correlation id through
//! gRPC metadata.
//!
//! On the server, [`ServerLayer`] opens one span per request (named and
//! attributed after the OpenTelemetry RPC conventions), continues the
//! caller's trace from `traceparent`, takes the caller's `x-correlation-id`
//! or makes one, puts the [`CorrelationId`] into the request extensions and
//! the task-local scope, and echoes it in the response headers. It does the
//! same with the request's id ([`causation`](crate::causation)): the
//! caller's `x-request-id` or a fresh one, recorded in the span, echoed,
//! and the cause of every event the handler publishes.
//!
//! On the client, [`ClientLayer`] opens a client span and injects its trace
//! context and the current correlation id into the outgoing metadata.
//!
//! Health checks and reflection pass through untraced: a probe every few
//! seconds would bury the traces worth reading.
//!
//! The server layer names spans and metric series only after the methods
//! the server serves ([`KnownMethods`]); any other path is the one method
//! [`UNKNOWN`]. The layer runs before access control, so a caller without a
//! token decides the path: named after it, 300 calls to made-up paths once
//! added 5,400 series to `/metrics`, for the life of the process.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::causation;
use crate::correlation::{self, CorrelationId};
use crate::propagation;

/// The method label and span name of every request to a path that is not
/// a method the server serves.
pub const UNKNOWN: &str = "unknown";

/// The methods a server serves, by full name (`package.Service/Method`).
#[derive(Debug, Clone, Default)]
pub struct KnownMethods(Arc<HashSet<String>>);

impl KnownMethods {
    pub fn new<I, M>(methods: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: Into<String>,
    {
        Self(Arc::new(methods.into_iter().map(Into::into).collect()))
    }

    /// Whether `full_name` (`package.Service/Method`) is served.
    pub fn contains(&self, full_name: &str) -> bool {
        self.0.contains(full_name)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Server-side layer; see the module documentation.
#[derive(Debug, Clone)]
pub struct ServerLayer {
    methods: KnownMethods,
}

impl ServerLayer {
    /// A layer for a server serving `methods`; requests to any other path
    /// are recorded as [`UNKNOWN`].
    pub fn new(methods: KnownMethods) -> Self {
        Self { methods }
    }
}

impl<S> Layer<S> for ServerLayer {
    type Service = ServerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerService {
            inner,
            methods: self.methods.clone(),
        }
    }
}

/// The service [`ServerLayer`] wraps around a server.
#[derive(Debug, Clone)]
pub struct ServerService<S> {
    inner: S,
    methods: KnownMethods,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for ServerService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
        };
        let correlation = header(correlation::HEADER)
            .and_then(CorrelationId::parse)
            .or_else(|| header(correlation::BAGGAGE_HEADER).and_then(CorrelationId::from_baggage))
            .unwrap_or_else(CorrelationId::generate);
        let request_id = header(causation::REQUEST_ID_HEADER)
            .and_then(causation::parse_request_id)
            .unwrap_or_else(causation::generate_request_id);
        request.extensions_mut().insert(correlation.clone());
        let infrastructure = is_infrastructure(request.uri().path());
        let rpc = Rpc::from_path(request.uri().path());
        // Only a served method gets its own series and span name: the path
        // is the caller's choice, and nothing has checked the caller yet.
        let (rpc, method) = if self.methods.contains(rpc.full_name) {
            (rpc, Cow::Owned(rpc.full_name.to_owned()))
        } else {
            (Rpc::UNKNOWN, Cow::Borrowed(UNKNOWN))
        };
        let span = if infrastructure {
            tracing::Span::none()
        } else {
            let span = tracing::info_span!(
                "grpc.server",
                otel.name = %rpc.full_name,
                otel.kind = "server",
                otel.status_code = tracing::field::Empty,
                rpc.system = "grpc",
                rpc.service = %rpc.service,
                rpc.method = %rpc.method,
                rpc.grpc.status_code = tracing::field::Empty,
                correlation_id = %correlation,
                request_id = %request_id,
                trace_id = tracing::field::Empty,
            );
            let parent =
                TraceContextPropagator::new().extract(&MetadataExtractor(request.headers()));
            propagation::adopt_parent(&span, parent);
            span
        };
        let echoed = HeaderValue::from_str(correlation.as_str()).ok();
        let echoed_request_id = HeaderValue::from_str(&request_id).ok();

        // Readiness was checked on `self.inner`; call that one and leave a
        // fresh clone behind for the next request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let future = span.in_scope(|| inner.call(request));
        let started = std::time::Instant::now();
        let handled = async move {
            let mut response = future.await?;
            let code = record_status(response.headers());
            if !infrastructure {
                let code = format!("{:?}", tonic::Code::from(code));
                metrics::counter!("grpc_server_requests_total", "method" => method.clone(), "code" => code).increment(1);
                metrics::histogram!("grpc_server_request_duration_seconds", "method" => method)
                    .record(started.elapsed().as_secs_f64());
            }
            if let Some(value) = echoed {
                response.headers_mut().insert(correlation::HEADER, value);
            }
            if let Some(value) = echoed_request_id {
                response
                    .headers_mut()
                    .insert(causation::REQUEST_ID_HEADER, value);
            }
            Ok(response)
        };
        Box::pin(correlation::scope(
            correlation,
            causation::scope(request_id, handled.instrument(span)),
        ))
    }
}

/// Client-side layer; see the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientLayer;

impl<S> Layer<S> for ClientLayer {
    type Service = ClientService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClientService { inner }
    }
}

/// The service [`ClientLayer`] wraps around a channel.
#[derive(Debug, Clone)]
pub struct ClientService<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for ClientService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let rpc = Rpc::from_path(request.uri().path());
        let correlation = correlation::current();
        let span = tracing::info_span!(
            "grpc.client",
            otel.name = %rpc.full_name,
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = %rpc.service,
            rpc.method = %rpc.method,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        TraceContextPropagator::new().inject_context(
            &span.context(),
            &mut MetadataInjector(request.headers_mut()),
        );
        // A correlation id set explicitly on the request wins over the scope's.
        if let Some(id) = correlation
            && let Ok(value) = HeaderValue::from_str(id.as_str())
            && let Ok(baggage) = HeaderValue::from_str(&id.to_baggage())
        {
            let headers = request.headers_mut();
            headers.entry(correlation::HEADER).or_insert(value);
            headers
                .entry(correlation::BAGGAGE_HEADER)
                .or_insert(baggage);
        }

        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let future = inner.call(request);
        Box::pin(
            async move {
                let response = future.await?;
                record_status(response.headers());
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// Service and method of a gRPC request path `/package.Service/Method`.
#[derive(Clone, Copy)]
struct Rpc<'a> {
    full_name: &'a str,
    service: &'a str,
    method: &'a str,
}

impl<'a> Rpc<'a> {
    /// What a request to a path the server does not serve is recorded as.
    const UNKNOWN: Rpc<'static> = Rpc {
        full_name: UNKNOWN,
        service: UNKNOWN,
        method: UNKNOWN,
    };

    fn from_path(path: &'a str) -> Self {
        let full_name = path.trim_start_matches('/');
        let (service, method) = full_name.split_once('/').unwrap_or((full_name, ""));
        Self {
            full_name,
            service,
            method,
        }
    }
}

fn is_infrastructure(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

/// Records the gRPC status on the current span. Errors a handler returns
/// travel in the response headers ("trailers-only"); a response without
/// `grpc-status` there is a normal reply whose status (almost always OK)
/// follows in the trailers.
fn record_status(headers: &HeaderMap) -> i32 {
    let code: i32 = headers
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0);
    let span = tracing::Span::current();
    span.record("rpc.grpc.status_code", code);
    if code != 0 {
        span.record("otel.status_code", "ERROR");
    }
    code
}

struct MetadataExtractor<'a>(&'a HeaderMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct MetadataInjector<'a>(&'a mut HeaderMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}
