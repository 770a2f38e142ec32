//! The engine: claims sagas with due work, drives each until it waits or
//! ends, and records every transition in one fenced transaction.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use api_saga::v1 as pb;
use chrono::{DateTime, Utc};
use messaging::envelope::EventMeta;
use prost::{Message, Name};
use sqlx::postgres::PgListener;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use telemetry::CorrelationId;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::definition::{SagaDefinition, Step, StepClass, StepContext, StepError};
use crate::plan::{Plan, Transition, plan};
use crate::store::{self, Kind, SagaRecord, SagaState, WriteError};

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This replica's name in leases (host name and process id, say).
    pub worker_id: String,
    /// How long a claim lasts. Longer than any attempt, so a live replica
    /// never loses a saga mid-step; a dead one's sagas wait this long.
    pub lease: Duration,
    /// Sagas driven at once by this replica.
    pub concurrency: usize,
    /// Topic of the saga events, and the producer named in their envelopes.
    pub events_topic: String,
    pub producer: &'static str,
}

/// The saga engine of one replica.
pub struct Engine {
    pool: PgPool,
    definitions: HashMap<&'static str, SagaDefinition>,
    config: EngineConfig,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What an operator's or customer's request found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Done, or will be between steps.
    Accepted,
    /// The saga was already in this final (or failed) state.
    NotApplicable(SagaState),
    /// The saga's pivot may have taken effect (its first attempt began at
    /// `since`): it only goes forward, and cannot be compensated.
    ForwardOnly {
        pivot: &'static str,
        since: DateTime<Utc>,
    },
    NotFound,
}

