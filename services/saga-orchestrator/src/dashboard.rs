//! The operators' dashboard, on the orchestrator's HTTP port: a page (`/`,
//! with its script and style sheet) and the JSON it reads, built from the
//! same read models as the gRPC APIs:
//!
//! - `/api/summary`: counts, flows in progress, recent events;
//! - `/api/charts`: the last hour's throughput, latency and backlog
//!   ([`charts`]);
//! - `/api/saga`: one saga's timeline, events and trace link ([`saga`]);
//! - `/api/trace`: one flow's events;
//! - `/api/sagas`: SagaService/ListSagas's search, with its filters;
//! - `POST /api/sagas/{id}/{action}`: retry, compensate, pause, resume or
//!   terminate a saga, through the same [`operator`] functions as
//!   SagaService's RPCs.
//!
//! Every API needs an admin token, as the gRPC APIs do; the page takes one
//! from its URL's fragment (and forgets the fragment) or asks for one. The
//! token travels in an `Authorization` header, which a browser never adds
//! by itself, so another site cannot make the page's POSTs (no CSRF).
//!
//! The page's script and style are files of their own, served from here,
//! so that its Content-Security-Policy can allow scripts and styles from
//! this origin only: no inline script, nothing from elsewhere, no framing.
//! The charts are SVG drawn by that script: nothing is fetched from a CDN.
//! The HTTP server adds the other security headers to every answer.

mod charts;
mod saga;

use std::sync::Arc;

use access_control::Verifier;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use saga_engine::{Engine, SagaRecord, SagaState, store};
use serde::{Deserialize, Serialize};
use service_runtime::fields;
use sqlx::PgPool;
use uuid::Uuid;

use crate::grpc;
use crate::operator::{self, Refused, TerminationReason};
use crate::order_saga::SAGA_TYPE;
use crate::trace_api;
use crate::trace_view;

pub(crate) use charts::Sampler;

/// What the dashboard links to.
#[derive(Debug, Clone, clap::Args)]
pub struct DashboardSettings {
    /// Link from a saga to its trace in a tracing UI: a URL in which
    /// `{trace_id}` stands for the trace's id, e.g.
    /// `http://localhost:16686/trace/{trace_id}` for Jaeger. Unset: the
    /// dashboard shows the trace id without a link.
    #[arg(long = "dashboard-trace-url", env = "DASHBOARD_TRACE_URL", value_parser = trace_url_pattern)]
    pub trace_url: Option<String>,
}

fn trace_url_pattern(text: &str) -> Result<String, String> {
    if !(text.starts_with("http://") || text.starts_with("https://")) {
        return Err("must be an http:// or https:// URL".to_owned());
    }
    if !text.contains("{trace_id}") {
        return Err("must contain {trace_id}".to_owned());
    }
    Ok(text.to_owned())
}

#[derive(Clone)]
struct Dashboard {
    engine: Arc<Engine>,
    verifier: Arc<Verifier>,
    sampler: Sampler,
    trace_url: Option<Arc<str>>,
}

impl Dashboard {
    fn pool(&self) -> &PgPool {
        self.engine.pool()
    }
}

/// What the page may load: its own script, style sheet and JSON, from this
/// origin; nothing inline, no plugins, no `<base>`, no forms, no framing.
pub(crate) const PAGE_CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// The dashboard's routes, and the sampler of its backlog chart (to run
/// with [`Sampler::run`]; `outbox` refreshes the outbox gauges it reads).
pub(crate) fn routes(
    engine: Arc<Engine>,
    verifier: Arc<Verifier>,
    settings: &DashboardSettings,
    outbox: service_runtime::http::Collector,
) -> (Router, Sampler) {
    let sampler = Sampler::new(outbox);
    let dashboard = Dashboard {
        engine,
        verifier,
        sampler: sampler.clone(),
        trace_url: settings.trace_url.as_deref().map(Arc::from),
    };
    let router = Router::new()
        .route(
            "/",
            get(|| async {
                (
                    [(
                        header::CONTENT_SECURITY_POLICY,
                        PAGE_CONTENT_SECURITY_POLICY,
                    )],
                    Html(include_str!("dashboard/index.html")),
                )
            }),
        )
        .route(
            "/dashboard.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    include_str!("dashboard/dashboard.js"),
                )
            }),
        )
        .route(
            "/dashboard.css",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
                    include_str!("dashboard/dashboard.css"),
                )
            }),
        )
        .route("/api/summary", get(summary))
        .route("/api/charts", get(charts))
        .route("/api/saga", get(one_saga))
        .route("/api/trace", get(trace))
        .route("/api/sagas", get(search))
        .route("/api/sagas/{saga_id}/{action}", post(act))
        .with_state(dashboard);
    (router, sampler)
}

