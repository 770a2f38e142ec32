//! The sagas' tables, and every statement run on them: this file answers
//! what is written, and what fences it. The engine decides (what a request
//! means in which state, what a turn changes); the functions here only
//! read and write.
//!
//! Every write, and what keeps it from overwriting a newer owner's work:
//!
//! | function               | writes                                       | fenced by                                              |
//! |------------------------|----------------------------------------------|--------------------------------------------------------|
//! | `create`               | `saga_instances` (insert; unowned, or leased | nothing to fence: a new row, one per type and key      |
//! |                        | at fence 1 to the replica starting it)       |                                                        |
//! | `claim`                | `saga_instances` (lease, fence + 1)          | takes the fence, under `FOR UPDATE SKIP LOCKED`, of    |
//! |                        |                                              | sagas whose lease is free or has run out               |
//! | `write`                | `saga_instances`, `saga_steps`, outbox,      | `WHERE fence = $2` on the row's update, which locks    |
//! |                        | journal                                      | the row before anything else is written                |
//! | `request_compensation` | `saga_instances` (the request, next run)     | the row lock of `lock`; leaves the fence, so the owner |
//! |                        |                                              | acts on the request between steps                      |
//! | `reopen`               | `saga_steps`, `saga_instances` (state,       | the row lock of `lock`; takes a new fence, so whoever  |
//! |                        | lease cleared, fence + 1)                    | held the saga is fenced off                            |
//! | `Events::write`        | outbox, journal                              | the transaction it joins: `create`'s or `write`'s      |
//!
//! `lock` writes nothing: it takes the row lock that orders a request
//! against the owner's turns. The rest only read: `load`,
//! `find_by_business_key`, `find_by_correlation`, `list`, `next_due`, and
//! `listen` (the channel on which the trigger of `0001_sagas.sql` announces
//! due work).
//!
//! States, step statuses and kinds are enums here, stored as the TEXT
//! values the tables' CHECK constraints allow; a value the engine does not
//! know is a decode error, never a guess.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use messaging::{EventEnvelope, Publisher};
use sqlx::error::BoxDynError;
use sqlx::postgres::{
    PgArgumentBuffer, PgHasArrayType, PgListener, PgTypeInfo, PgValueRef, Postgres,
};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::definition::Journal;
use crate::turn::Turn;

/// Where a saga is in its life (`saga_instances.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SagaState {
    Running,
    Compensating,
    Completed,
    Compensated,
    Failed,
}

impl SagaState {
    pub const ALL: [Self; 5] = [
        Self::Running,
        Self::Compensating,
        Self::Completed,
        Self::Compensated,
        Self::Failed,
    ];

    /// The value as stored.
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
        Self::ALL.into_iter().find(|state| state.as_str() == text)
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Compensated)
    }
}

/// Where one execution of a step's action or compensation stands
/// (`saga_steps.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepStatus {
    /// A retry is scheduled at `next_attempt_at`.
    Waiting,
    /// An attempt is in flight, or its replica died in it.
    Running,
    Succeeded,
    /// Failed for good: out of attempts or time, or refused.
    Failed,
}

impl StepStatus {
    pub const ALL: [Self; 4] = [Self::Waiting, Self::Running, Self::Succeeded, Self::Failed];

    /// The value as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == text)
    }
}

/// An action or its compensation (`saga_steps.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Action,
    Compensation,
}

impl Kind {
    pub const ALL: [Self; 2] = [Self::Action, Self::Compensation];

    /// The value as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Action => "action",
            Self::Compensation => "compensation",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == text)
    }
}

