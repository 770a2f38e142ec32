//! The trace view: a read model of every service's events, by flow.
//!
//! A consumer group of its own reads the user, order and payment topics
//! (the orchestrator's own saga events are written here by the engine, in
//! the transaction that makes them: [`TraceJournal`]) and records each
//! event once (its primary key is the event id,
//! so it needs no inbox), with the order it concerns and a one-line
//! summary, a consumer batch in one statement. That statement also
//! announces its new rows with `NOTIFY`, rows included, a few per
//! notification, so the live streams of every replica see every event
//! whichever replica consumed it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use api_order::v1 as order;
use api_payment::v1 as payment;
use api_saga::v1 as saga;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use messaging::envelope::{self, OpenError};
use messaging::{EventEnvelope, EventHandler, HandleError, ReceivedEvent};
use prost::{Message, Name};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The consumer group of the trace view.
pub(crate) const CONSUMER_GROUP: &str = "trace-view";

/// An event as the trace view keeps it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, Serialize, Deserialize)]
pub(crate) struct TraceEventRow {
    pub(crate) event_id: Uuid,
    pub(crate) correlation_id: String,
    pub(crate) order_id: Option<Uuid>,
    pub(crate) service: String,
    pub(crate) event_type: String,
    pub(crate) aggregate_type: String,
    pub(crate) aggregate_id: String,
    pub(crate) aggregate_version: i64,
    pub(crate) causation_id: Option<String>,
    pub(crate) occurred_at: DateTime<Utc>,
    pub(crate) summary: String,
}

macro_rules! trace_columns {
    () => {
        "event_id, correlation_id, order_id, service, event_type, aggregate_type, aggregate_id, \
         aggregate_version, causation_id, occurred_at, summary"
    };
}

/// Longest trace returned at once.
const MAX_TRACE_EVENTS: i64 = 1000;

/// Records every event it is handed, a batch in one statement. Its rows
/// are keyed by event id, so a redelivered event changes nothing and needs
/// no inbox row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TraceRecorder;

impl EventHandler for TraceRecorder {
    const KEYED_BY_EVENT_ID: bool = true;

    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: &ReceivedEvent,
    ) -> Result<(), HandleError> {
        self.handle_batch(conn, std::slice::from_ref(event)).await
    }

    async fn handle_batch(
        &self,
        conn: &mut PgConnection,
        events: &[ReceivedEvent],
    ) -> Result<(), HandleError> {
        let rows = events
            .iter()
            .map(|event| row_of(event.event_id, &event.envelope))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| HandleError::Permanent(error.into()))?;
        record(conn, &rows)
            .await
            .map_err(|error| HandleError::Transient(error.into()))
    }
}

/// The orchestrator's own saga events go into the trace view in the
/// transaction that makes them, with no round trip through the broker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TraceJournal;

impl saga_engine::Journal for TraceJournal {
    fn record<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        events: &'a [EventEnvelope],
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let rows = events
                .iter()
                .map(|envelope| {
                    let event_id = Uuid::parse_str(&envelope.event_id).context("an event id")?;
                    Ok(row_of(event_id, envelope)?)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            record(conn, &rows).await.context("recording saga events")
        })
    }
}

/// The trace view's row for an event.
fn row_of(event_id: Uuid, envelope: &EventEnvelope) -> Result<TraceEventRow, OpenError> {
    let (order_id, summary) = describe(envelope)?;
    let occurred_at = envelope
        .occurred_at
        .and_then(|at| DateTime::from_timestamp(at.seconds, u32::try_from(at.nanos).unwrap_or(0)))
        .unwrap_or_else(Utc::now);
    Ok(TraceEventRow {
        event_id,
        correlation_id: envelope.correlation_id.clone(),
        order_id,
        service: envelope.producer.clone(),
        event_type: envelope.event_type.clone(),
        aggregate_type: envelope.aggregate_type.clone(),
        aggregate_id: envelope.aggregate_id.clone(),
        aggregate_version: i64::try_from(envelope.aggregate_version).unwrap_or(i64::MAX),
        causation_id: (!envelope.causation_id.is_empty()).then(|| envelope.causation_id.clone()),
        occurred_at,
        summary,
    })
}

