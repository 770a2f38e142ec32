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
//! | `claim`                | `saga_instances` (lease, fence + 1, signal   | takes the fence, under `FOR UPDATE SKIP LOCKED`, of    |
//! |                        | flag cleared)                                | sagas whose lease is free or has run out, of the       |
//! |                        |                                              | definitions (type, version) the engine carries         |
//! | `write`                | `saga_instances`, `saga_steps`, outbox,      | `WHERE fence = $2` on the row's update, which locks    |
//! |                        | journal; and for a saga with children or a   | the row before anything else is written; the child     |
//! |                        | parent: children started (insert), children  | requests and the parent's wake-up are under those      |
//! |                        | asked to compensate (a completed one         | rows' locks, as `request_compensation`, `reopen` and   |
//! |                        | reopened, fence + 1), the parent woken       | `keep_signal` are                                      |
//! | `request_compensation` | `saga_instances` (the request, next run)     | the row lock of `lock`; leaves the fence, so the owner |
//! |                        |                                              | acts on the request between steps                      |
//! | `reopen`               | `saga_steps`, `saga_instances` (state,       | the row lock of `lock`; takes a new fence, so whoever  |
//! |                        | lease cleared, fence + 1)                    | held the saga is fenced off                            |
//! | `request_pause`,       | `saga_instances` (`pause_requested_at`)      | the row lock of `lock`; leaves the fence, so the owner |
//! | `withdraw_pause`       |                                              | pauses between steps (see `write`)                     |
//! | `pause`, `resume`      | `saga_instances` (state; `resume` also the   | the row lock of `lock`; takes a new fence, so whoever  |
//! |                        | unfinished steps' deadlines), fence + 1      | held the saga is fenced off                            |
//! | `terminate`            | `saga_instances` (a saga and the children    | the row locks of `lock` and `descendants`; takes new   |
//! |                        | under it: state, fence + 1; a parent not     | fences; the wake-up as `keep_signal`'s                 |
//! |                        | terminated with them woken)                  |                                                        |
//! | `flag_stuck`           | `saga_instances` (`stuck_since`, reason)     | nothing: only the flag, set once (`stuck_since IS      |
//! |                        |                                              | NULL`), which the owner's next progress clears (or,    |
//! |                        |                                              | for a parent waiting on a child, the child's)          |
//! | `keep_signal`          | `saga_signals` (insert), `saga_instances`    | the row lock of `lock`; leaves the fence, so the owner |
//! |                        | (`signal_pending`, next run)                 | reads the signal once it releases the saga             |
//! | `carry`                | `saga_definitions` (upsert)                  | nothing to fence: it only extends `carried_until`      |
//! | `Events::write`        | outbox, journal                              | the transaction it joins: `create`'s, `write`'s or a   |
//! |                        |                                              | request's                                              |
//!
//! `lock` and `descendants` write nothing: they take the row locks that
//! order a request against the owners' turns. The rest only read: `load`, `load_instance`,
//! `steps`, `find_by_business_key`, `find_by_correlation`, `trace_context`, `list`,
//! `search`, `explain_search`, `next_due`, `next_stuck`, `explain_stuck`, `signals`, `find_signal`,
//! `carried_definitions`, `unknown_version_count`, and `listen` (the channel on which
//! the trigger of `0001_sagas.sql` announces due work).
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
    /// Stopped between steps by an operator, until resumed.
    Paused,
    /// Stopped for good by an operator, without compensating.
    Terminated,
}

impl SagaState {
    pub const ALL: [Self; 7] = [
        Self::Running,
        Self::Compensating,
        Self::Completed,
        Self::Compensated,
        Self::Failed,
        Self::Paused,
        Self::Terminated,
    ];

    /// The value as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Compensating => "compensating",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
            Self::Failed => "failed",
            Self::Paused => "paused",
            Self::Terminated => "terminated",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == text)
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Compensated | Self::Terminated)
    }

    /// The state as the API and the saga events name it.
    pub fn to_proto(self) -> api_saga::v1::SagaState {
        use api_saga::v1::SagaState as Wire;
        match self {
            Self::Running => Wire::Running,
            Self::Compensating => Wire::Compensating,
            Self::Completed => Wire::Completed,
            Self::Compensated => Wire::Compensated,
            Self::Failed => Wire::Failed,
            Self::Paused => Wire::Paused,
            Self::Terminated => Wire::Terminated,
        }
    }

    /// The state the API names; `None` for UNSPECIFIED.
    pub fn from_proto(state: api_saga::v1::SagaState) -> Option<Self> {
        use api_saga::v1::SagaState as Wire;
        Some(match state {
            Wire::Unspecified => return None,
            Wire::Running => Self::Running,
            Wire::Compensating => Self::Compensating,
            Wire::Completed => Self::Completed,
            Wire::Compensated => Self::Compensated,
            Wire::Failed => Self::Failed,
            Wire::Paused => Self::Paused,
            Wire::Terminated => Self::Terminated,
        })
    }

    /// Whether the engine drives a saga in this state (claims it, runs its
    /// timers, counts it stuck).
    pub fn is_driven(self) -> bool {
        matches!(self, Self::Running | Self::Compensating)
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
    /// Its condition did not hold: it never ran, and has nothing to undo.
    Skipped,
}

impl StepStatus {
    pub const ALL: [Self; 5] = [
        Self::Waiting,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Skipped,
    ];

    /// The value as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }

    /// Done with, one way or the other: it will not run again.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Skipped)
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
    /// The version of its definition the saga runs on.
    pub version: i32,
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
    /// A pause accepted while a replica drove the saga, not yet taken.
    pub pause_requested_at: Option<DateTime<Utc>>,
    /// While paused: since when, and the state resuming returns it to.
    pub paused_at: Option<DateTime<Utc>>,
    pub paused_from: Option<SagaState>,
    /// Terminated: steps that may have taken effect, not compensated.
    pub left_in_effect: Option<Vec<String>>,
    /// When a step last succeeded or the saga last changed state.
    pub progressed_at: DateTime<Utc>,
    /// Set while the saga is stuck: since when, and why.
    pub stuck_since: Option<DateTime<Utc>>,
    pub stuck_reason: Option<String>,
    /// A signal arrived (or a child saga ended) that the replica driving
    /// it may not have read.
    pub signal_pending: bool,
    /// Released waiting for a child saga that runs (or compensates, or is
    /// paused): not stuck for want of progress while it waits; see
    /// [`flag_stuck`].
    pub awaits_child: bool,
    /// The saga and step that started this one as a child.
    pub parent_saga_id: Option<Uuid>,
    pub parent_step: Option<String>,
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
            version: 1,
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
            pause_requested_at: None,
            paused_at: None,
            paused_from: None,
            left_in_effect: None,
            progressed_at: now,
            stuck_since: None,
            stuck_reason: None,
            signal_pending: false,
            awaits_child: false,
            parent_saga_id: None,
            parent_step: None,
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
        "saga_id, saga_type, version, business_key, state, data, correlation_id, position, failure_reason, \
         compensation_requested, forward_only_since, overdue_step, overdue_since, pause_requested_at, paused_at, \
         paused_from, left_in_effect, progressed_at, stuck_since, stuck_reason, signal_pending, awaits_child, parent_saga_id, parent_step, next_run_at, lease_owner, \
         lease_expires_at, fence, created_at, updated_at, finished_at"
    };
}

