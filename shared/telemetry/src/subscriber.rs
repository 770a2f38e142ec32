use std::io::IsTerminal as _;

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_subscriber::Registry;
use tracing_subscriber::filter::dynamic_filter_fn;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::Filter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// Telemetry settings shared by every service.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetrySettings {
    /// Log line format: `json` (one object per line, for collectors) or
    /// `pretty` (one readable line per event, for people).
    #[arg(long = "log-format", env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// Which events to log, as `tracing` directives: `info`, or
    /// `info,order_service=debug`.
    #[arg(long = "log-level", env = "LOG_LEVEL", default_value = "info", value_parser = parse_directives)]
    pub log_level: String,

    /// OTLP/gRPC collector to export spans to, such as
    /// http://localhost:4317 (Jaeger accepts OTLP there). Unset: spans are
    /// not exported, and nothing fails.
    #[arg(long = "otel-exporter-otlp-endpoint", env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_parser = parse_endpoint)]
    pub otlp_endpoint: Option<String>,

    /// Service name in exported traces; defaults to the service's own name.
    #[arg(long = "otel-service-name", env = "OTEL_SERVICE_NAME")]
    pub service_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

fn parse_directives(value: &str) -> Result<String, String> {
    EnvFilter::builder()
        .parse(value)
        .map(|_| value.to_owned())
        .map_err(|error| error.to_string())
}

fn parse_endpoint(value: &str) -> Result<String, String> {
    let uri: http::Uri = value
        .parse()
        .map_err(|error: http::uri::InvalidUri| error.to_string())?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(value.to_owned()),
        _ => Err("expected an http:// or https:// URL".to_owned()),
    }
}

/// Keeps the trace pipeline alive; [`TelemetryGuard::shutdown`] flushes it.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Exports the spans still buffered and stops the exporter. Call it last,
    /// after the server and consumers have stopped.
    pub fn shutdown(mut self) {
        self.shutdown_provider();
    }

    fn shutdown_provider(&mut self) {
        if let Some(provider) = self.provider.take() {
            // `shutdown` flushes by itself; a separate `force_flush` first
            // is known to time out with the batch processor.
            if let Err(error) = provider.shutdown() {
                tracing::warn!(%error, "trace exporter did not shut down cleanly");
            }
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        self.shutdown_provider();
    }
}

/// Installs the global subscriber: logs to stdout in the configured format,
/// spans to OpenTelemetry (exported when an endpoint is set), and W3C trace
/// context as the global propagator.
pub fn init(settings: &TelemetrySettings, service_name: &str) -> anyhow::Result<TelemetryGuard> {
    let (subscriber, provider) = subscriber(settings, service_name, std::io::stdout)?;
    subscriber
        .try_init()
        .context("installing the tracing subscriber")?;
    Ok(TelemetryGuard {
        provider: Some(provider),
    })
}

/// The subscriber [`init`] installs, writing logs to `writer`; tests install
/// it for one thread with `tracing::subscriber::set_default` to read the logs.
pub fn subscriber<W>(
    settings: &TelemetrySettings,
    service_name: &str,
    writer: W,
) -> anyhow::Result<(
    impl tracing::Subscriber + Send + Sync + 'static,
    SdkTracerProvider,
)>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let name = settings
        .service_name
        .clone()
        .unwrap_or_else(|| service_name.to_owned());
    let mut builder = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name(name.clone()).build());
    if let Some(endpoint) = &settings.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .context("building the OTLP exporter")?;
        builder = builder.with_batch_exporter(exporter);
    }
    // Without an exporter the provider still creates sampled spans with
    // real trace ids: logs show them and propagation carries them on.
    let provider = builder.build();
    let tracer = provider.tracer(name);
    opentelemetry::global::set_tracer_provider(provider.clone());
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );

    // One filter for both layers: spans at INFO and above, whatever the log
    // level (spans carry the trace across services, and a quiet service
    // must not break every trace that passes through it), and events at the
    // log level. Two filters, one per layer, disagreed on events that only
    // one of them kept, and the line after such an event could go missing;
    // one filter, in front of both, also decides for both at once.
    let log_filter = EnvFilter::builder().parse(&settings.log_level)?;
    let shared = dynamic_filter_fn(move |metadata, context| {
        (metadata.is_span() && *metadata.level() <= Level::INFO)
            || Filter::<Registry>::enabled(&log_filter, metadata, context)
    });
    let logs = match settings.log_format {
        // Span fields (correlation_id, trace_id) of every enclosing span go
        // into each line, so any line can be tied to its request.
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .with_writer(writer)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .compact()
            .with_ansi(std::io::stdout().is_terminal())
            .with_writer(writer)
            .boxed(),
    };
    let subscriber = tracing_subscriber::registry()
        .with(shared)
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .with(logs);
    Ok((subscriber, provider))
}