/// Stores `$ty` as PostgreSQL `text` through its `as_str` and `parse`: the
/// same type as a `&str` bind (no type lookup, no extra statement), and a
/// decode error for any value `parse` does not know.
macro_rules! stored_as_text {
    ($ty:ty, $what:literal) => {
        impl sqlx::Type<Postgres> for $ty {
            fn type_info() -> PgTypeInfo {
                <str as sqlx::Type<Postgres>>::type_info()
            }

            fn compatible(ty: &PgTypeInfo) -> bool {
                <str as sqlx::Type<Postgres>>::compatible(ty)
            }
        }

        impl PgHasArrayType for $ty {
            fn array_type_info() -> PgTypeInfo {
                <&str as PgHasArrayType>::array_type_info()
            }

            fn array_compatible(ty: &PgTypeInfo) -> bool {
                <&str as PgHasArrayType>::array_compatible(ty)
            }
        }

        impl sqlx::Encode<'_, Postgres> for $ty {
            fn encode_by_ref(
                &self,
                buf: &mut PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, BoxDynError> {
                <&str as sqlx::Encode<Postgres>>::encode(self.as_str(), buf)
            }

            fn size_hint(&self) -> usize {
                self.as_str().len()
            }
        }

        impl<'r> sqlx::Decode<'r, Postgres> for $ty {
            fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
                let text = <&str as sqlx::Decode<Postgres>>::decode(value)?;
                Self::parse(text).ok_or_else(|| format!("unknown {} {text:?}", $what).into())
            }
        }
    };
}

stored_as_text!(SagaState, "saga state");
stored_as_text!(StepStatus, "step status");
stored_as_text!(Kind, "step kind");

/// A saga instance as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Instance {
    pub saga_id: Uuid,
    pub saga_type: String,
    pub business_key: String,
    pub state: SagaState,
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

#[cfg(test)]
impl Instance {
    /// A saga's row as the pure rules' tests start from: `state` at
    /// `position`, nothing requested, failed or leased.
    pub(crate) fn for_test(state: SagaState, position: i32) -> Self {
        let now = Utc::now();
        Self {
            saga_id: Uuid::nil(),
            saga_type: "test".into(),
            business_key: "k".into(),
            state,
            data: Json(serde_json::Value::Null),
            correlation_id: "c".into(),
            position,
            failure_reason: None,
            compensation_requested: None,
            forward_only_since: None,
            overdue_step: None,
            overdue_since: None,
            next_run_at: None,
            lease_owner: None,
            lease_expires_at: None,
            fence: 1,
            created_at: now,
            updated_at: now,
            finished_at: None,
        }
    }
}