/// The (type, version) pairs no live replica carries, as a subquery.
macro_rules! uncarried {
    () => {
        "SELECT saga_type, version FROM saga_definitions WHERE carried_until <= now()"
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

/// The saga's row, in the caller's transaction. Reads only.
pub(crate) async fn load_instance(
    conn: &mut PgConnection,
    saga_id: Uuid,
) -> anyhow::Result<Option<Instance>> {
    sqlx::query_as(concat!(
        "SELECT ",
        instance_columns!(),
        " FROM saga_instances WHERE saga_id = $1"
    ))
    .bind(saga_id)
    .fetch_optional(&mut *conn)
    .await
    .context("reading a saga")
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

/// The W3C trace context a saga continues (the trace of what started it),
/// as header pairs; `None` if there is no such saga. Reads only.
pub async fn trace_context(
    pool: &PgPool,
    saga_id: Uuid,
) -> anyhow::Result<Option<Vec<(String, String)>>> {
    let context: Option<Json<Vec<(String, String)>>> =
        sqlx::query_scalar("SELECT trace_context FROM saga_instances WHERE saga_id = $1")
            .bind(saga_id)
            .fetch_optional(pool)
            .await
            .context("reading a saga's trace context")?;
    Ok(context.map(|context| context.0))
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

/// What a saga search asks for: every filter set must hold. Each is
/// served by an index of `0004_search.sql` (or, for stuck sagas, of
/// `0003_operator_controls.sql`).
#[derive(Debug, Clone, Default)]
pub struct SagaFilter {
    /// Any of these states; empty means any state.
    pub states: Vec<SagaState>,
    pub saga_type: Option<String>,
    /// Started in `[created_after, created_before)`.
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
    /// Finished (or failed) in `[finished_after, finished_before)`.
    pub finished_after: Option<DateTime<Utc>>,
    pub finished_before: Option<DateTime<Utc>>,
    /// A fragment of the failure reason, in any case (at least three
    /// characters, or the trigram index cannot narrow it down).
    pub failure_reason_contains: Option<String>,
    pub business_key: Option<String>,
    /// The customer the saga acts for: its data's `customer_id`.
    pub customer_id: Option<String>,
    pub stuck_only: bool,
    /// Only this version of `saga_type` (which it needs).
    pub version: Option<i32>,
    /// Only unfinished sagas of a version no live replica carries.
    pub unknown_version_only: bool,
}

/// Where a page of a search starts: before (created_at, saga_id), newest
/// first.
pub type SearchCursor = ListCursor;

/// The search statement: only the filters that are set, so that each
/// combination is a statement of its own whose plan uses their indexes
/// (a `$1 IS NULL OR ...` clause would leave a generic plan scanning).
fn search_query(
    prefix: &str,
    filter: &SagaFilter,
    before: Option<SearchCursor>,
    limit: i64,
) -> sqlx::QueryBuilder<Postgres> {
    let mut query = sqlx::QueryBuilder::new(format!(
        concat!(
            "{}SELECT ",
            instance_columns!(),
            " FROM saga_instances WHERE true"
        ),
        prefix
    ));
    // One state by `=`, so that its index also gives the page order.
    match filter.states.as_slice() {
        [] => {}
        [state] => {
            query.push(" AND state = ").push_bind(*state);
        }
        states => {
            query
                .push(" AND state = ANY(")
                .push_bind(states.to_vec())
                .push(")");
        }
    }
    if let Some(saga_type) = &filter.saga_type {
        query.push(" AND saga_type = ").push_bind(saga_type.clone());
    }
    if let Some(version) = filter.version {
        query.push(" AND version = ").push_bind(version);
    }
    if filter.unknown_version_only {
        // The partial index's predicate, spelled out so that the plan may use it.
        query.push(concat!(
            " AND state IN ('running', 'compensating', 'paused', 'failed')",
            " AND (saga_type, version) IN (",
            uncarried!(),
            ")"
        ));
    }
    if let Some(after) = filter.created_after {
        query.push(" AND created_at >= ").push_bind(after);
    }
    if let Some(before) = filter.created_before {
        query.push(" AND created_at < ").push_bind(before);
    }
    if let Some(after) = filter.finished_after {
        query.push(" AND finished_at >= ").push_bind(after);
    }
    if let Some(before) = filter.finished_before {
        query.push(" AND finished_at < ").push_bind(before);
    }
    if let Some(fragment) = &filter.failure_reason_contains {
        let escaped = fragment
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        query
            .push(" AND failure_reason ILIKE ")
            .push_bind(format!("%{escaped}%"));
    }
    if let Some(key) = &filter.business_key {
        query.push(" AND business_key = ").push_bind(key.clone());
    }
    if let Some(customer) = &filter.customer_id {
        // The index's predicate, spelled out so that the plan may use it.
        query
            .push(" AND data ? 'customer_id' AND data ->> 'customer_id' = ")
            .push_bind(customer.clone());
    }
    if filter.stuck_only {
        query.push(" AND stuck_since IS NOT NULL");
    }
    if let Some(cursor) = before {
        query
            .push(" AND (created_at, saga_id) < (")
            .push_bind(cursor.created_at)
            .push(", ")
            .push_bind(cursor.saga_id)
            .push(")");
    }
    query
        .push(" ORDER BY created_at DESC, saga_id DESC LIMIT ")
        .push_bind(limit);
    query
}

/// Sagas matching `filter`, newest first, starting before `before`.
/// Reads only.
pub async fn search(
    pool: &PgPool,
    filter: &SagaFilter,
    before: Option<SearchCursor>,
    limit: i64,
) -> anyhow::Result<Vec<Instance>> {
    search_query("", filter, before, limit)
        .build_query_as()
        .fetch_all(pool)
        .await
        .context("searching sagas")
}

/// The plan PostgreSQL makes for [`search`] with these arguments (EXPLAIN,
/// not run), for the tests that check each filter is served by an index,
/// and for an operator wondering why a search is slow. Reads only.
pub async fn explain_search(
    pool: &PgPool,
    filter: &SagaFilter,
    before: Option<SearchCursor>,
    limit: i64,
) -> anyhow::Result<String> {
    let lines: Vec<String> = search_query("EXPLAIN ", filter, before, limit)
        .build_query_scalar()
        .fetch_all(pool)
        .await
        .context("explaining a saga search")?;
    Ok(lines.join("\n"))
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
             (saga_id, saga_type, version, business_key, state, data, correlation_id, trace_context, next_run_at,
              lease_owner, lease_expires_at, fence)
         VALUES ($1, $2, $9, $3, 'running', $4, $5, $6, now(), $7, now() + $8, CASE WHEN $7 IS NULL THEN 0 ELSE 1 END)
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
    .bind(new.version)
    .fetch_optional(&mut *conn)
    .await
    .context("starting a saga")
}

/// A saga about to be created.
pub(crate) struct NewSaga<'a> {
    pub(crate) saga_id: Uuid,
    pub(crate) saga_type: &'a str,
    pub(crate) version: i32,
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
    /// Its signals, read only for a definition with steps that wait for one.
    pub signals: Vec<Signal>,
    /// Its child sagas, read only for a definition with steps that start one.
    pub children: Vec<Child>,
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

/// The (type, version) pairs of the definitions an engine carries, as the
/// two arrays its statements bind.
#[derive(Debug, Clone, Default)]
pub struct Carried {
    pub types: Vec<String>,
    pub versions: Vec<i32>,
}

impl Carried {
    pub fn of(definitions: &[(&str, i32)]) -> Self {
        Self {
            types: definitions.iter().map(|(t, _)| (*t).to_owned()).collect(),
            versions: definitions.iter().map(|(_, v)| *v).collect(),
        }
    }
}

/// Claims up to `limit` sagas with work due now whose lease is free or
/// expired, among those whose definition (type and version) this engine
/// carries: each gets this worker as owner and a new fence, and comes back
/// whole (with its step log), so the engine drives it from memory. A saga
/// of a version this engine lacks is never claimed: it is left for a
/// replica that has it.
///
/// Writes `saga_instances` (lease owner, lease expiry, fence + 1, signal
/// flag cleared: the engine reads the signals next). It does not check a
/// fence, it takes one: `FOR UPDATE SKIP LOCKED` keeps two replicas from
/// claiming one saga, only a free or expired lease is taken, and the new
/// fence refuses every later write of the previous owner. Reads
/// `saga_instances_due_by_definition`, one range per carried definition.
pub async fn claim(
    pool: &PgPool,
    worker: &str,
    carried: &Carried,
    limit: i64,
    lease: Duration,
) -> anyhow::Result<Vec<Claimed>> {
    let rows: Vec<ClaimedRow> = sqlx::query_as(
        "WITH due AS (
             SELECT i.saga_id FROM unnest($4::text[], $5::int4[]) AS d (saga_type, version)
             CROSS JOIN LATERAL (
                 SELECT saga_id, next_run_at FROM saga_instances
                 WHERE saga_type = d.saga_type AND version = d.version
                   AND next_run_at <= now()
                   AND state IN ('running', 'compensating')
                   AND (lease_expires_at IS NULL OR lease_expires_at < now())
                 ORDER BY next_run_at
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED
             ) i
             ORDER BY i.next_run_at
             LIMIT $2
         )
         UPDATE saga_instances s
         SET lease_owner = $1, lease_expires_at = now() + $3, fence = s.fence + 1, signal_pending = false
         FROM due WHERE s.saga_id = due.saga_id
         RETURNING s.*",
    )
    .bind(worker)
    .bind(limit)
    .bind(chrono::Duration::from_std(lease)?)
    .bind(&carried.types)
    .bind(&carried.versions)
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
            signals: Vec::new(),
            children: Vec::new(),
        })
        .collect())
}

