//! What a saga must do next, decided from its definition, its record and
//! the time alone: no I/O, so every rule can be read (and tested) here.

use chrono::{DateTime, Utc};

use crate::definition::{Facts, SagaDefinition, Settle, Step, StepClass};
use crate::store::{Child, Kind, SagaRecord, SagaState, Signal, StepRecord, StepStatus};

/// The next thing to do for a saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Attempt these steps' actions or compensations now, in parallel.
    /// While compensating, an action is attempted again only to settle an
    /// unknown outcome.
    Attempt {
        kind: Kind,
        steps: Vec<&'static str>,
    },
    /// Change state without running anything.
    Transition(Transition),
    /// Nothing due before then (a retry, a deadline).
    Wait(DateTime<Utc>),
    /// Nothing more will happen without an operator.
    Idle,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Transition {
    /// An operator asked for a pause: nothing more runs until resumed.
    Pause,
    /// Every step of the current group succeeded (or was skipped): on to
    /// the next.
    Advance,
    /// These steps' conditions do not hold: they are skipped.
    Skip {
        steps: Vec<&'static str>,
    },
    /// A step begins waiting for its signal, until then (its timer).
    BeginWait {
        step: &'static str,
        until: DateTime<Utc>,
    },
    /// The signal a waiting step waits for is here: its payload is the
    /// step's output.
    Signalled {
        step: &'static str,
        signal: Signal,
    },
    /// A waiting step's timer fired before its signal came.
    WaitTimedOut {
        step: &'static str,
    },
    /// A step starts its child saga.
    StartChild {
        step: &'static str,
    },
    /// A step's child saga ended: completed, or why not.
    ChildEnded {
        step: &'static str,
        outcome: Result<uuid::Uuid, String>,
    },
    /// Compensating a step compensates its child saga.
    CompensateChild {
        step: &'static str,
        child: uuid::Uuid,
    },
    /// The child saga of a step being compensated ended: compensated, or
    /// why it cannot be.
    ChildCompensated {
        step: &'static str,
        outcome: Result<(), String>,
    },
    Complete,
    /// Stop going forward and undo what was done.
    Compensate {
        reason: String,
    },
    /// A compensatable step ran out of time: it fails for good.
    StepFailed {
        step: &'static str,
        kind: Kind,
        reason: String,
    },
    /// A step that cannot give up (the pivot, or one after it) is past its
    /// deadline: flag it for operators, and go on retrying.
    Overdue {
        step: &'static str,
        since: DateTime<Utc>,
    },
    Compensated,
    /// A compensation failed for good, or a step after the pivot was
    /// refused: an operator must step in.
    Fail {
        reason: String,
    },
}

/// `signals` are the saga's, in the order they arrived (empty for a
/// definition whose steps wait for none); `children` its child sagas.
pub(crate) fn plan(
    definition: &SagaDefinition,
    saga: &SagaRecord,
    signals: &[Signal],
    children: &[Child],
    now: DateTime<Utc>,
) -> Plan {
    // A pause comes first: the attempts just made are recorded with it,
    // and nothing new begins.
    if saga.instance.state.is_driven() && saga.instance.pause_requested_at.is_some() {
        return Plan::Transition(Transition::Pause);
    }
    match saga.instance.state {
        SagaState::Running => forward(definition, saga, signals, children, now),
        SagaState::Compensating => backward(definition, saga, children, now),
        SagaState::Completed
        | SagaState::Compensated
        | SagaState::Failed
        | SagaState::Paused
        | SagaState::Terminated => Plan::Idle,
    }
}

/// The steps that may have taken effect and are not compensated, in
/// definition order: what stopping the saga now, without compensating,
/// leaves in place. The same rule as compensation's: an action attempted
/// (unless it answered for certain that it did nothing, for a step settled
/// by repeating), or a step without an action once the saga reached it,
/// whose compensation exists and has not succeeded.
pub(crate) fn in_effect(definition: &SagaDefinition, saga: &SagaRecord) -> Vec<&'static str> {
    let reached = usize::try_from(saga.instance.position).unwrap_or(0);
    let mut left = Vec::new();
    for (index, group) in definition.groups.iter().enumerate() {
        for step in group {
            if step.compensation.is_none() {
                continue;
            }
            let action = saga.step(step.name, Kind::Action);
            if action.is_some_and(|r| r.status == StepStatus::Skipped) {
                continue;
            }
            let attempted = action.is_some_and(|r| r.attempts > 0)
                || (step.action.is_none() && index <= reached);
            let refused_for_certain = action.is_some_and(|r| {
                step.settle == Settle::ByRepeating
                    && r.status != StepStatus::Succeeded
                    && !r.outcome_unknown()
            });
            let undone = saga
                .step(step.name, Kind::Compensation)
                .is_some_and(|r| r.status == StepStatus::Succeeded);
            if attempted && !refused_for_certain && !undone {
                left.push(step.name);
            }
        }
    }
    left
}

