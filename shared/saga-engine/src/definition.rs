//! How a saga is described: steps with actions, compensations, retry
//! policies and deadlines. Nothing here knows about any particular saga.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use uuid::Uuid;

use crate::store::Kind;

/// A saga: groups of steps run in order; the steps of one group run in
/// parallel. When a step fails for good, every step that may have taken
/// effect is compensated, group by group in reverse order.
///
/// Steps are of three classes (Garcia-Molina & Salem's sagas, as
/// Richardson names them): the steps before the pivot are compensatable,
/// the pivot is the point of no return, and the steps after it are
/// retriable. Once the pivot may have taken effect the saga only goes
/// forward: compensation requests are refused, and the pivot and the steps
/// after it are retried until they answer for certain, however long that
/// takes (past their deadline they are flagged as overdue, never undone).
/// Only a definite refusal of the pivot itself turns the saga back.
#[derive(Clone)]
pub struct SagaDefinition {
    pub name: &'static str,
    /// Which version of `name` this is, from 1. A saga runs to its end on
    /// the version it started on; new sagas start on the newest version an
    /// engine carries. Change what a saga does by adding a version, never
    /// by changing one that sagas may be running on.
    pub version: u32,
    pub groups: Vec<Vec<Step>>,
    /// The pivot step's name; `None` for a saga that can always turn back.
    pub pivot: Option<&'static str>,
}

/// Where a step stands relative to the saga's point of no return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepClass {
    /// Before the pivot: undone if the saga turns back.
    Compensatable,
    /// The point of no return: once it may have taken effect, the saga only
    /// goes forward, unless the pivot is refused for certain.
    Pivot,
    /// After the pivot: retried until it succeeds; never undone.
    Retriable,
}

impl std::fmt::Debug for SagaDefinition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let groups: Vec<Vec<&str>> = self
            .groups
            .iter()
            .map(|g| g.iter().map(|s| s.name).collect())
            .collect();
        f.debug_struct("SagaDefinition")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("groups", &groups)
            .finish()
    }
}

impl SagaDefinition {
    /// A saga whose steps run one after another.
    pub fn sequence(name: &'static str, steps: Vec<Step>) -> Self {
        Self {
            name,
            version: 1,
            groups: steps.into_iter().map(|step| vec![step]).collect(),
            pivot: None,
        }
    }

    /// This saga with `step` as its pivot; see [`StepClass`]. The pivot's
    /// action must be idempotent and its refusal final: once it answers
    /// "no" for certain, no attempt of it (not even one still in flight)
    /// can take effect. The order's confirmation is such a step: the order
    /// aggregate decides it against the customer's cancellation atomically,
    /// and a cancelled order is never confirmed.
    #[must_use]
    pub fn with_pivot(mut self, step: &'static str) -> Self {
        self.pivot = Some(step);
        self
    }

    /// This saga as version `version` of its name.
    #[must_use]
    pub fn with_version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// The signals its steps wait for, in definition order.
    pub fn signals(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.groups
            .iter()
            .flatten()
            .filter_map(|step| step.wait.as_ref().map(|wait| wait.signal))
    }

    /// Whether a step waits for a signal: only then does the engine read
    /// a saga's signals.
    pub(crate) fn waits(&self) -> bool {
        self.signals().next().is_some()
    }

    /// Whether a step starts a child saga: only then does the engine read
    /// a saga's children.
    pub(crate) fn has_children(&self) -> bool {
        self.groups
            .iter()
            .flatten()
            .any(|step| step.child.is_some())
    }

    /// Index of the pivot's group, if the saga has a pivot.
    pub(crate) fn pivot_group(&self) -> Option<usize> {
        let pivot = self.pivot?;
        self.groups
            .iter()
            .position(|group| group.iter().any(|step| step.name == pivot))
    }

    /// The class of the steps of group `index`.
    pub(crate) fn class(&self, index: usize) -> StepClass {
        match self.pivot_group() {
            Some(pivot) if index == pivot => StepClass::Pivot,
            Some(pivot) if index > pivot => StepClass::Retriable,
            _ => StepClass::Compensatable,
        }
    }

