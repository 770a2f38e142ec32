//! The small HTTP server every service runs beside gRPC: Prometheus
//! metrics at `/metrics`, and whatever routes a service adds (the
//! orchestrator's dashboard).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use anyhow::Context as _;
use axum::Router;
use axum::routing::get;
use futures::future::BoxFuture;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Sets gauges that are read, not counted (a backlog, sagas by state) just
/// before each scrape.
pub type Collector = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// The process's metrics recorder, installed on first use. Latency
/// histograms get buckets from a millisecond to half a minute.
pub fn recorder() -> anyhow::Result<&'static PrometheusHandle> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle);
    }
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ])
        .context("histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    Ok(HANDLE.get_or_init(|| handle))
}

/// The HTTP server, bound at construction.
pub(crate) struct HttpServer {
    listener: TcpListener,
    router: Router,
    collectors: Vec<Collector>,
}

impl HttpServer {
    pub(crate) async fn bind(address: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("binding the metrics port {address}"))?;
        Ok(Self {
            listener,
            router: Router::new(),
            collectors: Vec::new(),
        })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub(crate) fn merge(&mut self, router: Router) {
        self.router = std::mem::take(&mut self.router).merge(router);
    }

    pub(crate) fn collect(&mut self, collector: Collector) {
        self.collectors.push(collector);
    }

    /// Serves until `shutdown`.
    pub(crate) async fn serve(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let handle = recorder()?;
        let collectors = Arc::new(self.collectors);
        let metrics = get(move || {
            let collectors = collectors.clone();
            async move {
                for collect in collectors.iter() {
                    collect().await;
                }
                handle.render()
            }
        });
        let router = self.router.route("/metrics", metrics);
        tracing::info!(address = %self.listener.local_addr()?, "HTTP server listening");
        axum::serve(self.listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .context("HTTP server failed")
    }
}