/// One execution of a step's action or compensation.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StepRecord {
    pub step: String,
    pub kind: Kind,
    pub status: StepStatus,
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
        self.outcome_unknown || self.status == StepStatus::Running
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
            .find(|record| record.step == name && record.kind == kind)
    }

    /// Outputs of the `kind` executions that succeeded, by step name.
    pub(crate) fn outputs(&self, kind: Kind) -> HashMap<String, serde_json::Value> {
        self.steps
            .iter()
            .filter(|record| record.kind == kind && record.status == StepStatus::Succeeded)
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
            .filter(|record| record.kind == Kind::Action && record.status == StepStatus::Failed)
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

/// The saga `saga_id` with its step log. Reads only (two statements, not
/// one snapshot: the engine reads a claimed saga, whose rows only it writes).
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

/// The id of the saga of `saga_type` for `business_key`, if any. Reads only.
pub async fn find_by_business_key(
    executor: impl sqlx::PgExecutor<'_>,
    saga_type: &str,
    business_key: &str,
) -> anyhow::Result<Option<Uuid>> {
    sqlx::query_scalar(
        "SELECT saga_id FROM saga_instances WHERE saga_type = $1 AND business_key = $2",
    )
    .bind(saga_type)
    .bind(business_key)
    .fetch_optional(executor)
    .await
    .context("finding a saga by key")
}

/// The id of the (first) saga of a flow. Reads only.
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
/// Reads only.
pub async fn list(
    pool: &PgPool,
    states: &[SagaState],
    started_before: DateTime<Utc>,
    after: Option<ListCursor>,
    limit: i64,
) -> anyhow::Result<Vec<Instance>> {
    sqlx::query_as(concat!(
        "SELECT ",
        instance_columns!(),
        " FROM saga_instances
         WHERE state = ANY($1) AND created_at <= $2
           AND ($3::timestamptz IS NULL OR (created_at, saga_id) > ($3, $4))
         ORDER BY created_at, saga_id LIMIT $5"
    ))
    .bind(states)
    .bind(started_before)
    .bind(after.map(|c| c.created_at))
    .bind(after.map(|c| c.saga_id))
    .bind(limit)
    .fetch_all(pool)
    .await
    .context("listing sagas")
}

/// Inserts a saga of `saga_type` for `business_key`, running and due now,
/// in the caller's transaction, and returns its row; `None` (and nothing
/// written) if that type has a saga for that key already. Writes
/// `saga_instances`; nothing to fence: the row is new, and the unique key
/// keeps it the only one. Unowned, it is at fence 0 and its trigger wakes
/// the engines when the transaction commits; owned by `owner` (a started
/// saga this replica drives at once), it is at fence 1 under that lease,
/// and nobody is woken.
pub(crate) async fn create(
    conn: &mut PgConnection,
    new: &NewSaga<'_>,
    owner: Option<(&str, Duration)>,
) -> anyhow::Result<Option<Instance>> {
    let (lease_owner, lease) = owner.unzip();
    sqlx::query_as(concat!(
        "INSERT INTO saga_instances
             (saga_id, saga_type, business_key, state, data, correlation_id, trace_context, next_run_at,
              lease_owner, lease_expires_at, fence)
         VALUES ($1, $2, $3, 'running', $4, $5, $6, now(), $7, now() + $8, CASE WHEN $7 IS NULL THEN 0 ELSE 1 END)
         ON CONFLICT (saga_type, business_key) DO NOTHING
         RETURNING ",
        instance_columns!()
    ))
    .bind(new.saga_id)
    .bind(new.saga_type)
    .bind(new.business_key)
    .bind(Json(new.data))
    .bind(new.correlation_id)
    .bind(Json(new.trace_context))
    .bind(lease_owner)
    .bind(lease.map(chrono::Duration::from_std).transpose()?)
    .fetch_optional(&mut *conn)
    .await
    .context("starting a saga")
}

/// A saga about to be created.
pub(crate) struct NewSaga<'a> {
    pub(crate) saga_id: Uuid,
    pub(crate) saga_type: &'a str,
    pub(crate) business_key: &'a str,
    pub(crate) data: &'a serde_json::Value,
    pub(crate) correlation_id: &'a str,
    pub(crate) trace_context: &'a [(String, String)],
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
///
/// Writes `saga_instances` (lease owner, lease expiry, fence + 1). It does
/// not check a fence, it takes one: `FOR UPDATE SKIP LOCKED` keeps two
/// replicas from claiming one saga, only a free or expired lease is taken,
/// and the new fence refuses every later write of the previous owner.
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

/// Writes a turn in one transaction of two statements: the saga's row
/// (fenced: the `WHERE` clause of that update is the fence check, and it
/// locks the row first) with every changed step execution, written only if
/// the fence held; then the turn's events, to the outbox (and to the
/// journal, if any).
///
/// Writes `saga_instances`, `saga_steps`, the outbox and the journal, all
/// behind the row update `WHERE saga_id = $1 AND fence = $2`: with another
/// fence it matches no row and nothing is written ([`WriteError::Fenced`]).
/// Holding that row's lock, it also sees a compensation request accepted
/// since the saga was read, and rolls back a turn that begins forward
/// attempts ([`Written::TurningBack`]).
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
    let rows: Vec<&StepRecord> = turn.rows().collect();
    let mut tx = pool.begin().await.context("starting a transaction")?;
    // One statement: the saga's row, then (only if the fence held, which
    // the `EXISTS` waits for) every changed step execution.
    let written: Option<Instance> = sqlx::query_as(concat!(
        "WITH saga AS (
             UPDATE saga_instances SET
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
        instance_columns!(),
        "
         ), steps AS (
             INSERT INTO saga_steps (saga_id, step, kind, status, attempts, last_error, output, started_at,
                                     finished_at, next_attempt_at, deadline_at, outcome_unknown)
             SELECT $1, * FROM UNNEST($15::text[], $16::text[], $17::text[], $18::int4[], $19::text[],
                                      $20::jsonb[], $21::timestamptz[], $22::timestamptz[],
                                      $23::timestamptz[], $24::timestamptz[], $25::bool[])
             WHERE EXISTS (SELECT FROM saga)
             ON CONFLICT (saga_id, step, kind) DO UPDATE SET
                 status = EXCLUDED.status, attempts = EXCLUDED.attempts, last_error = EXCLUDED.last_error,
                 output = EXCLUDED.output, finished_at = EXCLUDED.finished_at,
                 next_attempt_at = EXCLUDED.next_attempt_at, deadline_at = EXCLUDED.deadline_at,
                 outcome_unknown = EXCLUDED.outcome_unknown
         )
         SELECT * FROM saga"
    ))
    .bind(instance.saga_id)
    .bind(fence)
    .bind(instance.state)
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
    .bind(rows.iter().map(|r| r.step.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.kind).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.status).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.attempts).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.last_error.as_deref()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.output.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.started_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.finished_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.next_attempt_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.deadline_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.outcome_unknown).collect::<Vec<_>>())
    .fetch_optional(&mut *tx)
    .await
    .context("writing the saga and its steps")?;
    let Some(written) = written else {
        return Err(WriteError::Fenced);
    };
    // The steps were written with it; rolling back undoes them too.
    if turn.begins_forward
        && written.compensation_requested.is_some()
        && written.forward_only_since.is_none()
    {
        return Ok(Written::TurningBack); // dropping `tx` rolls it back
    }
    events.write(&mut tx, &turn.events).await?;
    tx.commit().await.context("committing a turn")?;
    Ok(Written::Committed(Box::new(written)))
}