/// A saga started by a step of another (`saga_instances.parent_saga_id`).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Child {
    pub saga_id: Uuid,
    pub saga_type: String,
    pub parent_saga_id: Uuid,
    pub parent_step: String,
    pub state: SagaState,
    pub failure_reason: Option<String>,
    /// Its pivot may have taken effect: it cannot be undone.
    pub forward_only: bool,
}

/// The child sagas of `parents`. Reads only (`saga_instances_children`).
pub async fn children(
    executor: impl sqlx::PgExecutor<'_>,
    parents: &[Uuid],
) -> anyhow::Result<Vec<Child>> {
    sqlx::query_as(
        "SELECT saga_id, saga_type, parent_saga_id, parent_step, state, failure_reason,
                forward_only_since IS NOT NULL AS forward_only
         FROM saga_instances WHERE parent_saga_id = ANY($1) ORDER BY created_at",
    )
    .bind(parents)
    .fetch_all(executor)
    .await
    .context("reading child sagas")
}

/// A child saga a turn starts.
#[derive(Debug, Clone)]
pub(crate) struct NewChild {
    pub(crate) saga_id: Uuid,
    pub(crate) saga_type: &'static str,
    pub(crate) version: i32,
    pub(crate) step: &'static str,
    pub(crate) data: serde_json::Value,
}

/// A signal sent to a saga (`saga_signals`).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Signal {
    pub signal_id: String,
    pub signal: String,
    pub payload: Json<serde_json::Value>,
    pub received_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct SagaSignal {
    saga_id: Uuid,
    #[sqlx(flatten)]
    signal: Signal,
}

/// The signals of `saga_ids`, each saga's in the order they arrived.
/// Reads only (the primary key of `saga_signals`).
pub(crate) async fn signals(
    executor: impl sqlx::PgExecutor<'_>,
    saga_ids: &[Uuid],
) -> anyhow::Result<HashMap<Uuid, Vec<Signal>>> {
    let rows: Vec<SagaSignal> = sqlx::query_as(
        "SELECT saga_id, signal_id, signal, payload, received_at FROM saga_signals
         WHERE saga_id = ANY($1) ORDER BY seq",
    )
    .bind(saga_ids)
    .fetch_all(executor)
    .await
    .context("reading sagas' signals")?;
    let mut by_saga: HashMap<Uuid, Vec<Signal>> = HashMap::new();
    for row in rows {
        by_saga.entry(row.saga_id).or_default().push(row.signal);
    }
    Ok(by_saga)
}

/// The signal `signal_id` of the saga, if it was received. Reads only.
pub(crate) async fn find_signal(
    conn: &mut PgConnection,
    saga_id: Uuid,
    signal_id: &str,
) -> anyhow::Result<Option<Signal>> {
    sqlx::query_as(
        "SELECT signal_id, signal, payload, received_at FROM saga_signals
         WHERE saga_id = $1 AND signal_id = $2",
    )
    .bind(saga_id)
    .bind(signal_id)
    .fetch_optional(&mut *conn)
    .await
    .context("finding a signal")
}

