//! The sagas' tables: reading them, and every write, fenced.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// Where a saga is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SagaState {
    Running,
    Compensating,
    Completed,
    Compensated,
    Failed,
}

impl SagaState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Compensating => "compensating",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
            Self::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Running,
            Self::Compensating,
            Self::Completed,
            Self::Compensated,
            Self::Failed,
        ]
        .into_iter()
        .find(|state| state.as_str() == text)
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Compensated)
    }
}

/// An action or its compensation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Action,
    Compensation,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Action => "action",
            Self::Compensation => "compensation",
        }
    }
}

/// A saga instance as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Instance {
    pub saga_id: Uuid,
    pub saga_type: String,
    pub business_key: String,
    pub state: String,
    pub data: Json<serde_json::Value>,
    pub correlation_id: String,
    pub position: i32,
    pub failure_reason: Option<String>,
    pub compensation_requested: Option<String>,
    /// Since when the pivot may have taken effect: the saga only goes forward.
    pub forward_only_since: Option<DateTime<Utc>>,
    /// A step past its deadline that is retried on because it cannot give up.
    pub overdue_step: Option<String>,
    pub overdue_since: Option<DateTime<Utc>>,
    pub next_run_at: Option<DateTime<Utc>>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub fence: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl Instance {
    pub fn state(&self) -> SagaState {
        SagaState::parse(&self.state).unwrap_or(SagaState::Failed)
    }
}

/// One execution of a step's action or compensation.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StepRecord {
    pub step: String,
    pub kind: String,
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub output: Option<Json<serde_json::Value>>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub deadline_at: Option<DateTime<Utc>>,
    /// The last attempt's answer was lost: it may have taken effect.
    pub outcome_unknown: bool,
}

impl StepRecord {
    /// Whether the last attempt may have taken effect without our knowing:
    /// its answer was lost, or it never reported back (its replica died).
    pub fn outcome_unknown(&self) -> bool {
        self.outcome_unknown || self.status == "running"
    }
}

/// A saga with its step log, in the order executions began.
#[derive(Debug, Clone)]
pub struct SagaRecord {
    pub instance: Instance,
    pub steps: Vec<StepRecord>,
}

impl SagaRecord {
    pub(crate) fn step(&self, name: &str, kind: Kind) -> Option<&StepRecord> {
        self.steps
            .iter()
            .find(|record| record.step == name && record.kind == kind.as_str())
    }