    /// Checks what the engine relies on: the pivot exists and is alone in
    /// its group, and nothing from the pivot on has a compensation.
    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        if self.version == 0 {
            anyhow::bail!("saga {}: versions start at 1", self.name);
        }
        if let Some(step) = self.groups.iter().flatten().find(|step| {
            (step.wait.is_some() || step.child.is_some())
                && (step.action.is_some() || step.compensation.is_some())
        }) {
            anyhow::bail!(
                "saga {}: {} waits for a signal or a child saga, so it has no action or compensation of its own",
                self.name,
                step.name
            );
        }
        let Some(pivot) = self.pivot else {
            return Ok(());
        };
        let Some(index) = self.pivot_group() else {
            anyhow::bail!(
                "saga {}: the pivot {pivot} is not one of its steps",
                self.name
            );
        };
        if self.groups[index].len() != 1 {
            anyhow::bail!(
                "saga {}: the pivot {pivot} must be alone in its group",
                self.name
            );
        }
        if let Some(step) = self.groups[index..]
            .iter()
            .flatten()
            .find(|step| step.compensation.is_some())
        {
            anyhow::bail!(
                "saga {}: {} is at or after the pivot, so it is never undone; it cannot have a compensation",
                self.name,
                step.name
            );
        }
        Ok(())
    }

    /// The step named `name`, with the index of its group.
    pub fn step(&self, name: &str) -> Option<(usize, &Step)> {
        self.groups.iter().enumerate().find_map(|(index, group)| {
            group
                .iter()
                .find(|step| step.name == name)
                .map(|step| (index, step))
        })
    }

    /// The longest time one attempt of any step may take.
    pub(crate) fn longest_attempt(&self) -> Duration {
        self.groups
            .iter()
            .flatten()
            .flat_map(|step| [step.attempt_timeout, step.compensation_attempt_timeout])
            .max()
            .unwrap_or_default()
    }
}

/// One step: an action, what undoes it, and how hard to try.
#[derive(Clone)]
pub struct Step {
    pub name: &'static str,
    /// What the step does; `None` for a step that exists only to be
    /// compensated (it succeeds at once).
    pub action: Option<Arc<dyn Action>>,
    /// What undoes the action; run if the action may have taken effect.
    /// Only steps before the pivot have one.
    pub compensation: Option<Arc<dyn Action>>,
    pub retry: RetryPolicy,
    pub compensation_retry: RetryPolicy,
    /// Longest time one attempt may take; past it the attempt's outcome is
    /// unknown.
    pub attempt_timeout: Duration,
    pub compensation_attempt_timeout: Duration,
    /// Longest time from the first attempt to success; past it a
    /// compensatable step fails for good, and the pivot or a retriable step
    /// is flagged as overdue (and retried on).
    pub deadline: Duration,
    /// How the engine learns, before compensating, whether an action whose
    /// answer was lost took effect.
    pub settle: Settle,
    /// When set, the step runs only if this holds of the saga's data and
    /// the earlier steps' outputs, read when the saga reaches its group;
    /// otherwise it is recorded as skipped, and nothing is compensated for
    /// it. Pure: the planner calls it, and may call it more than once.
    pub condition: Option<Condition>,
    /// When set, the step waits for a signal (SagaService/SignalSaga)
    /// instead of running an action: the signal's payload is its output.
    pub wait: Option<SignalWait>,
    /// When set, the step starts a saga of another type as its child and
    /// waits for its outcome: completed is the step's success, anything
    /// else its failure. Compensating the step compensates the child (a
    /// completed one is reopened to compensate, unless it is past its
    /// pivot); cancelling the parent reaches a child still running, and
    /// terminating it terminates the child (see `Engine::terminate`);
    /// pausing it does not pause the child (see `Engine::pause`). While the
    /// child runs, the parent is not stuck for want of progress; it is if
    /// the child is (see `store::flag_stuck`).
    pub child: Option<ChildSaga>,
}

/// The saga a step starts as its child.
#[derive(Clone)]
pub struct ChildSaga {
    pub saga_type: &'static str,
    /// The child's input, from the parent's data and earlier outputs.
    pub data: Arc<dyn Fn(&Facts<'_>) -> serde_json::Value + Send + Sync>,
}

impl std::fmt::Debug for ChildSaga {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildSaga")
            .field("saga_type", &self.saga_type)
            .finish_non_exhaustive()
    }
}

/// A step's predicate; see [`Step::condition`].
pub type Condition = Arc<dyn Fn(&Facts<'_>) -> bool + Send + Sync>;

/// What a step's [`Condition`] may read: the saga's input and the outputs
/// of the steps that succeeded so far (a signal's payload included).
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub data: &'a serde_json::Value,
    pub(crate) steps: &'a [crate::store::StepRecord],
}

impl Facts<'_> {
    /// The output of `step`'s action, if it succeeded.
    pub fn output(&self, step: &str) -> Option<&serde_json::Value> {
        self.steps
            .iter()
            .find(|r| {
                r.step == step && r.kind == Kind::Action && r.status == crate::StepStatus::Succeeded
            })
            .map(|r| r.output.as_ref().map_or(&serde_json::Value::Null, |o| &o.0))
    }
}

/// A step that waits for the signal `signal`, for at most `timeout` (a
/// durable timer: the step's deadline, a row, which a pause moves on).
#[derive(Debug, Clone, PartialEq)]
pub struct SignalWait {
    pub signal: &'static str,
    pub timeout: Duration,
    pub on_timeout: OnTimeout,
}

/// What a wait that timed out comes to.
#[derive(Debug, Clone, PartialEq)]
pub enum OnTimeout {
    /// The step fails for good with this error: before the pivot the saga
    /// turns back, after it the saga waits for an operator.
    Fail(String),
    /// The step succeeds with this output, as if it had been signalled
    /// (a review that timed out is a review that declined, say).
    Output(serde_json::Value),
}