/// Keeps a signal for the saga, and makes the saga due now unless a
/// replica holds it or it is paused; either way `signal_pending` tells the
/// replica that releases it next to make it due, so the signal is read.
///
/// Writes `saga_signals` (insert) and `saga_instances` (`signal_pending`,
/// `next_run_at`). Not fenced, on purpose, as [`request_compensation`]:
/// under the row lock of [`lock`], so the owner's next write sees the flag.
pub(crate) async fn keep_signal(
    conn: &mut PgConnection,
    saga: &Locked,
    signal_id: &str,
    signal: &str,
    payload: &serde_json::Value,
) -> anyhow::Result<Signal> {
    let kept = sqlx::query_as(
        "INSERT INTO saga_signals (saga_id, signal_id, signal, payload) VALUES ($1, $2, $3, $4)
         RETURNING signal_id, signal, payload, received_at",
    )
    .bind(saga.saga_id)
    .bind(signal_id)
    .bind(signal)
    .bind(Json(payload))
    .fetch_one(&mut *conn)
    .await
    .context("keeping a signal")?;
    sqlx::query(
        "UPDATE saga_instances SET signal_pending = true,
             next_run_at = CASE WHEN lease_owner IS NULL AND state = 'running' THEN now() ELSE next_run_at END
         WHERE saga_id = $1",
    )
    .bind(saga.saga_id)
    .execute(&mut *conn)
    .await
    .context("announcing a signal")?;
    Ok(kept)
}

/// Says that this engine carries `carried`, until `until` from now (or
/// later, if another replica said so). Writes `saga_definitions` (upsert);
/// nothing to fence: it only extends what replicas have said.
pub(crate) async fn carry(pool: &PgPool, carried: &Carried, until: Duration) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO saga_definitions (saga_type, version, carried_until)
         SELECT saga_type, version, now() + $3 FROM unnest($1::text[], $2::int4[]) AS d (saga_type, version)
         ON CONFLICT (saga_type, version) DO UPDATE
             SET carried_until = greatest(saga_definitions.carried_until, EXCLUDED.carried_until)",
    )
    .bind(&carried.types)
    .bind(&carried.versions)
    .bind(chrono::Duration::from_std(until).context("carried for")?)
    .execute(pool)
    .await
    .context("saying which definitions this replica carries")?;
    Ok(())
}

/// The definitions (type, version) that some live replica carries. Reads
/// only (`saga_definitions`, a row per definition ever carried).
pub async fn carried_definitions(
    executor: impl sqlx::PgExecutor<'_>,
) -> anyhow::Result<Vec<(String, i32)>> {
    sqlx::query_as("SELECT saga_type, version FROM saga_definitions WHERE carried_until > now()")
        .fetch_all(executor)
        .await
        .context("reading which definitions live replicas carry")
}