/// A saga's row, locked for the caller's transaction by [`lock`]: what a
/// request is decided on.
#[derive(Debug, Clone)]
pub(crate) struct Locked {
    pub(crate) saga_id: Uuid,
    pub(crate) state: SagaState,
    pub(crate) saga_type: String,
    /// Since when the pivot may have taken effect.
    pub(crate) forward_only_since: Option<DateTime<Utc>>,
}

/// Locks the saga's row for the caller's transaction (`SELECT ... FOR
/// UPDATE`), and reads what a request is decided on. Writes nothing; the
/// lock orders the request against the owner's turns, whose fenced update
/// waits for it: the owner sees the request's outcome, or the request sees
/// the turn's (the pivot begun, say).
pub(crate) async fn lock(conn: &mut PgConnection, saga_id: Uuid) -> anyhow::Result<Option<Locked>> {
    let row: Option<(SagaState, String, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT state, saga_type, forward_only_since FROM saga_instances WHERE saga_id = $1 FOR UPDATE",
    )
    .bind(saga_id)
    .fetch_optional(&mut *conn)
    .await
    .context("locking a saga")?;
    Ok(row.map(|(state, saga_type, forward_only_since)| Locked {
        saga_id,
        state,
        saga_type,
        forward_only_since,
    }))
}

/// Records a request to compensate the saga, with its reason, and makes it
/// due now unless a replica holds it (the owner acts on it between steps).
///
/// Writes `saga_instances` (`compensation_requested`, `next_run_at`). Not
/// fenced, on purpose: it leaves the fence and the lease alone, so the
/// owner keeps driving and turns back at its next plan. It runs under the
/// row lock of [`lock`], so the owner's next turn sees it: a turn that
/// begins forward attempts rolls back (see [`write`]).
pub(crate) async fn request_compensation(
    conn: &mut PgConnection,
    saga: &Locked,
    reason: &str,
) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE saga_instances SET compensation_requested = $2,
             next_run_at = CASE WHEN lease_owner IS NULL THEN now() ELSE next_run_at END
         WHERE saga_id = $1",
    )
    .bind(saga.saga_id)
    .bind(reason)
    .execute(&mut *conn)
    .await
    .context("requesting a compensation")?;
    Ok(())
}