/// What the engine does before it compensates a step whose action's last
/// outcome is unknown (a timeout, a lost connection, a crash mid-call): an
/// unknown outcome is a question to ask, not a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Repeats the action (it is idempotent) until it answers for certain;
    /// the compensation runs only if it took effect.
    ByRepeating,
    /// The compensation itself settles it: it undoes whatever the action
    /// came to, nothing included (a refund-or-void by the charge's key).
    ByCompensation,
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What an action or compensation is handed.
#[derive(Debug, Clone)]
pub struct StepContext {
    pub saga_id: Uuid,
    pub step: &'static str,
    /// The saga's input.
    pub data: serde_json::Value,
    /// Outputs of the actions that succeeded so far, by step name.
    pub outputs: HashMap<String, serde_json::Value>,
    /// Outputs of the compensations that succeeded so far, by step name.
    pub compensation_outputs: HashMap<String, serde_json::Value>,
    /// Actions that failed for good, with their last error, by step name.
    pub failed_actions: HashMap<String, String>,
    /// Why the saga is compensating, when it is.
    pub failure_reason: Option<String>,
    /// This attempt's number, from 1.
    pub attempt: u32,
    /// Time left for this attempt: pass it on as the deadline of calls.
    pub time_left: Duration,
    pub correlation_id: String,
    /// This attempt's id ([`attempt_id`]): send it as the `x-request-id` of
    /// its calls, so the events they cause name this attempt as their
    /// causation, as the step's own outcome event does.
    pub request_id: String,
}

/// The id of one attempt of a step, `<saga id>/<step>/<action or
/// compensation>/<attempt>`: unique (attempts are numbered in the saga's
/// row before they begin), and readable in a trace.
pub fn attempt_id(saga_id: Uuid, step: &str, kind: Kind, attempt: u32) -> String {
    format!("{saga_id}/{step}/{}/{attempt}", kind.as_str())
}

impl StepContext {
    /// An idempotency key for this step's action, the same on every
    /// attempt and every replica: downstream services deduplicate on it.
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}", self.saga_id, self.step)
    }
}

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// Did not take effect, and might if tried again (the service refused
    /// for now: overloaded, a conflict, a token to renew).
    #[error("{0}")]
    Retryable(String),
    /// The answer was lost (the attempt timed out, was cancelled, or its
    /// connection broke): it may or may not have taken effect. Retried like
    /// a retryable error, and settled before the step is compensated.
    #[error("{0}")]
    Unknown(String),
    /// Will not succeed (a declined payment, a refused command).
    #[error("{0}")]
    Permanent(String),
    /// Nothing was tried (a circuit breaker refused the call): try again
    /// after `retry_after`, without spending one of the step's attempts
    /// (its deadline still holds). Otherwise an open circuit would use up a
    /// saga's retries in moments and compensate it for no fault of its own.
    #[error("{reason}")]
    NotAttempted {
        reason: String,
        retry_after: Duration,
    },
}

/// An action or a compensation. Must be idempotent: after a crash or a
/// timeout it is run again with the same context.
pub trait Action: Send + Sync + 'static {
    fn run<'a>(
        &'a self,
        context: &'a StepContext,
    ) -> BoxFuture<'a, Result<serde_json::Value, StepError>>;
}

/// Any async closure from a context to an outcome is an action.
pub struct FnAction<F>(pub F);

impl<F> std::fmt::Debug for FnAction<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnAction")
    }
}

impl<F> Action for FnAction<F>
where
    F: for<'a> Fn(&'a StepContext) -> BoxFuture<'a, Result<serde_json::Value, StepError>>
        + Send
        + Sync
        + 'static,
{
    fn run<'a>(
        &'a self,
        context: &'a StepContext,
    ) -> BoxFuture<'a, Result<serde_json::Value, StepError>> {
        (self.0)(context)
    }
}

/// How often, and how far apart, a failing step is tried.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// The pause after failed attempt `attempt` (from 1): exponential,
    /// capped, with full jitter so that retrying sagas spread out.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exponential = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)));
        let capped = exponential.min(self.max_backoff);
        capped.mul_f64(rand::random_range(0.5..=1.0))
    }
}

/// Where every saga event is recorded, in the transaction that makes it
/// (a service's trace view, say). With a journal, the events topic carries
/// only what subscribers act on (a saga started, turned back, ended);
/// without one, it carries every event.
pub trait Journal: Send + Sync + 'static {
    fn record<'a>(
        &'a self,
        conn: &'a mut sqlx::PgConnection,
        events: &'a [messaging::EventEnvelope],
    ) -> BoxFuture<'a, anyhow::Result<()>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_with_jitter_up_to_its_cap() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        for (attempt, full) in [(1, 100), (2, 200), (3, 400), (4, 800), (5, 1000), (9, 1000)] {
            for _ in 0..20 {
                let pause = policy.backoff(attempt);
                let full = Duration::from_millis(full);
                assert!(
                    pause >= full / 2 && pause <= full,
                    "attempt {attempt}: {pause:?}"
                );
            }
        }
    }
}