/// Unfinished sagas (running, compensating, paused or failed) of a
/// version no live replica carries: nothing drives them until one does.
/// Reads `saga_definitions` and `saga_instances_unfinished`:
/// only those sagas, never finished history.
pub async fn unknown_version_count(executor: impl sqlx::PgExecutor<'_>) -> anyhow::Result<i64> {
    sqlx::query_scalar(concat!(
        "SELECT count(*) FROM saga_instances
         WHERE state IN ('running', 'compensating', 'paused', 'failed')
           AND (saga_type, version) IN (",
        uncarried!(),
        ")"
    ))
    .fetch_one(executor)
    .await
    .context("counting sagas of a version no replica carries")
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
    /// Rolled back: the turn began attempts, and a request that must come
    /// first was accepted since the saga was read (a compensation, before
    /// forward attempts; a pause, before any). The saga's row as it stands,
    /// for its requests.
    Interrupted(Box<Instance>),
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
/// attempts; or a pause request, and rolls back a turn that begins any
/// ([`Written::Interrupted`]). Released with a pause request pending, the
/// saga is due at once, so that some replica pauses it now rather than
/// when its timer fires.
///
/// Progress (a step succeeded, the state or position changed) clears the
/// stuck flag, unless a step is still past its deadline; a turn that finds
/// a step past its deadline sets it, unless set already. A saga released
/// to wait for a signal counts its progress from its timer: waiting is not
/// being stuck. Released to wait for a child saga that is running, it is
/// marked as waiting for it (`awaits_child`), and out of the detector's
/// index of sagas that may become stuck until it is written again: its
/// progress is counted from then, as the wait was not being stuck. Released
/// with a signal pending (one arrived, or a child ended, while this replica
/// held the saga), it is due at once, so that its signals are read; it is
/// left marked as the signal left it (a child's end clears the mark).
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
                 next_run_at = CASE
                     WHEN $12 THEN next_run_at
                     WHEN pause_requested_at IS NOT NULL AND NOT $26 AND $3 IN ('running', 'compensating') THEN now()
                     WHEN signal_pending AND $3 IN ('running', 'compensating') THEN now()
                     ELSE $13 END,
                 lease_owner = CASE WHEN $12 THEN lease_owner END,
                 lease_expires_at = CASE WHEN $12 THEN now() + $14 END,
                 updated_at = now(),
                 pause_requested_at = CASE WHEN $26 THEN NULL ELSE pause_requested_at END,
                 paused_at = $27, paused_from = $28,
                 progressed_at = CASE
                     WHEN $31::timestamptz IS NOT NULL THEN greatest(progressed_at, $31)
                     WHEN $29 OR awaits_child THEN now()
                     ELSE progressed_at END,
                 awaits_child = CASE WHEN signal_pending THEN awaits_child ELSE $32 END,
                 stuck_since = CASE
                     WHEN $3 NOT IN ('running', 'compensating') THEN NULL
                     WHEN $30::text IS NOT NULL THEN coalesce(stuck_since, now())
                     WHEN $29 AND $10::timestamptz IS NULL THEN NULL
                     ELSE stuck_since END,
                 stuck_reason = CASE
                     WHEN $3 NOT IN ('running', 'compensating') THEN NULL
                     WHEN $30::text IS NOT NULL THEN coalesce(stuck_reason, $30)
                     WHEN $29 AND $10::timestamptz IS NULL THEN NULL
                     ELSE stuck_reason END
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
    .bind(turn.clears_pause_request)
    .bind(instance.paused_at)
    .bind(instance.paused_from)
    .bind(turn.progressed)
    .bind(turn.flags_stuck.as_deref())
    .bind(turn.awaits_until)
    .bind(turn.awaits_child)
    .fetch_optional(&mut *tx)
    .await
    .context("writing the saga and its steps")?;
    let Some(written) = written else {
        return Err(WriteError::Fenced);
    };
    // The steps were written with it; rolling back undoes them too.
    let turns_back = turn.begins_forward
        && written.compensation_requested.is_some()
        && written.forward_only_since.is_none();
    let pauses = turn.begins_attempts && written.pause_requested_at.is_some();
    if turns_back || pauses {
        return Ok(Written::Interrupted(Box::new(written))); // dropping `tx` rolls it back
    }
    write_children(&mut tx, turn, &written).await?;
    events.write(&mut tx, &turn.events).await?;
    tx.commit().await.context("committing a turn")?;
    Ok(Written::Committed(Box::new(written)))
}

/// A turn's writes to other sagas, in its transaction, behind its fence:
/// the children it starts (running, due now, under a unique key of parent
/// and step), the compensation it asks of children (a running one is asked
/// between steps, a completed one reopened to compensate, unless past its
/// pivot: as [`request_compensation`] and [`reopen`] do, under the row's
/// lock that the update takes), and, for a child that ended, its parent's
/// wake-up (as [`keep_signal`]'s). Each is a statement only when there is
/// something to write: a saga without children pays nothing.
async fn write_children(
    conn: &mut PgConnection,
    turn: &Turn,
    written: &Instance,
) -> anyhow::Result<()> {
    if !turn.new_children.is_empty() {
        let new = &turn.new_children;
        sqlx::query(
            "INSERT INTO saga_instances (saga_id, saga_type, version, business_key, state, data, correlation_id,
                                         trace_context, next_run_at, parent_saga_id, parent_step)
             SELECT c.saga_id, c.saga_type, c.version, $1 || '/' || c.step, 'running', c.data, p.correlation_id,
                    p.trace_context, now(), $1, c.step
             FROM unnest($2::uuid[], $3::text[], $4::int4[], $5::text[], $6::jsonb[])
                  AS c (saga_id, saga_type, version, step, data),
                  saga_instances p
             WHERE p.saga_id = $1
             ON CONFLICT (saga_type, business_key) DO NOTHING",
        )
        .bind(written.saga_id)
        .bind(new.iter().map(|c| c.saga_id).collect::<Vec<_>>())
        .bind(new.iter().map(|c| c.saga_type).collect::<Vec<_>>())
        .bind(new.iter().map(|c| c.version).collect::<Vec<_>>())
        .bind(new.iter().map(|c| c.step).collect::<Vec<_>>())
        .bind(new.iter().map(|c| Json(c.data.clone())).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await
        .context("starting child sagas")?;
    }
    if !turn.child_requests.is_empty() {
        let asked = &turn.child_requests;
        sqlx::query(
            "UPDATE saga_instances c SET
                 compensation_requested = CASE WHEN c.state IN ('running', 'paused') AND c.forward_only_since IS NULL
                                               THEN r.reason ELSE c.compensation_requested END,
                 failure_reason = CASE WHEN c.state = 'completed' AND c.forward_only_since IS NULL
                                       THEN r.reason ELSE c.failure_reason END,
                 finished_at = CASE WHEN c.state = 'completed' AND c.forward_only_since IS NULL
                                    THEN NULL ELSE c.finished_at END,
                 next_run_at = CASE WHEN c.forward_only_since IS NULL
                                         AND (c.state = 'completed' OR (c.state = 'running' AND c.lease_owner IS NULL))
                                    THEN now() ELSE c.next_run_at END,
                 fence = CASE WHEN c.state = 'completed' AND c.forward_only_since IS NULL THEN c.fence + 1 ELSE c.fence END,
                 progressed_at = now(),
                 state = CASE WHEN c.state = 'completed' AND c.forward_only_since IS NULL
                              THEN 'compensating' ELSE c.state END
             FROM unnest($1::uuid[], $2::text[]) AS r (saga_id, reason)
             WHERE c.saga_id = r.saga_id",
        )
        .bind(asked.iter().map(|(id, _)| *id).collect::<Vec<_>>())
        .bind(asked.iter().map(|(_, reason)| reason.as_str()).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await
        .context("asking child sagas to compensate")?;
    }
    if let Some(parent) = written.parent_saga_id.filter(|_| {
        turn.counts
            .iter()
            .any(|c| matches!(c, crate::turn::Count::Finished(_)))
    }) {
        wake_parents(conn, &[parent]).await?;
    }
    Ok(())
}

/// Wakes the parents of child sagas that ended (completed, compensated,
/// failed or terminated): each reads its children when next claimed. A
/// parent is due now unless a replica holds it (`signal_pending` makes
/// that replica release it due now) or it is paused (it reads them once
/// resumed). It waits for its child no more: its progress is counted from
/// the child's end, so a parent that does not move on is stuck in time.
///
/// Writes `saga_instances` (`signal_pending`, `awaits_child`,
/// `progressed_at`, next run). Not fenced, as [`keep_signal`]: under the
/// row lock the update takes, which orders it against the parent's turns.
async fn wake_parents(conn: &mut PgConnection, parents: &[Uuid]) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE saga_instances SET signal_pending = true, awaits_child = false,
             progressed_at = greatest(progressed_at, now()),
             next_run_at = CASE WHEN lease_owner IS NULL AND state IN ('running', 'compensating')
                                THEN now() ELSE next_run_at END
         WHERE saga_id = ANY($1)",
    )
    .bind(parents)
    .execute(&mut *conn)
    .await
    .context("waking a child saga's parent")?;
    Ok(())
}

/// A saga's row, locked for the caller's transaction by [`lock`]: what a
/// request is decided on.
#[derive(Debug, Clone)]
pub(crate) struct Locked {
    pub(crate) saga_id: Uuid,
    pub(crate) state: SagaState,
    pub(crate) saga_type: String,
    pub(crate) version: i32,
    pub(crate) business_key: String,
    pub(crate) correlation_id: String,
    /// Since when the pivot may have taken effect.
    pub(crate) forward_only_since: Option<DateTime<Utc>>,
    /// A replica holds the saga's lease, and it has not run out: it may be
    /// mid-turn, with the saga in its memory.
    pub(crate) driven: bool,
    pub(crate) pause_requested: bool,
    /// While paused, the state resuming returns it to.
    pub(crate) paused_from: Option<SagaState>,
}

#[derive(sqlx::FromRow)]
struct LockedRow {
    state: SagaState,
    saga_type: String,
    version: i32,
    business_key: String,
    correlation_id: String,
    forward_only_since: Option<DateTime<Utc>>,
    driven: bool,
    pause_requested: bool,
    paused_from: Option<SagaState>,
}