/// Sets the gauges of sagas by unfinished state (paused included), of
/// overdue sagas, of stuck ones and of those of a version no live replica
/// carries, when a scrape finds them older than the
/// refresh interval.
pub(crate) fn saga_metrics(pool: PgPool) -> service_runtime::http::Collector {
    Arc::new(move || {
        let pool = pool.clone();
        Box::pin(async move {
            if let Ok(counts) = active_counts(&pool).await {
                for state in ["running", "compensating", "paused", "failed"] {
                    let count = counts
                        .iter()
                        .find(|(s, _)| s == state)
                        .map_or(0, |(_, n)| *n);
                    metrics::gauge!("sagas_active", "state" => state).set(count as f64);
                }
            }
            if let Ok(overdue) = overdue_count(&pool).await {
                metrics::gauge!("sagas_overdue").set(overdue as f64);
            }
            if let Ok(stuck) = stuck_count(&pool).await {
                metrics::gauge!("sagas_stuck").set(stuck as f64);
            }
            if let Ok(unknown) = store::unknown_version_count(&pool).await {
                metrics::gauge!("sagas_unknown_version").set(unknown as f64);
            }
        })
    })
}

/// Sagas retrying a step past its deadline that they cannot give up.
async fn overdue_count(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM saga_instances
         WHERE overdue_since IS NOT NULL AND state IN ('running', 'failed')",
    )
    .fetch_one(pool)
    .await
}

/// Sagas flagged stuck (a paused or finished one never is: pausing and
/// finishing clear the flag).
async fn stuck_count(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM saga_instances WHERE stuck_since IS NOT NULL")
        .fetch_one(pool)
        .await
}

async fn active_counts(pool: &PgPool) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as(
        "SELECT state, count(*) FROM saga_instances
         WHERE state IN ('running', 'compensating', 'paused', 'failed') GROUP BY state",
    )
    .fetch_all(pool)
    .await
}

/// Lets the request through for an admin's token only.
async fn authorize(dashboard: &Dashboard, headers: &HeaderMap) -> Result<(), Response> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .ok_or_else(|| {
            (
                StatusCode::UNAUTHORIZED,
                "an admin bearer token is required",
            )
                .into_response()
        })?;
    match dashboard.verifier.verify(token).await {
        Ok(claims) if claims.is_admin() => Ok(()),
        Ok(_) => Err((StatusCode::FORBIDDEN, "admins only").into_response()),
        Err(_) => Err((StatusCode::UNAUTHORIZED, "invalid token").into_response()),
    }
}

fn failure(error: &anyhow::Error) -> Response {
    tracing::error!(error = format!("{error:#}"), "dashboard query failed");
    (StatusCode::INTERNAL_SERVER_ERROR, "query failed").into_response()
}

#[derive(Debug, Serialize)]
struct Summary {
    active: Counts,
    overdue: Vec<Overdue>,
    last_hour: LastHour,
    top_failure_reasons: Vec<Reason>,
    active_flows: Vec<Flow>,
    recently_finished: Vec<Finished>,
    recent_events: Vec<Event>,
}

#[derive(Debug, Default, Serialize)]
struct Counts {
    running: i64,
    compensating: i64,
    paused: i64,
    failed: i64,
    overdue: i64,
    stuck: i64,
    /// Unfinished sagas of a version no live replica carries.
    unknown_version: i64,
}

/// A saga past its pivot whose step is past its deadline: it is retried
/// until it succeeds, and an operator should look at what it calls.
#[derive(Debug, Serialize, sqlx::FromRow)]
struct Overdue {
    saga_id: Uuid,
    order_id: String,
    correlation_id: String,
    step: String,
    overdue_since: DateTime<Utc>,
}

