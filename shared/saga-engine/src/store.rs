//! The sagas' tables: reading them, and every write of a claimed saga,
//! fenced by the `WHERE` clause of the update that locks its row.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use messaging::EventEnvelope;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::definition::Journal;
use crate::turn::Turn;

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

/// A saga this replica claimed: its record, and the trace it continues.
#[derive(Debug)]
pub struct Claimed {
    pub saga: SagaRecord,
    /// W3C trace context of what started the saga, as (name, value) pairs.
    pub trace_context: Vec<(String, String)>,
}

impl Claimed {
    /// The fence of this claim: every write of it must match.
    pub fn fence(&self) -> i64 {
        self.saga.instance.fence
    }
}

#[derive(sqlx::FromRow)]
struct ClaimedRow {
    #[sqlx(flatten)]
    instance: Instance,
    trace_context: Json<Vec<(String, String)>>,
}

#[derive(sqlx::FromRow)]
struct OwnedStep {
    saga_id: Uuid,
    #[sqlx(flatten)]
    record: StepRecord,
}

/// Claims up to `limit` sagas with work due now whose lease is free or
/// expired: each gets this worker as owner and a new fence, and comes back
/// whole (with its step log), so the engine drives it from memory.
pub async fn claim(
    pool: &PgPool,
    worker: &str,
    limit: i64,
    lease: Duration,
) -> anyhow::Result<Vec<Claimed>> {
    let rows: Vec<ClaimedRow> = sqlx::query_as(
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
         RETURNING s.*",
    )
    .bind(worker)
    .bind(limit)
    .bind(chrono::Duration::from_std(lease)?)
    .fetch_all(pool)
    .await
    .context("claiming sagas")?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = rows.iter().map(|row| row.instance.saga_id).collect();
    let mut steps: HashMap<Uuid, Vec<StepRecord>> = HashMap::new();
    let owned: Vec<OwnedStep> = sqlx::query_as(concat!(
        "SELECT saga_id, ",
        step_columns!(),
        " FROM saga_steps WHERE saga_id = ANY($1) ORDER BY seq"
    ))
    .bind(&ids)
    .fetch_all(pool)
    .await
    .context("reading the claimed sagas' steps")?;
    for step in owned {
        steps.entry(step.saga_id).or_default().push(step.record);
    }
    Ok(rows
        .into_iter()
        .map(|row| Claimed {
            saga: SagaRecord {
                steps: steps.remove(&row.instance.saga_id).unwrap_or_default(),
                instance: row.instance,
            },
            trace_context: row.trace_context.0,
        })
        .collect())
}

/// What a turn does with the lease.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Lease {
    /// Keep driving: renew it for this long.
    Keep(Duration),
    /// Give it up, with the saga's next work due then (if ever).
    Release(Option<DateTime<Utc>>),
}

/// What became of a turn's write.
#[derive(Debug)]
pub(crate) enum Written {
    /// Committed: the saga's row as it now stands.
    Committed(Box<Instance>),
    /// Rolled back: the turn began forward attempts, and a compensation
    /// request was accepted since the saga was read.
    TurningBack,
}