/// Locks the saga's row for the caller's transaction (`SELECT ... FOR
/// UPDATE`), and reads what a request is decided on. Writes nothing; the
/// lock orders the request against the owner's turns, whose fenced update
/// waits for it: the owner sees the request's outcome, or the request sees
/// the turn's (the pivot begun, say).
pub(crate) async fn lock(conn: &mut PgConnection, saga_id: Uuid) -> anyhow::Result<Option<Locked>> {
    let row: Option<LockedRow> = sqlx::query_as(
        "SELECT state, saga_type, version, business_key, correlation_id, forward_only_since,
                coalesce(lease_owner IS NOT NULL AND lease_expires_at > now(), false) AS driven,
                pause_requested_at IS NOT NULL AS pause_requested, paused_from
         FROM saga_instances WHERE saga_id = $1 FOR UPDATE",
    )
    .bind(saga_id)
    .fetch_optional(&mut *conn)
    .await
    .context("locking a saga")?;
    Ok(row.map(|row| Locked {
        saga_id,
        state: row.state,
        saga_type: row.saga_type,
        version: row.version,
        business_key: row.business_key,
        correlation_id: row.correlation_id,
        forward_only_since: row.forward_only_since,
        driven: row.driven,
        pause_requested: row.pause_requested,
        paused_from: row.paused_from,
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
             next_run_at = CASE WHEN lease_owner IS NULL AND state IN ('running', 'compensating')
                                THEN now() ELSE next_run_at END
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
             lease_owner = NULL, lease_expires_at = NULL, fence = fence + 1, progressed_at = now()
         WHERE saga_id = $1",
    )
    .bind(saga.saga_id)
    .bind(state)
    .execute(&mut *conn)
    .await
    .context("reopening a saga")?;
    Ok(())
}

/// Records a pause request on a saga a replica is driving: that replica
/// pauses it at its next turn boundary (see [`write`]).
///
/// Writes `saga_instances` (`pause_requested_at`). Not fenced, on purpose,
/// as [`request_compensation`]: under the row lock of [`lock`], so the
/// owner's next turn sees it.
pub(crate) async fn request_pause(conn: &mut PgConnection, saga: &Locked) -> anyhow::Result<()> {
    sqlx::query("UPDATE saga_instances SET pause_requested_at = now() WHERE saga_id = $1")
        .bind(saga.saga_id)
        .execute(&mut *conn)
        .await
        .context("requesting a pause")?;
    Ok(())
}

/// Withdraws a pause request not yet taken. Writes `saga_instances`
/// (`pause_requested_at`), under the row lock of [`lock`].
pub(crate) async fn withdraw_pause(conn: &mut PgConnection, saga: &Locked) -> anyhow::Result<()> {
    sqlx::query("UPDATE saga_instances SET pause_requested_at = NULL WHERE saga_id = $1")
        .bind(saga.saga_id)
        .execute(&mut *conn)
        .await
        .context("withdrawing a pause request")?;
    Ok(())
}

/// Pauses a saga nobody is driving (its lease is free or ran out): no
/// work due, no lease, remembering the state to return to.
///
/// Writes `saga_instances` (state, `paused_at`, `paused_from`, no work due,
/// lease cleared, stuck flag cleared, fence + 1). Under the row lock of
/// [`lock`]; the new fence refuses any write of a replica whose lease ran
/// out while it stalled.
pub(crate) async fn pause(conn: &mut PgConnection, saga: &Locked) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE saga_instances SET state = 'paused', paused_from = state, paused_at = now(),
             pause_requested_at = NULL, next_run_at = NULL, lease_owner = NULL, lease_expires_at = NULL,
             stuck_since = NULL, stuck_reason = NULL, fence = fence + 1, updated_at = now()
         WHERE saga_id = $1",
    )
    .bind(saga.saga_id)
    .execute(&mut *conn)
    .await
    .context("pausing a saga")?;
    Ok(())
}

/// Resumes a paused saga in the state it was paused in, due now, its
/// progress counted from now. Its unfinished steps' deadlines move on by
/// the time it was paused: a paused saga's timers do not run.
///
/// Writes `saga_steps` (deadlines of unfinished executions) and
/// `saga_instances` (state, pause cleared, work due now, fence + 1). Under
/// the row lock of [`lock`].
pub(crate) async fn resume(
    conn: &mut PgConnection,
    saga: &Locked,
    state: SagaState,
) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE saga_steps st SET deadline_at = st.deadline_at + (now() - i.paused_at)
         FROM saga_instances i
         WHERE st.saga_id = $1 AND i.saga_id = $1 AND st.finished_at IS NULL
           AND st.deadline_at IS NOT NULL AND i.paused_at IS NOT NULL",
    )
    .bind(saga.saga_id)
    .execute(&mut *conn)
    .await
    .context("moving a paused saga's deadlines")?;
    sqlx::query(
        "UPDATE saga_instances SET state = $2, paused_from = NULL, paused_at = NULL,
             next_run_at = now(), progressed_at = now(), lease_owner = NULL, lease_expires_at = NULL,
             fence = fence + 1, updated_at = now()
         WHERE saga_id = $1",
    )
    .bind(saga.saga_id)
    .bind(state)
    .execute(&mut *conn)
    .await
    .context("resuming a saga")?;
    Ok(())
}

/// A saga to stop for good: why, and the steps it leaves in effect.
#[derive(Debug, Clone)]
pub(crate) struct Stop {
    pub(crate) saga_id: Uuid,
    pub(crate) reason: String,
    pub(crate) left_in_effect: Vec<String>,
}

/// Stops sagas for good, without compensating (a saga and the children
/// under it): each terminated, with its reason and the steps it leaves in
/// effect. The parent of a stopped saga that is not stopped with it (an
/// operator terminated a child) is woken, as by a child's last turn: for it,
/// its child ended.
///
/// Writes `saga_instances` (state, reason, steps left in effect, finished,
/// no work due, requests and flags cleared, lease cleared, fence + 1; and
/// the wake-up of [`wake_parents`]). Under the row locks of [`lock`] and
/// [`descendants`]; the new fence cuts off a replica mid attempt: its
/// outcome is never written.
pub(crate) async fn terminate(conn: &mut PgConnection, stops: &[Stop]) -> anyhow::Result<()> {
    let ids: Vec<Uuid> = stops.iter().map(|stop| stop.saga_id).collect();
    let parents: Vec<Uuid> = sqlx::query_scalar(
        "WITH stopped AS (
             UPDATE saga_instances s SET state = 'terminated', failure_reason = t.reason,
                 left_in_effect = ARRAY(SELECT jsonb_array_elements_text(t.left_in_effect)),
                 finished_at = now(), next_run_at = NULL, compensation_requested = NULL,
                 pause_requested_at = NULL, paused_at = NULL, paused_from = NULL,
                 stuck_since = NULL, stuck_reason = NULL, awaits_child = false,
                 lease_owner = NULL, lease_expires_at = NULL, fence = s.fence + 1, updated_at = now()
             FROM unnest($1::uuid[], $2::text[], $3::jsonb[]) AS t (saga_id, reason, left_in_effect)
             WHERE s.saga_id = t.saga_id
             RETURNING s.parent_saga_id
         )
         SELECT DISTINCT parent_saga_id FROM stopped
         WHERE parent_saga_id IS NOT NULL AND parent_saga_id <> ALL($1)",
    )
    .bind(&ids)
    .bind(stops.iter().map(|stop| stop.reason.as_str()).collect::<Vec<_>>())
    .bind(
        stops
            .iter()
            .map(|stop| Json(&stop.left_in_effect))
            .collect::<Vec<_>>(),
    )
    .fetch_all(&mut *conn)
    .await
    .context("terminating sagas")?;
    if !parents.is_empty() {
        wake_parents(conn, &parents).await?;
    }
    Ok(())
}

