//! What a saga must do next, decided from its definition, its record and
//! the time alone: no I/O, so every rule can be read (and tested) here.

use chrono::{DateTime, Utc};

use crate::definition::{SagaDefinition, Step};
use crate::store::{Kind, SagaRecord, SagaState, StepRecord};

/// The next thing to do for a saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Attempt these steps' actions or compensations now, in parallel.
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
    /// Every step of the current group succeeded: on to the next.
    Advance,
    Complete,
    /// Stop going forward and undo what was done.
    Compensate {
        reason: String,
    },
    /// A step ran out of time: it fails for good.
    StepFailed {
        step: &'static str,
        kind: Kind,
        reason: String,
    },
    Compensated,
    /// A compensation failed for good: an operator must step in.
    Fail {
        reason: String,
    },
}

pub(crate) fn plan(definition: &SagaDefinition, saga: &SagaRecord, now: DateTime<Utc>) -> Plan {
    match saga.instance.state() {
        SagaState::Running => forward(definition, saga, now),
        SagaState::Compensating => backward(definition, saga, now),
        SagaState::Completed | SagaState::Compensated | SagaState::Failed => Plan::Idle,
    }
}

fn forward(definition: &SagaDefinition, saga: &SagaRecord, now: DateTime<Utc>) -> Plan {
    if let Some(reason) = &saga.instance.compensation_requested {
        return Plan::Transition(Transition::Compensate {
            reason: reason.clone(),
        });
    }
    let position = usize::try_from(saga.instance.position).unwrap_or(usize::MAX);
    let Some(group) = definition.groups.get(position) else {
        return Plan::Transition(Transition::Complete);
    };
    let mut due = Vec::new();
    let mut wait: Option<DateTime<Utc>> = None;
    let mut all_succeeded = true;
    for step in group {
        let record = saga.step(step.name, Kind::Action);
        if record.is_some_and(|r| r.status == "succeeded") {
            continue;
        }
        all_succeeded = false;
        if let Some(record) = record.filter(|r| r.status == "failed") {
            let error = record.last_error.as_deref().unwrap_or("failed");
            return Plan::Transition(Transition::Compensate {
                reason: format!("{}: {error}", step.name),
            });
        }
        match next_attempt(step, Kind::Action, record, now) {
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
/// the saga reaches it.
fn backward(definition: &SagaDefinition, saga: &SagaRecord, now: DateTime<Utc>) -> Plan {
    let reached = usize::try_from(saga.instance.position).unwrap_or(0);
    for (index, group) in definition.groups.iter().enumerate().rev() {
        let mut due = Vec::new();
        let mut wait: Option<DateTime<Utc>> = None;
        for step in group {
            let attempted = saga
                .step(step.name, Kind::Action)
                .is_some_and(|r| r.attempts > 0)
                || (step.action.is_none() && index <= reached);

            if !attempted || step.compensation.is_none() {
                continue;
            }
            let record = saga.step(step.name, Kind::Compensation);
            match record.map(|r| r.status.as_str()) {
                Some("succeeded") => continue,
                Some("failed") => {
                    let error = record
                        .and_then(|r| r.last_error.as_deref())
                        .unwrap_or("failed");
                    return Plan::Transition(Transition::Fail {
                        reason: format!("compensation of {} failed: {error}", step.name),
                    });
                }
                _ => {}
            }
            match next_attempt(step, Kind::Compensation, record, now) {
                Next::Now => due.push(step.name),
                Next::At(at) => wait = Some(wait.map_or(at, |w| w.min(at))),
                Next::Fail(reason) => {
                    return Plan::Transition(Transition::StepFailed {
                        step: step.name,
                        kind: Kind::Compensation,
                        reason,
                    });
                }
            }
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
    }
    Plan::Transition(Transition::Compensated)
}

enum Next {
    Now,
    At(DateTime<Utc>),
    Fail(String),
}

/// When a step that has not succeeded should be attempted again.
fn next_attempt(step: &Step, kind: Kind, record: Option<&StepRecord>, now: DateTime<Utc>) -> Next {
    let Some(record) = record else {
        return Next::Now;
    };
    let max_attempts = match kind {
        Kind::Action => step.retry.max_attempts,
        Kind::Compensation => step.compensation_retry.max_attempts,
    };
    let out_of_attempts = u32::try_from(record.attempts).unwrap_or(u32::MAX) >= max_attempts;
    if record.deadline_at.is_some_and(|deadline| deadline <= now) {
        return Next::Fail(format!(
            "deadline exceeded after {} attempts",
            record.attempts
        ));
    }
    match record.status.as_str() {
        // An attempt was started and never recorded: its replica died. It
        // counts as a failed attempt whose effect is unknown.
        "running" if out_of_attempts => Next::Fail(format!(
            "attempt {} did not report back and no attempts are left",
            record.attempts
        )),
        "running" => Next::Now,
        _ => match record.next_attempt_at {
            Some(at) if at > now => {
                Next::At(record.deadline_at.map_or(at, |deadline| at.min(deadline)))
            }
            _ => Next::Now,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use futures::FutureExt as _;
    use sqlx::types::Json;
    use uuid::Uuid;

    use super::*;
    use crate::definition::{FnAction, RetryPolicy};
    use crate::store::Instance;

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
        }
    }

    fn definition() -> SagaDefinition {
        SagaDefinition {
            name: "test",
            groups: vec![
                vec![step("a", true)],
                vec![step("b", true), step("c", false)],
                vec![step("d", true)],
            ],
        }
    }

    fn saga(state: &str, position: i32, steps: Vec<StepRecord>) -> SagaRecord {
        let now = Utc::now();
        SagaRecord {
            instance: Instance {
                saga_id: Uuid::nil(),
                saga_type: "test".into(),
                business_key: "k".into(),
                state: state.into(),
                data: Json(serde_json::Value::Null),
                correlation_id: "c".into(),
                position,
                failure_reason: None,
                compensation_requested: None,
                next_run_at: None,
                lease_owner: None,
                lease_expires_at: None,
                fence: 1,
                created_at: now,
                updated_at: now,
                finished_at: None,
            },
            steps,
        }
    }

    fn record(step: &str, kind: Kind, status: &str, attempts: i32) -> StepRecord {
        StepRecord {
            step: step.into(),
            kind: kind.as_str().into(),
            status: status.into(),
            attempts,
            last_error: Some("boom".into()),
            output: None,
            started_at: Utc::now(),
            finished_at: None,
            next_attempt_at: None,
            deadline_at: None,
        }
    }

    #[test]
    fn a_new_saga_attempts_its_first_step() {
        assert_eq!(
            plan(&definition(), &saga("running", 0, vec![]), Utc::now()),
            Plan::Attempt {
                kind: Kind::Action,
                steps: vec!["a"]
            }
        );
    }

    #[test]
    fn a_parallel_group_runs_together_and_advances_when_all_succeed() {
        let done_a = record("a", Kind::Action, "succeeded", 1);
        let partial = saga(
            "running",
            1,
            vec![done_a.clone(), record("b", Kind::Action, "succeeded", 1)],
        );
        assert_eq!(
            plan(&definition(), &partial, Utc::now()),
            Plan::Attempt {
                kind: Kind::Action,
                steps: vec!["c"]
            }
        );
        let fresh = saga("running", 1, vec![done_a.clone()]);
        assert_eq!(
            plan(&definition(), &fresh, Utc::now()),
            Plan::Attempt {
                kind: Kind::Action,
                steps: vec!["b", "c"]
            }
        );
        let done = saga(
            "running",
            1,
            vec![
                done_a,
                record("b", Kind::Action, "succeeded", 1),
                record("c", Kind::Action, "succeeded", 1),
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
        let mut waiting = record("a", Kind::Action, "waiting", 1);
        waiting.next_attempt_at = Some(now + chrono::Duration::seconds(5));
        waiting.deadline_at = Some(now + chrono::Duration::seconds(3));
        assert_eq!(
            plan(
                &definition(),
                &saga("running", 0, vec![waiting.clone()]),
                now
            ),
            Plan::Wait(now + chrono::Duration::seconds(3))
        );
        let later = now + chrono::Duration::seconds(4);
        assert!(matches!(
            plan(&definition(), &saga("running", 0, vec![waiting]), later),
            Plan::Transition(Transition::StepFailed {
                step: "a",
                kind: Kind::Action,
                ..
            })
        ));
    }

    #[test]
    fn an_attempt_that_never_reported_back_is_retried_or_failed() {
        let crashed = record("a", Kind::Action, "running", 1);
        assert_eq!(
            plan(
                &definition(),
                &saga("running", 0, vec![crashed]),
                Utc::now()
            ),
            Plan::Attempt {
                kind: Kind::Action,
                steps: vec!["a"]
            }
        );
        let exhausted = record("a", Kind::Action, "running", 3);
        assert!(matches!(
            plan(
                &definition(),
                &saga("running", 0, vec![exhausted]),
                Utc::now()
            ),
            Plan::Transition(Transition::StepFailed { .. })
        ));
    }

    #[test]
    fn a_failed_step_or_a_request_turns_the_saga_to_compensation() {
        let failed = saga("running", 0, vec![record("a", Kind::Action, "failed", 1)]);
        assert_eq!(
            plan(&definition(), &failed, Utc::now()),
            Plan::Transition(Transition::Compensate {
                reason: "a: boom".into()
            })
        );
        let mut asked = saga("running", 0, vec![]);
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
            record("a", Kind::Action, "succeeded", 1),
            record("b", Kind::Action, "succeeded", 1),
            record("c", Kind::Action, "failed", 3),
        ];
        let now = Utc::now();
        assert_eq!(
            plan(&definition(), &saga("compensating", 1, log.clone()), now),
            Plan::Attempt {
                kind: Kind::Compensation,
                steps: vec!["b"]
            }
        );
        let mut after_b = log.clone();
        after_b.push(record("b", Kind::Compensation, "succeeded", 1));
        assert_eq!(
            plan(
                &definition(),
                &saga("compensating", 1, after_b.clone()),
                now
            ),
            Plan::Attempt {
                kind: Kind::Compensation,
                steps: vec!["a"]
            }
        );
        after_b.push(record("a", Kind::Compensation, "succeeded", 1));
        assert_eq!(
            plan(&definition(), &saga("compensating", 1, after_b), now),
            Plan::Transition(Transition::Compensated)
        );
        let mut broken = log;
        broken.push(record("b", Kind::Compensation, "failed", 3));
        assert!(matches!(
            plan(&definition(), &saga("compensating", 1, broken), now),
            Plan::Transition(Transition::Fail { .. })
        ));
    }

    #[test]
    fn a_step_without_an_action_is_compensated_even_if_the_saga_never_ran() {
        let mut definition = definition();
        definition.groups[0][0].action = None;
        let asked = saga("compensating", 0, vec![]);
        assert_eq!(
            plan(&definition, &asked, Utc::now()),
            Plan::Attempt {
                kind: Kind::Compensation,
                steps: vec!["a"]
            }
        );
    }

    #[test]
    fn a_saga_past_its_last_group_completes_and_final_states_rest() {
        let log: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|s| record(s, Kind::Action, "succeeded", 1))
            .collect();
        let mut last = log.clone();
        last.push(record("d", Kind::Action, "succeeded", 1));
        assert_eq!(
            plan(&definition(), &saga("running", 2, last), Utc::now()),
            Plan::Transition(Transition::Complete)
        );
        for state in ["completed", "compensated", "failed"] {
            assert_eq!(
                plan(&definition(), &saga(state, 0, log.clone()), Utc::now()),
                Plan::Idle
            );
        }
    }
}