fn forward(
    definition: &SagaDefinition,
    saga: &SagaRecord,
    signals: &[Signal],
    children: &[Child],
    now: DateTime<Utc>,
) -> Plan {
    // A request is refused once the saga is forward-only, and no forward
    // attempt begins while one waits; so a request seen here came first.
    let forward_only = saga.instance.forward_only_since.is_some();
    if let Some(reason) = saga
        .instance
        .compensation_requested
        .as_ref()
        .filter(|_| !forward_only)
    {
        return Plan::Transition(Transition::Compensate {
            reason: reason.clone(),
        });
    }
    let position = usize::try_from(saga.instance.position).unwrap_or(usize::MAX);
    let Some(group) = definition.groups.get(position) else {
        return Plan::Transition(Transition::Complete);
    };
    let class = definition.class(position);
    let mut due = Vec::new();
    let mut wait: Option<DateTime<Utc>> = None;
    let mut all_succeeded = true;
    let mut skip = Vec::new();
    let facts = Facts {
        data: &saga.instance.data.0,
        steps: &saga.steps,
    };
    for step in group {
        let record = saga.step(step.name, Kind::Action);
        if record.is_some_and(|r| matches!(r.status, StepStatus::Succeeded | StepStatus::Skipped)) {
            continue;
        }
        all_succeeded = false;
        // Decided once, when the saga reaches the group: a step begun is
        // not skipped later.
        if record.is_none() && step.condition.as_ref().is_some_and(|holds| !holds(&facts)) {
            skip.push(step.name);
            continue;
        }
        if let Some(record) = record.filter(|r| r.status == StepStatus::Failed) {
            let error = record.last_error.as_deref().unwrap_or("failed");
            return Plan::Transition(match class {
                // Refused for certain: it did not take effect. Before the
                // pivot, or at it, the saga turns back.
                StepClass::Compensatable | StepClass::Pivot => Transition::Compensate {
                    reason: format!("{}: {error}", step.name),
                },
                StepClass::Retriable => Transition::Fail {
                    reason: format!(
                        "{}: {error}; past the pivot the saga only goes forward: retry it once the cause is fixed",
                        step.name
                    ),
                },
            });
        }
        if step.child.is_some() {
            let Some(record) = record else {
                return Plan::Transition(Transition::StartChild { step: step.name });
            };
            let child = children.iter().find(|c| c.parent_step == step.name);
            let ended = match child.map(|c| (c.state, c)) {
                Some((SagaState::Completed, c)) => Some(Ok(c.saga_id)),
                Some((
                    state @ (SagaState::Compensated | SagaState::Failed | SagaState::Terminated),
                    c,
                )) => Some(Err(format!(
                    "child saga {} {} {}: {}",
                    c.saga_type,
                    c.saga_id,
                    state.as_str(),
                    c.failure_reason.as_deref().unwrap_or("no reason given")
                ))),
                // Running: the child wakes this saga when it ends.
                Some(_) => None,
                None if record.status == StepStatus::Waiting => {
                    Some(Err("its child saga is gone".to_owned()))
                }
                None => None,
            };
            if let Some(outcome) = ended {
                return Plan::Transition(Transition::ChildEnded {
                    step: step.name,
                    outcome,
                });
            }
            continue;
        }
        if let Some(waits) = &step.wait {
            if let Some(signal) = signal_for(definition, step, signals) {
                return Plan::Transition(Transition::Signalled {
                    step: step.name,
                    signal: signal.clone(),
                });
            }
            match record.and_then(|r| r.deadline_at) {
                None => {
                    let until = now
                        + chrono::Duration::from_std(waits.timeout)
                            .unwrap_or(chrono::Duration::MAX);
                    return Plan::Transition(Transition::BeginWait {
                        step: step.name,
                        until,
                    });
                }
                Some(until) if until <= now => {
                    return Plan::Transition(Transition::WaitTimedOut { step: step.name });
                }
                Some(until) => wait = Some(wait.map_or(until, |w| w.min(until))),
            }
            continue;
        }
        if class != StepClass::Compensatable
            && saga.instance.overdue_step.is_none()
            && let Some(since) = record.and_then(|r| r.deadline_at).filter(|d| *d <= now)
        {
            return Plan::Transition(Transition::Overdue {
                step: step.name,
                since,
            });
        }
        match next_attempt(step, Kind::Action, class, record, now) {
            Next::Now => due.push(step.name),
            Next::At(at) => wait = Some(wait.map_or(at, |w| w.min(at))),
            Next::Fail(reason) => {
                return Plan::Transition(Transition::StepFailed {
                    step: step.name,
                    kind: Kind::Action,
                    reason,
                });
            }
        }
    }
    if !skip.is_empty() {
        return Plan::Transition(Transition::Skip { steps: skip });
    }
    if all_succeeded {
        return Plan::Transition(if position + 1 == definition.groups.len() {
            Transition::Complete
        } else {
            Transition::Advance
        });
    }
    if !due.is_empty() {
        return Plan::Attempt {
            kind: Kind::Action,
            steps: due,
        };
    }
    wait.map_or(Plan::Idle, Plan::Wait)
}