/// Every saga under `root` (its children, theirs, and so on), final or
/// not, each with its step log: parents before their children, siblings in
/// the order they started. Locks their rows for the caller's transaction,
/// after `root`'s (taken by [`lock`]): the order in which a parent's turn
/// takes them. Writes nothing. Two statements, whatever the family's size:
/// the tree through `saga_instances_children`, then the step logs.
pub(crate) async fn descendants(
    conn: &mut PgConnection,
    root: Uuid,
) -> anyhow::Result<Vec<SagaRecord>> {
    let instances: Vec<Instance> = sqlx::query_as(concat!(
        "WITH RECURSIVE tree (id, depth) AS (
             SELECT saga_id, 1 FROM saga_instances WHERE parent_saga_id = $1
             UNION ALL
             SELECT c.saga_id, tree.depth + 1 FROM saga_instances c JOIN tree ON c.parent_saga_id = tree.id
         )
         SELECT ",
        instance_columns!(),
        " FROM saga_instances JOIN tree ON saga_id = tree.id
         ORDER BY tree.depth, created_at, saga_id
         FOR UPDATE OF saga_instances"
    ))
    .bind(root)
    .fetch_all(&mut *conn)
    .await
    .context("reading and locking a saga's children")?;
    if instances.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = instances.iter().map(|i| i.saga_id).collect();
    let owned: Vec<OwnedStep> = sqlx::query_as(concat!(
        "SELECT saga_id, ",
        step_columns!(),
        " FROM saga_steps WHERE saga_id = ANY($1) ORDER BY seq"
    ))
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await
    .context("reading a saga's children's steps")?;
    let mut steps: HashMap<Uuid, Vec<StepRecord>> = HashMap::new();
    for step in owned {
        steps.entry(step.saga_id).or_default().push(step.record);
    }
    Ok(instances
        .into_iter()
        .map(|instance| SagaRecord {
            steps: steps.remove(&instance.saga_id).unwrap_or_default(),
            instance,
        })
        .collect())
}

/// The saga's step log, in the caller's transaction. Reads only.
pub(crate) async fn steps(
    conn: &mut PgConnection,
    saga_id: Uuid,
) -> anyhow::Result<Vec<StepRecord>> {
    sqlx::query_as(concat!(
        "SELECT ",
        step_columns!(),
        " FROM saga_steps WHERE saga_id = $1 ORDER BY seq"
    ))
    .bind(saga_id)
    .fetch_all(&mut *conn)
    .await
    .context("reading a saga's steps")
}

/// A saga just found stuck.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Stuck {
    pub saga_id: Uuid,
    pub saga_type: String,
    pub business_key: String,
    pub correlation_id: String,
    pub progressed_at: DateTime<Utc>,
    pub stuck_reason: String,
}