/// Inserts `rows` and announces the new ones to the live feeds, in one
/// statement; rows already recorded are left alone (and not announced).
/// Saga events that do not name their order get their saga's.
///
/// The announcement is a `NOTIFY` on `<schema>.trace_events`, delivered
/// when the transaction commits: the rows as a JSON array, eight to a
/// notification (a payload holds at most 8000 bytes, and a row, its summary
/// at most 500 characters, stays under 1000).
async fn record(conn: &mut PgConnection, rows: &[TraceEventRow]) -> sqlx::Result<()> {
    sqlx::query(
        "WITH recorded AS (
         INSERT INTO trace_events (event_id, correlation_id, order_id, service, event_type, aggregate_type,
                                   aggregate_id, aggregate_version, causation_id, occurred_at, summary)
         SELECT e.event_id, e.correlation_id,
                coalesce(e.order_id, CASE WHEN e.aggregate_type = 'saga' THEN
                    -- A child saga's events belong to its parent's order.
                    (SELECT CASE WHEN k.key ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                                 THEN k.key::uuid END
                     FROM saga_instances s
                     LEFT JOIN saga_instances p ON p.saga_id = s.parent_saga_id
                     CROSS JOIN LATERAL (SELECT coalesce(p.business_key, s.business_key) AS key) k
                     WHERE s.saga_id = e.aggregate_id::uuid) END),
                e.service, e.event_type, e.aggregate_type, e.aggregate_id, e.aggregate_version,
                e.causation_id, e.occurred_at, e.summary
         FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::text[],
                     $8::int8[], $9::text[], $10::timestamptz[], $11::text[])
              WITH ORDINALITY AS e(event_id, correlation_id, order_id, service, event_type, aggregate_type,
                                   aggregate_id, aggregate_version, causation_id, occurred_at, summary, n)
         ORDER BY e.n
         ON CONFLICT (event_id) DO NOTHING
         RETURNING *
         )
         SELECT pg_notify(current_schema() || '.trace_events', chunk)
         FROM (SELECT json_agg(json_build_object(
                          'event_id', event_id, 'correlation_id', correlation_id, 'order_id', order_id,
                          'service', service, 'event_type', event_type, 'aggregate_type', aggregate_type,
                          'aggregate_id', aggregate_id, 'aggregate_version', aggregate_version,
                          'causation_id', causation_id, 'occurred_at', occurred_at, 'summary', summary)
                          ORDER BY occurred_at)::text AS chunk
               FROM (SELECT *, (row_number() OVER () - 1) / 8 AS part FROM recorded) AS numbered
               GROUP BY part) AS chunks",
    )
    .bind(rows.iter().map(|r| r.event_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.correlation_id.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.order_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.service.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.event_type.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.aggregate_type.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.aggregate_id.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.aggregate_version).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.causation_id.as_deref()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.occurred_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.summary.as_str()).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// The order an event concerns (if the event says), and a line saying