/// Compensates the latest group with anything left to undo; within it, every
/// step whose action may have taken effect and has a compensation, in
/// parallel. An action may have taken effect once it was attempted; a step
/// without an action (one that exists to be compensated) takes effect when
/// the saga reaches it. A step settled by repeating whose outcome is
/// unknown is first asked again until it answers for certain; one that
/// answered "no" for certain has nothing to undo.
fn backward(
    definition: &SagaDefinition,
    saga: &SagaRecord,
    children: &[Child],
    now: DateTime<Utc>,
) -> Plan {
    let reached = usize::try_from(saga.instance.position).unwrap_or(0);
    for (index, group) in definition.groups.iter().enumerate().rev() {
        // A child asked to compensate: this group waits for it.
        let mut undoing_child = false;
        let mut settle = Vec::new();
        let mut due = Vec::new();
        let mut wait: Option<DateTime<Utc>> = None;
        let mut wait_until =
            |at: DateTime<Utc>| wait = Some(wait.map_or(at, |w: DateTime<Utc>| w.min(at)));
        for step in group {
            let action = saga.step(step.name, Kind::Action);
            // Skipped: it never ran, so there is nothing to undo.
            if action.is_some_and(|r| r.status == StepStatus::Skipped) {
                continue;
            }
            if step.child.is_some() {
                // Never started, or nothing of it left to undo.
                let Some(child) = children.iter().find(|c| c.parent_step == step.name) else {
                    continue;
                };
                let undone = saga.step(step.name, Kind::Compensation);
                match (undone.map(|r| r.status), child.state) {
                    (Some(StepStatus::Succeeded), _) => {}
                    (Some(StepStatus::Failed), _) => {
                        let error = undone
                            .and_then(|r| r.last_error.as_deref())
                            .unwrap_or("failed");
                        return Plan::Transition(Transition::Fail {
                            reason: format!("compensation of {} failed: {error}", step.name),
                        });
                    }
                    (None, SagaState::Compensated | SagaState::Terminated) => {}
                    (None, _) => {
                        return Plan::Transition(Transition::CompensateChild {
                            step: step.name,
                            child: child.saga_id,
                        });
                    }
                    (Some(_), SagaState::Compensated) => {
                        return Plan::Transition(Transition::ChildCompensated {
                            step: step.name,
                            outcome: Ok(()),
                        });
                    }
                    (Some(_), state @ (SagaState::Failed | SagaState::Terminated)) => {
                        return Plan::Transition(Transition::ChildCompensated {
                            step: step.name,
                            outcome: Err(format!(
                                "child saga {} {} is {}",
                                child.saga_type,
                                child.saga_id,
                                state.as_str()
                            )),
                        });
                    }
                    (Some(_), SagaState::Completed) if child.forward_only => {
                        return Plan::Transition(Transition::ChildCompensated {
                            step: step.name,
                            outcome: Err(format!(
                                "child saga {} {} is past its pivot: it cannot be undone",
                                child.saga_type, child.saga_id
                            )),
                        });
                    }
                    (Some(_), _) => undoing_child = true,
                }
                continue;
            }
            let attempted = action.is_some_and(|r| r.attempts > 0)
                || (step.action.is_none() && index <= reached);
            if !attempted || step.compensation.is_none() {
                continue;
            }
            if let Some(action) = action
                .filter(|r| step.settle == Settle::ByRepeating && r.status != StepStatus::Succeeded)
            {
                if !action.outcome_unknown() {
                    continue; // it answered for certain that it did nothing
                }
                match action
                    .next_attempt_at
                    .filter(|at| *at > now && action.status == StepStatus::Waiting)
                {
                    Some(at) => wait_until(at),
                    None => settle.push(step.name),
                }
                continue;
            }
            let record = saga.step(step.name, Kind::Compensation);
            match record.map(|r| r.status) {
                Some(StepStatus::Succeeded | StepStatus::Skipped) => continue,
                Some(StepStatus::Failed) => {
                    let error = record
                        .and_then(|r| r.last_error.as_deref())
                        .unwrap_or("failed");
                    return Plan::Transition(Transition::Fail {
                        reason: format!("compensation of {} failed: {error}", step.name),
                    });
                }
                Some(StepStatus::Waiting | StepStatus::Running) | None => {}
            }
            match next_attempt(
                step,
                Kind::Compensation,
                StepClass::Compensatable,
                record,
                now,
            ) {
                Next::Now => due.push(step.name),
                Next::At(at) => wait_until(at),
                Next::Fail(reason) => {
                    return Plan::Transition(Transition::StepFailed {
                        step: step.name,
                        kind: Kind::Compensation,
                        reason,
                    });
                }
            }
        }
        if !settle.is_empty() {
            return Plan::Attempt {
                kind: Kind::Action,
                steps: settle,
            };
        }
        if !due.is_empty() {
            return Plan::Attempt {
                kind: Kind::Compensation,
                steps: due,
            };
        }
        if let Some(at) = wait {
            return Plan::Wait(at);
        }
        if undoing_child {
            // Woken when the child ends.
            return Plan::Idle;
        }
    }
    Plan::Transition(Transition::Compensated)
}