/// Flags the running and compensating sagas that have made no progress
/// for `stuck_after`, and returns them: each is returned once, to the one
/// caller whose statement flagged it, whichever replica that is.
///
/// Writes `saga_instances` (`stuck_since`, `stuck_reason`). Not fenced: it
/// touches neither fence nor lease, only the flag, which the owner's next
/// progress clears (see [`write`]). Reads the `saga_instances_unprogressed`
/// index: only sagas that may become stuck, never finished history.
///
/// A saga of a version no live replica carries is stuck too, at once
/// (nothing will drive it), found through
/// `saga_instances_unfinished`.
///
/// A parent waiting for a child saga (`awaits_child`) is not in that
/// index: its child's progress is its own, and the child is flagged on its
/// own. Such a parent is flagged when a child of it is, with the child's
/// reason, and a grandparent waiting on it in turn (a statement per
/// generation, over live sagas only: see `FLAG_PARENTS`); the flag is
/// cleared once none of its children is stuck any more. A child that ended
/// woke its parent and cleared its `awaits_child`, counting its progress
/// from then: a parent that does not move on is flagged like any saga.
pub async fn flag_stuck(pool: &PgPool, stuck_after: Duration) -> anyhow::Result<Vec<Stuck>> {
    let mut stuck: Vec<Stuck> = sqlx::query_as(concat!(
        "UPDATE saga_instances SET stuck_since = now(),
             stuck_reason = 'no live replica carries version ' || version || ' of its definition ' || saga_type
         WHERE state IN ('running', 'compensating') AND stuck_since IS NULL
           AND (saga_type, version) IN (",
        uncarried!(),
        ")
         RETURNING saga_id, saga_type, business_key, correlation_id, progressed_at, stuck_reason"
    ))
    .fetch_all(pool)
    .await
    .context("flagging sagas of a version no replica carries")?;
    let stuck_after = chrono::Duration::from_std(stuck_after).context("stuck after")?;
    let unprogressed: Vec<Stuck> = sqlx::query_as(FLAG_UNPROGRESSED)
        .bind(stuck_after)
        .fetch_all(pool)
        .await
        .context("flagging stuck sagas")?;
    stuck.extend(unprogressed);
    // A waiting parent flagged for a child that is stuck no more: its
    // other reasons (past a deadline, a version nobody carries) stay.
    sqlx::query(UNFLAG_PARENTS)
        .execute(pool)
        .await
        .context("clearing the flag of parents whose children moved on")?;
    // Up the family, a generation per statement (a family is a few deep).
    for _ in 0..MAX_GENERATIONS {
        let parents: Vec<Stuck> = sqlx::query_as(FLAG_PARENTS)
            .fetch_all(pool)
            .await
            .context("flagging the parents of stuck child sagas")?;
        if parents.is_empty() {
            break;
        }
        stuck.extend(parents);
    }
    Ok(stuck)
}

/// How many generations of waiting parents one [`flag_stuck`] flags above
/// a stuck child; the next pass goes on from there.
const MAX_GENERATIONS: usize = 8;

/// The sagas without progress for `$1`, flagged; through
/// `saga_instances_unprogressed`, whose predicate it spells out.
const FLAG_UNPROGRESSED: &str = "UPDATE saga_instances SET stuck_since = now(),
         stuck_reason = 'no progress since ' || to_char(progressed_at AT TIME ZONE 'UTC',
                                                        'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
     WHERE state IN ('running', 'compensating') AND stuck_since IS NULL AND NOT awaits_child
       AND progressed_at < now() - $1
     RETURNING saga_id, saga_type, business_key, correlation_id, progressed_at, stuck_reason";

/// The waiting parents of stuck children, flagged: from the few sagas
/// stuck now (`saga_instances_stuck`) or the unfinished ones
/// (`saga_instances_unfinished`), whichever the planner finds fewer, and
/// the other side by its key or `saga_instances_children`.
const FLAG_PARENTS: &str = "UPDATE saga_instances p SET stuck_since = now(),
         stuck_reason = 'child saga ' || c.saga_type || ' ' || c.saga_id || ' is stuck: '
                        || coalesce(c.stuck_reason, 'no reason given')
     FROM saga_instances c
     WHERE c.stuck_since IS NOT NULL AND c.parent_saga_id = p.saga_id
       AND p.awaits_child AND p.stuck_since IS NULL AND p.state IN ('running', 'compensating')
     RETURNING p.saga_id, p.saga_type, p.business_key, p.correlation_id, p.progressed_at, p.stuck_reason";

/// The waiting parents flagged for children stuck no more, cleared: from
/// the sagas stuck now (or the unfinished ones), each one's children by
/// `saga_instances_children`.
const UNFLAG_PARENTS: &str = concat!(
    "UPDATE saga_instances p SET stuck_since = NULL, stuck_reason = NULL
     WHERE p.stuck_since IS NOT NULL AND p.awaits_child AND p.overdue_since IS NULL
       AND p.state IN ('running', 'compensating')
       AND (p.saga_type, p.version) NOT IN (",
    uncarried!(),
    ")
       AND NOT EXISTS (SELECT FROM saga_instances c
                       WHERE c.parent_saga_id = p.saga_id AND c.stuck_since IS NOT NULL)"
);

/// The least progressed saga that may become stuck, `$1` on; through
/// `saga_instances_unprogressed`, whose predicate it spells out.
const NEXT_STUCK: &str =
    "SELECT extract(epoch FROM min(progressed_at) + $1 - now())::float8 FROM saga_instances
     WHERE state IN ('running', 'compensating') AND stuck_since IS NULL AND NOT awaits_child";

/// The plans PostgreSQL makes for the statements of [`flag_stuck`] and
/// [`next_stuck`] that look at progress (EXPLAIN, not run), by name
/// (`unprogressed`, `parents`, `moved on`, `next`): for the test that
/// checks each reads its index, not the history of finished sagas. Reads
/// only.
pub async fn explain_stuck(pool: &PgPool) -> anyhow::Result<Vec<(&'static str, String)>> {
    let hour = chrono::Duration::hours(1);
    let mut plans = Vec::new();
    for (name, statement, binds) in [
        ("unprogressed", FLAG_UNPROGRESSED, true),
        ("parents", FLAG_PARENTS, false),
        ("moved on", UNFLAG_PARENTS, false),
        ("next", NEXT_STUCK, true),
    ] {
        let explain = format!("EXPLAIN {statement}");
        let query = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(explain));
        let query = if binds { query.bind(hour) } else { query };
        let lines: Vec<String> = query
            .fetch_all(pool)
            .await
            .with_context(|| format!("explaining the stuck statement {name}"))?;
        plans.push((name, lines.join("\n")));
    }
    Ok(plans)
}

/// How long until the next saga could become stuck (the least progressed
/// of those not flagged, and not waiting for a child), if any may. Reads
/// only, from the `saga_instances_unprogressed` index: a parent waiting
/// for a child, however old its progress, is not in it.
pub async fn next_stuck(pool: &PgPool, stuck_after: Duration) -> anyhow::Result<Option<Duration>> {
    let stuck_after = chrono::Duration::from_std(stuck_after).context("stuck after")?;
    let seconds: Option<f64> = sqlx::query_scalar(NEXT_STUCK)
        .bind(stuck_after)
        .fetch_one(pool)
        .await
        .context("finding the next saga that may become stuck")?;
    Ok(seconds.map(|seconds| Duration::from_secs_f64(seconds.max(0.0))))
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
        || event_type == api_saga::v1::SagaStepSkipped::full_name()
}

/// When the next saga becomes claimable: its work falls due, or the lease
/// of a replica that stopped renewing runs out. Reads only.
/// Only the sagas of definitions this engine carries count: one it cannot
/// run must not wake it.
pub(crate) async fn next_due(
    pool: &PgPool,
    carried: &Carried,
) -> anyhow::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar(
        "SELECT min(greatest(next_run_at, coalesce(lease_expires_at, next_run_at)))
         FROM saga_instances
         WHERE next_run_at IS NOT NULL AND state IN ('running', 'compensating')
           AND (saga_type, version) IN (SELECT * FROM unnest($1::text[], $2::int4[]))",
    )
    .bind(&carried.types)
    .bind(&carried.versions)
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

/// The purge of sagas that completed or compensated longer than
/// `retention` ago, each with its steps (`ON DELETE CASCADE`: a handful of
/// rows per saga). A saga still running or compensating, or failed and
/// waiting for an operator, is never purged.
///
/// A child whose parent has not finished is kept: the parent may yet have
/// to compensate it.
///
/// Keep `retention` longer than the inbox's: together with the inbox row,
/// a saga's unique business key is what makes a late redelivery of the
/// event that started it start nothing.
pub fn finished_purge(retention: Duration) -> database::PurgeTarget {
    database::PurgeTarget {
        table: "saga_instances",
        retention,
        // Oldest first through `saga_instances_ended_by_age`.
        statement: "DELETE FROM saga_instances WHERE ctid = ANY(ARRAY(
                        SELECT ctid FROM saga_instances
                        WHERE state IN ('completed', 'compensated') AND finished_at < now() - $1
                          AND (parent_saga_id IS NULL OR NOT EXISTS (
                                   SELECT FROM saga_instances p
                                   WHERE p.saga_id = saga_instances.parent_saga_id AND p.finished_at IS NULL))
                        ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED))",
    }
}

/// Whether `error` is PostgreSQL's breaking of a deadlock (40P01): the
/// transaction was rolled back, and may be run again.
pub(crate) fn is_deadlock(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<sqlx::Error>()
            .and_then(|error| error.as_database_error())
            .and_then(|error| error.code())
            .is_some_and(|code| code == "40P01")
    })
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
