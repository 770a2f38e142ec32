use std::future::Future;
use std::process::ExitCode;

use telemetry::TelemetrySettings;
use tokio_util::sync::CancellationToken;

/// The body of every service's `main`: starts the runtime and telemetry,
/// runs `service` with a token that SIGTERM or SIGINT cancels, reports how
/// it ended, and flushes telemetry last.
///
/// `service` must return once the token is cancelled, after stopping its
/// server and background work.
pub fn main<F, Fut>(name: &'static str, telemetry: &TelemetrySettings, service: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{name}: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        // The OTLP exporter needs the runtime, so telemetry starts inside it.
        let guard = match telemetry::init(telemetry, name) {
            Ok(guard) => guard,
            Err(error) => {
                eprintln!("{name}: cannot start telemetry: {error:#}");
                return ExitCode::FAILURE;
            }
        };
        if let Err(error) = crate::http::recorder() {
            eprintln!("{name}: cannot record metrics: {error:#}");
            return ExitCode::FAILURE;
        }
        let shutdown = CancellationToken::new();
        tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                shutdown_signal().await;
                tracing::info!("shutdown signal received");
                shutdown.cancel();
            }
        });
        tracing::info!(
            service = name,
            version = env!("CARGO_PKG_VERSION"),
            "starting"
        );
        let outcome = service(shutdown).await;
        let code = match &outcome {
            Ok(()) => {
                tracing::info!("stopped cleanly");
                ExitCode::SUCCESS
            }
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "stopped with an error");
                ExitCode::FAILURE
            }
        };
        guard.shutdown();
        code
    })
}

/// Completes on SIGTERM (what Kubernetes and `docker stop` send) or SIGINT
/// (Ctrl-C).
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