    /// Outputs of the `kind` executions that succeeded, by step name.
    pub(crate) fn outputs(&self, kind: Kind) -> HashMap<String, serde_json::Value> {
        self.steps
            .iter()
            .filter(|record| record.kind == kind.as_str() && record.status == "succeeded")
            .map(|record| {
                (
                    record.step.clone(),
                    record
                        .output
                        .as_ref()
                        .map(|o| o.0.clone())
                        .unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Actions that failed for good, with their last error.
    pub(crate) fn failed_actions(&self) -> HashMap<String, String> {
        self.steps
            .iter()
            .filter(|record| record.kind == Kind::Action.as_str() && record.status == "failed")
            .map(|record| {
                (
                    record.step.clone(),
                    record.last_error.clone().unwrap_or_default(),
                )
            })
            .collect()
    }
}

macro_rules! instance_columns {
    () => {
        "saga_id, saga_type, business_key, state, data, correlation_id, position, failure_reason, \
         compensation_requested, forward_only_since, overdue_step, overdue_since, next_run_at, lease_owner, \
         lease_expires_at, fence, created_at, updated_at, finished_at"
    };
}

macro_rules! step_columns {
    () => {
        "step, kind, status, attempts, last_error, output, started_at, finished_at, next_attempt_at, deadline_at, \
         outcome_unknown"
    };
}

/// The saga `saga_id` with its step log.
pub async fn load(pool: &PgPool, saga_id: Uuid) -> anyhow::Result<Option<SagaRecord>> {
    let instance: Option<Instance> = sqlx::query_as(concat!(
        "SELECT ",
        instance_columns!(),
        " FROM saga_instances WHERE saga_id = $1"
    ))
    .bind(saga_id)
    .fetch_optional(pool)
    .await
    .context("reading a saga")?;
    let Some(instance) = instance else {
        return Ok(None);
    };
    let steps = sqlx::query_as(concat!(
        "SELECT ",
        step_columns!(),
        " FROM saga_steps WHERE saga_id = $1 ORDER BY seq"
    ))
    .bind(saga_id)
    .fetch_all(pool)
    .await
    .context("reading a saga's steps")?;
    Ok(Some(SagaRecord { instance, steps }))
}

/// The trace context a saga continues.
pub(crate) async fn trace_context(
    pool: &PgPool,
    saga_id: Uuid,
) -> anyhow::Result<Option<Vec<(String, String)>>> {
    let headers: Option<Json<Vec<(String, String)>>> =
        sqlx::query_scalar("SELECT trace_context FROM saga_instances WHERE saga_id = $1")
            .bind(saga_id)
            .fetch_optional(pool)
            .await
            .context("reading a saga's trace context")?;
    Ok(headers.map(|Json(headers)| headers))
}

/// The id of the saga of `saga_type` for `business_key`, if any.
pub async fn find_by_business_key(
    pool: &PgPool,
    saga_type: &str,
    business_key: &str,
) -> anyhow::Result<Option<Uuid>> {
    sqlx::query_scalar(
        "SELECT saga_id FROM saga_instances WHERE saga_type = $1 AND business_key = $2",
    )
    .bind(saga_type)
    .bind(business_key)
    .fetch_optional(pool)
    .await
    .context("finding a saga by key")
}

/// The id of the (first) saga of a flow.
pub async fn find_by_correlation(
    pool: &PgPool,
    correlation_id: &str,
) -> anyhow::Result<Option<Uuid>> {
    sqlx::query_scalar(
        "SELECT saga_id FROM saga_instances WHERE correlation_id = $1 ORDER BY created_at LIMIT 1",
    )
    .bind(correlation_id)
    .fetch_optional(pool)
    .await
    .context("finding a saga by correlation id")
}

/// Where a page of sagas starts: after (created_at, saga_id), oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListCursor {
    pub created_at: DateTime<Utc>,
    pub saga_id: Uuid,
}

/// Sagas in `states`, started before `started_before`, oldest first.
pub async fn list(
    pool: &PgPool,
    states: &[SagaState],
    started_before: DateTime<Utc>,
    after: Option<ListCursor>,
    limit: i64,
) -> anyhow::Result<Vec<Instance>> {
    let states: Vec<&str> = states.iter().map(|state| state.as_str()).collect();
    sqlx::query_as(concat!(
        "SELECT ",
        instance_columns!(),
        " FROM saga_instances
         WHERE state = ANY($1) AND created_at <= $2
           AND ($3::timestamptz IS NULL OR (created_at, saga_id) > ($3, $4))
         ORDER BY created_at, saga_id LIMIT $5"
    ))
    .bind(&states)
    .bind(started_before)
    .bind(after.map(|c| c.created_at))
    .bind(after.map(|c| c.saga_id))
    .bind(limit)
    .fetch_all(pool)
    .await
    .context("listing sagas")
}

/// Claims up to `limit` sagas with work due now whose lease is free or
/// expired: each gets this worker as owner and a new fence.
pub async fn claim(
    pool: &PgPool,
    worker: &str,
    limit: i64,
    lease: Duration,
) -> anyhow::Result<Vec<(Uuid, i64)>> {
    sqlx::query_as(
        "WITH due AS (
             SELECT saga_id FROM saga_instances
             WHERE next_run_at <= now()
               AND state IN ('running', 'compensating')
               AND (lease_expires_at IS NULL OR lease_expires_at < now())
             ORDER BY next_run_at
             LIMIT $2
             FOR UPDATE SKIP LOCKED
         )
         UPDATE saga_instances s
         SET lease_owner = $1, lease_expires_at = now() + $3, fence = s.fence + 1
         FROM due WHERE s.saga_id = due.saga_id
         RETURNING s.saga_id, s.fence",
    )
    .bind(worker)
    .bind(limit)
    .bind(chrono::Duration::from_std(lease)?)
    .fetch_all(pool)
    .await
    .context("claiming sagas")
}

/// When the next saga becomes claimable: its work falls due, or the lease
/// of a replica that stopped renewing runs out.
pub(crate) async fn next_due(pool: &PgPool) -> anyhow::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar(
        "SELECT min(greatest(next_run_at, coalesce(lease_expires_at, next_run_at)))
         FROM saga_instances WHERE next_run_at IS NOT NULL AND state IN ('running', 'compensating')",
    )
    .fetch_one(pool)
    .await
    .context("finding the next due saga")
}

/// Why a fenced write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Another replica has claimed the saga since: this one must stop.
    #[error("the saga was claimed by another replica")]
    Fenced,
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// What [`check_fence`] found under the row's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// A compensation was requested and the saga can still turn back: a
    /// forward attempt must not begin (the request was accepted first).
    pub turning_back: bool,
}

