//! The operators' dashboard, on the orchestrator's HTTP port: a page (`/`,
//! with its script and style sheet) and the JSON it reads (`/api/summary`,
//! `/api/trace`), built from the same read models as the gRPC APIs. The
//! JSON needs an admin token, as the gRPC APIs do; the page asks for one.
//!
//! The page's script and style are files of their own, served from here,
//! so that its Content-Security-Policy can allow scripts and styles from
//! this origin only: no inline script, nothing from elsewhere, no framing.
//! The HTTP server adds the other security headers to every answer.

use std::sync::Arc;

use access_control::Verifier;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::trace_api;
use crate::trace_view;

#[derive(Clone)]
struct Dashboard {
    pool: PgPool,
    verifier: Arc<Verifier>,
}

/// What the page may load: its own script, style sheet and JSON, from this
/// origin; nothing inline, no plugins, no `<base>`, no forms, no framing.
pub(crate) const PAGE_CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// The dashboard's routes.
pub(crate) fn routes(pool: PgPool, verifier: Arc<Verifier>) -> Router {
    Router::new()
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
        .route("/api/trace", get(trace))
        .with_state(Dashboard { pool, verifier })
}

/// Sets the gauges of sagas by unfinished state (paused included), of
/// overdue sagas and of stuck ones, when a scrape finds them older than the
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
    match read_summary(&dashboard.pool).await {
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
    let correlation = match service_runtime::fields::correlation_id(&query.correlation) {
        Ok(correlation) => correlation,
        Err(reason) => {
            return (StatusCode::BAD_REQUEST, format!("correlation: {reason}")).into_response();
        }
    };
    match trace_view::by_correlation(&dashboard.pool, correlation.as_str()).await {
        Ok(rows) => private(Json(rows.into_iter().map(Event::from).collect::<Vec<_>>())),
        Err(error) => failure(&error),
    }
}

/// An answer with an operator's data: kept out of shared caches.
fn private(answer: impl IntoResponse) -> Response {
    ([(header::CACHE_CONTROL, "no-store")], answer).into_response()
}