/// The signal `step` takes: the k-th step (in definition order) waiting
/// for a name takes the k-th signal of that name to arrive.
fn signal_for<'a>(
    definition: &SagaDefinition,
    step: &Step,
    signals: &'a [Signal],
) -> Option<&'a Signal> {
    let name = step.wait.as_ref()?.signal;
    let rank = definition
        .groups
        .iter()
        .flatten()
        .filter(|s| s.wait.as_ref().is_some_and(|w| w.signal == name))
        .position(|s| s.name == step.name)?;
    signals.iter().filter(|s| s.signal == name).nth(rank)
}

enum Next {
    Now,
    At(DateTime<Utc>),
    Fail(String),
}

/// When a step that has not succeeded should be attempted again. A
/// compensatable step (or a compensation) gives up when out of attempts or
/// time; the pivot and the steps after it never do.
fn next_attempt(
    step: &Step,
    kind: Kind,
    class: StepClass,
    record: Option<&StepRecord>,
    now: DateTime<Utc>,
) -> Next {
    let Some(record) = record else {
        return Next::Now;
    };
    let gives_up = class == StepClass::Compensatable;
    let max_attempts = match kind {
        Kind::Action => step.retry.max_attempts,
        Kind::Compensation => step.compensation_retry.max_attempts,
    };
    let out_of_attempts = u32::try_from(record.attempts).unwrap_or(u32::MAX) >= max_attempts;
    let deadline = record.deadline_at.filter(|_| gives_up);
    if deadline.is_some_and(|deadline| deadline <= now) {
        return Next::Fail(format!(
            "deadline exceeded after {} attempts",
            record.attempts
        ));
    }
    match record.status {
        // An attempt was started and never recorded: its replica died. It
        // counts as an attempt whose outcome is unknown.
        StepStatus::Running if out_of_attempts && gives_up => Next::Fail(format!(
            "attempt {} did not report back and no attempts are left",
            record.attempts
        )),
        StepStatus::Running => Next::Now,
        StepStatus::Waiting | StepStatus::Succeeded | StepStatus::Failed | StepStatus::Skipped => {
            match record.next_attempt_at {
                Some(at) if at > now => Next::At(deadline.map_or(at, |deadline| at.min(deadline))),
                _ => Next::Now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use futures::FutureExt as _;

    use super::*;
    use crate::definition::{FnAction, RetryPolicy};
    use crate::store::Instance;

    /// The plan of a saga without signals or children.
    fn plan(definition: &SagaDefinition, saga: &SagaRecord, now: DateTime<Utc>) -> Plan {
        super::plan(definition, saga, &[], &[], now)
    }

    fn nothing(
        _: &crate::StepContext,
    ) -> futures::future::BoxFuture<'_, Result<serde_json::Value, crate::StepError>> {
        async { Ok(serde_json::Value::Null) }.boxed()
    }

    fn step(name: &'static str, compensated: bool) -> Step {
        let noop: Arc<dyn crate::Action> = Arc::new(FnAction(nothing));
        let retry = RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
        };
        Step {
            name,
            action: Some(noop.clone()),
            compensation: compensated.then_some(noop),
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

    fn definition() -> SagaDefinition {
        SagaDefinition {
            name: "test",
            version: 1,
            groups: vec![
                vec![step("a", true)],
                vec![step("b", true), step("c", false)],
                vec![step("d", true)],
            ],
            pivot: None,
        }
    }

    fn saga(state: SagaState, position: i32, steps: Vec<StepRecord>) -> SagaRecord {
        SagaRecord {
            instance: Instance::for_test(state, position),
            steps,
        }
    }

    fn record(step: &str, kind: Kind, status: StepStatus, attempts: i32) -> StepRecord {
        StepRecord {
            step: step.into(),
            kind,
            status,
            attempts,
            last_error: Some("boom".into()),
            output: None,
            started_at: Utc::now(),
            finished_at: None,
            next_attempt_at: None,
            deadline_at: None,
            outcome_unknown: false,
        }
    }

    #[test]
    fn a_new_saga_attempts_its_first_step() {
        assert_eq!(
            plan(
                &definition(),
                &saga(SagaState::Running, 0, vec![]),
                Utc::now()
            ),
            Plan::Attempt {
                kind: Kind::Action,
                steps: vec!["a"]
            }
        );
    }

    #[test]
    fn a_parallel_group_runs_together_and_advances_when_all_succeed() {
        let done_a = record("a", Kind::Action, StepStatus::Succeeded, 1);
        let partial = saga(
            SagaState::Running,
            1,
            vec![
                done_a.clone(),
                record("b", Kind::Action, StepStatus::Succeeded, 1),
            ],
        );
        assert_eq!(
            plan(&definition(), &partial, Utc::now()),
            Plan::Attempt {
                kind: Kind::Action,
                steps: vec!["c"]
            }
        );
        let fresh = saga(SagaState::Running, 1, vec![done_a.clone()]);
        assert_eq!(
            plan(&definition(), &fresh, Utc::now()),
            Plan::Attempt {
                kind: Kind::Action,
                steps: vec!["b", "c"]
            }
        );
        let done = saga(
            SagaState::Running,
            1,
            vec![
                done_a,
                record("b", Kind::Action, StepStatus::Succeeded, 1),
                record("c", Kind::Action, StepStatus::Succeeded, 1),
            ],
        );
        assert_eq!(
            plan(&definition(), &done, Utc::now()),
            Plan::Transition(Transition::Advance)
        );
    }

    #[test]
    fn a_waiting_retry_waits_until_its_time_and_its_deadline_fails_it() {
        let now = Utc::now();
        let mut waiting = record("a", Kind::Action, StepStatus::Waiting, 1);
        waiting.next_attempt_at = Some(now + chrono::Duration::seconds(5));
        waiting.deadline_at = Some(now + chrono::Duration::seconds(3));
        assert_eq!(
            plan(
                &definition(),
                &saga(SagaState::Running, 0, vec![waiting.clone()]),
                now
            ),
            Plan::Wait(now + chrono::Duration::seconds(3))
        );
        let later = now + chrono::Duration::seconds(4);
        assert!(matches!(
            plan(
                &definition(),
                &saga(SagaState::Running, 0, vec![waiting]),
                later
            ),
            Plan::Transition(Transition::StepFailed {
                step: "a",
                kind: Kind::Action,
                ..
            })
        ));
    }

    #[test]
    fn an_attempt_that_never_reported_back_is_retried_or_failed() {
        let crashed = record("a", Kind::Action, StepStatus::Running, 1);
        assert_eq!(
            plan(
                &definition(),
                &saga(SagaState::Running, 0, vec![crashed]),
                Utc::now()
            ),
            Plan::Attempt {
                kind: Kind::Action,
                steps: vec!["a"]
            }
        );
        let exhausted = record("a", Kind::Action, StepStatus::Running, 3);
        assert!(matches!(
            plan(
                &definition(),
                &saga(SagaState::Running, 0, vec![exhausted]),
                Utc::now()
            ),
            Plan::Transition(Transition::StepFailed { .. })
        ));
    }

    #[test]
    fn a_failed_step_or_a_request_turns_the_saga_to_compensation() {
        let failed = saga(
            SagaState::Running,
            0,
            vec![record("a", Kind::Action, StepStatus::Failed, 1)],
        );
        assert_eq!(
            plan(&definition(), &failed, Utc::now()),
            Plan::Transition(Transition::Compensate {
                reason: "a: boom".into()
            })
        );
        let mut asked = saga(SagaState::Running, 0, vec![]);
        asked.instance.compensation_requested = Some("customer cancelled".into());
        assert_eq!(
            plan(&definition(), &asked, Utc::now()),
            Plan::Transition(Transition::Compensate {
                reason: "customer cancelled".into()
            })
        );
    }

    #[test]
    fn compensation_goes_group_by_group_in_reverse_over_attempted_steps() {
        // a and b succeeded, c failed (never compensated: it has none), d never ran.
        let log = vec![
            record("a", Kind::Action, StepStatus::Succeeded, 1),
            record("b", Kind::Action, StepStatus::Succeeded, 1),
            record("c", Kind::Action, StepStatus::Failed, 3),
        ];
        let now = Utc::now();
        assert_eq!(
            plan(
                &definition(),
                &saga(SagaState::Compensating, 1, log.clone()),
                now
            ),
            Plan::Attempt {
                kind: Kind::Compensation,
                steps: vec!["b"]
            }
        );
        let mut after_b = log.clone();
        after_b.push(record("b", Kind::Compensation, StepStatus::Succeeded, 1));
        assert_eq!(
            plan(
                &definition(),
                &saga(SagaState::Compensating, 1, after_b.clone()),
                now
            ),
            Plan::Attempt {
                kind: Kind::Compensation,
                steps: vec!["a"]
            }
        );
        after_b.push(record("a", Kind::Compensation, StepStatus::Succeeded, 1));
        assert_eq!(
            plan(
                &definition(),
                &saga(SagaState::Compensating, 1, after_b),
                now
            ),
            Plan::Transition(Transition::Compensated)
        );
        let mut broken = log;
        broken.push(record("b", Kind::Compensation, StepStatus::Failed, 3));
        assert!(matches!(
            plan(
                &definition(),
                &saga(SagaState::Compensating, 1, broken),
                now
            ),
            Plan::Transition(Transition::Fail { .. })
        ));
    }

    #[test]
    fn a_step_without_an_action_is_compensated_even_if_the_saga_never_ran() {
        let mut definition = definition();
        definition.groups[0][0].action = None;
        let asked = saga(SagaState::Compensating, 0, vec![]);
        assert_eq!(
            plan(&definition, &asked, Utc::now()),
            Plan::Attempt {
                kind: Kind::Compensation,
                steps: vec!["a"]
            }
        );
    }

    /// a (compensatable), p (the pivot), r (retriable).
    fn pivoted() -> SagaDefinition {
        SagaDefinition::sequence(
            "test",
            vec![step("a", true), step("p", false), step("r", false)],
        )
        .with_pivot("p")
    }

    #[test]
    fn past_the_pivot_deadlines_and_budgets_flag_a_step_but_never_fail_it() {
        let now = Utc::now();
        let mut lost = record("p", Kind::Action, StepStatus::Waiting, 7);
        lost.outcome_unknown = true;
        lost.deadline_at = Some(now - chrono::Duration::seconds(1));
        lost.next_attempt_at = Some(now + chrono::Duration::seconds(2));
        let log = vec![record("a", Kind::Action, StepStatus::Succeeded, 1), lost];
        let mut saga = saga(SagaState::Running, 1, log);
        saga.instance.forward_only_since = Some(now);
        assert_eq!(
            plan(&pivoted(), &saga, now),
            Plan::Transition(Transition::Overdue {
                step: "p",
                since: now - chrono::Duration::seconds(1)
            })
        );
        saga.instance.overdue_step = Some("p".into());
        assert_eq!(
            plan(&pivoted(), &saga, now),
            Plan::Wait(now + chrono::Duration::seconds(2)),
            "retried at its time, not cut short by the deadline"
        );
        saga.steps[1].status = StepStatus::Running; // its replica died mid-call
        assert_eq!(
            plan(&pivoted(), &saga, now),
            Plan::Attempt {
                kind: Kind::Action,
                steps: vec!["p"]
            }
        );
        // A request that somehow reached a forward-only saga is not acted on.
        saga.instance.compensation_requested = Some("operator".into());
        assert!(matches!(plan(&pivoted(), &saga, now), Plan::Attempt { .. }));
    }

    #[test]
    fn a_refused_pivot_turns_back_and_a_refused_step_after_it_waits_for_an_operator() {
        let a = record("a", Kind::Action, StepStatus::Succeeded, 1);
        let refused = saga(
            SagaState::Running,
            1,
            vec![a.clone(), record("p", Kind::Action, StepStatus::Failed, 2)],
        );
        assert_eq!(
            plan(&pivoted(), &refused, Utc::now()),
            Plan::Transition(Transition::Compensate {
                reason: "p: boom".into()
            })
        );
        let parked = saga(
            SagaState::Running,
            2,
            vec![
                a,
                record("p", Kind::Action, StepStatus::Succeeded, 1),
                record("r", Kind::Action, StepStatus::Failed, 1),
            ],
        );
        assert!(matches!(
            plan(&pivoted(), &parked, Utc::now()),
            Plan::Transition(Transition::Fail { .. })
        ));
    }

    #[test]
    fn an_unknown_outcome_is_settled_before_compensating_and_a_certain_no_is_not_undone() {
        let now = Utc::now();
        let mut lost = record("a", Kind::Action, StepStatus::Failed, 3);
        lost.outcome_unknown = true;
        let settling = saga(SagaState::Compensating, 0, vec![lost.clone()]);
        assert_eq!(
            plan(&definition(), &settling, now),
            Plan::Attempt {
                kind: Kind::Action,
                steps: vec!["a"]
            },
            "asked again first"
        );
        let mut asked_again = lost.clone();
        asked_again.status = StepStatus::Waiting;
        asked_again.next_attempt_at = Some(now + chrono::Duration::seconds(1));
        assert_eq!(
            plan(
                &definition(),
                &saga(SagaState::Compensating, 0, vec![asked_again]),
                now
            ),
            Plan::Wait(now + chrono::Duration::seconds(1))
        );
        let mut no = lost;
        no.outcome_unknown = false;
        assert_eq!(
            plan(
                &definition(),
                &saga(SagaState::Compensating, 0, vec![no]),
                now
            ),
            Plan::Transition(Transition::Compensated),
            "it did nothing, for certain: nothing to undo"
        );
        // A compensation that undoes whatever happened needs no question.
        let mut covered = definition();
        covered.groups[0][0].settle = Settle::ByCompensation;
        assert_eq!(
            plan(&covered, &settling, now),
            Plan::Attempt {
                kind: Kind::Compensation,
                steps: vec!["a"]
            }
        );
    }

    #[test]
    fn a_definition_keeps_compensations_before_its_pivot() {
        assert!(pivoted().validate().is_ok());
        let mut undoable = pivoted();
        undoable.groups[2][0] = step("r", true);
        assert!(
            undoable.validate().is_err(),
            "a retriable step cannot be undone"
        );
        let mut missing = pivoted();
        missing.pivot = Some("nowhere");
        assert!(missing.validate().is_err());
    }

    #[test]
    fn a_saga_past_its_last_group_completes_and_final_states_rest() {
        let log: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|s| record(s, Kind::Action, StepStatus::Succeeded, 1))
            .collect();
        let mut last = log.clone();
        last.push(record("d", Kind::Action, StepStatus::Succeeded, 1));
        assert_eq!(
            plan(
                &definition(),
                &saga(SagaState::Running, 2, last),
                Utc::now()
            ),
            Plan::Transition(Transition::Complete)
        );
        for state in [
            SagaState::Completed,
            SagaState::Compensated,
            SagaState::Failed,
        ] {
            assert_eq!(
                plan(&definition(), &saga(state, 0, log.clone()), Utc::now()),
                Plan::Idle
            );
        }
    }

    #[test]
    fn a_requested_pause_comes_before_any_next_step_forward_or_back() {
        for state in [SagaState::Running, SagaState::Compensating] {
            let mut given = saga(
                state,
                1,
                vec![record("a", Kind::Action, StepStatus::Succeeded, 1)],
            );
            given.instance.pause_requested_at = Some(Utc::now());
            given.instance.compensation_requested = Some("customer".into());
            assert_eq!(
                plan(&definition(), &given, Utc::now()),
                Plan::Transition(Transition::Pause),
                "{state:?}"
            );
        }
    }

    #[test]
    fn paused_and_terminated_sagas_do_nothing_whatever_is_due() {
        for state in [SagaState::Paused, SagaState::Terminated] {
            let mut given = saga(
                state,
                0,
                vec![record("a", Kind::Action, StepStatus::Waiting, 1)],
            );
            given.instance.compensation_requested = Some("customer".into());
            assert_eq!(plan(&definition(), &given, Utc::now()), Plan::Idle);
        }
    }

    fn signal(name: &str, id: &str, payload: serde_json::Value) -> Signal {
        Signal {
            signal_id: id.into(),
            signal: name.into(),
            payload: sqlx::types::Json(payload),
            received_at: Utc::now(),
        }
    }

    /// a, then two steps that wait for "review", then d.
    fn reviewed() -> SagaDefinition {
        let waits = |name| {
            let mut step = step(name, false);
            step.action = None;
            step.wait = Some(crate::definition::SignalWait {
                signal: "review",
                timeout: Duration::from_secs(60),
                on_timeout: crate::definition::OnTimeout::Fail("late".into()),
            });
            step
        };
        SagaDefinition::sequence(
            "test",
            vec![step("a", true), waits("r1"), waits("r2"), step("d", true)],
        )
    }

    #[test]
    fn a_step_whose_condition_fails_is_skipped_and_not_compensated() {
        let mut definition = definition();
        definition.groups[1][0].condition = Some(Arc::new(|facts: &Facts<'_>| {
            facts.output("a").is_some_and(|out| out["big"] == true)
        }));
        let a = record("a", Kind::Action, StepStatus::Succeeded, 1);
        let reached = saga(SagaState::Running, 1, vec![a.clone()]);
        assert_eq!(
            plan(&definition, &reached, Utc::now()),
            Plan::Transition(Transition::Skip { steps: vec!["b"] })
        );
        let skipped = record("b", Kind::Action, StepStatus::Skipped, 0);
        let after = saga(SagaState::Running, 1, vec![a.clone(), skipped.clone()]);
        assert_eq!(
            plan(&definition, &after, Utc::now()),
            Plan::Attempt {
                kind: Kind::Action,
                steps: vec!["c"]
            },
            "the rest of its group runs"
        );
        let turned = saga(SagaState::Compensating, 1, vec![a, skipped]);
        assert_eq!(
            plan(&definition, &turned, Utc::now()),
            Plan::Attempt {
                kind: Kind::Compensation,
                steps: vec!["a"]
            },
            "nothing to undo for b"
        );
    }

    #[test]
    fn a_waiting_step_takes_its_signal_in_order_or_times_out() {
        let now = Utc::now();
        let a = record("a", Kind::Action, StepStatus::Succeeded, 1);
        let fresh = saga(SagaState::Running, 1, vec![a.clone()]);
        assert_eq!(
            super::plan(&reviewed(), &fresh, &[], &[], now),
            Plan::Transition(Transition::BeginWait {
                step: "r1",
                until: now + chrono::Duration::seconds(60)
            })
        );
        let mut waiting = record("r1", Kind::Action, StepStatus::Waiting, 0);
        waiting.deadline_at = Some(now + chrono::Duration::seconds(60));
        let at_r1 = saga(SagaState::Running, 1, vec![a.clone(), waiting]);
        assert_eq!(
            super::plan(&reviewed(), &at_r1, &[], &[], now),
            Plan::Wait(now + chrono::Duration::seconds(60))
        );
        let first = signal("review", "s-1", serde_json::json!(1));
        let other = signal("other", "s-0", serde_json::json!(0));
        assert_eq!(
            super::plan(&reviewed(), &at_r1, &[other, first.clone()], &[], now),
            Plan::Transition(Transition::Signalled {
                step: "r1",
                signal: first.clone()
            })
        );
        // r2 takes the second review signal, not the first again.
        let mut r1 = record("r1", Kind::Action, StepStatus::Succeeded, 1);
        r1.output = Some(sqlx::types::Json(serde_json::json!(1)));
        let at_r2 = saga(SagaState::Running, 2, vec![a, r1]);
        let second = signal("review", "s-2", serde_json::json!(2));
        assert!(matches!(
            super::plan(&reviewed(), &at_r2, std::slice::from_ref(&first), &[], now),
            Plan::Transition(Transition::BeginWait { step: "r2", .. })
        ));
        assert_eq!(
            super::plan(&reviewed(), &at_r2, &[first, second.clone()], &[], now),
            Plan::Transition(Transition::Signalled {
                step: "r2",
                signal: second
            })
        );
        let later = now + chrono::Duration::seconds(61);
        assert_eq!(
            super::plan(&reviewed(), &at_r1, &[], &[], later),
            Plan::Transition(Transition::WaitTimedOut { step: "r1" })
        );
    }

    #[test]
    fn in_effect_are_the_attempted_steps_with_a_compensation_not_yet_undone() {
        // a succeeded, b in flight (unknown), c has no compensation.
        let running = saga(
            SagaState::Running,
            1,
            vec![
                record("a", Kind::Action, StepStatus::Succeeded, 1),
                record("b", Kind::Action, StepStatus::Running, 1),
                record("c", Kind::Action, StepStatus::Succeeded, 1),
            ],
        );
        assert_eq!(in_effect(&definition(), &running), vec!["a", "b"]);

        // b refused for certain did nothing; a undone is no longer in effect.
        let mut refused = record("b", Kind::Action, StepStatus::Failed, 1);
        refused.outcome_unknown = false;
        let compensating = saga(
            SagaState::Compensating,
            1,
            vec![
                record("a", Kind::Action, StepStatus::Succeeded, 1),
                refused,
                record("a", Kind::Compensation, StepStatus::Succeeded, 1),
            ],
        );
        assert!(in_effect(&definition(), &compensating).is_empty());

        // A refusal whose earlier attempt was lost may have taken effect.
        let mut lost = record("b", Kind::Action, StepStatus::Failed, 2);
        lost.outcome_unknown = true;
        let failed = saga(SagaState::Failed, 1, vec![lost]);
        assert_eq!(in_effect(&definition(), &failed), vec!["b"]);

        // A step without an action is in effect once the saga reaches it.
        let mut opening = definition();
        opening.groups[0][0].action = None;
        assert_eq!(
            in_effect(&opening, &saga(SagaState::Running, 0, vec![])),
            vec!["a"]
        );
        assert!(in_effect(&definition(), &saga(SagaState::Running, 0, vec![])).is_empty());
    }
}