/// First statement of every write of a claimed saga: fails unless our claim
/// is still the current one, locks the row for the transaction, and renews
/// the lease (a saga driven through many steps keeps it).
pub async fn check_fence(
    conn: &mut PgConnection,
    saga_id: Uuid,
    fence: i64,
    lease: Duration,
) -> Result<Held, WriteError> {
    let turning_back: Option<bool> = sqlx::query_scalar(
        "UPDATE saga_instances SET updated_at = now(), lease_expires_at = now() + $3
         WHERE saga_id = $1 AND fence = $2
         RETURNING compensation_requested IS NOT NULL AND forward_only_since IS NULL",
    )
    .bind(saga_id)
    .bind(fence)
    .bind(chrono::Duration::from_std(lease).context("lease")?)
    .fetch_optional(conn)
    .await
    .context("checking the fence")?;
    turning_back
        .map(|turning_back| Held { turning_back })
        .ok_or(WriteError::Fenced)
}

/// Marks the saga forward-only: its pivot's first attempt is being written
/// ahead. In the transaction of that write, after [`check_fence`].
pub(crate) async fn mark_forward_only(
    conn: &mut PgConnection,
    saga_id: Uuid,
) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE saga_instances SET forward_only_since = coalesce(forward_only_since, now())
         WHERE saga_id = $1",
    )
    .bind(saga_id)
    .execute(conn)
    .await
    .context("marking the saga forward-only")?;
    Ok(())
}

/// The pivot was refused for certain: it did not take effect, and the saga
/// may turn back again.
pub(crate) async fn clear_forward_only(
    conn: &mut PgConnection,
    saga_id: Uuid,
) -> anyhow::Result<()> {
    sqlx::query("UPDATE saga_instances SET forward_only_since = NULL WHERE saga_id = $1")
        .bind(saga_id)
        .execute(conn)
        .await
        .context("clearing forward-only")?;
    Ok(())
}

/// Flags `step` as past its deadline (or clears the flag, with `None`).
pub(crate) async fn set_overdue(
    conn: &mut PgConnection,
    saga_id: Uuid,
    step: Option<(&str, DateTime<Utc>)>,
) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE saga_instances SET overdue_step = $2, overdue_since = $3 WHERE saga_id = $1",
    )
    .bind(saga_id)
    .bind(step.map(|(name, _)| name))
    .bind(step.map(|(_, since)| since))
    .execute(conn)
    .await
    .context("flagging an overdue step")?;
    Ok(())
}

/// Gives up the lease, scheduling the saga's next work (if any).
pub async fn release(
    pool: &PgPool,
    saga_id: Uuid,
    fence: i64,
    next_run_at: Option<DateTime<Utc>>,
) -> Result<(), WriteError> {
    let released = sqlx::query(
        "UPDATE saga_instances SET lease_owner = NULL, lease_expires_at = NULL, next_run_at = $3
         WHERE saga_id = $1 AND fence = $2",
    )
    .bind(saga_id)
    .bind(fence)
    .bind(next_run_at)
    .execute(pool)
    .await
    .context("releasing a saga")?
    .rows_affected();
    if released == 1 {
        Ok(())
    } else {
        Err(WriteError::Fenced)
    }
}