/// Sends the saga to `state`, due now: its executions of `kind` that failed
/// for good wait for a retry, with a fresh budget of attempts.
///
/// Writes `saga_steps` (the failed `kind` executions) and `saga_instances`
/// (state, `next_run_at`, `finished_at`, lease cleared). Under the row
/// lock of [`lock`]; it takes a new fence (fence + 1), so whatever held the
/// saga before has no say any more: its next write is fenced off.
pub(crate) async fn reopen(
    conn: &mut PgConnection,
    saga: &Locked,
    state: SagaState,
    kind: Kind,
) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE saga_steps SET status = 'waiting', attempts = 0, next_attempt_at = now(), finished_at = NULL
         WHERE saga_id = $1 AND kind = $2 AND status = 'failed'",
    )
    .bind(saga.saga_id)
    .bind(kind)
    .execute(&mut *conn)
    .await
    .context("retrying a saga's failed steps")?;
    sqlx::query(
        "UPDATE saga_instances SET state = $2, next_run_at = now(), finished_at = NULL,
             lease_owner = NULL, lease_expires_at = NULL, fence = fence + 1
         WHERE saga_id = $1",
    )
    .bind(saga.saga_id)
    .bind(state)
    .execute(&mut *conn)
    .await
    .context("reopening a saga")?;
    Ok(())
}

/// Where saga events go, in the caller's transaction.
#[derive(Clone, Copy)]
pub(crate) struct Events<'a> {
    pub(crate) publisher: &'a Publisher,
    pub(crate) journal: Option<&'a dyn Journal>,
}

impl Events<'_> {
    /// Records `events` in the journal, and puts on the topic (through the
    /// outbox) those worth publishing: with a journal, what a saga came to
    /// rather than each of its steps.
    ///
    /// Writes the outbox and the journal's tables, in the caller's
    /// transaction, and is fenced by it: [`write`]'s fenced update, or a
    /// new saga's insert ([`create`]).
    pub(crate) async fn write(
        &self,
        conn: &mut PgConnection,
        events: &[EventEnvelope],
    ) -> anyhow::Result<()> {
        let Some(journal) = self.journal else {
            return self.publisher.enqueue(conn, events).await;
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
        self.publisher.enqueue(conn, &published).await
    }
}

/// A step's success or failure, as opposed to what the saga came to.
fn is_step_event(event_type: &str) -> bool {
    use prost::Name as _;
    event_type == api_saga::v1::SagaStepSucceeded::full_name()
        || event_type == api_saga::v1::SagaStepFailed::full_name()
}

/// When the next saga becomes claimable: its work falls due, or the lease
/// of a replica that stopped renewing runs out. Reads only.
pub(crate) async fn next_due(pool: &PgPool) -> anyhow::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar(
        "SELECT min(greatest(next_run_at, coalesce(lease_expires_at, next_run_at)))
         FROM saga_instances WHERE next_run_at IS NOT NULL AND state IN ('running', 'compensating')",
    )
    .fetch_one(pool)
    .await
    .context("finding the next due saga")
}

/// A listener on the channel where the `saga_work_notify` trigger announces
/// work due now, in this schema (the pool's `current_schema()`). Writes
/// nothing.
pub(crate) async fn listen(pool: &PgPool) -> anyhow::Result<PgListener> {
    let schema: String = sqlx::query_scalar("SELECT current_schema()")
        .fetch_one(pool)
        .await
        .context("reading the current schema")?;
    let mut listener = PgListener::connect_with(pool)
        .await
        .context("connecting a listener")?;
    listener
        .listen(&format!("{schema}.saga_work"))
        .await
        .context("listening for due work")?;
    Ok(listener)
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