/// what happened.
fn describe(envelope: &EventEnvelope) -> Result<(Option<Uuid>, String), OpenError> {
    fn open<M: Message + Default + Name>(envelope: &EventEnvelope) -> Result<M, OpenError> {
        envelope::open(envelope)
    }
    let uuid = |text: &str| Uuid::parse_str(text).ok();
    let money = |amount: Option<&api_common::v1::Money>| {
        amount
            .and_then(|amount| money::Money::from_proto(amount).ok())
            .map_or_else(
                || "an unknown amount".to_owned(),
                |amount| amount.to_string(),
            )
    };
    let event_type = envelope.event_type.as_str();
    let described = match event_type {
        t if t == order::OrderPlaced::full_name() => {
            let placed: order::OrderPlaced = open(envelope)?;
            let lines = placed.items.len();
            (
                uuid(&placed.order_id),
                format!(
                    "order placed: {}, {lines} line{}",
                    money(placed.total.as_ref()),
                    if lines == 1 { "" } else { "s" }
                ),
            )
        }
        t if t == order::OrderConfirmed::full_name() => {
            (uuid(&envelope.aggregate_id), "order confirmed".to_owned())
        }
        t if t == order::OrderRejected::full_name() => {
            let rejected: order::OrderRejected = open(envelope)?;
            (
                uuid(&rejected.order_id),
                format!("order rejected: {}", rejected.reason),
            )
        }
        t if t == order::OrderCancellationRequested::full_name() => (
            uuid(&envelope.aggregate_id),
            "customer asked to cancel".to_owned(),
        ),
        t if t == order::OrderCancelled::full_name() => {
            let cancelled: order::OrderCancelled = open(envelope)?;
            (
                uuid(&cancelled.order_id),
                format!("order cancelled: {}", cancelled.reason),
            )
        }
        t if t == order::OrderHeldForReview::full_name() => (
            uuid(&envelope.aggregate_id),
            "order held for review".to_owned(),
        ),
        t if t == order::OrderReviewApproved::full_name() => (
            uuid(&envelope.aggregate_id),
            "order approved in review".to_owned(),
        ),
        t if t == order::OrderReviewDeclined::full_name() => {
            let declined: order::OrderReviewDeclined = open(envelope)?;
            (
                uuid(&declined.order_id),
                format!("order declined in review: {}", declined.reason),
            )
        }
        t if t == order::OrderReturnRequested::full_name() => {
            let requested: order::OrderReturnRequested = open(envelope)?;
            (
                uuid(&requested.order_id),
                format!("customer asked to return: {}", requested.reason),
            )
        }
        t if t == order::OrderReturned::full_name() => {
            (uuid(&envelope.aggregate_id), "order returned".to_owned())
        }
        t if t == payment::PaymentAuthorized::full_name() => {
            let authorized: payment::PaymentAuthorized = open(envelope)?;
            (
                uuid(&authorized.order_id),
                format!("payment authorized: {}", money(authorized.amount.as_ref())),
            )
        }
        t if t == payment::PaymentVoided::full_name() => {
            let voided: payment::PaymentVoided = open(envelope)?;
            (
                uuid(&voided.order_id),
                format!("authorization voided: {}", money(voided.amount.as_ref())),
            )
        }
        t if t == payment::PaymentAuthorizationExpired::full_name() => {
            let expired: payment::PaymentAuthorizationExpired = open(envelope)?;
            (
                uuid(&expired.order_id),
                format!("authorization expired: {}", money(expired.amount.as_ref())),
            )
        }
        t if t == payment::PaymentCaptured::full_name() => {
            let captured: payment::PaymentCaptured = open(envelope)?;
            (
                uuid(&captured.order_id),
                format!("payment captured: {}", money(captured.amount.as_ref())),
            )
        }
        t if t == payment::PaymentDeclined::full_name() => {
            let declined: payment::PaymentDeclined = open(envelope)?;
            (
                uuid(&declined.order_id),
                format!("payment declined: {}", declined.decline_reason),
            )
        }
        t if t == payment::PaymentRefunded::full_name() => {
            let refunded: payment::PaymentRefunded = open(envelope)?;
            (
                uuid(&refunded.order_id),
                format!("payment refunded: {}", money(refunded.amount.as_ref())),
            )
        }
        t if t == saga::SagaStarted::full_name() => {
            let started: saga::SagaStarted = open(envelope)?;
            (
                uuid(&started.order_id),
                format!(
                    "saga {} v{} started",
                    started.saga_type,
                    started.version.max(1)
                ),
            )
        }
        t if t == saga::SagaStepSucceeded::full_name() => {
            let step: saga::SagaStepSucceeded = open(envelope)?;
            let what = if step.compensation {
                "compensation of"
            } else {
                "step"
            };
            let attempts = if step.attempts == 1 {
                String::new()
            } else {
                format!(" after {} attempts", step.attempts)
            };
            (None, format!("{what} {} succeeded{attempts}", step.step))
        }
        t if t == saga::SagaStepFailed::full_name() => {
            let step: saga::SagaStepFailed = open(envelope)?;
            let what = if step.compensation {
                "compensation of"
            } else {
                "step"
            };
            let next = if step.will_retry {
                "will retry"
            } else {
                "gave up"
            };
            (
                None,
                format!("{what} {} failed ({next}): {}", step.step, step.error),
            )
        }
        t if t == saga::SagaStepSkipped::full_name() => {
            let step: saga::SagaStepSkipped = open(envelope)?;
            (
                None,
                format!("step {} skipped: its condition does not hold", step.step),
            )
        }
        t if t == saga::SagaCompensationStarted::full_name() => {
            let started: saga::SagaCompensationStarted = open(envelope)?;
            (None, format!("compensation started: {}", started.reason))
        }
        t if t == saga::SagaCompleted::full_name() => {
            let completed: saga::SagaCompleted = open(envelope)?;
            (uuid(&completed.order_id), "saga completed".to_owned())
        }
        t if t == saga::SagaCompensated::full_name() => {
            let compensated: saga::SagaCompensated = open(envelope)?;
            (
                uuid(&compensated.order_id),
                format!("saga compensated: {}", compensated.reason),
            )
        }
        t if t == saga::SagaFailed::full_name() => {
            let failed: saga::SagaFailed = open(envelope)?;
            (
                uuid(&failed.order_id),
                format!("saga failed, waiting for an operator: {}", failed.reason),
            )
        }
        t if t == saga::SagaPaused::full_name() => {
            let paused: saga::SagaPaused = open(envelope)?;
            (
                uuid(&paused.order_id),
                format!(
                    "saga paused by an operator (resumes {})",
                    state_name(paused.resumes_to)
                ),
            )
        }
        t if t == saga::SagaResumed::full_name() => {
            let resumed: saga::SagaResumed = open(envelope)?;
            (
                uuid(&resumed.order_id),
                format!("saga resumed by an operator, {}", state_name(resumed.state)),
            )
        }
        t if t == saga::SagaTerminated::full_name() => {
            let terminated: saga::SagaTerminated = open(envelope)?;
            let left = if terminated.steps_left_in_effect.is_empty() {
                String::new()
            } else {
                format!(
                    "; left in effect: {}",
                    terminated.steps_left_in_effect.join(", ")
                )
            };
            (
                uuid(&terminated.order_id),
                format!("saga {}{left}", terminated.reason),
            )
        }
        t if t == api_auth::v1::UserRegistered::full_name() => (None, "user registered".to_owned()),
        other => (None, other.rsplit('.').next().unwrap_or(other).to_owned()),
    };
    let (order_id, summary) = described;
    Ok((order_id, summary.chars().take(500).collect()))
}

