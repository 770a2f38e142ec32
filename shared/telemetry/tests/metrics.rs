//! The server layer's metric series: one per method the server serves,
//! and one for every other path, whatever the callers send.

use std::convert::Infallible;

use http::{Request, Response};
use metrics_exporter_prometheus::PrometheusBuilder;
use telemetry::grpc::{KnownMethods, ServerLayer, UNKNOWN};
use tower::{Layer as _, Service as _, ServiceExt as _};

/// Answers every request PERMISSION_DENIED, as access control does for a
/// path without a rule.
async fn refuse(_request: Request<()>) -> Result<Response<()>, Infallible> {
    let mut response = Response::new(());
    response
        .headers_mut()
        .insert("grpc-status", http::HeaderValue::from_static("7"));
    Ok(response)
}

fn request(path: &str) -> Request<()> {
    Request::builder()
        .uri(format!("http://order.test{path}"))
        .body(())
        .unwrap()
}

/// The `method` label of every series of `name` in Prometheus text.
fn methods(text: &str, name: &str) -> Vec<String> {
    let mut methods: Vec<String> = text
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .filter_map(|line| {
            let (_, rest) = line.split_once("method=\"")?;
            Some(rest.split_once('"')?.0.to_owned())
        })
        .collect();
    methods.sort();
    methods.dedup();
    methods
}

// One thread: the recorder is installed for this thread only, and the
// layer records when its response future completes.
#[tokio::test(flavor = "current_thread")]
async fn only_served_methods_get_series_of_their_own() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let _recorder = metrics::set_default_local_recorder(&recorder);
    let served = "ordersaga.order.v1.OrderService/GetOrder";
    let mut server = ServerLayer::new(KnownMethods::new([served])).layer(tower::service_fn(refuse));

    let mut paths: Vec<String> = (0..1000)
        .map(|n| format!("/random.Svc{n}/xyz{n}"))
        .collect();
    paths.extend(
        [
            "/ordersaga.order.v1.OrderService/GetOrder",
            "/ordersaga.order.v1.OrderService/NoSuchMethod",
            "/ordersaga.order.v1.OrderService/GetOrder/extra",
            "/",
            "/a/b/c",
            "/grpc.health.v1.Health/Check",
        ]
        .map(str::to_owned),
    );
    for path in &paths {
        let response = server
            .ready()
            .await
            .unwrap()
            .call(request(path))
            .await
            .unwrap();
        assert_eq!(response.headers()["grpc-status"], "7");
    }

    let text = handle.render();
    assert_eq!(
        methods(&text, "grpc_server_requests_total"),
        [served, UNKNOWN],
        "{text}"
    );
    assert_eq!(
        methods(&text, "grpc_server_request_duration_seconds_count"),
        [served, UNKNOWN]
    );
    let unknown_requests: f64 = text
        .lines()
        .find(|line| line.starts_with("grpc_server_requests_total{method=\"unknown\""))
        .and_then(|line| line.rsplit_once(' '))
        .and_then(|(_, value)| value.parse().ok())
        .unwrap();
    // Every path but the served one and the health check, which is not
    // recorded at all.
    assert_eq!(unknown_requests, (paths.len() - 2) as f64);
}