#[derive(Debug, Default, Serialize)]
struct LastHour {
    completed: i64,
    compensated: i64,
    failed: i64,
    terminated: i64,
    /// Completed among finished, from 0 to 1; none finished gives none.
    completion_rate: Option<f64>,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
struct Reason {
    reason: String,
    count: i64,
}

#[derive(Debug, Serialize)]
struct Flow {
    saga_id: Uuid,
    order_id: String,
    correlation_id: String,
    state: String,
    current_step: Option<String>,
    age_seconds: i64,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
struct Finished {
    saga_id: Uuid,
    order_id: String,
    correlation_id: String,
    state: String,
    failure_reason: Option<String>,
    finished_at: DateTime<Utc>,
}

#[derive(Debug, Serialize)]
struct Event {
    event_id: Uuid,
    /// The event or request that caused this one: an event id of the same
    /// flow, or a request id (a step attempt's, or a client's).
    causation_id: Option<String>,
    occurred_at: DateTime<Utc>,
    service: String,
    event_type: String,
    correlation_id: String,
    order_id: Option<Uuid>,
    summary: String,
}

impl From<trace_view::TraceEventRow> for Event {
    fn from(row: trace_view::TraceEventRow) -> Self {
        Self {
            event_id: row.event_id,
            causation_id: row.causation_id,
            occurred_at: row.occurred_at,
            service: row.service,
            event_type: row.event_type,
            correlation_id: row.correlation_id,
            order_id: row.order_id,
            summary: row.summary,
        }
    }
}

async fn summary(State(dashboard): State<Dashboard>, headers: HeaderMap) -> Response {
    if let Err(refusal) = authorize(&dashboard, &headers).await {
        return refusal;
    }
    match read_summary(dashboard.pool()).await {
        Ok(summary) => private(Json(summary)),
        Err(error) => failure(&error),
    }
}

async fn read_summary(pool: &PgPool) -> anyhow::Result<Summary> {
    let mut active = Counts::default();
    for (state, count) in active_counts(pool).await? {
        match state.as_str() {
            "running" => active.running = count,
            "compensating" => active.compensating = count,
            "paused" => active.paused = count,
            _ => active.failed = count,
        }
    }
    active.overdue = overdue_count(pool).await?;
    active.stuck = stuck_count(pool).await?;
    active.unknown_version = store::unknown_version_count(pool).await?;
    let overdue = sqlx::query_as(
        "SELECT saga_id, business_key AS order_id, correlation_id, overdue_step AS step, overdue_since
         FROM saga_instances WHERE overdue_since IS NOT NULL AND state IN ('running', 'failed')
         ORDER BY overdue_since LIMIT 20",
    )
    .fetch_all(pool)
    .await?;
    let finished: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state, count(*) FROM saga_instances WHERE finished_at > now() - interval '1 hour' GROUP BY state",
    )
    .fetch_all(pool)
    .await?;
    let mut last_hour = LastHour::default();
    for (state, count) in finished {
        match state.as_str() {
            "completed" => last_hour.completed = count,
            "compensated" => last_hour.compensated = count,
            // Terminated by an operator: counted apart, not as failed.
            "terminated" => last_hour.terminated = count,
            _ => last_hour.failed += count,
        }
    }
    let total = last_hour.completed + last_hour.compensated + last_hour.failed;
    last_hour.completion_rate = (total > 0).then(|| last_hour.completed as f64 / total as f64);
    let top_failure_reasons = sqlx::query_as(
        "SELECT failure_reason AS reason, count(*) AS count FROM saga_instances
         WHERE finished_at > now() - interval '1 hour' AND state IN ('compensated', 'failed', 'terminated')
           AND failure_reason IS NOT NULL
         GROUP BY failure_reason ORDER BY count(*) DESC, failure_reason LIMIT 5",
    )
    .fetch_all(pool)
    .await?;
    let now = Utc::now();
    let active_flows = trace_api::active_flows(pool, None, 20)
        .await?
        .into_iter()
        .map(|flow| Flow {
            saga_id: flow.saga_id,
            order_id: flow.business_key,
            correlation_id: flow.correlation_id,
            state: flow.state,
            current_step: flow.current_step,
            age_seconds: (now - flow.created_at).num_seconds(),
        })
        .collect();
    let recently_finished = sqlx::query_as(
        "SELECT saga_id, business_key AS order_id, correlation_id, state, failure_reason, finished_at
         FROM saga_instances WHERE finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT 10",
    )
    .fetch_all(pool)
    .await?;
    let recent_events = trace_view::recent(pool, 20)
        .await?
        .into_iter()
        .map(Event::from)
        .collect();
    Ok(Summary {
        active,
        overdue,
        last_hour,
        top_failure_reasons,
        active_flows,
        recently_finished,
        recent_events,
    })
}

#[derive(Debug, Deserialize)]
struct TraceQuery {
    correlation: String,
}

async fn trace(
    State(dashboard): State<Dashboard>,
    headers: HeaderMap,
    Query(query): Query<TraceQuery>,
) -> Response {
    if let Err(refusal) = authorize(&dashboard, &headers).await {
        return refusal;
    }
    let correlation = match fields::correlation_id(&query.correlation) {
        Ok(correlation) => correlation,
        Err(reason) => {
            return (StatusCode::BAD_REQUEST, format!("correlation: {reason}")).into_response();
        }
    };
    match trace_view::by_correlation(dashboard.pool(), correlation.as_str()).await {
        Ok(rows) => private(Json(rows.into_iter().map(Event::from).collect::<Vec<_>>())),
        Err(error) => failure(&error),
    }
}

async fn charts(State(dashboard): State<Dashboard>, headers: HeaderMap) -> Response {
    if let Err(refusal) = authorize(&dashboard, &headers).await {
        return refusal;
    }
    match charts::read(dashboard.pool(), &dashboard.sampler).await {
        Ok(charts) => private(Json(charts)),
        Err(error) => failure(&error),
    }
}

/// Which saga: exactly one of its id, its order's id, or its flow's
/// correlation id.
#[derive(Debug, Deserialize)]
struct SagaQuery {
    saga: Option<String>,
    order: Option<String>,
    correlation: Option<String>,
}

/// A child saga, as the page lists it under its parent.
#[derive(Debug, Serialize)]
struct ChildView {
    saga_id: Uuid,
    saga_type: String,
    step: String,
    state: &'static str,
}

#[derive(Debug, Serialize)]
struct OneSaga {
    saga: saga::SagaView,
    children: Vec<ChildView>,
    executions: Vec<saga::Execution>,
    events: Vec<Event>,
    trace_id: Option<String>,
    trace_url: Option<String>,
}

async fn one_saga(
    State(dashboard): State<Dashboard>,
    headers: HeaderMap,
    Query(query): Query<SagaQuery>,
) -> Response {
    if let Err(refusal) = authorize(&dashboard, &headers).await {
        return refusal;
    }
    let pool = dashboard.pool();
    let found = match (query.saga, query.order, query.correlation) {
        (Some(id), None, None) => match fields::uuid(&id) {
            Ok(id) => Ok(Some(id)),
            Err(reason) => return invalid("saga", reason),
        },
        (None, Some(id), None) => match fields::uuid(&id) {
            Ok(id) => store::find_by_business_key(pool, SAGA_TYPE, &id.to_string()).await,
            Err(reason) => return invalid("order", reason),
        },
        (None, None, Some(id)) => match fields::correlation_id(&id) {
            Ok(id) => store::find_by_correlation(pool, id.as_str()).await,
            Err(reason) => return invalid("correlation", reason),
        },
        _ => return invalid("saga", "give one of saga, order, correlation"),
    };
    let read = async {
        let Some(saga_id) = found? else {
            return Ok(None);
        };
        let Some(record) = store::load(pool, saga_id).await? else {
            return Ok(None);
        };
        let events = trace_view::by_correlation(pool, &record.instance.correlation_id).await?;
        let trace_id = store::trace_context(pool, saga_id)
            .await?
            .and_then(|headers| saga::trace_id(&headers));
        let definition = dashboard
            .engine
            .definition(&record.instance.saga_type, record.instance.version);
        let carried = grpc::carried(&dashboard.engine)
            .await?
            .carries(&record.instance);
        let children = store::children(pool, &[saga_id])
            .await?
            .into_iter()
            .map(|child| ChildView {
                saga_id: child.saga_id,
                saga_type: child.saga_type,
                step: child.parent_step,
                state: child.state.as_str(),
            })
            .collect();
        anyhow::Ok(Some(OneSaga {
            saga: saga::SagaView::new(&record, definition, carried),
            children,
            executions: saga::timeline(&record, definition, &events, Utc::now()),
            events: events.into_iter().map(Event::from).collect(),
            trace_url: saga::trace_url(dashboard.trace_url.as_deref(), trace_id.as_deref()),
            trace_id,
        }))
    };
    match read.await {
        Ok(Some(one)) => private(Json(one)),
        Ok(None) => refused(StatusCode::NOT_FOUND, "NOT_FOUND", "no such saga"),
        Err(error) => failure(&error),
    }
}

/// What an action may carry: the operator's reason (compensate, terminate)
/// and, for terminate, that they take on the steps left in effect.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    #[serde(default)]
    reason: String,
    #[serde(default)]
    acknowledge_effects: bool,
}

