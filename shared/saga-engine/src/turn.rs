//! One turn of a claimed saga, in memory: the attempts it begins, their
//! outcomes, and the transitions that follow, applied to the saga's record
//! exactly as the store will write them, in one fenced transaction. The
//! engine keeps the record between turns instead of reading it back, so
//! what is decided here is what the next plan sees. No I/O here.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use api_saga::v1 as pb;
use chrono::{DateTime, Utc};
use messaging::envelope::{Origin, Subject};
use messaging::{EventEnvelope, Publisher};
use prost::{Message, Name};
use sqlx::types::Json;
use telemetry::CorrelationId;

use crate::definition::Facts;
use crate::definition::{OnTimeout, SagaDefinition, Step, StepError, attempt_id};
use crate::plan::Transition;
use crate::store::{Child, Kind, NewChild, SagaRecord, SagaState, Signal, StepRecord, StepStatus};

/// A counter to bump once the turn has committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Count {
    Finished(SagaState),
    CompensationStarted,
    Paused,
    Overdue(&'static str),
    PastDeadline(&'static str, Kind),
}

/// The saga as it will be once this turn commits, and what changed.
#[derive(Debug, Clone)]
pub(crate) struct Turn {
    pub(crate) saga: SagaRecord,
    /// Its signals, in the order they arrived, as read when it was claimed.
    pub(crate) signals: Vec<Signal>,
    /// Its child sagas, as read when it was claimed and as this replica
    /// has since started or asked them.
    pub(crate) children: Vec<Child>,
    /// The newest version of each saga type this replica carries: what a
    /// child it starts runs on.
    newest: Arc<HashMap<&'static str, u32>>,
    /// Children this turn starts, and those it asks to compensate.
    pub(crate) new_children: Vec<NewChild>,
    pub(crate) child_requests: Vec<(uuid::Uuid, String)>,
    publisher: Publisher,
    /// The id of the step outcome event this turn recorded last: what the
    /// transitions it leads to (in the same turn) were caused by.
    cause: Option<String>,
    /// Step executions changed since the last commit, by (step, kind).
    pub(crate) dirty: Vec<(String, Kind)>,
    /// The turn begins forward attempts: they must not begin if a
    /// compensation request was accepted since the saga was read.
    pub(crate) begins_forward: bool,
    /// The turn begins attempts (forward or back): they must not begin if
    /// a pause was requested since the saga was read.
    pub(crate) begins_attempts: bool,
    /// The turn begins the pivot: from its commit on, the saga is
    /// forward-only.
    pub(crate) begins_pivot: bool,
    /// The turn acted on the compensation request.
    pub(crate) clears_request: bool,
    /// The pivot was refused for certain: the saga may turn back.
    pub(crate) clears_forward_only: bool,
    /// The turn paused the saga, as requested.
    pub(crate) clears_pause_request: bool,
    /// A step succeeded, or the saga changed state or position.
    pub(crate) progressed: bool,
    /// A step is past its deadline: the saga is stuck, for this reason.
    pub(crate) flags_stuck: Option<String>,
    /// The saga waits for a signal until then: it is not stuck for want of
    /// progress before that (its progress is counted from then).
    pub(crate) awaits_until: Option<DateTime<Utc>>,
    /// The saga is released waiting for a child saga that is running: it
    /// is not stuck for want of progress while it waits (the child is
    /// watched on its own, and its end wakes the parent).
    pub(crate) awaits_child: bool,
    pub(crate) events: Vec<EventEnvelope>,
    pub(crate) counts: Vec<Count>,
}

impl Turn {
    pub(crate) fn new(
        saga: SagaRecord,
        signals: Vec<Signal>,
        children: Vec<Child>,
        newest: Arc<HashMap<&'static str, u32>>,
        publisher: Publisher,
    ) -> Self {
        Self {
            saga,
            signals,
            children,
            newest,
            new_children: Vec::new(),
            child_requests: Vec::new(),
            publisher,
            cause: None,
            dirty: Vec::new(),
            begins_forward: false,
            begins_attempts: false,
            begins_pivot: false,
            clears_request: false,
            clears_forward_only: false,
            clears_pause_request: false,
            progressed: false,
            flags_stuck: None,
            awaits_until: None,
            awaits_child: false,
            events: Vec::new(),
            counts: Vec::new(),
        }
    }

    /// The changes are written: start the next turn from here.
    pub(crate) fn committed(&mut self) -> Vec<Count> {
        self.dirty.clear();
        self.events.clear();
        self.cause = None;
        self.begins_forward = false;
        self.begins_attempts = false;
        self.begins_pivot = false;
        self.clears_request = false;
        self.clears_forward_only = false;
        self.clears_pause_request = false;
        self.progressed = false;
        self.flags_stuck = None;
        self.awaits_until = None;
        self.awaits_child = false;
        self.new_children.clear();
        self.child_requests.clear();
        std::mem::take(&mut self.counts)
    }

    /// The step execution `(name, kind)` as it will be written.
    pub(crate) fn rows(&self) -> impl Iterator<Item = &StepRecord> {
        self.dirty
            .iter()
            .filter_map(|(name, kind)| self.saga.step(name, *kind))
    }

    fn touch(&mut self, name: &str, kind: Kind) -> &mut StepRecord {
        if !self
            .dirty
            .iter()
            .any(|(dirty, k)| dirty == name && *k == kind)
        {
            self.dirty.push((name.to_owned(), kind));
        }
        let index = self
            .saga
            .steps
            .iter()
            .position(|r| r.step == name && r.kind == kind)
            .expect("a step execution begun before it is changed");
        &mut self.saga.steps[index]
    }

    /// The latest timer of the steps waiting for a signal now, if any.
    pub(crate) fn awaited(&self, definition: &SagaDefinition) -> Option<DateTime<Utc>> {
        self.saga
            .steps
            .iter()
            .filter(|r| r.kind == Kind::Action && r.status == StepStatus::Waiting)
            .filter(|r| {
                definition
                    .step(&r.step)
                    .is_some_and(|(_, s)| s.wait.is_some())
            })
            .filter_map(|r| r.deadline_at)
            .max()
    }

    /// Whether a child saga of this one is still under way (running,
    /// compensating, or paused by an operator), as far as this replica
    /// knows: the saga waits for it. A child that ended since it was read
    /// has woken the saga (`signal_pending`), which is read again at once.
    pub(crate) fn awaiting_child(&self) -> bool {
        self.children.iter().any(|child| {
            matches!(
                child.state,
                SagaState::Running | SagaState::Compensating | SagaState::Paused
            )
        })
    }

    /// Adds a record of `step`'s action, finished or waiting.
    fn record(
        &mut self,
        step: &'static str,
        status: StepStatus,
        until: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> &mut StepRecord {
        let record = self.record_of(step, Kind::Action, status, now);
        record.deadline_at = until.or(record.deadline_at);
        record.next_attempt_at = until;
        record
    }

    /// Starts `step`'s child saga (written with the turn, on the newest
    /// version of its type this replica carries), and waits for it; a
    /// type not carried here fails the step.
    fn start_child(&mut self, definition: &SagaDefinition, step: &'static str, now: DateTime<Utc>) {
        let Some(child) = definition.step(step).and_then(|(_, s)| s.child.clone()) else {
            return;
        };
        let Some(version) = self.newest.get(child.saga_type).copied() else {
            let error = format!("no definition of child saga type {} here", child.saga_type);
            self.end_wait(step, Err(error), now);
            return;
        };
        let data = (child.data)(&Facts {
            data: &self.saga.instance.data.0,
            steps: &self.saga.steps,
        });
        let child_id = uuid::Uuid::now_v7();
        let parent = self.saga.instance.saga_id;
        let record = self.record(step, StepStatus::Waiting, None, now);
        record.attempts = 1;
        record.output = Some(Json(serde_json::json!({ "child_saga_id": child_id })));
        self.progressed = true;
        self.new_children.push(NewChild {
            saga_id: child_id,
            saga_type: child.saga_type,
            version: i32::try_from(version).unwrap_or(i32::MAX),
            step,
            data,
        });
        self.children.push(Child {
            saga_id: child_id,
            saga_type: child.saga_type.to_owned(),
            parent_saga_id: parent,
            parent_step: step.to_owned(),
            state: SagaState::Running,
            failure_reason: None,
            forward_only: false,
        });
        let started = pb::SagaStarted {
            saga_id: child_id.to_string(),
            saga_type: child.saga_type.to_owned(),
            // The child works for its parent's order (its own business
            // key, `<parent>/<step>`, only makes it unique).
            order_id: self.saga.instance.business_key.clone(),
            version,
        };
        let envelope = saga_event(
            &self.publisher,
            child_id,
            &self.saga.instance.correlation_id,
            self.cause.clone(),
            &started,
        );
        self.events.push(envelope);
        tracing::info!(saga = definition.name, step, child = %child_id, child_type = child.saga_type, "child saga started");
    }

    /// Adds a record of `step`'s `kind` execution, with `status`.
    fn record_of(
        &mut self,
        step: &'static str,
        kind: Kind,
        status: StepStatus,
        now: DateTime<Utc>,
    ) -> &mut StepRecord {
        if self.saga.step(step, kind).is_none() {
            self.saga.steps.push(StepRecord {
                step: step.to_owned(),
                kind,
                status,
                attempts: 0,
                last_error: None,
                output: None,
                started_at: now,
                finished_at: None,
                next_attempt_at: None,
                deadline_at: None,
                outcome_unknown: false,
            });
        }
        let record = self.touch(step, kind);
        record.status = status;
        record.finished_at = status.is_finished().then_some(now);
        record
    }

    /// A waiting step's outcome: its signal's payload, or its timeout's.
    fn end_wait(
        &mut self,
        step: &'static str,
        outcome: Result<serde_json::Value, String>,
        now: DateTime<Utc>,
    ) {
        let saga_id = self.saga.instance.saga_id.to_string();
        match outcome {
            Ok(output) => {
                let record = self.record(step, StepStatus::Succeeded, None, now);
                record.attempts = 1;
                record.output = Some(Json(output));
                self.progressed = true;
                self.cause = Some(self.emit(&pb::SagaStepSucceeded {
                    saga_id,
                    step: step.to_owned(),
                    compensation: false,
                    attempts: 1,
                    duration: None,
                }));
            }
            Err(error) => {
                let record = self.record(step, StepStatus::Failed, None, now);
                record.attempts = 1;
                record.last_error = Some(error.clone());
                self.cause = Some(self.emit(&pb::SagaStepFailed {
                    saga_id,
                    step: step.to_owned(),
                    compensation: false,
                    attempts: 1,
                    error,
                    will_retry: false,
                    outcome_unknown: false,
                }));
            }
        }
    }

    /// Records that an attempt of `step` begins (written ahead of it, so a
    /// crash mid-call leaves it known to have been made): its number, and
    /// the step's deadline. An earlier attempt still `running` never
    /// reported back, so its outcome is unknown, whatever this one says.
    pub(crate) fn begin(
        &mut self,
        step: &Step,
        kind: Kind,
        now: DateTime<Utc>,
    ) -> (u32, Option<DateTime<Utc>>) {
        if self.saga.step(step.name, kind).is_none() {
            let deadline = (kind == Kind::Action).then(|| {
                now + chrono::Duration::from_std(step.deadline).unwrap_or(chrono::Duration::MAX)
            });
            self.saga.steps.push(StepRecord {
                step: step.name.to_owned(),
                kind,
                status: StepStatus::Running,
                attempts: 0,
                last_error: None,
                output: None,
                started_at: now,
                finished_at: None,
                next_attempt_at: None,
                deadline_at: deadline,
                outcome_unknown: false,
            });
        }
        let record = self.touch(step.name, kind);
        record.outcome_unknown |= record.status == StepStatus::Running && record.attempts > 0;
        record.status = StepStatus::Running;
        record.attempts += 1;
        (
            u32::try_from(record.attempts).unwrap_or(u32::MAX),
            record.deadline_at,
        )
    }

    /// Records how attempt `attempt` of `step` went. `persistent` steps
    /// (the pivot, the steps after it, and an action asked again to settle
    /// an unknown outcome) never give up; the others give up when out of
    /// attempts, or when no retry fits before the deadline.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn outcome(
        &mut self,
        step: &Step,
        kind: Kind,
        persistent: bool,
        attempt: u32,
        deadline_at: Option<DateTime<Utc>>,
        outcome: Result<serde_json::Value, StepError>,
        took: Duration,
        now: DateTime<Utc>,
    ) {
        let policy = match kind {
            Kind::Action => step.retry,
            Kind::Compensation => step.compensation_retry,
        };
        let compensation = kind == Kind::Compensation;
        match outcome {
            Ok(output) => {
                metrics::histogram!("saga_step_duration_seconds", "step" => step.name, "kind" => kind.as_str(), "outcome" => "succeeded")
                    .record(took.as_secs_f64());
                let record = self.touch(step.name, kind);
                record.status = StepStatus::Succeeded;
                record.output = Some(Json(output));
                record.finished_at = Some(now);
                record.next_attempt_at = None;
                record.outcome_unknown = false;
                self.progressed = true;
                let event = pb::SagaStepSucceeded {
                    saga_id: self.saga.instance.saga_id.to_string(),
                    step: step.name.to_owned(),
                    compensation,
                    attempts: attempt,
                    duration: prost_types::Duration::try_from(took).ok(),
                };
                self.emit_outcome(&event, step, kind, attempt);
            }
            Err(error) => {
                let (delay, spent) = match &error {
                    StepError::NotAttempted { retry_after, .. } => (*retry_after, false),
                    _ => (policy.backoff(attempt), true),
                };
                let retry_at =
                    now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
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
                let settles = match &error {
                    StepError::Unknown(_) => Some(true),
                    StepError::Permanent(_) => Some(false),
                    StepError::Retryable(_) | StepError::NotAttempted { .. } => None,
                };
                metrics::counter!("saga_step_failures_total", "step" => step.name, "kind" => kind.as_str(), "reason" => reason)
                    .increment(1);
                metrics::histogram!("saga_step_duration_seconds", "step" => step.name, "kind" => kind.as_str(), "outcome" => "failed")
                    .record(took.as_secs_f64());
                let error = give_up.unwrap_or_else(|| error.to_string());
                let saga_id = self.saga.instance.saga_id.to_string();
                tracing::warn!(step = step.name, kind = kind.as_str(), attempt, will_retry, ?settles, %error, "saga step failed");
                let record = self.touch(step.name, kind);
                record.status = if will_retry {
                    StepStatus::Waiting
                } else {
                    StepStatus::Failed
                };
                record.last_error = Some(error.clone());
                record.next_attempt_at = will_retry.then_some(retry_at);
                record.finished_at = (!will_retry).then_some(now);
                // An attempt that was not made is given back.
                if !spent {
                    record.attempts -= 1;
                }
                if let Some(unknown) = settles {
                    record.outcome_unknown = unknown;
                }
                let event = pb::SagaStepFailed {
                    saga_id,
                    step: step.name.to_owned(),
                    compensation,
                    attempts: if spent { attempt } else { attempt - 1 },
                    error,
                    will_retry,
                    outcome_unknown: record.outcome_unknown,
                };
                self.emit_outcome(&event, step, kind, attempt);
            }
        }
    }

    /// Applies a transition the plan chose.
    pub(crate) fn transition(
        &mut self,
        definition: &SagaDefinition,
        transition: Transition,
        now: DateTime<Utc>,
    ) {
        let saga_id = self.saga.instance.saga_id.to_string();
        let order_id = self.saga.instance.business_key.clone();
        // An overdue step that moved on is no longer flagged.
        if matches!(transition, Transition::Advance | Transition::Complete) {
            self.saga.instance.overdue_step = None;
            self.saga.instance.overdue_since = None;
        }
        // Anything but a step giving up or running late (or a wait that
        // timed out into a failure) moves the saga on.
        if !matches!(
            transition,
            Transition::Overdue { .. }
                | Transition::StepFailed { .. }
                | Transition::WaitTimedOut { .. }
        ) {
            self.progressed = true;
        }
        match transition {
            Transition::Skip { steps } => {
                for step in steps {
                    self.record(step, StepStatus::Skipped, None, now);
                    tracing::info!(
                        saga = definition.name,
                        step,
                        "saga step skipped: its condition does not hold"
                    );
                    self.emit(&pb::SagaStepSkipped {
                        saga_id: saga_id.clone(),
                        step: step.to_owned(),
                    });
                }
            }
            Transition::BeginWait { step, until } => {
                self.record(step, StepStatus::Waiting, Some(until), now);
                tracing::info!(saga = definition.name, step, %until, "saga step waits for its signal");
            }
            Transition::Signalled { step, signal } => {
                tracing::info!(
                    saga = definition.name,
                    step,
                    signal_id = signal.signal_id,
                    "saga step signalled"
                );
                self.end_wait(step, Ok(signal.payload.0), now);
            }
            Transition::StartChild { step } => self.start_child(definition, step, now),
            Transition::ChildEnded { step, outcome } => {
                let outcome = outcome.map(|child| serde_json::json!({ "child_saga_id": child }));
                self.end_wait(step, outcome, now);
            }
            Transition::CompensateChild { step, child } => {
                let reason = self
                    .saga
                    .instance
                    .failure_reason
                    .clone()
                    .unwrap_or_else(|| "its parent saga is compensating".to_owned());
                let reason = format!(
                    "parent saga {} compensates: {reason}",
                    self.saga.instance.saga_id
                );
                let record = self.record_of(step, Kind::Compensation, StepStatus::Waiting, now);
                record.attempts = 1;
                self.child_requests.push((child, reason));
                // As the request will leave it (a completed child reopens).
                if let Some(known) = self.children.iter_mut().find(|c| c.saga_id == child)
                    && known.state == SagaState::Completed
                    && !known.forward_only
                {
                    known.state = SagaState::Compensating;
                }
                tracing::info!(saga = definition.name, step, %child, "compensating a child saga");
            }
            Transition::ChildCompensated { step, outcome } => {
                let saga_id = self.saga.instance.saga_id.to_string();
                match outcome {
                    Ok(()) => {
                        self.record_of(step, Kind::Compensation, StepStatus::Succeeded, now);
                        self.progressed = true;
                        self.cause = Some(self.emit(&pb::SagaStepSucceeded {
                            saga_id,
                            step: step.to_owned(),
                            compensation: true,
                            attempts: 1,
                            duration: None,
                        }));
                    }
                    Err(error) => {
                        let record =
                            self.record_of(step, Kind::Compensation, StepStatus::Failed, now);
                        record.last_error = Some(error.clone());
                        self.cause = Some(self.emit(&pb::SagaStepFailed {
                            saga_id,
                            step: step.to_owned(),
                            compensation: true,
                            attempts: 1,
                            error,
                            will_retry: false,
                            outcome_unknown: false,
                        }));
                    }
                }
            }
            Transition::WaitTimedOut { step } => {
                let wait = definition.step(step).and_then(|(_, s)| s.wait.clone());
                let outcome = match wait.map(|w| (w.signal, w.on_timeout)) {
                    Some((_, OnTimeout::Output(output))) => Ok(output),
                    Some((signal, OnTimeout::Fail(reason))) => {
                        Err(format!("timed out waiting for signal {signal}: {reason}"))
                    }
                    None => Err("timed out waiting for its signal".to_owned()),
                };
                tracing::info!(
                    saga = definition.name,
                    step,
                    "saga step timed out waiting for its signal"
                );
                self.end_wait(step, outcome, now);
            }
            Transition::Pause => {
                let instance = &mut self.saga.instance;
                let resumes_to = instance.state;
                instance.paused_from = Some(resumes_to);
                instance.paused_at = Some(now);
                instance.pause_requested_at = None;
                instance.state = SagaState::Paused;
                self.clears_pause_request = true;
                self.counts.push(Count::Paused);
                tracing::info!(
                    saga = definition.name,
                    resumes_to = resumes_to.as_str(),
                    "saga paused by an operator"
                );
                self.emit(&pb::SagaPaused {
                    saga_id,
                    order_id,
                    resumes_to: resumes_to.to_proto().into(),
                });
            }
            Transition::Overdue { step, since } => {
                self.saga.instance.overdue_step = Some(step.to_owned());
                self.saga.instance.overdue_since = Some(since);
                self.flags_stuck = Some(format!(
                    "step {step} is past its deadline (since {})",
                    since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ));
                self.counts.push(Count::Overdue(step));
                tracing::error!(
                    saga = definition.name,
                    step,
                    %since,
                    "saga step is past its deadline; past the pivot it is retried until it succeeds, never undone"
                );
            }
            Transition::Advance => self.saga.instance.position += 1,
            Transition::Complete => {
                self.finish(SagaState::Completed, None, now);
                tracing::info!(saga = definition.name, "saga completed");
                self.emit(&pb::SagaCompleted { saga_id, order_id });
            }
            Transition::Compensate { reason } => {
                // Asked for (by the customer or an operator, in an earlier
                // transaction) rather than led to by this turn's outcome:
                // that outcome is not its cause.
                if self.saga.instance.compensation_requested.is_some() {
                    self.cause = None;
                }
                let instance = &mut self.saga.instance;
                instance.state = SagaState::Compensating;
                instance.failure_reason = Some(reason.clone());
                instance.compensation_requested = None;
                self.clears_request = true;
                self.counts.push(Count::CompensationStarted);
                tracing::info!(saga = definition.name, %reason, "saga compensating");
                self.emit(&pb::SagaCompensationStarted { saga_id, reason });
            }
            Transition::StepFailed { step, kind, reason } => {
                let record = self.touch(step, kind);
                // An attempt that never reported back leaves it unknown.
                record.outcome_unknown |= record.status == StepStatus::Running;
                record.status = StepStatus::Failed;
                record.last_error = Some(reason.clone());
                record.finished_at = Some(now);
                record.next_attempt_at = None;
                let event = pb::SagaStepFailed {
                    saga_id,
                    step: step.to_owned(),
                    compensation: kind == Kind::Compensation,
                    attempts: u32::try_from(record.attempts).unwrap_or(0),
                    error: reason,
                    will_retry: false,
                    outcome_unknown: record.outcome_unknown,
                };
                self.counts.push(Count::PastDeadline(step, kind));
                // Caused by the clock, not by an attempt; what it leads to
                // in this turn is caused by it.
                self.cause = Some(self.emit(&event));
            }
            Transition::Compensated => {
                let reason = self.saga.instance.failure_reason.clone();
                self.finish(SagaState::Compensated, None, now);
                tracing::info!(saga = definition.name, "saga compensated");
                self.emit(&pb::SagaCompensated {
                    saga_id,
                    order_id,
                    reason: reason.unwrap_or_default(),
                });
            }
            Transition::Fail { reason } => {
                self.finish(SagaState::Failed, Some(reason.clone()), now);
                tracing::error!(saga = definition.name, %reason, "saga failed; it waits for an operator");
                self.emit(&pb::SagaFailed {
                    saga_id,
                    order_id,
                    reason,
                });
            }
        }
    }

    /// The pivot was refused for certain: it did not take effect.
    pub(crate) fn pivot_refused(&mut self) {
        self.saga.instance.forward_only_since = None;
        self.clears_forward_only = true;
    }

    fn finish(&mut self, state: SagaState, reason: Option<String>, now: DateTime<Utc>) {
        let instance = &mut self.saga.instance;
        instance.state = state;
        if reason.is_some() {
            instance.failure_reason = reason;
        }
        instance.finished_at = Some(now);
        instance.next_run_at = None;
        self.counts.push(Count::Finished(state));
    }

    /// Records a step's outcome: caused by the attempt (its id is the
    /// `x-request-id` of the attempt's calls), and the cause of the
    /// transitions it leads to.
    fn emit_outcome<M: Message + Name>(
        &mut self,
        event: &M,
        step: &Step,
        kind: Kind,
        attempt: u32,
    ) {
        let attempt = attempt_id(self.saga.instance.saga_id, step.name, kind, attempt);
        self.cause = Some(self.emit_caused(event, Some(attempt)));
    }

    /// Records a transition's event, caused by the step outcome this turn
    /// recorded (none when an operator's request or a timer led to it).
    /// Returns its event id.
    fn emit<M: Message + Name>(&mut self, event: &M) -> String {
        self.emit_caused(event, self.cause.clone())
    }

    fn emit_caused<M: Message + Name>(
        &mut self,
        event: &M,
        causation_id: Option<String>,
    ) -> String {
        let instance = &self.saga.instance;
        let envelope = saga_event(
            &self.publisher,
            instance.saga_id,
            &instance.correlation_id,
            causation_id,
            event,
        );
        let event_id = envelope.event_id.clone();
        self.events.push(envelope);
        event_id
    }
}

/// A saga event, sealed for the outbox.
pub(crate) fn saga_event<M: Message + Name>(
    publisher: &Publisher,
    saga_id: uuid::Uuid,
    correlation_id: &str,
    causation_id: Option<String>,
    event: &M,
) -> EventEnvelope {
    let origin = Origin {
        correlation_id: CorrelationId::parse(correlation_id)
            .unwrap_or_else(CorrelationId::generate),
        causation_id,
    };
    publisher.seal(Subject::unversioned("saga", &saga_id), origin, 1, event)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures::FutureExt as _;
    use uuid::Uuid;

    use super::*;
    use crate::definition::{FnAction, RetryPolicy, Settle};
    use crate::store::Instance;

    fn nothing(
        _: &crate::StepContext,
    ) -> futures::future::BoxFuture<'_, Result<serde_json::Value, StepError>> {
        async { Ok(serde_json::Value::Null) }.boxed()
    }

    fn step() -> Step {
        let retry = RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
        };
        Step {
            name: "charge",
            action: Some(Arc::new(FnAction(nothing))),
            compensation: None,
            retry,
            compensation_retry: retry,
            attempt_timeout: Duration::from_secs(1),
            compensation_attempt_timeout: Duration::from_secs(1),
            deadline: Duration::from_secs(10),
            settle: Settle::ByRepeating,
            condition: None,
            wait: None,
            child: None,
        }
    }

    fn turn(compensation_requested: Option<&str>) -> Turn {
        let saga = SagaRecord {
            instance: Instance {
                saga_id: Uuid::now_v7(),
                correlation_id: "flow-1".into(),
                compensation_requested: compensation_requested.map(str::to_owned),
                ..Instance::for_test(SagaState::Running, 0)
            },
            steps: vec![],
        };
        Turn::new(
            saga,
            Vec::new(),
            Vec::new(),
            Arc::default(),
            Publisher::new("test", "test.saga.events"),
        )
    }

    /// A step fails for good, then the saga turns back in the same turn.
    fn fail_then_compensate(turn: &mut Turn) -> (String, String) {
        let step = step();
        let definition = SagaDefinition {
            name: "test",
            version: 1,
            groups: vec![vec![step.clone()]],
            pivot: None,
        };
        let now = Utc::now();
        let (attempt, deadline) = turn.begin(&step, Kind::Action, now);
        turn.outcome(
            &step,
            Kind::Action,
            false,
            attempt,
            deadline,
            Err(StepError::Permanent("declined".into())),
            Duration::from_millis(5),
            now,
        );
        let reason = "charge: declined".to_owned();
        turn.transition(&definition, Transition::Compensate { reason }, now);
        let [failed, turned] = turn.events.as_slice() else {
            panic!("two events: {:?}", turn.events);
        };
        assert_eq!(failed.event_type, pb::SagaStepFailed::full_name());
        assert_eq!(turned.event_type, pb::SagaCompensationStarted::full_name());
        assert_eq!(
            failed.causation_id,
            format!("{}/charge/action/1", turn.saga.instance.saga_id),
            "a step's outcome names its attempt"
        );
        (failed.event_id.clone(), turned.causation_id.clone())
    }

    #[test]
    fn a_transition_names_the_outcome_that_led_to_it() {
        let mut turn = turn(None);
        let (failed, cause) = fail_then_compensate(&mut turn);
        assert_eq!(cause, failed);
        assert!(
            turn.events
                .iter()
                .all(|event| event.correlation_id == "flow-1")
        );
    }

    #[test]
    fn a_compensation_asked_for_earlier_names_no_outcome_of_this_turn() {
        let mut turn = turn(Some("customer cancelled"));
        let (_, cause) = fail_then_compensate(&mut turn);
        assert_eq!(cause, "");
    }

    #[test]
    fn a_committed_turn_forgets_its_cause() {
        let mut turn = turn(None);
        fail_then_compensate(&mut turn);
        turn.committed();
        let definition = SagaDefinition {
            name: "test",
            version: 1,
            groups: vec![vec![step()]],
            pivot: None,
        };
        turn.transition(&definition, Transition::Compensated, Utc::now());
        assert_eq!(turn.events[0].causation_id, "");
    }
}