impl Engine {
    /// An engine for `definitions`. Every attempt must fit in the lease.
    pub fn new(
        pool: PgPool,
        definitions: Vec<SagaDefinition>,
        config: EngineConfig,
    ) -> anyhow::Result<Self> {
        for definition in &definitions {
            definition.validate()?;
            if definition.longest_attempt() >= config.lease {
                bail!(
                    "saga {} has an attempt timeout longer than the lease",
                    definition.name
                );
            }
        }
        let definitions = definitions.into_iter().map(|d| (d.name, d)).collect();
        Ok(Self {
            pool,
            definitions,
            config,
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The definition of `saga_type`, if this engine runs it.
    pub fn definition(&self, saga_type: &str) -> Option<&SagaDefinition> {
        self.definitions.get(saga_type)
    }

    /// Starts a saga of `saga_type` for `business_key` in the caller's
    /// transaction, unless one exists: `None` then. Work is due at once and
    /// the engines are woken when the transaction commits.
    pub async fn start(
        &self,
        conn: &mut PgConnection,
        saga_type: &str,
        business_key: &str,
        data: serde_json::Value,
        correlation_id: &str,
    ) -> anyhow::Result<Option<Uuid>> {
        let saga_id = Uuid::now_v7();
        let inserted = sqlx::query(
            "INSERT INTO saga_instances
                 (saga_id, saga_type, business_key, state, data, correlation_id, trace_context, next_run_at)
             VALUES ($1, $2, $3, 'running', $4, $5, $6, now())
             ON CONFLICT (saga_type, business_key) DO NOTHING",
        )
        .bind(saga_id)
        .bind(saga_type)
        .bind(business_key)
        .bind(Json(&data))
        .bind(correlation_id)
        .bind(Json(telemetry::propagation::current_headers()))
        .execute(&mut *conn)
        .await
        .context("starting a saga")?
        .rows_affected();
        if inserted == 0 {
            return Ok(None);
        }
        let event = pb::SagaStarted {
            saga_id: saga_id.to_string(),
            saga_type: saga_type.to_owned(),
            order_id: business_key.to_owned(),
        };
        self.publish(conn, saga_id, correlation_id, &event).await?;
        Ok(Some(saga_id))
    }

    /// Asks a running saga to compensate (it does so between steps, never
    /// overtaking one in flight), or sends a failed one back to compensating.
    /// Refused once the saga's pivot may have taken effect: the row's lock
    /// orders this request and the pivot's first attempt, so exactly one of
    /// them goes ahead.
    pub async fn request_compensation(
        &self,
        conn: &mut PgConnection,
        saga_id: Uuid,
        reason: &str,
    ) -> anyhow::Result<RequestOutcome> {
        let Some((state, saga_type, forward_only_since)) = self.lock(conn, saga_id).await? else {
            return Ok(RequestOutcome::NotFound);
        };
        if let Some(since) = forward_only_since.filter(|_| !state.is_final()) {
            let pivot = self
                .definitions
                .get(saga_type.as_str())
                .and_then(|d| d.pivot)
                .unwrap_or("the pivot");
            return Ok(RequestOutcome::ForwardOnly { pivot, since });
        }
        match state {
            SagaState::Running => {
                sqlx::query(
                    "UPDATE saga_instances SET compensation_requested = $2,
                         next_run_at = CASE WHEN lease_owner IS NULL THEN now() ELSE next_run_at END
                     WHERE saga_id = $1",
                )
                .bind(saga_id)
                .bind(reason)
                .execute(&mut *conn)
                .await?;
                Ok(RequestOutcome::Accepted)
            }
            SagaState::Failed => {
                self.resume(conn, saga_id, SagaState::Compensating).await?;
                Ok(RequestOutcome::Accepted)
            }
            other => Ok(RequestOutcome::NotApplicable(other)),
        }
    }

    /// Resumes a failed saga: its failed compensations get a fresh retry
    /// budget, or, for a saga that failed past its pivot, its failed steps
    /// do and it goes forward again.
    pub async fn retry(
        &self,
        conn: &mut PgConnection,
        saga_id: Uuid,
    ) -> anyhow::Result<RequestOutcome> {
        match self.lock(conn, saga_id).await? {
            None => Ok(RequestOutcome::NotFound),
            // Failed past its pivot: it can only go forward.
            Some((SagaState::Failed, _, Some(_))) => {
                self.resume(conn, saga_id, SagaState::Running).await?;
                Ok(RequestOutcome::Accepted)
            }
            Some((SagaState::Failed, _, None)) => {
                self.resume(conn, saga_id, SagaState::Compensating).await?;
                Ok(RequestOutcome::Accepted)
            }
            Some((other, _, _)) => Ok(RequestOutcome::NotApplicable(other)),
        }
    }

    /// Locks a saga's row for the caller's transaction: its state, type and
    /// since when it is forward-only.
    async fn lock(
        &self,
        conn: &mut PgConnection,
        saga_id: Uuid,
    ) -> anyhow::Result<Option<(SagaState, String, Option<DateTime<Utc>>)>> {
        let row: Option<(String, String, Option<DateTime<Utc>>)> = sqlx::query_as(
            "SELECT state, saga_type, forward_only_since FROM saga_instances WHERE saga_id = $1 FOR UPDATE",
        )
        .bind(saga_id)
        .fetch_optional(&mut *conn)
        .await
        .context("locking a saga")?;
        Ok(row.and_then(|(state, saga_type, since)| {
            SagaState::parse(&state).map(|state| (state, saga_type, since))
        }))
    }

    /// Sends a failed saga back to `state` (running, or compensating): the
    /// executions that failed in that direction get a fresh retry budget.
    async fn resume(
        &self,
        conn: &mut PgConnection,
        saga_id: Uuid,
        state: SagaState,
    ) -> anyhow::Result<()> {
        let kind = match state {
            SagaState::Running => Kind::Action,
            _ => Kind::Compensation,
        };
        sqlx::query(
            "UPDATE saga_steps SET status = 'waiting', attempts = 0, next_attempt_at = now(), finished_at = NULL
             WHERE saga_id = $1 AND kind = $2 AND status = 'failed'",
        )
        .bind(saga_id)
        .bind(kind.as_str())
        .execute(&mut *conn)
        .await?;
        // A new fence: whatever held the saga before has no say any more.
        sqlx::query(
            "UPDATE saga_instances SET state = $2, next_run_at = now(), finished_at = NULL,
                 lease_owner = NULL, lease_expires_at = NULL, fence = fence + 1
             WHERE saga_id = $1",
        )
        .bind(saga_id)
        .bind(state.as_str())
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Runs until `shutdown`: claims due sagas whenever work appears
    /// (notification) or a timer falls due, and drives them.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let permits = Arc::new(Semaphore::new(self.config.concurrency));
        let mut drivers = tokio::task::JoinSet::new();
        let mut listener: Option<PgListener> = None;
        while !shutdown.is_cancelled() {
            if listener.is_none() {
                listener = match self.listen().await {
                    Ok(listener) => Some(listener),
                    Err(error) => {
                        tracing::warn!(
                            error = format!("{error:#}"),
                            "saga engine cannot listen yet"
                        );
                        None
                    }
                };
            }
            // Claim as much work as there are free hands.
            let free = permits.available_permits();
            let claimed = if free == 0 {
                Vec::new()
            } else {
                store::claim(
                    &self.pool,
                    &self.config.worker_id,
                    free as i64,
                    self.config.lease,
                )
                .await
                .unwrap_or_else(|error| {
                    tracing::warn!(error = format!("{error:#}"), "claiming sagas failed");
                    Vec::new()
                })
            };
            let claimed_any = !claimed.is_empty();
            for (saga_id, fence) in claimed {
                let permit = permits
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed");
                let engine = self.clone();
                let shutdown = shutdown.clone();
                drivers.spawn(async move {
                    engine.drive(saga_id, fence, &shutdown).await;
                    drop(permit);
                });
            }
            while drivers.try_join_next().is_some() {}
            if claimed_any {
                continue;
            }
            // Sleep until the next timer, a notification, a driver freeing
            // its hands, or a slow safety sweep.
            let next_due = store::next_due(&self.pool).await.ok().flatten();
            let sleep = next_due
                .map(|at| (at - Utc::now()).to_std().unwrap_or_default())
                .unwrap_or(Duration::from_secs(5))
                .min(Duration::from_secs(5));
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(sleep) => {}
                Some(_) = drivers.join_next(), if !drivers.is_empty() => {}
                received = async { listener.as_mut().expect("guarded").try_recv().await }, if listener.is_some() => {
                    if received.is_err() {
                        listener = None;
                    }
                }
            }
        }
        // Drivers stop between steps once shutdown is cancelled.
        while drivers.join_next().await.is_some() {}
        tracing::debug!("saga engine stopped");
    }

    async fn listen(&self) -> anyhow::Result<PgListener> {
        let schema: String = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(&self.pool)
            .await?;
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(&format!("{schema}.saga_work")).await?;
        Ok(listener)
    }

    /// Drives one claimed saga until it waits, ends, or is taken over. Its
    /// spans continue the trace of what started the saga.
    pub async fn drive(&self, saga_id: Uuid, fence: i64, shutdown: &CancellationToken) {
        let span = tracing::info_span!(
            "saga.drive",
            %saga_id,
            correlation_id = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        if let Ok(Some(headers)) = store::trace_context(&self.pool, saga_id).await {
            let received = telemetry::propagation::extract(
                headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            );
            telemetry::propagation::adopt_parent(&span, received.context);
        }
        async {
            match self.drive_inner(saga_id, fence, shutdown).await {
                Ok(()) | Err(WriteError::Fenced) => {}
                Err(WriteError::Unexpected(error)) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "driving a saga failed; it will be retried"
                    );
                    // The lease runs out and the saga is claimed again.
                }
            }
        }
        .instrument(span)
        .await;
    }

    async fn drive_inner(
        &self,
        saga_id: Uuid,
        fence: i64,
        shutdown: &CancellationToken,
    ) -> Result<(), WriteError> {
        loop {
            let saga = store::load(&self.pool, saga_id)
                .await?
                .context("a claimed saga exists")?;
            if saga.instance.fence != fence {
                return Err(WriteError::Fenced);
            }
            tracing::Span::current()
                .record("correlation_id", saga.instance.correlation_id.as_str());
            let definition = self
                .definitions
                .get(saga.instance.saga_type.as_str())
                .with_context(|| {
                    format!("no definition for saga type {}", saga.instance.saga_type)
                })?;
            if shutdown.is_cancelled() {
                // Hand the saga to whichever replica is still running.
                return store::release(&self.pool, saga_id, fence, Some(Utc::now())).await;
            }
            let correlation = CorrelationId::parse(&saga.instance.correlation_id)
                .unwrap_or_else(CorrelationId::generate);
            match plan(definition, &saga, Utc::now()) {
                Plan::Attempt { kind, steps } => {
                    telemetry::correlation::scope(
                        correlation,
                        self.attempt(definition, &saga, fence, kind, &steps),
                    )
                    .await?;
                }
                Plan::Transition(transition) => {
                    self.transition(definition, &saga, fence, transition)
                        .await?
                }
                Plan::Wait(until) => {
                    return store::release(&self.pool, saga_id, fence, Some(until)).await;
                }
                Plan::Idle => return store::release(&self.pool, saga_id, fence, None).await,
            }
        }
    }

    /// One attempt of each of `names`, in parallel: recorded as started,
    /// run with their time limits, then recorded with their outcomes.
    async fn attempt(
        &self,
        definition: &SagaDefinition,
        saga: &SagaRecord,
        fence: i64,
        kind: Kind,
        names: &[&'static str],
    ) -> Result<(), WriteError> {
        let saga_id = saga.instance.saga_id;
        let forward = kind == Kind::Action && saga.instance.state() == SagaState::Running;
        let steps: Vec<(&Step, StepClass)> = names
            .iter()
            .filter_map(|name| definition.step(name))
            .map(|(index, step)| (step, definition.class(index)))
            .collect();
        // The pivot and the steps after it never give up, and neither does
        // asking again whether an action took effect: their deadline only
        // flags them, and bounds neither their attempts nor their time.
        let persistent = |class: StepClass| {
            class != StepClass::Compensatable || (kind == Kind::Action && !forward)
        };

        // Write ahead: after a crash, the next owner knows these attempts
        // were made and may have had an effect.
        let mut started = Vec::with_capacity(steps.len());
        {
            let mut tx = self.pool.begin().await.context("starting a transaction")?;
            let held = store::check_fence(&mut tx, saga_id, fence, self.config.lease).await?;
            if forward && held.turning_back {
                // A compensation request was accepted since this plan was
                // made: begin nothing (the transaction rolls back), plan again.
                return Ok(());
            }
            if forward && steps.iter().any(|(_, class)| *class == StepClass::Pivot) {
                // From this commit on, the saga only goes forward.
                store::mark_forward_only(&mut tx, saga_id).await?;
            }
            for (step, _) in &steps {
                let deadline = chrono::Duration::from_std(step.deadline).context("deadline")?;
                // An attempt still `running` never reported back: its
                // outcome is unknown, whatever the next one says.
                let (attempts, deadline_at): (i32, Option<DateTime<Utc>>) = sqlx::query_as(
                    "INSERT INTO saga_steps (saga_id, step, kind, status, attempts, deadline_at)
                     VALUES ($1, $2, $3, 'running', 1, CASE WHEN $3 = 'action' THEN now() + $4 END)
                     ON CONFLICT (saga_id, step, kind) DO UPDATE
                         SET status = 'running', attempts = saga_steps.attempts + 1,
                             outcome_unknown = saga_steps.outcome_unknown OR saga_steps.status = 'running'
                     RETURNING attempts, deadline_at",
                )
                .bind(saga_id)
                .bind(step.name)
                .bind(kind.as_str())
                .bind(deadline)
                .fetch_one(&mut *tx)
                .await
                .context("recording an attempt")?;
                started.push((u32::try_from(attempts).unwrap_or(u32::MAX), deadline_at));
            }
            tx.commit().await.context("committing the attempts")?;
        }

        let outputs = saga.outputs(Kind::Action);
        let compensation_outputs = saga.outputs(Kind::Compensation);
        let failed_actions = saga.failed_actions();
        let runs = steps
            .iter()
            .zip(&started)
            .map(|((step, class), (attempt, deadline_at))| {
                let limit = match kind {
                    Kind::Action => step.attempt_timeout,
                    Kind::Compensation => step.compensation_attempt_timeout,
                };
                let time_left = deadline_at
                    .filter(|_| !persistent(*class))
                    .map(|deadline| (deadline - Utc::now()).to_std().unwrap_or_default())
                    .map_or(limit, |left| left.min(limit));
                let context = StepContext {
                    saga_id,
                    step: step.name,
                    data: saga.instance.data.0.clone(),
                    outputs: outputs.clone(),
                    compensation_outputs: compensation_outputs.clone(),
                    failed_actions: failed_actions.clone(),
                    failure_reason: saga.instance.failure_reason.clone(),
                    attempt: *attempt,
                    time_left,
                    correlation_id: saga.instance.correlation_id.clone(),
                };
                let action = match kind {
                    Kind::Action => step.action.clone(),
                    Kind::Compensation => step.compensation.clone(),
                };
                let span = tracing::info_span!(
                    "saga.step",
                    otel.name = format!("{} {} {}", definition.name, step.name, kind.as_str()),
                    saga.step = step.name,
                    saga.kind = kind.as_str(),
                    saga.attempt = *attempt,
                );
                async move {
                    let started = std::time::Instant::now();
                    let outcome = match action {
                        None => Ok(serde_json::Value::Null),
                        Some(action) => {
                            match tokio::time::timeout(time_left, action.run(&context)).await {
                                Ok(outcome) => outcome,
                                Err(_) => Err(StepError::Unknown(format!(
                                    "attempt timed out after {time_left:?}"
                                ))),
                            }
                        }
                    };
                    (outcome, started.elapsed())
                }
                .instrument(span)
            });
        let outcomes = futures::future::join_all(runs).await;

        let mut tx = self.pool.begin().await.context("starting a transaction")?;
        store::check_fence(&mut tx, saga_id, fence, self.config.lease).await?;
        for (((step, class), (attempt, deadline_at)), (outcome, took)) in
            steps.iter().zip(&started).zip(outcomes)
        {
            if *class == StepClass::Pivot && matches!(outcome, Err(StepError::Permanent(_))) {
                // Refused for certain: the pivot did not take effect.
                store::clear_forward_only(&mut tx, saga_id).await?;
            }
            self.record_outcome(
                &mut tx,
                saga,
                step,
                kind,
                persistent(*class),
                *attempt,
                *deadline_at,
                outcome,
                took,
            )
            .await?;
        }
        tx.commit().await.context("committing the outcomes")?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn record_outcome(
        &self,
        conn: &mut PgConnection,
        saga: &SagaRecord,
        step: &Step,
        kind: Kind,
        persistent: bool,
        attempt: u32,
        deadline_at: Option<DateTime<Utc>>,
        outcome: Result<serde_json::Value, StepError>,
        took: Duration,
    ) -> anyhow::Result<()> {
        let saga_id = saga.instance.saga_id;
        let policy = match kind {
            Kind::Action => step.retry,
            Kind::Compensation => step.compensation_retry,
        };
        let compensation = kind == Kind::Compensation;
        let correlation = &saga.instance.correlation_id;
        match outcome {
            Ok(output) => {
                metrics::histogram!("saga_step_duration_seconds", "step" => step.name, "kind" => kind.as_str(), "outcome" => "succeeded")
                    .record(took.as_secs_f64());
                sqlx::query(
                    "UPDATE saga_steps SET status = 'succeeded', output = $4, finished_at = now(), next_attempt_at = NULL,
                         outcome_unknown = false
                     WHERE saga_id = $1 AND step = $2 AND kind = $3",
                )
                .bind(saga_id)
                .bind(step.name)
                .bind(kind.as_str())
                .bind(Json(output))
                .execute(&mut *conn)
                .await?;
                let event = pb::SagaStepSucceeded {
                    saga_id: saga_id.to_string(),
                    step: step.name.to_owned(),
                    compensation,
                    attempts: attempt,
                    duration: prost_types::Duration::try_from(took).ok(),
                };
                self.publish(conn, saga_id, correlation, &event).await?;
            }
            Err(error) => {
                let (delay, spent) = match &error {
                    StepError::NotAttempted { retry_after, .. } => (*retry_after, false),
                    _ => (policy.backoff(attempt), true),
                };
                let retry_at = Utc::now() + chrono::Duration::from_std(delay)?;
                let retryable = !matches!(error, StepError::Permanent(_));
                // Give up as soon as no retry can happen: no attempts left,
                // or the next one would start after the deadline.
                let give_up = if !retryable || persistent {
                    None
                } else if spent && attempt >= policy.max_attempts {
                    Some(format!("{error} (no attempts left after {attempt})"))
                } else if deadline_at.is_some_and(|deadline| retry_at >= deadline) {
                    Some(format!("{error} (no retry fits before the deadline)"))
                } else {
                    None
                };
                let will_retry = retryable && give_up.is_none();
                let reason = match &error {
                    StepError::Permanent(_) => "permanent",
                    _ if give_up.is_some() => "exhausted",
                    StepError::NotAttempted { .. } => "not_attempted",
                    StepError::Retryable(_) => "retryable",
                    StepError::Unknown(_) => "unknown",
                };
                // A definite answer settles what earlier attempts left
                // unknown; a refusal for now leaves it as it was.
                let outcome_unknown = match &error {
                    StepError::Unknown(_) => Some(true),
                    StepError::Permanent(_) => Some(false),
                    StepError::Retryable(_) | StepError::NotAttempted { .. } => None,
                };
                metrics::counter!("saga_step_failures_total", "step" => step.name, "kind" => kind.as_str(), "reason" => reason)
                    .increment(1);
                metrics::histogram!("saga_step_duration_seconds", "step" => step.name, "kind" => kind.as_str(), "outcome" => "failed")
                    .record(took.as_secs_f64());
                let error = give_up.unwrap_or_else(|| error.to_string());
                tracing::warn!(step = step.name, kind = kind.as_str(), attempt, will_retry, ?outcome_unknown, %error, "saga step failed");
                // An attempt that was not made is given back.
                let outcome_unknown: bool = sqlx::query_scalar(
                    "UPDATE saga_steps SET status = $4, last_error = $5, next_attempt_at = $6,
                         finished_at = CASE WHEN $4 = 'failed' THEN now() END,
                         attempts = attempts - CASE WHEN $7 THEN 0 ELSE 1 END,
                         outcome_unknown = coalesce($8, outcome_unknown)
                     WHERE saga_id = $1 AND step = $2 AND kind = $3
                     RETURNING outcome_unknown",
                )
                .bind(saga_id)
                .bind(step.name)
                .bind(kind.as_str())
                .bind(if will_retry { "waiting" } else { "failed" })
                .bind(&error)
                .bind(will_retry.then_some(retry_at))
                .bind(spent)
                .bind(outcome_unknown)
                .fetch_one(&mut *conn)
                .await?;
                let event = pb::SagaStepFailed {
                    saga_id: saga_id.to_string(),
                    step: step.name.to_owned(),
                    compensation,
                    attempts: if spent { attempt } else { attempt - 1 },
                    error,
                    will_retry,
                    outcome_unknown,
                };
                self.publish(conn, saga_id, correlation, &event).await?;
            }
        }
        Ok(())
    }

    async fn transition(
        &self,
        definition: &SagaDefinition,
        saga: &SagaRecord,
        fence: i64,
        transition: Transition,
    ) -> Result<(), WriteError> {
        let saga_id = saga.instance.saga_id;
        let correlation = saga.instance.correlation_id.as_str();
        let order_id = saga.instance.business_key.clone();
        // Counted once the transition has committed.
        let finished = match &transition {
            Transition::Complete => Some(SagaState::Completed),
            Transition::Compensated => Some(SagaState::Compensated),
            Transition::Fail { .. } => Some(SagaState::Failed),
            _ => None,
        };
        let compensating = matches!(transition, Transition::Compensate { .. });
        let past_deadline = match &transition {
            Transition::StepFailed { step, kind, .. } => Some((*step, *kind)),
            _ => None,
        };
        let overdue = match &transition {
            Transition::Overdue { step, .. } => Some(*step),
            _ => None,
        };
        // An overdue step that moved on is no longer flagged.
        let clear_overdue = saga.instance.overdue_step.is_some()
            && matches!(transition, Transition::Advance | Transition::Complete);
        let mut tx = self.pool.begin().await.context("starting a transaction")?;
        store::check_fence(&mut tx, saga_id, fence, self.config.lease).await?;
        if clear_overdue {
            store::set_overdue(&mut tx, saga_id, None).await?;
        }
        match transition {
            Transition::Overdue { step, since } => {
                store::set_overdue(&mut tx, saga_id, Some((step, since))).await?;
                tracing::error!(
                    saga = definition.name,
                    step,
                    %since,
                    "saga step is past its deadline; past the pivot it is retried until it succeeds, never undone"
                );
            }
            Transition::Advance => {
                sqlx::query("UPDATE saga_instances SET position = position + 1 WHERE saga_id = $1")
                    .bind(saga_id)
                    .execute(&mut *tx)
                    .await
                    .context("advancing")?;
            }
            Transition::Complete => {
                self.finish(&mut tx, saga_id, SagaState::Completed, None)
                    .await?;
                tracing::info!(saga = definition.name, "saga completed");
                let event = pb::SagaCompleted {
                    saga_id: saga_id.to_string(),
                    order_id,
                };
                self.publish(&mut tx, saga_id, correlation, &event).await?;
            }
            Transition::Compensate { reason } => {
                sqlx::query(
                    "UPDATE saga_instances SET state = 'compensating', failure_reason = $2, compensation_requested = NULL
                     WHERE saga_id = $1",
                )
                .bind(saga_id)
                .bind(&reason)
                .execute(&mut *tx)
                .await
                .context("starting compensation")?;
                tracing::info!(saga = definition.name, %reason, "saga compensating");
                let event = pb::SagaCompensationStarted {
                    saga_id: saga_id.to_string(),
                    reason,
                };
                self.publish(&mut tx, saga_id, correlation, &event).await?;
            }
            Transition::StepFailed { step, kind, reason } => {
                // An attempt that never reported back leaves the outcome unknown.
                let outcome_unknown: bool = sqlx::query_scalar(
                    "UPDATE saga_steps SET status = 'failed', last_error = $4, finished_at = now(), next_attempt_at = NULL,
                         outcome_unknown = outcome_unknown OR status = 'running'
                     WHERE saga_id = $1 AND step = $2 AND kind = $3
                     RETURNING outcome_unknown",
                )
                .bind(saga_id)
                .bind(step)
                .bind(kind.as_str())
                .bind(&reason)
                .fetch_one(&mut *tx)
                .await
                .context("failing a step")?;
                let attempts = saga
                    .step(step, kind)
                    .map_or(0, |r| u32::try_from(r.attempts).unwrap_or(0));
                let event = pb::SagaStepFailed {
                    saga_id: saga_id.to_string(),
                    step: step.to_owned(),
                    compensation: kind == Kind::Compensation,
                    attempts,
                    error: reason,
                    will_retry: false,
                    outcome_unknown,
                };
                self.publish(&mut tx, saga_id, correlation, &event).await?;
            }
            Transition::Compensated => {
                let reason = saga.instance.failure_reason.clone();
                self.finish(&mut tx, saga_id, SagaState::Compensated, None)
                    .await?;
                tracing::info!(saga = definition.name, "saga compensated");
                let event = pb::SagaCompensated {
                    saga_id: saga_id.to_string(),
                    order_id,
                    reason: reason.unwrap_or_default(),
                };
                self.publish(&mut tx, saga_id, correlation, &event).await?;
            }
            Transition::Fail { reason } => {
                self.finish(&mut tx, saga_id, SagaState::Failed, Some(&reason))
                    .await?;
                tracing::error!(saga = definition.name, %reason, "saga failed; it waits for an operator");
                let event = pb::SagaFailed {
                    saga_id: saga_id.to_string(),
                    order_id,
                    reason,
                };
                self.publish(&mut tx, saga_id, correlation, &event).await?;
            }
        }
        tx.commit().await.context("committing a transition")?;
        if let Some(state) = finished {
            metrics::counter!("sagas_finished_total", "saga" => definition.name, "state" => state.as_str()).increment(1);
        }
        if compensating {
            metrics::counter!("saga_compensations_started_total", "saga" => definition.name)
                .increment(1);
        }
        if let Some(step) = overdue {
            metrics::counter!("saga_steps_overdue_total", "saga" => definition.name, "step" => step)
                .increment(1);
        }
        if let Some((step, kind)) = past_deadline {
            metrics::counter!("saga_step_failures_total", "step" => step, "kind" => kind.as_str(), "reason" => "deadline")
                .increment(1);
        }
        Ok(())
    }

    async fn finish(
        &self,
        conn: &mut PgConnection,
        saga_id: Uuid,
        state: SagaState,
        reason: Option<&str>,
    ) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE saga_instances SET state = $2, failure_reason = coalesce($3, failure_reason),
                 finished_at = now(), next_run_at = NULL
             WHERE saga_id = $1",
        )
        .bind(saga_id)
        .bind(state.as_str())
        .bind(reason)
        .execute(conn)
        .await
        .context("finishing a saga")?;
        Ok(())
    }

    async fn publish<M: Message + Name>(
        &self,
        conn: &mut PgConnection,
        saga_id: Uuid,
        correlation_id: &str,
        event: &M,
    ) -> anyhow::Result<()> {
        let envelope = messaging::envelope::seal(
            EventMeta {
                producer: self.config.producer,
                aggregate_type: "saga",
                aggregate_id: saga_id.to_string(),
                aggregate_version: 0,
                correlation_id: CorrelationId::parse(correlation_id)
                    .unwrap_or_else(CorrelationId::generate),
                causation_id: None,
            },
            1,
            event,
        );
        messaging::outbox::enqueue(conn, &self.config.events_topic, &envelope).await
    }
}