#[derive(Debug, Serialize)]
struct Acted {
    saga: saga::SagaView,
}

/// An operator's action on a saga, answered with the saga as it then is,
/// or with the status the RPC would give (its code and message): the same
/// edge checks as SagaService's handlers, then the same [`operator`]
/// function.
async fn act(
    State(dashboard): State<Dashboard>,
    headers: HeaderMap,
    Path((saga_id, action)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    if let Err(refusal) = authorize(&dashboard, &headers).await {
        return refusal;
    }
    let saga_id = match fields::uuid(&saga_id) {
        Ok(saga_id) => saga_id,
        Err(reason) => return invalid("saga_id", reason),
    };
    let body: ActionBody = if body.is_empty() {
        ActionBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(body) => body,
            Err(error) => return invalid("body", &format!("is not an action's JSON: {error}")),
        }
    };
    let engine = &dashboard.engine;
    let done = match action.as_str() {
        "retry" => operator::retry(engine, saga_id).await,
        "compensate" => {
            if let Err(error) = fields::text(&body.reason, operator::MAX_REASON_CHARS) {
                return invalid("reason", &error.to_string());
            }
            operator::compensate(engine, saga_id, &body.reason).await
        }
        "pause" => operator::pause(engine, saga_id).await,
        "resume" => operator::resume(engine, saga_id).await,
        "terminate" => {
            let reason = match TerminationReason::parse(&body.reason) {
                Ok(reason) => reason,
                Err(why) => return invalid("reason", &why),
            };
            operator::terminate(engine, saga_id, &reason, body.acknowledge_effects).await
        }
        _ => return refused(StatusCode::NOT_FOUND, "NOT_FOUND", "no such action"),
    };
    match done {
        Ok(record) => {
            let instance = &record.instance;
            let definition = engine.definition(&instance.saga_type, instance.version);
            match grpc::carried(engine).await {
                Ok(carried) => private(Json(Acted {
                    saga: saga::SagaView::new(&record, definition, carried.carries(instance)),
                })),
                Err(error) => failure(&error),
            }
        }
        Err(Refused::Unexpected(error)) => failure(&error),
        Err(refusal) => answer_of(&tonic::Status::from(refusal)),
    }
}

