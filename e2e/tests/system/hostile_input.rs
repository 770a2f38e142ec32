//! Hostile callers at the edges of the real binaries: made-up gRPC paths
//! must not grow `/metrics`; slow HTTP clients are cut off; scrapes do not
//! query the database each time; the dashboard carries its security
//! headers; and NUL characters, huge strings and extreme durations and
//! timestamps sent to every string and time field of OrderService,
//! SagaService and TraceService are answered INVALID_ARGUMENT naming the
//! field (never INTERNAL or UNKNOWN, which a fuzz run once got from
//! PostgreSQL's "invalid byte sequence for encoding UTF8: 0x00" and
//! "timestamp out of range", and from an overflow panic).

use std::fmt::Debug;
use std::time::Duration;

use api_order::v1 as order;
use api_saga::v1 as saga;
use api_trace::v1 as trace;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use e2e::{Stack, order_request};
use futures::StreamExt as _;
use prost::bytes::Buf as _;
use testkit::grpc::{bearer, violated_fields};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::{Code, Status};

/// Ten thousand random paths, as many as the fix must take in its stride.
const RANDOM_PATHS: usize = 10_000;
/// Longer than any field of these APIs accepts, within gRPC's 4 MiB.
fn huge() -> String {
    "x".repeat(1 << 20)
}
const NUL: &str = "flow\0-1";

// ---------------------------------------------------------------------
// Metrics: one series set for every path no server serves.

/// A codec for calls whose messages do not matter: sends an empty message
/// and reads whatever comes back, so any path can be called.
#[derive(Debug, Clone, Copy, Default)]
struct Anything;

impl Codec for Anything {
    type Encode = ();
    type Decode = ();
    type Encoder = Anything;
    type Decoder = Anything;

    fn encoder(&mut self) -> Self::Encoder {
        Anything
    }

    fn decoder(&mut self) -> Self::Decoder {
        Anything
    }
}

impl Encoder for Anything {
    type Item = ();
    type Error = Status;

    fn encode(&mut self, (): (), _dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        Ok(())
    }
}

impl Decoder for Anything {
    type Item = ();
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

/// Calls `path` on the service at `url` with an empty message.
async fn call_path(
    grpc: &tonic::client::Grpc<tonic::transport::Channel>,
    path: String,
) -> Result<(), Status> {
    let mut grpc = grpc.clone();
    grpc.ready()
        .await
        .map_err(|error| Status::unavailable(error.to_string()))?;
    let path = PathAndQuery::try_from(path).expect("a valid path");
    grpc.unary(tonic::Request::new(()), path, Anything)
        .await
        .map(|_| ())
}

/// The series lines of `service`'s `/metrics` (comments left out), and the
/// size of the whole text.
async fn series(stack: &Stack, service: &str) -> (Vec<String>, usize) {
    let address = stack.service(service).http_address().unwrap();
    let body = e2e::http_get(&format!("http://{address}/metrics"), None).await;
    let lines = body
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect();
    (lines, body.len())
}

fn grpc_series(lines: &[String]) -> Vec<&String> {
    lines
        .iter()
        .filter(|line| line.starts_with("grpc_server_"))
        .collect()
}

#[tokio::test]
async fn made_up_paths_do_not_add_metric_series() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let customer = stack.customer_token("paths@example.com").await.unwrap();
    let channel = testkit::grpc::channel(&stack.service("order").url())
        .await
        .unwrap();
    let grpc = tonic::client::Grpc::new(channel);
    let random = |n: usize| match n % 4 {
        0 => format!("/random.Svc{n}/{}", uuid::Uuid::new_v4().simple()),
        1 => format!("/{}.{n}/x", uuid::Uuid::new_v4().simple()),
        2 => format!(
            "/ordersaga.order.v1.OrderService/No{}",
            uuid::Uuid::new_v4().simple()
        ),
        _ => format!("/a/b/{n}/{}", uuid::Uuid::new_v4().simple()),
    };
    let code_of = |result: Result<(), Status>| match result {
        Err(status) => status.code(),
        Ok(()) => Code::Ok,
    };

