//! The small HTTP server every service runs beside gRPC: Prometheus
//! metrics at `/metrics`, and whatever routes a service adds (the
//! orchestrator's dashboard).
//!
//! The port faces whoever can reach it, so the server bounds what a client
//! can hold:
//! - a client gets [`HttpLimits::request_timeout`] to send a request's
//!   headers (a connection that sends nothing, or trickles, is closed), and
//!   a handler as long to answer (503 after that);
//! - at most [`HttpLimits::max_connections`] connections are served at
//!   once; HTTP/1.1 serves one request at a time per connection, so this
//!   also bounds the requests in flight. Further clients wait in the
//!   listen backlog, not in memory;
//! - gauges read from the database are cached ([`Gauges`]): a flood of
//!   scrapes costs the database one query per refresh interval.
//!
//! Every answer carries security headers ([`security_headers`]); a route
//! that needs a looser Content-Security-Policy (the dashboard page) sets
//! its own.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse as _, Response};
use axum::routing::get;
use futures::future::BoxFuture;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Sets gauges that are read, not counted (a backlog, sagas by state).
/// Run when a scrape finds the gauges older than the refresh interval.
pub type Collector = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// The Content-Security-Policy of every answer that sets none: nothing it
/// returns (metrics text, JSON) needs to load or run anything.
pub const DEFAULT_CONTENT_SECURITY_POLICY: &str = "default-src 'none'; frame-ancestors 'none'";

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

/// What bounds the HTTP server; from [`ServerSettings`](crate::ServerSettings).
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Longest a client may take to send a request's headers (and an idle
    /// connection may stay open), and a handler to answer.
    pub request_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Longest the gauges of the collectors are kept before a scrape
    /// refreshes them.
    pub refresh_interval: Duration,
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

    /// Serves until `shutdown`, then lets the requests in flight finish
    /// (each is bounded by the request timeout).
    pub(crate) async fn serve(
        self,
        limits: HttpLimits,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let handle = recorder()?;
        let gauges = Arc::new(Gauges::new(self.collectors, limits.refresh_interval));
        let metrics = get(move || {
            let gauges = gauges.clone();
            async move {
                gauges.refresh_if_stale().await;
                handle.render()
            }
        });
        let router = self
            .router
            .route("/metrics", metrics)
            // Innermost: a handler that overruns is answered 503 and dropped
            // (its queries with it).
            .layer(middleware::from_fn_with_state(
                limits.request_timeout,
                answer_within,
            ))
            // Outermost, so the 503 of a timeout carries them too.
            .layer(middleware::map_response(security_headers));
        tracing::info!(address = %self.listener.local_addr()?, "HTTP server listening");

        let connections = Arc::new(Semaphore::new(limits.max_connections));
        let tracker = TaskTracker::new();
        loop {
            // A permit before accepting: beyond the limit, clients wait in
            // the kernel's backlog rather than in a task of ours.
            let permit = tokio::select! {
                permit = connections.clone().acquire_owned() => {
                    permit.context("the connection limit was closed")?
                }
                () = shutdown.cancelled() => break,
            };
            let stream = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(error) => {
                        // Out of file descriptors, most likely: pausing lets
                        // connections close, where retrying at once would spin.
                        tracing::warn!(%error, "cannot accept an HTTP connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = shutdown.cancelled() => break,
            };
            let service = TowerToHyperService::new(router.clone());
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                let _permit = permit;
                let mut builder = hyper::server::conn::http1::Builder::new();
                // The timer is what makes the header timeout work at all.
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.request_timeout);
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                let mut connection = std::pin::pin!(connection);
                let served = tokio::select! {
                    served = connection.as_mut() => served,
                    () = shutdown.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                if let Err(error) = served {
                    // Timeouts and clients that hang up: theirs to fix.
                    tracing::debug!(%error, "HTTP connection ended with an error");
                }
            });
        }
        tracker.close();
        tracker.wait().await;
        Ok(())
    }
}

/// Answers 503 if the handler has not answered within the request timeout.
async fn answer_within(State(timeout): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(?timeout, "an HTTP request took too long");
            (StatusCode::SERVICE_UNAVAILABLE, "the request took too long").into_response()
        }
    }
}

/// Headers every answer carries: no MIME sniffing, no framing by another
/// site (clickjacking), no URL (with a flow's correlation id) sent on in a
/// `Referer`, and [`DEFAULT_CONTENT_SECURITY_POLICY`] unless the route set
/// a policy of its own.
pub async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers
        .entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(HeaderValue::from_static(DEFAULT_CONTENT_SECURITY_POLICY));
    response
}

/// The gauges of the collectors, refreshed by a scrape that finds them
/// older than the interval. Refreshing on demand, not on a timer, queries
/// nothing while nobody scrapes, and gives the first scrape after a quiet
/// spell fresh values.
struct Gauges {
    collectors: Vec<Collector>,
    interval: Duration,
    /// When the last refresh began; held while one runs.
    refreshed: Mutex<Option<Instant>>,
}

impl Gauges {
    fn new(collectors: Vec<Collector>, interval: Duration) -> Self {
        Self {
            collectors,
            interval,
            refreshed: Mutex::new(None),
        }
    }