/// ListSagas's filters, as the search form sends them: states comma
/// separated, times in RFC 3339.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchQuery {
    #[serde(default)]
    states: String,
    #[serde(default)]
    saga_type: String,
    created_after: Option<String>,
    created_before: Option<String>,
    finished_after: Option<String>,
    finished_before: Option<String>,
    #[serde(default)]
    failure_reason_contains: String,
    #[serde(default)]
    order_id: String,
    #[serde(default)]
    customer_id: String,
    #[serde(default)]
    stuck_only: bool,
    #[serde(default)]
    version: u32,
    #[serde(default)]
    unknown_version_only: bool,
    #[serde(default)]
    page_size: u32,
    #[serde(default)]
    page_token: String,
}

impl SearchQuery {
    /// The ListSagas request these filters make; what cannot be one is
    /// named, as ListSagas names its fields.
    fn into_request(self) -> Result<api_saga::v1::ListSagasRequest, tonic::Status> {
        let mut violations = service_runtime::status::FieldViolations::new();
        let mut states = Vec::new();
        for name in self.states.split(',').filter(|name| !name.is_empty()) {
            match SagaState::parse(name) {
                Some(state) => states.push(state.to_proto().into()),
                None => violations.add("states", format!("{name:?} is not a saga state")),
            }
        }
        let mut time = |field: &str, text: Option<String>| {
            let text = text.filter(|text| !text.is_empty())?;
            DateTime::parse_from_rfc3339(&text)
                .map(|at| std::time::SystemTime::from(at).into())
                .map_err(|_| violations.add(field, "must be an RFC 3339 time"))
                .ok()
        };
        let request = api_saga::v1::ListSagasRequest {
            page_size: self.page_size,
            page_token: self.page_token,
            states,
            saga_type: self.saga_type,
            created_after: time("created_after", self.created_after),
            created_before: time("created_before", self.created_before),
            finished_after: time("finished_after", self.finished_after),
            finished_before: time("finished_before", self.finished_before),
            failure_reason_contains: self.failure_reason_contains,
            order_id: self.order_id,
            customer_id: self.customer_id,
            stuck_only: self.stuck_only,
            version: self.version,
            unknown_version_only: self.unknown_version_only,
        };
        violations.into_result()?;
        Ok(request)
    }
}