/// Writes a turn in one transaction: the saga's row (fenced: the `WHERE`
/// clause of that update is the fence check, and it locks the row first),
/// every changed step execution in one statement, and the turn's events in
/// one statement to the outbox.
pub(crate) async fn write(
    pool: &PgPool,
    fence: i64,
    turn: &Turn,
    lease: Lease,
    events: Events<'_>,
) -> Result<Written, WriteError> {
    let instance = &turn.saga.instance;
    let (hold, next_run_at, renew) = match lease {
        Lease::Keep(duration) => (true, None, duration),
        Lease::Release(next) => (false, next, Duration::ZERO),
    };
    let mut tx = pool.begin().await.context("starting a transaction")?;
    let written: Option<Instance> = sqlx::query_as(concat!(
        "UPDATE saga_instances SET
             state = $3, position = $4, failure_reason = $5,
             compensation_requested = CASE WHEN $6 THEN NULL ELSE compensation_requested END,
             forward_only_since = CASE
                 WHEN $7 AND compensation_requested IS NULL THEN coalesce(forward_only_since, now())
                 WHEN $8 THEN NULL
                 ELSE forward_only_since END,
             overdue_step = $9, overdue_since = $10, finished_at = $11,
             next_run_at = CASE WHEN $12 THEN next_run_at ELSE $13 END,
             lease_owner = CASE WHEN $12 THEN lease_owner END,
             lease_expires_at = CASE WHEN $12 THEN now() + $14 END,
             updated_at = now()
         WHERE saga_id = $1 AND fence = $2
         RETURNING ",
        instance_columns!()
    ))
    .bind(instance.saga_id)
    .bind(fence)
    .bind(&instance.state)
    .bind(instance.position)
    .bind(&instance.failure_reason)
    .bind(turn.clears_request)
    .bind(turn.begins_pivot)
    .bind(turn.clears_forward_only)
    .bind(&instance.overdue_step)
    .bind(instance.overdue_since)
    .bind(instance.finished_at)
    .bind(hold)
    .bind(next_run_at)
    .bind(chrono::Duration::from_std(renew).context("lease")?)
    .fetch_optional(&mut *tx)
    .await
    .context("writing the saga")?;
    let Some(written) = written else {
        return Err(WriteError::Fenced);
    };
    if turn.begins_forward
        && written.compensation_requested.is_some()
        && written.forward_only_since.is_none()
    {
        return Ok(Written::TurningBack); // dropping `tx` rolls it back
    }
    let rows: Vec<&StepRecord> = turn.rows().collect();
    if !rows.is_empty() {
        sqlx::query(
            "INSERT INTO saga_steps (saga_id, step, kind, status, attempts, last_error, output, started_at,
                                     finished_at, next_attempt_at, deadline_at, outcome_unknown)
             SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::int4[], $6::text[], $7::jsonb[],
                                      $8::timestamptz[], $9::timestamptz[], $10::timestamptz[],
                                      $11::timestamptz[], $12::bool[])
             ON CONFLICT (saga_id, step, kind) DO UPDATE SET
                 status = EXCLUDED.status, attempts = EXCLUDED.attempts, last_error = EXCLUDED.last_error,
                 output = EXCLUDED.output, finished_at = EXCLUDED.finished_at,
                 next_attempt_at = EXCLUDED.next_attempt_at, deadline_at = EXCLUDED.deadline_at,
                 outcome_unknown = EXCLUDED.outcome_unknown",
        )
        .bind(instance.saga_id)
        .bind(rows.iter().map(|r| r.step.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.kind.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.status.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.attempts).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.last_error.as_deref()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.output.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.started_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.finished_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.next_attempt_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.deadline_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.outcome_unknown).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await
        .context("writing the steps")?;
    }
    events.write(&mut tx, &turn.events).await?;
    tx.commit().await.context("committing a turn")?;
    Ok(Written::Committed(Box::new(written)))
}

/// Where saga events go, in the caller's transaction.
#[derive(Clone, Copy)]
pub(crate) struct Events<'a> {
    pub(crate) topic: &'a str,
    pub(crate) journal: Option<&'a dyn Journal>,
}

impl Events<'_> {
    /// Records `events` in the journal, and puts on the topic (through the
    /// outbox) those worth publishing: with a journal, what a saga came to
    /// rather than each of its steps.
    pub(crate) async fn write(
        &self,
        conn: &mut PgConnection,
        events: &[EventEnvelope],
    ) -> anyhow::Result<()> {
        let Some(journal) = self.journal else {
            return messaging::outbox::enqueue_all(conn, self.topic, events).await;
        };
        if events.is_empty() {
            return Ok(());
        }
        journal.record(conn, events).await?;
        let published: Vec<EventEnvelope> = events
            .iter()
            .filter(|event| !is_step_event(&event.event_type))
            .cloned()
            .collect();
        messaging::outbox::enqueue_all(conn, self.topic, &published).await
    }
}

/// A step's success or failure, as opposed to what the saga came to.
fn is_step_event(event_type: &str) -> bool {
    use prost::Name as _;
    event_type == api_saga::v1::SagaStepSucceeded::full_name()
        || event_type == api_saga::v1::SagaStepFailed::full_name()
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