    async fn refresh_if_stale(&self) {
        // A scrape arriving while another refreshes reads the gauges as
        // they are, instead of queueing on the database.
        let Ok(mut refreshed) = self.refreshed.try_lock() else {
            return;
        };
        if refreshed.is_some_and(|at| at.elapsed() < self.interval) {
            return;
        }
        // Stamped before the queries run: a database that fails or hangs is
        // tried again only after another interval.
        *refreshed = Some(Instant::now());
        metrics::counter!("metrics_gauge_refreshes_total").increment(1);
        for collect in &self.collectors {
            collect().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    use super::*;

    struct Running {
        address: SocketAddr,
        refreshes: Arc<AtomicUsize>,
        shutdown: CancellationToken,
        served: tokio::task::JoinHandle<anyhow::Result<()>>,
    }

    impl Running {
        async fn stop(self) {
            self.shutdown.cancel();
            self.served.await.unwrap().unwrap();
        }
    }

    async fn start(limits: HttpLimits, router: Router) -> Running {
        let mut server = HttpServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let refreshes = Arc::new(AtomicUsize::new(0));
        let counted = refreshes.clone();
        server.collect(Arc::new(move || {
            let counted = counted.clone();
            Box::pin(async move {
                counted.fetch_add(1, Ordering::SeqCst);
            })
        }));
        server.merge(router);
        let address = server.local_addr();
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(server.serve(limits, shutdown.clone()));
        Running {
            address,
            refreshes,
            shutdown,
            served,
        }
    }

    fn limits(request_timeout: Duration) -> HttpLimits {
        HttpLimits {
            request_timeout,
            max_connections: 8,
            refresh_interval: Duration::from_secs(3600),
        }
    }

    /// The head and body of the answer to `GET path` on a new connection.
    async fn fetch(address: SocketAddr, path: &str) -> (String, String) {
        let mut stream = TcpStream::connect(address).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        (head.to_owned(), body.to_owned())
    }

    /// How long until the server closes `stream`, reading what it sends.
    async fn closed_after(mut stream: TcpStream) -> Duration {
        let started = Instant::now();
        let mut sink = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut sink))
            .await
            .expect("the server closes the connection")
            .ok();
        started.elapsed()
    }

    #[tokio::test]
    async fn a_client_that_sends_nothing_or_trickles_is_cut_off() {
        let timeout = Duration::from_millis(300);
        let server = start(limits(timeout), Router::new()).await;

        let silent = TcpStream::connect(server.address).await.unwrap();
        let mut trickling = TcpStream::connect(server.address).await.unwrap();
        trickling
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: test\r\n")
            .await
            .unwrap();
        let (silent, trickling) = tokio::join!(closed_after(silent), closed_after(trickling));
        for waited in [silent, trickling] {
            assert!(
                waited >= timeout - Duration::from_millis(50) && waited < timeout * 5,
                "closed after {waited:?}"
            );
        }
        // The server still answers everyone else.
        let (head, _) = fetch(server.address, "/metrics").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        server.stop().await;
    }

    #[tokio::test]
    async fn a_slow_handler_is_answered_503_within_the_timeout() {
        let slow = Router::new().route(
            "/slow",
            get(|| async {
                // Stands for a query that never returns.
                std::future::pending::<()>().await;
                "never"
            }),
        );
        let server = start(limits(Duration::from_millis(200)), slow).await;
        let started = Instant::now();
        let (head, _) = fetch(server.address, "/slow").await;
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(head.contains("x-content-type-options: nosniff"), "{head}");
        server.stop().await;
    }

    #[tokio::test]
    async fn clients_beyond_the_connection_limit_wait_for_a_free_one() {
        let server = start(
            HttpLimits {
                max_connections: 2,
                ..limits(Duration::from_secs(30))
            },
            Router::new(),
        )
        .await;
        let holders = [
            TcpStream::connect(server.address).await.unwrap(),
            TcpStream::connect(server.address).await.unwrap(),
        ];
        let third = tokio::spawn(fetch(server.address, "/metrics"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!third.is_finished(), "a third connection was served");
        drop(holders);
        let (head, _) = tokio::time::timeout(Duration::from_secs(5), third)
            .await
            .expect("served once a connection closed")
            .unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        server.stop().await;
    }

    #[tokio::test]
    async fn scrapes_refresh_the_gauges_once_per_interval() {
        let server = start(limits(Duration::from_secs(10)), Router::new()).await;
        for _ in 0..20 {
            let (head, _) = fetch(server.address, "/metrics").await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        }
        assert_eq!(server.refreshes.load(Ordering::SeqCst), 1);
        server.stop().await;

        let server = start(
            HttpLimits {
                refresh_interval: Duration::ZERO,
                ..limits(Duration::from_secs(10))
            },
            Router::new(),
        )
        .await;
        for _ in 0..3 {
            fetch(server.address, "/metrics").await;
        }
        assert_eq!(server.refreshes.load(Ordering::SeqCst), 3);
        server.stop().await;
    }

    #[tokio::test]
    async fn every_answer_carries_the_security_headers() {
        let page = Router::new().route(
            "/page",
            get(|| async {
                (
                    [(header::CONTENT_SECURITY_POLICY, "default-src 'self'")],
                    "a page",
                )
            }),
        );
        let server = start(limits(Duration::from_secs(10)), page).await;
        for (path, policy) in [
            ("/metrics", DEFAULT_CONTENT_SECURITY_POLICY),
            ("/nowhere", DEFAULT_CONTENT_SECURITY_POLICY),
            ("/page", "default-src 'self'"),
        ] {
            let (head, _) = fetch(server.address, path).await;
            let head = head.to_ascii_lowercase();
            assert!(head.contains("x-content-type-options: nosniff"), "{head}");
            assert!(head.contains("x-frame-options: deny"), "{head}");
            assert!(head.contains("referrer-policy: no-referrer"), "{head}");
            assert!(
                head.contains(&format!(
                    "content-security-policy: {}",
                    policy.to_ascii_lowercase()
                )),
                "{path}: {head}"
            );
        }
        server.stop().await;
    }
}