/// A saga state as an operator reads it ("running").
fn state_name(state: i32) -> &'static str {
    saga::SagaState::try_from(state)
        .ok()
        .and_then(saga_engine::SagaState::from_proto)
        .map_or("unknown", saga_engine::SagaState::as_str)
}

/// Every event of a flow, in causal and time order.
pub(crate) async fn by_correlation(
    pool: &PgPool,
    correlation_id: &str,
) -> anyhow::Result<Vec<TraceEventRow>> {
    sqlx::query_as(concat!(
        "SELECT ",
        trace_columns!(),
        " FROM trace_events WHERE correlation_id = $1
         ORDER BY occurred_at, aggregate_version, event_id LIMIT $2"
    ))
    .bind(correlation_id)
    .bind(MAX_TRACE_EVENTS)
    .fetch_all(pool)
    .await
    .context("reading a trace")
}

/// The flow that placed an order: the correlation id of its OrderPlaced.
pub(crate) async fn correlation_of_order(
    pool: &PgPool,
    order_id: Uuid,
) -> anyhow::Result<Option<String>> {
    sqlx::query_scalar(
        "SELECT correlation_id FROM trace_events WHERE order_id = $1
         ORDER BY (event_type = $2) DESC, occurred_at LIMIT 1",
    )
    .bind(order_id)
    .bind(order::OrderPlaced::full_name())
    .fetch_optional(pool)
    .await
    .context("finding an order's flow")
}

/// The newest recorded events, newest first.
pub(crate) async fn recent(pool: &PgPool, limit: i64) -> anyhow::Result<Vec<TraceEventRow>> {
    sqlx::query_as(concat!(
        "SELECT ",
        trace_columns!(),
        " FROM trace_events ORDER BY recorded_at DESC LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(pool)
    .await
    .context("reading recent events")
}

/// New events as they are recorded, on this replica.
#[derive(Debug, Clone)]
pub(crate) struct LiveFeed {
    sender: broadcast::Sender<Arc<TraceEventRow>>,
}

impl LiveFeed {
    pub(crate) fn new() -> Self {
        // A slow subscriber that falls this far behind skips what it missed.
        Self {
            sender: broadcast::channel(1024).0,
        }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<TraceEventRow>> {
        self.sender.subscribe()
    }

    /// Relays the trace view's notifications to subscribers until `shutdown`.
    pub(crate) async fn run(self, pool: PgPool, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            let mut listener = match listen(&pool).await {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::warn!(error = format!("{error:#}"), "trace feed cannot listen yet");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    notification = listener.recv() => match notification {
                        // A notification carries some of the rows one
                        // statement inserted.
                        Ok(notification) => match serde_json::from_str::<Vec<TraceEventRow>>(notification.payload()) {
                            Ok(rows) => for row in rows {
                                // No subscribers is not an error.
                                let _ = self.sender.send(Arc::new(row));
                            },
                            Err(error) => tracing::warn!(%error, "malformed trace notification"),
                        },
                        Err(error) => {
                            tracing::warn!(%error, "trace feed lost its connection");
                            break;
                        }
                    }
                }
            }
        }
    }
}

async fn listen(pool: &PgPool) -> anyhow::Result<PgListener> {
    let schema: String = sqlx::query_scalar("SELECT current_schema()")
        .fetch_one(pool)
        .await?;
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(&format!("{schema}.trace_events")).await?;
    Ok(listener)
}

/// The purge of trace events recorded longer than `retention` ago. The
/// trace view is a record for people, not a source of truth: a flow's saga
/// keeps its own state and steps (`saga-engine`), whatever its events'
/// age.
pub(crate) fn trace_event_purge(retention: Duration) -> database::PurgeTarget {
    database::PurgeTarget {
        table: "trace_events",
        retention,
        // Oldest first through `trace_events_recent`.
        statement: "DELETE FROM trace_events WHERE ctid = ANY(ARRAY(
                        SELECT ctid FROM trace_events WHERE recorded_at < now() - $1
                        ORDER BY recorded_at LIMIT $2 FOR UPDATE SKIP LOCKED))",
    }
}