#[derive(Debug, Serialize)]
struct Found {
    sagas: Vec<saga::SagaView>,
    next_page_token: String,
}

/// SagaService/ListSagas for the page: the same request, checks and query.
async fn search(
    State(dashboard): State<Dashboard>,
    headers: HeaderMap,
    query: Result<Query<SearchQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(refusal) = authorize(&dashboard, &headers).await {
        return refusal;
    }
    let request = match query {
        Ok(Query(query)) => query.into_request(),
        Err(rejection) => return invalid("query", &rejection.body_text()),
    };
    let found = match request {
        Ok(request) => grpc::search(&dashboard.engine, &request).await,
        Err(status) => Err(status),
    };
    let carried = match grpc::carried(&dashboard.engine).await {
        Ok(carried) => carried,
        Err(error) => return failure(&error),
    };
    match found {
        Ok((instances, next_page_token)) => {
            let sagas = instances
                .into_iter()
                .map(|instance| {
                    let definition = dashboard
                        .engine
                        .definition(&instance.saga_type, instance.version);
                    let known = carried.carries(&instance);
                    let record = SagaRecord {
                        instance,
                        steps: Vec::new(),
                    };
                    saga::SagaView::new(&record, definition, known)
                })
                .collect();
            private(Json(Found {
                sagas,
                next_page_token,
            }))
        }
        Err(status) => answer_of(&status),
    }
}

/// A gRPC status as the page's answer: its code's name and its message
/// (INVALID_ARGUMENT's names every bad field), with the HTTP status that
/// means the same. An unexpected failure was logged where it happened.
fn answer_of(status: &tonic::Status) -> Response {
    use tonic::Code;
    let (http, code) = match status.code() {
        Code::InvalidArgument => (StatusCode::BAD_REQUEST, "INVALID_ARGUMENT"),
        Code::NotFound => (StatusCode::NOT_FOUND, "NOT_FOUND"),
        Code::FailedPrecondition => (StatusCode::CONFLICT, "FAILED_PRECONDITION"),
        Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL"),
    };
    refused(http, code, status.message())
}

/// A refusal in the words of the RPC's status: its code and message, and
/// the field for an invalid argument.
#[derive(Debug, Serialize)]
struct Refusal<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

fn refused(status: StatusCode, code: &str, message: &str) -> Response {
    let refusal = Refusal {
        code,
        message,
        field: None,
    };
    (status, private(Json(refusal))).into_response()
}

fn invalid(field: &str, reason: &str) -> Response {
    let message = format!("{field}: {reason}");
    let refusal = Refusal {
        code: "INVALID_ARGUMENT",
        message: &message,
        field: Some(field),
    };
    (StatusCode::BAD_REQUEST, private(Json(refusal))).into_response()
}

/// An answer with an operator's data: kept out of shared caches.
fn private(answer: impl IntoResponse) -> Response {
    ([(header::CACHE_CONTROL, "no-store")], answer).into_response()
}