    // A few of each kind first, and a known method without a token: every
    // series the flood below can touch then exists.
    for n in 0..8 {
        let code = code_of(call_path(&grpc, random(n)).await);
        assert_eq!(code, Code::PermissionDenied, "no rule for a made-up path");
    }
    let unauthenticated = stack
        .orders()
        .await
        .get_order(order::GetOrderRequest {
            order_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(unauthenticated.code(), Code::Unauthenticated);
    let (before, before_bytes) = series(&stack, "order").await;

    let codes: Vec<Code> = futures::stream::iter(0..RANDOM_PATHS)
        .map(|n| {
            let grpc = &grpc;
            let path = random(n);
            async move { code_of(call_path(grpc, path).await) }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    assert!(
        codes.iter().all(|code| *code == Code::PermissionDenied),
        "{:?}",
        codes.iter().find(|code| **code != Code::PermissionDenied)
    );
    // Made-up paths with a valid token, and a known method without one.
    for n in 0..50 {
        let mut request = tonic::Request::new(());
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {customer}").parse().unwrap(),
        );
        let mut grpc = grpc.clone();
        grpc.ready().await.unwrap();
        let path = PathAndQuery::try_from(random(n)).unwrap();
        let status = grpc.unary(request, path, Anything).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        let status = stack
            .orders()
            .await
            .list_orders(order::ListOrdersRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }

    let (after, after_bytes) = series(&stack, "order").await;
    eprintln!(
        "order /metrics: {} series ({before_bytes} bytes) before {RANDOM_PATHS} made-up paths, {} series ({after_bytes} bytes) after",
        before.len(),
        after.len()
    );
    let unknown = |lines: &[String]| {
        lines
            .iter()
            .find(|line| {
                line.starts_with("grpc_server_requests_total{")
                    && line.contains("method=\"unknown\"")
            })
            .and_then(|line| line.rsplit_once(' '))
            .and_then(|(_, value)| value.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(
        unknown(&after) - unknown(&before),
        (RANDOM_PATHS + 50) as f64
    );
    let new_series: Vec<_> = grpc_series(&after)
        .into_iter()
        .map(|line| line.rsplit_once(' ').unwrap().0)
        .filter(|name| {
            !before
                .iter()
                .any(|line| line.rsplit_once(' ').unwrap().0 == *name)
        })
        .collect();
    // ListOrders without a token is the one new (and bounded) series set.
    assert!(
        new_series
            .iter()
            .all(|name| name.contains("OrderService/ListOrders")),
        "{new_series:#?}"
    );
    assert!(
        after.len() <= before.len() + 18,
        "{} series before, {} after",
        before.len(),
        after.len()
    );
    assert!(after_bytes < 64 * 1024, "{after_bytes} bytes of metrics");
    assert!(
        !after.iter().any(|line| line.contains("random.Svc")),
        "no path of a caller's in the metrics"
    );
}

// ---------------------------------------------------------------------
// The HTTP port: timeouts, cached gauges, security headers.

/// The head and body of the answer to `GET path` at `address`.
async fn http(address: std::net::SocketAddr, path: &str, token: Option<&str>) -> (String, String) {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request =
        format!("GET {path} HTTP/1.1\r\nhost: {address}\r\n{auth}connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.to_ascii_lowercase(), body.to_owned())
}

/// Calls of the order service's outbox gauge query in this test's database.
async fn outbox_gauge_queries(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND userid = (SELECT oid FROM pg_roles WHERE rolname = $1)
           AND query LIKE '%min(created_at)%FROM outbox%'",
    )
    .bind(order_service::ROLE)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn the_http_ports_cut_off_slow_clients_cache_gauges_and_send_security_headers() {
    let timeout = Duration::from_secs(1);
    let stack = Stack::builder()
        .env_all("HTTP_REQUEST_TIMEOUT", "1s")
        .env_all("METRICS_REFRESH_INTERVAL", "1h")
        .start()
        .await
        .unwrap();
    let order_http = stack.service("order").http_address().unwrap();

    // A client that sends half a request, and one that sends nothing.
    let mut trickling = TcpStream::connect(order_http).await.unwrap();
    trickling
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let silent = TcpStream::connect(order_http).await.unwrap();
    let started = tokio::time::Instant::now();
    for mut stream in [trickling, silent] {
        let mut sink = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut sink))
            .await
            .expect("the server hangs up on a slow client")
            .ok();
    }
    let waited = started.elapsed();
    assert!(
        waited >= timeout - Duration::from_millis(200) && waited < timeout * 4,
        "cut off after {waited:?}"
    );

    // Fifty scrapes, one database query for the gauges.
    let pool = stack.scenario.inspect().await.unwrap();
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&pool)
        .await
        .unwrap();
    let queries_before = outbox_gauge_queries(&pool).await;
    let mut last = String::new();
    for _ in 0..50 {
        last = e2e::http_get(&format!("http://{order_http}/metrics"), None).await;
    }
    let queries = outbox_gauge_queries(&pool).await - queries_before;
    assert_eq!(queries, 1, "50 scrapes ran the gauge query {queries} times");
    assert!(last.contains("outbox_backlog 0"), "{last}");
    assert!(last.contains("metrics_gauge_refreshes_total 1"), "{last}");

    // The dashboard: its page, script and style sheet, and its JSON.
    let dashboard = stack.service("saga-orchestrator").http_address().unwrap();
    let (page, body) = http(dashboard, "/", None).await;
    assert!(page.starts_with("http/1.1 200"), "{page}");
    for header in [
        "content-security-policy: default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        "x-content-type-options: nosniff",
        "x-frame-options: deny",
        "referrer-policy: no-referrer",
    ] {
        assert!(page.contains(header), "missing {header:?} in {page}");
    }
    assert!(body.contains("<script src=\"/dashboard.js\"></script>"));
    assert!(!body.contains("<script>") && !body.contains("<style>"));
    for (path, kind) in [
        ("/dashboard.js", "text/javascript"),
        ("/dashboard.css", "text/css"),
    ] {
        let (head, _) = http(dashboard, path, None).await;
        assert!(head.starts_with("http/1.1 200"), "{path}: {head}");
        assert!(head.contains(&format!("content-type: {kind}")), "{head}");
        assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    }
    let admin = stack.admin_token().await.unwrap();
    for (path, token, code) in [
        ("/api/summary", None, "401"),
        ("/api/summary", Some(admin.as_str()), "200"),
        ("/api/trace?correlation=flow%00-1", Some(&admin), "400"),
        ("/api/trace?correlation=flow-1", Some(&admin), "200"),
        ("/metrics", None, "200"),
    ] {
        let (head, _) = http(dashboard, path, token).await;
        assert!(
            head.starts_with(&format!("http/1.1 {code}")),
            "{path}: {head}"
        );
        assert!(
            head.contains("content-security-policy: default-src 'none'; frame-ancestors 'none'")
                && head.contains("x-frame-options: deny")
                && head.contains("x-content-type-options: nosniff"),
            "{path}: {head}"
        );
    }
}

// ---------------------------------------------------------------------
// Hostile fields, RPC by RPC.

/// What the hostile cases found: every case runs, and the test fails
/// with the list of those answered wrongly.
#[derive(Debug, Default)]
struct Findings(Vec<String>);

impl Findings {
    /// Expects `answer` to be INVALID_ARGUMENT naming `field`.
    fn refused<T: Debug>(
        &mut self,
        case: &str,
        answer: Result<tonic::Response<T>, Status>,
        field: &str,
    ) {
        let status = match answer {
            Ok(response) => {
                return self
                    .0
                    .push(format!("{case}: accepted: {:?}", response.get_ref()));
            }
            Err(status) => status,
        };
        let fields = violated_fields(&status);
        if status.code() != Code::InvalidArgument || !fields.iter().any(|f| f == field) {
            self.0.push(format!(
                "{case}: {:?} {} (fields {fields:?}), not INVALID_ARGUMENT naming {field}",
                status.code(),
                status.message()
            ));
        } else if status.message().len() > 4096 {
            self.0
                .push(format!("{case}: the answer grows with the request"));
        }
    }

    /// Expects `answer` not to be a server fault, whatever else it is.
    fn no_fault<T>(&mut self, case: &str, answer: Result<tonic::Response<T>, Status>) {
        if let Err(status) = answer
            && matches!(status.code(), Code::Internal | Code::Unknown)
        {
            self.0
                .push(format!("{case}: {:?} {}", status.code(), status.message()));
        }
    }

    /// Expects `answer` to be served.
    fn served<T>(&mut self, case: &str, answer: Result<tonic::Response<T>, Status>) {
        if let Err(status) = answer {
            self.0.push(format!(
                "{case}: refused: {:?} {}",
                status.code(),
                status.message()
            ));
        }
    }

    #[track_caller]
    fn assert_none(self) {
        assert!(
            self.0.is_empty(),
            "{} cases answered wrongly:\n{}",
            self.0.len(),
            self.0.join("\n")
        );
    }
}

/// A page token of the form the services issue, at `micros`.
fn page_token(micros: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{micros}:{}", uuid::Uuid::new_v4()))
}

/// Page tokens no service issued: not base64, NUL, huge, and positions
/// before year 1 or past year 9999 (PostgreSQL: "timestamp out of range").
fn bad_page_tokens() -> Vec<(&'static str, String)> {
    vec![
        ("garbage", "%%%".to_owned()),
        ("NUL", "abc\0def".to_owned()),
        ("huge", huge()),
        ("far past", page_token("-8000000000000000000")),
        ("year 10000", page_token("253402300800000000")),
        ("i64::MIN", page_token(&i64::MIN.to_string())),
        ("beyond i64", page_token("99999999999999999999999")),
    ]
}

/// A ListActiveSagas request for sagas older than `seconds` and `nanos`
/// (the two parts of a protobuf duration, set apart to send any pair).
fn older_than(seconds: i64, nanos: i32) -> saga::ListActiveSagasRequest {
    let mut request = saga::ListActiveSagasRequest {
        older_than: Some(Default::default()),
        ..Default::default()
    };
    let older_than = request.older_than.as_mut().expect("just set");
    older_than.seconds = seconds;
    older_than.nanos = nanos;
    request
}

#[tokio::test]
async fn hostile_fields_at_the_order_service_are_invalid_arguments() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let customer = stack.customer_token("hostile@example.com").await.unwrap();
    let service = stack.service_token().await.unwrap();
    let admin = stack.admin_token().await.unwrap();
    let mut orders = stack.orders().await;
    let mut found = Findings::default();
    // A pending order (no sagas here) for the commands to aim at, placed
    // with a correlation id too long to keep: served, with one of ours.
    let mut request = bearer(order_request("hostile-ok", "tok_visa"), &customer);
    request
        .metadata_mut()
        .insert("x-correlation-id", "c".repeat(4000).parse().unwrap());
    let placed = orders.create_order(request).await.unwrap().into_inner();
    assert_ne!(
        placed.correlation_id,
        "c".repeat(4000),
        "replaced, not kept"
    );
    let order_id = placed.order_id.clone();

    // CreateOrder: every string of the request and of a line.
    let create = |change: &dyn Fn(&mut order::CreateOrderRequest)| {
        let mut request = order_request("hostile-1", "tok_visa");
        change(&mut request);
        bearer(request, &customer)
    };
    type Change = Box<dyn Fn(&mut order::CreateOrderRequest)>;
    let cases: Vec<(&str, &str, Change)> = vec![
        (
            "NUL key",
            "idempotency_key",
            Box::new(|r| r.idempotency_key = NUL.into()),
        ),
        (
            "huge key",
            "idempotency_key",
            Box::new(|r| r.idempotency_key = huge()),
        ),
        (
            "NUL payment method",
            "payment_method_token",
            Box::new(|r| r.payment_method_token = NUL.into()),
        ),
        (
            "huge payment method",
            "payment_method_token",
            Box::new(|r| r.payment_method_token = huge()),
        ),
        (
            "NUL sku",
            "items[0].sku",
            Box::new(|r| r.items[0].sku = NUL.into()),
        ),
        (
            "huge sku",
            "items[1].sku",
            Box::new(|r| r.items[1].sku = huge()),
        ),
        (
            "NUL currency",
            "items[0].unit_price.currency",
            Box::new(|r| r.items[0].unit_price.as_mut().unwrap().currency = "EU\0".into()),
        ),
        (
            "huge currency",
            "items[0].unit_price.currency",
            Box::new(|r| r.items[0].unit_price.as_mut().unwrap().currency = huge()),
        ),
        (
            "largest amount",
            "items[0].unit_price.amount_minor",
            Box::new(|r| r.items[0].unit_price.as_mut().unwrap().amount_minor = i64::MAX),
        ),
        (
            "smallest amount",
            "items[0].unit_price.amount_minor",
            Box::new(|r| r.items[0].unit_price.as_mut().unwrap().amount_minor = i64::MIN),
        ),
        (
            "largest quantity",
            "items[0].quantity",
            Box::new(|r| r.items[0].quantity = u32::MAX),
        ),
        (
            "no price",
            "items[0].unit_price",
            Box::new(|r| r.items[0].unit_price = None),
        ),
        (
            "ten thousand lines",
            "items",
            Box::new(|r| r.items = vec![r.items[0].clone(); 10_000]),
        ),
    ];
    for (case, field, change) in &cases {
        found.refused(case, orders.create_order(create(change)).await, field);
    }

    // GetOrder, RequestOrderCancellation, and the service's ConfirmOrder, RejectOrder
    // and CancelOrder.
    for (case, id) in [("NUL id", NUL.to_owned()), ("huge id", huge())] {
        let request = order::GetOrderRequest {
            order_id: id.clone(),
        };
        found.refused(
            case,
            orders.get_order(bearer(request, &customer)).await,
            "order_id",
        );
        let request = order::RequestOrderCancellationRequest {
            order_id: id.clone(),
            reason: String::new(),
        };
        found.refused(
            case,
            orders
                .request_order_cancellation(bearer(request, &customer))
                .await,
            "order_id",
        );
        let request = order::ConfirmOrderRequest {
            order_id: id.clone(),
            payment_id: uuid::Uuid::new_v4().to_string(),
        };
        found.refused(
            case,
            orders.confirm_order(bearer(request, &service)).await,
            "order_id",
        );
        let request = order::ConfirmOrderRequest {
            order_id: order_id.clone(),
            payment_id: id.clone(),
        };
        found.refused(
            case,
            orders.confirm_order(bearer(request, &service)).await,
            "payment_id",
        );
        let request = order::RejectOrderRequest {
            order_id: id.clone(),
            reason: "declined".into(),
        };
        found.refused(
            case,
            orders.reject_order(bearer(request, &service)).await,
            "order_id",
        );
        let request = order::CancelOrderRequest {
            order_id: id.clone(),
            reason: "aborted".into(),
        };
        found.refused(
            case,
            orders.cancel_order(bearer(request, &service)).await,
            "order_id",
        );
        // Review and returns.
        let request = order::HoldOrderForReviewRequest {
            order_id: id.clone(),
        };
        found.refused(
            case,
            orders
                .hold_order_for_review(bearer(request, &service))
                .await,
            "order_id",
        );
        let request = order::ApproveOrderRequest {
            order_id: id.clone(),
        };
        found.refused(
            case,
            orders.approve_order(bearer(request, &admin)).await,
            "order_id",
        );
        let request = order::DeclineOrderRequest {
            order_id: id.clone(),
            reason: "fraud".into(),
        };
        found.refused(
            case,
            orders.decline_order(bearer(request, &admin)).await,
            "order_id",
        );
        let request = order::RequestReturnRequest {
            order_id: id.clone(),
            reason: "broken".into(),
        };
        found.refused(
            case,
            orders.request_return(bearer(request, &customer)).await,
            "order_id",
        );
        let request = order::MarkOrderReturnedRequest { order_id: id };
        found.refused(
            case,
            orders.mark_order_returned(bearer(request, &service)).await,
            "order_id",
        );
    }
    for (case, reason) in [
        ("NUL reason", NUL.to_owned()),
        ("NUL alone", "\0".to_owned()),
        ("huge reason", huge()),
        ("501 characters", "é".repeat(501)),
    ] {
        let request = order::RequestOrderCancellationRequest {
            order_id: order_id.clone(),
            reason: reason.clone(),
        };
        found.refused(
            case,
            orders
                .request_order_cancellation(bearer(request, &customer))
                .await,
            "reason",
        );
        let request = order::RejectOrderRequest {
            order_id: order_id.clone(),
            reason: reason.clone(),
        };
        found.refused(
            case,
            orders.reject_order(bearer(request, &service)).await,
            "reason",
        );
        let request = order::CancelOrderRequest {
            order_id: order_id.clone(),
            reason: reason.clone(),
        };
        found.refused(
            case,
            orders.cancel_order(bearer(request, &service)).await,
            "reason",
        );
        let request = order::DeclineOrderRequest {
            order_id: order_id.clone(),
            reason: reason.clone(),
        };
        found.refused(
            case,
            orders.decline_order(bearer(request, &admin)).await,
            "reason",
        );
        let request = order::RequestReturnRequest {
            order_id: order_id.clone(),
            reason,
        };
        found.refused(
            case,
            orders.request_return(bearer(request, &customer)).await,
            "reason",
        );
    }

    // ListOrders: page tokens, sizes and statuses.
    for (case, token) in bad_page_tokens() {
        let request = order::ListOrdersRequest {
            page_token: token,
            ..Default::default()
        };
        found.refused(
            case,
            orders.list_orders(bearer(request, &customer)).await,
            "page_token",
        );
    }
    for (field, request) in [
        (
            "page_size",
            order::ListOrdersRequest {
                page_size: u32::MAX,
                ..Default::default()
            },
        ),
        (
            "status",
            order::ListOrdersRequest {
                status: i32::MAX,
                ..Default::default()
            },
        ),
    ] {
        found.refused(
            field,
            orders.list_orders(bearer(request, &customer)).await,
            field,
        );
    }

    // What is merely odd is served: the oldest and newest positions
    // PostgreSQL holds.
    for micros in ["-62135596800000000", "253402300799999999"] {
        let request = order::ListOrdersRequest {
            page_token: page_token(micros),
            ..Default::default()
        };
        found.served(micros, orders.list_orders(bearer(request, &customer)).await);
    }

    // Beyond gRPC's message limit: refused, not a fault.
    let mut request = order_request("hostile-big", "tok_visa");
    request.idempotency_key = "x".repeat(5 << 20);
    found.no_fault(
        "5 MiB request",
        orders.create_order(bearer(request, &customer)).await,
    );

    // Nothing refused was written.
    let request = order::GetOrderRequest {
        order_id: order_id.clone(),
    };
    let order = orders
        .get_order(bearer(request, &customer))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(order.status(), order::OrderStatus::Pending, "{order:?}");
    assert_eq!(order.version, placed.version);
    found.assert_none();
}

#[tokio::test]
async fn hostile_fields_at_the_saga_and_trace_services_are_invalid_arguments() {
    use saga::get_saga_status_request::Lookup;
    let stack = Stack::start().await.unwrap();
    let admin = stack.admin_token().await.unwrap();
    let mut sagas = stack.sagas().await;
    let mut traces = stack.traces().await;
    let mut found = Findings::default();
    let saga_id = uuid::Uuid::new_v4().to_string();

    // GetSagaStatus: each lookup.
    let status = |lookup| bearer(saga::GetSagaStatusRequest { lookup }, &admin);
    found.refused(
        "no lookup",
        sagas.get_saga_status(status(None)).await,
        "lookup",
    );
    for (case, text) in [
        ("NUL", NUL.to_owned()),
        ("huge", huge()),
        ("empty", String::new()),
    ] {
        found.refused(
            case,
            sagas
                .get_saga_status(status(Some(Lookup::SagaId(text.clone()))))
                .await,
            "saga_id",
        );
        found.refused(
            case,
            sagas
                .get_saga_status(status(Some(Lookup::OrderId(text.clone()))))
                .await,
            "order_id",
        );
        found.refused(
            case,
            sagas
                .get_saga_status(status(Some(Lookup::CorrelationId(text.clone()))))
                .await,
            "correlation_id",
        );
        let request = trace::GetTraceByCorrelationRequest {
            correlation_id: text.clone(),
        };
        found.refused(
            case,
            traces
                .get_trace_by_correlation(bearer(request, &admin))
                .await,
            "correlation_id",
        );
        let request = trace::GetTraceByOrderRequest {
            order_id: text.clone(),
        };
        found.refused(
            case,
            traces.get_trace_by_order(bearer(request, &admin)).await,
            "order_id",
        );
        let request = saga::RetrySagaRequest {
            saga_id: text.clone(),
        };
        found.refused(
            case,
            sagas.retry_saga(bearer(request, &admin)).await,
            "saga_id",
        );
        let request = saga::CompensateSagaRequest {
            saga_id: text,
            reason: String::new(),
        };
        found.refused(
            case,
            sagas.compensate_saga(bearer(request, &admin)).await,
            "saga_id",
        );
    }
    let request = trace::GetTraceByCorrelationRequest {
        correlation_id: "has space".into(),
    };
    found.refused(
        "space",
        traces
            .get_trace_by_correlation(bearer(request, &admin))
            .await,
        "correlation_id",
    );

    // CompensateSaga's reason.
    for (case, reason) in [
        ("NUL reason", NUL.to_owned()),
        ("huge reason", huge()),
        ("501 characters", "é".repeat(501)),
    ] {
        let request = saga::CompensateSagaRequest {
            saga_id: saga_id.clone(),
            reason,
        };
        found.refused(
            case,
            sagas.compensate_saga(bearer(request, &admin)).await,
            "reason",
        );
    }

    // ListActiveSagas: older_than from negative to overflowing, page
    // tokens, sizes, states.
    for (case, request) in [
        ("negative", older_than(-1, 0)),
        ("negative nanos", older_than(0, -1)),
        ("mixed signs", older_than(5, -1)),
        ("nanos beyond a second", older_than(0, 1_000_000_000)),
        (
            "9,500 years: out of PostgreSQL's range",
            older_than(300_000_000_000, 0),
        ),
        (
            "317,000 years: chrono overflows",
            older_than(10_000_000_000_000, 0),
        ),
        ("i64::MAX", older_than(i64::MAX, 999_999_999)),
        ("i64::MIN", older_than(i64::MIN, 0)),
        ("i64::MIN nanos", older_than(i64::MIN, -999_999_999)),
    ] {
        found.refused(
            case,
            sagas.list_active_sagas(bearer(request, &admin)).await,
            "older_than",
        );
    }
    for (case, token) in bad_page_tokens() {
        let request = saga::ListActiveSagasRequest {
            page_token: token.clone(),
            ..Default::default()
        };
        found.refused(
            case,
            sagas.list_active_sagas(bearer(request, &admin)).await,
            "page_token",
        );
        let request = trace::ListActiveFlowsRequest {
            page_token: token,
            ..Default::default()
        };
        found.refused(
            case,
            traces.list_active_flows(bearer(request, &admin)).await,
            "page_token",
        );
    }
    let request = saga::ListActiveSagasRequest {
        states: vec![i32::MAX; 100_000],
        ..Default::default()
    };
    let answer = sagas.list_active_sagas(bearer(request, &admin)).await;
    found.refused("100,000 unknown states", answer, "states");
    let request = saga::ListActiveSagasRequest {
        page_size: u32::MAX,
        ..Default::default()
    };
    let answer = sagas.list_active_sagas(bearer(request, &admin)).await;
    found.refused("page size", answer, "page_size");
    let request = trace::ListActiveFlowsRequest {
        page_size: u32::MAX,
        ..Default::default()
    };
    found.refused(
        "page size",
        traces.list_active_flows(bearer(request, &admin)).await,
        "page_size",
    );

    // What is merely odd is served: a century-old cutoff, a hundred
    // thousand repeats of one state, the extreme positions.
    let request = saga::ListActiveSagasRequest {
        states: vec![saga::SagaState::Running.into(); 100_000],
        ..older_than(3_155_760_000, 0)
    };
    found.served(
        "a century, one state 100,000 times",
        sagas.list_active_sagas(bearer(request, &admin)).await,
    );
    for micros in ["-62135596800000000", "253402300799999999"] {
        let request = saga::ListActiveSagasRequest {
            page_token: page_token(micros),
            ..Default::default()
        };
        found.served(
            micros,
            sagas.list_active_sagas(bearer(request, &admin)).await,
        );
        let request = trace::ListActiveFlowsRequest {
            page_token: page_token(micros),
            ..Default::default()
        };
        found.served(
            micros,
            traces.list_active_flows(bearer(request, &admin)).await,
        );
    }
    let request = trace::GetTraceByCorrelationRequest {
        correlation_id: "c".repeat(128),
    };
    let answer = traces
        .get_trace_by_correlation(bearer(request, &admin))
        .await;
    assert_eq!(answer.unwrap_err().code(), Code::NotFound, "looked up");

    // StreamEvents: its filter.
    let stream = |correlation_id: &str, event_types: Vec<String>| {
        bearer(
            trace::StreamEventsRequest {
                correlation_id: correlation_id.to_owned(),
                event_types,
            },
            &admin,
        )
    };
    for (case, correlation) in [("NUL", NUL.to_owned()), ("huge", huge())] {
        found.refused(
            case,
            traces.stream_events(stream(&correlation, vec![])).await,
            "correlation_id",
        );
    }
    found.refused(
        "NUL type",
        traces
            .stream_events(stream("", vec!["a".into(), "order.\0".into()]))
            .await,
        "event_types[1]",
    );
    found.refused(
        "huge type",
        traces.stream_events(stream("", vec![huge()])).await,
        "event_types[0]",
    );
    found.refused(
        "many types",
        traces.stream_events(stream("", vec!["t".into(); 51])).await,
        "event_types",
    );
    found.served(
        "fifty types",
        traces
            .stream_events(stream("flow-1", vec!["t".into(); 50]))
            .await,
    );

    // Beyond gRPC's message limit: refused, not a fault.
    found.no_fault(
        "5 MiB correlation id",
        sagas
            .get_saga_status(status(Some(Lookup::CorrelationId("x".repeat(5 << 20)))))
            .await,
    );
    found.assert_none();
}

/// Auth's and payment's own edges are their owners' to harden (and to
/// test for INVALID_ARGUMENT); here, only that hostile fields are never a
/// server fault.
#[tokio::test]
async fn hostile_fields_at_auth_and_payment_are_never_server_faults() {
    use api_auth::v1 as auth;
    use api_payment::v1 as payment;
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    // Every scope, so that the reads get past access control too.
    let service = stack
        .service_token_with(access_control::Scope::ALL)
        .await
        .unwrap();
    let mut users = stack.auth().await;
    let mut payments = stack.payments().await;
    let mut found = Findings::default();
    let valid = uuid::Uuid::new_v4().to_string();
    for (n, (case, text)) in [("NUL", NUL.to_owned()), ("huge", huge())]
        .into_iter()
        .enumerate()
    {
        let email = format!("faults-{n}@example.com");
        for request in [
            auth::RegisterRequest {
                email: text.clone(),
                password: e2e::CUSTOMER_PASSWORD.into(),
                display_name: "Hostile".into(),
            },
            auth::RegisterRequest {
                email: email.clone(),
                password: text.clone(),
                display_name: "Hostile".into(),
            },
            auth::RegisterRequest {
                email: email.clone(),
                password: e2e::CUSTOMER_PASSWORD.into(),
                display_name: text.clone(),
            },
        ] {
            found.no_fault(case, users.register(request).await);
        }
        for (email, password) in [
            (text.clone(), e2e::CUSTOMER_PASSWORD.to_owned()),
            (email.clone(), text.clone()),
        ] {
            let request = auth::LoginRequest { email, password };
            found.no_fault(case, users.login(request).await);
        }
        let refresh = auth::RefreshRequest {
            refresh_token: text.clone(),
        };
        found.no_fault(case, users.refresh(refresh).await);
        let logout = auth::LogoutRequest {
            refresh_token: text.clone(),
        };
        found.no_fault(case, users.logout(logout).await);
        let issue = auth::IssueServiceTokenRequest {
            client_id: text.clone(),
            client_secret: text.clone(),
            scope: text.clone(),
        };
        found.no_fault(case, users.issue_service_token(issue).await);

        let charge = |change: &dyn Fn(&mut payment::ProcessPaymentRequest)| {
            let mut request = payment::ProcessPaymentRequest {
                order_id: valid.clone(),
                customer_id: valid.clone(),
                amount: Some(api_common::v1::Money {
                    amount_minor: 100,
                    currency: "EUR".into(),
                }),
                payment_method_token: "tok_visa".into(),
                idempotency_key: format!("hostile-{n}"),
            };
            change(&mut request);
            bearer(request, &service)
        };
        type Change<'a> = Box<dyn Fn(&mut payment::ProcessPaymentRequest) + 'a>;
        let changes: [Change<'_>; 5] = [
            Box::new(|r| r.order_id = text.clone()),
            Box::new(|r| r.customer_id = text.clone()),
            Box::new(|r| r.payment_method_token = text.clone()),
            Box::new(|r| r.idempotency_key = text.clone()),
            Box::new(|r| r.amount.as_mut().unwrap().currency = text.clone()),
        ];
        for change in &changes {
            found.no_fault(case, payments.process_payment(charge(change)).await);
        }
        use payment::refund_payment_request::Target;
        for (target, idempotency_key, reason) in [
            (
                Target::PaymentId(text.clone()),
                "k".to_owned(),
                "r".to_owned(),
            ),
            (
                Target::ChargeIdempotencyKey(text.clone()),
                "k".into(),
                "r".into(),
            ),
            (Target::PaymentId(valid.clone()), text.clone(), "r".into()),
            (Target::PaymentId(valid.clone()), "k".into(), text.clone()),
        ] {
            let request = payment::RefundPaymentRequest {
                target: Some(target),
                idempotency_key,
                reason,
            };
            found.no_fault(
                case,
                payments.refund_payment(bearer(request, &service)).await,
            );
        }
        let authorize = |change: &dyn Fn(&mut payment::ProcessPaymentRequest)| {
            let charge = charge(change).into_inner();
            bearer(
                payment::AuthorizePaymentRequest {
                    order_id: charge.order_id,
                    customer_id: charge.customer_id,
                    amount: charge.amount,
                    payment_method_token: charge.payment_method_token,
                    idempotency_key: format!("authorize-{}", charge.idempotency_key),
                },
                &service,
            )
        };
        for change in &changes {
            found.no_fault(case, payments.authorize_payment(authorize(change)).await);
        }
        use payment::{capture_payment_request, void_payment_request};
        for target in [
            capture_payment_request::Target::PaymentId(text.clone()),
            capture_payment_request::Target::AuthorizationIdempotencyKey(text.clone()),
        ] {
            let request = payment::CapturePaymentRequest {
                target: Some(target),
            };
            found.no_fault(
                case,
                payments.capture_payment(bearer(request, &service)).await,
            );
        }
        for (target, idempotency_key, reason) in [
            (
                void_payment_request::Target::PaymentId(text.clone()),
                "k".to_owned(),
                "r".to_owned(),
            ),
            (
                void_payment_request::Target::AuthorizationIdempotencyKey(text.clone()),
                "k".into(),
                "r".into(),
            ),
            (
                void_payment_request::Target::PaymentId(valid.clone()),
                text.clone(),
                "r".into(),
            ),
            (
                void_payment_request::Target::PaymentId(valid.clone()),
                "k".into(),
                text.clone(),
            ),
        ] {
            let request = payment::VoidPaymentRequest {
                target: Some(target),
                idempotency_key,
                reason,
            };
            found.no_fault(case, payments.void_payment(bearer(request, &service)).await);
        }
        let request = payment::GetPaymentRequest {
            payment_id: text.clone(),
        };
        found.no_fault(case, payments.get_payment(bearer(request, &service)).await);
        let request = payment::ListPaymentsByOrderRequest {
            order_id: text.clone(),
        };
        found.no_fault(
            case,
            payments
                .list_payments_by_order(bearer(request, &service))
                .await,
        );
    }
    found.assert_none();
}
