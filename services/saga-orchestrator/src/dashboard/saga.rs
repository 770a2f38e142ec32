//! One saga on the dashboard (`/api/saga`): its state, a timeline of its
//! step executions with their attempts, its events and a link to its trace;
//! and the operator's actions on it (`POST /api/sagas/{id}/{action}`),
//! which call the same [`operator`](crate::operator) functions as
//! SagaService.

use api_saga::v1 as pb;
use chrono::{DateTime, Utc};
use prost::Name as _;
use saga_engine::{Kind, SagaDefinition, SagaRecord, SagaState, StepRecord, StepStatus};
use serde::Serialize;
use uuid::Uuid;

use crate::trace_view::TraceEventRow;

/// A saga as the page shows it.
#[derive(Debug, Serialize)]
pub(crate) struct SagaView {
    pub(crate) saga_id: Uuid,
    pub(crate) saga_type: String,
    /// The version of its definition it runs on, and whether no live
    /// replica carries it (then nothing drives the saga).
    pub(crate) version: i32,
    pub(crate) version_unknown: bool,
    /// The saga whose step started this one, if any.
    pub(crate) parent_saga_id: Option<Uuid>,
    pub(crate) parent_step: Option<String>,
    pub(crate) order_id: String,
    pub(crate) correlation_id: String,
    pub(crate) state: &'static str,
    pub(crate) failure_reason: Option<String>,
    pub(crate) compensation_requested: Option<String>,
    pub(crate) pivot_step: Option<&'static str>,
    pub(crate) forward_only_since: Option<DateTime<Utc>>,
    pub(crate) overdue_step: Option<String>,
    pub(crate) overdue_since: Option<DateTime<Utc>>,
    /// Set while the saga is stuck: since when, and why.
    pub(crate) stuck_since: Option<DateTime<Utc>>,
    pub(crate) stuck_reason: Option<String>,
    /// Where an order's saga stands, in the order's words: "pending
    /// review", "awaiting capture", "refunding", "returned".
    pub(crate) phase: Option<&'static str>,
    /// A step waits for this signal until then.
    pub(crate) waiting_for_signal: Option<&'static str>,
    pub(crate) waiting_until: Option<DateTime<Utc>>,
    pub(crate) pause_requested_at: Option<DateTime<Utc>>,
    pub(crate) paused_at: Option<DateTime<Utc>>,
    /// What a terminated saga left in effect, as the operator acknowledged.
    pub(crate) left_in_effect: Vec<String>,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
    pub(crate) finished_at: Option<DateTime<Utc>>,
}

impl SagaView {
    /// `carried`: whether a live replica carries its definition version.
    pub(crate) fn new(
        saga: &SagaRecord,
        definition: Option<&SagaDefinition>,
        carried: bool,
    ) -> Self {
        let instance = &saga.instance;
        let pivot = definition.and_then(|definition| definition.pivot);
        let waiting = if instance.state.is_driven() || instance.state == SagaState::Paused {
            saga.steps
                .iter()
                .filter_map(|step| crate::grpc::waiting_for(definition, step))
                .find_map(|(signal, until)| until.map(|until| (signal, until)))
        } else {
            None
        };
        Self {
            saga_id: instance.saga_id,
            saga_type: instance.saga_type.clone(),
            version: instance.version,
            version_unknown: !carried && !instance.state.is_final(),
            parent_saga_id: instance.parent_saga_id,
            parent_step: instance.parent_step.clone(),
            phase: phase(saga, waiting.map(|(signal, _)| signal)),
            waiting_for_signal: waiting.map(|(signal, _)| signal),
            waiting_until: waiting.map(|(_, until)| until),
            order_id: instance.business_key.clone(),
            correlation_id: instance.correlation_id.clone(),
            state: instance.state.as_str(),
            failure_reason: instance.failure_reason.clone(),
            compensation_requested: instance.compensation_requested.clone(),
            pivot_step: pivot,
            forward_only_since: instance.forward_only_since,
            overdue_step: instance.overdue_step.clone(),
            overdue_since: instance.overdue_since,
            stuck_since: instance.stuck_since,
            stuck_reason: instance.stuck_reason.clone(),
            pause_requested_at: instance.pause_requested_at,
            paused_at: instance.paused_at,
            left_in_effect: instance.left_in_effect.clone().unwrap_or_default(),
            created_at: instance.created_at,
            updated_at: instance.updated_at,
            finished_at: instance.finished_at,
        }
    }
}

/// Where the orchestrator's sagas stand, for the steps that mean something
/// to the order: its review, its capture after the confirmation, its
/// return. `None` for any other moment or saga.
fn phase(saga: &SagaRecord, waiting_for: Option<&'static str>) -> Option<&'static str> {
    use crate::order_saga::{self, CONFIRM_ORDER, v2};
    use crate::return_saga;
    let instance = &saga.instance;
    let succeeded = |name: &str| {
        saga.steps
            .iter()
            .any(|r| r.step == name && r.kind == Kind::Action && r.status == StepStatus::Succeeded)
    };
    let driven = instance.state.is_driven() || instance.state == SagaState::Paused;
    match instance.saga_type.as_str() {
        order_saga::SAGA_TYPE if driven && waiting_for == Some(v2::REVIEW_SIGNAL) => {
            Some("pending review")
        }
        order_saga::SAGA_TYPE
            if driven
                && instance.version >= 2
                && succeeded(CONFIRM_ORDER)
                && !succeeded(v2::CAPTURE_PAYMENT) =>
        {
            Some("awaiting capture")
        }
        return_saga::SAGA_TYPE if driven => Some("refunding"),
        return_saga::SAGA_TYPE if instance.state == SagaState::Completed => Some("returned"),
        _ => None,
    }
}

/// One execution of a step's action or compensation, on the time axis.
#[derive(Debug, PartialEq, Serialize)]
pub(crate) struct Execution {
    pub(crate) step: String,
    pub(crate) kind: &'static str,
    pub(crate) status: &'static str,
    pub(crate) attempts: i32,
    pub(crate) last_error: Option<String>,
    pub(crate) started_at: DateTime<Utc>,
    pub(crate) finished_at: Option<DateTime<Utc>>,
    /// For a step that waits for a signal: its name, and while it waits,
    /// until when.
    pub(crate) signal: Option<&'static str>,
    pub(crate) waiting_until: Option<DateTime<Utc>>,
    pub(crate) bars: Vec<AttemptBar>,
}

/// An attempt, from the end of the one before it (or the execution's
/// start) to its own end: the engine records when an attempt ended, in its
/// event, not when it began, so a retry's bar includes its backoff.
#[derive(Debug, PartialEq, Serialize)]
pub(crate) struct AttemptBar {
    pub(crate) from: DateTime<Utc>,
    pub(crate) to: DateTime<Utc>,
    /// `succeeded`, `failed`, or, for the last bar of an unfinished
    /// execution, `running` (an attempt in flight), `waiting` (for a retry)
    /// or `abandoned` (the saga turned back or finished without it).
    pub(crate) outcome: &'static str,
    /// What the saga's event said of it.
    pub(crate) note: String,
}

/// The saga's step executions with their attempts, from its record and the
/// trace view's events of its flow (its step events carry each attempt's
/// end). Unfinished executions run until `now`.
pub(crate) fn timeline(
    saga: &SagaRecord,
    definition: Option<&SagaDefinition>,
    events: &[TraceEventRow],
    now: DateTime<Utc>,
) -> Vec<Execution> {
    let saga_id = saga.instance.saga_id.to_string();
    let succeeded = pb::SagaStepSucceeded::full_name();
    let failed = pb::SagaStepFailed::full_name();
    let step_events: Vec<(&TraceEventRow, bool)> = events
        .iter()
        .filter(|event| event.aggregate_id == saga_id)
        .filter_map(|event| {
            if event.event_type == succeeded {
                Some((event, true))
            } else if event.event_type == failed {
                Some((event, false))
            } else {
                None
            }
        })
        .collect();
    // An action left waiting or unanswered when the saga turned back (or
    // finished) stops there: it is not tried again.
    let turned_back = saga
        .steps
        .iter()
        .filter(|execution| execution.kind == Kind::Compensation)
        .map(|execution| execution.started_at)
        .min();
    let settled = saga.instance.finished_at;
    saga.steps
        .iter()
        .map(|execution| {
            let mine = step_events.iter().filter(|(event, _)| {
                names(&event.summary, execution) && event.occurred_at >= execution.started_at
            });
            let mut bars = Vec::new();
            let mut from = execution.started_at;
            for (event, ok) in mine {
                bars.push(AttemptBar {
                    from,
                    to: event.occurred_at,
                    outcome: if *ok { "succeeded" } else { "failed" },
                    note: event.summary.clone(),
                });
                from = event.occurred_at;
            }
            let stopped = match execution.kind {
                Kind::Action => turned_back.or(settled),
                Kind::Compensation => settled,
            };
            let unfinished = match (execution.status, stopped) {
                (StepStatus::Running, None) => Some(("running", "an attempt in flight")),
                (StepStatus::Running, Some(_)) => {
                    Some(("abandoned", "no answer: its outcome is unknown"))
                }
                (StepStatus::Waiting, None) => Some(("waiting", "waiting to try again")),
                (StepStatus::Waiting, Some(_)) => {
                    Some(("abandoned", "not tried again: the saga turned back"))
                }
                (StepStatus::Succeeded | StepStatus::Failed | StepStatus::Skipped, _) => None,
            };
            let wait = crate::grpc::waiting_for(definition, execution);
            let unfinished = match (unfinished, wait) {
                (Some(("waiting", _)), Some((_, Some(_)))) => {
                    Some(("waiting", "waiting for its signal"))
                }
                (unfinished, _) => unfinished,
            };
            if let Some((outcome, note)) = unfinished {
                bars.push(AttemptBar {
                    from,
                    to: stopped.unwrap_or(now).max(from),
                    outcome,
                    note: note.to_owned(),
                });
            }
            Execution {
                step: execution.step.clone(),
                kind: execution.kind.as_str(),
                status: execution.status.as_str(),
                attempts: execution.attempts,
                last_error: execution.last_error.clone(),
                started_at: execution.started_at,
                finished_at: execution.finished_at,
                signal: wait.map(|(signal, _)| signal),
                waiting_until: wait.and_then(|(_, until)| until),
                bars,
            }
        })
        .collect()
}

/// Whether a step event's summary is about `execution`: the trace view
/// words them "step <name> ..." and "compensation of <name> ..."
/// (`trace_view::describe`).
fn names(summary: &str, execution: &StepRecord) -> bool {
    let prefix = match execution.kind {
        Kind::Action => "step ",
        Kind::Compensation => "compensation of ",
    };
    summary
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix(execution.step.as_str()))
        .is_some_and(|rest| rest.starts_with(' '))
}

/// The trace id in a W3C `traceparent` among `headers`, unless it is the
/// invalid all-zero one.
pub(crate) fn trace_id(headers: &[(String, String)]) -> Option<String> {
    let (_, value) = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("traceparent"))?;
    let id = value.split('-').nth(1)?;
    let valid = id.len() == 32
        && id.bytes().all(|b| b.is_ascii_hexdigit())
        && id.bytes().any(|b| b != b'0');
    valid.then(|| id.to_ascii_lowercase())
}

/// The link to a trace: `pattern` with `{trace_id}` replaced.
pub(crate) fn trace_url(pattern: Option<&str>, trace_id: Option<&str>) -> Option<String> {
    Some(pattern?.replace("{trace_id}", trace_id?))
}

#[cfg(test)]
mod tests {
    use saga_engine::StepStatus;
    use saga_engine::store::Instance;
    use sqlx::types::Json;

    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    fn saga(steps: Vec<StepRecord>) -> SagaRecord {
        SagaRecord {
            instance: Instance {
                saga_id: Uuid::from_u128(7),
                saga_type: "order".into(),
                version: 1,
                business_key: "k".into(),
                state: SagaState::Compensating,
                data: Json(serde_json::Value::Null),
                correlation_id: "c".into(),
                position: 0,
                failure_reason: None,
                compensation_requested: None,
                forward_only_since: None,
                overdue_step: None,
                overdue_since: None,
                pause_requested_at: None,
                paused_at: None,
                paused_from: None,
                left_in_effect: None,
                progressed_at: at(0),
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
                created_at: at(0),
                updated_at: at(0),
                finished_at: None,
            },
            steps,
        }
    }

    fn step(name: &str, kind: Kind, status: StepStatus, started: i64) -> StepRecord {
        StepRecord {
            step: name.into(),
            kind,
            status,
            attempts: 1,
            last_error: None,
            output: None,
            started_at: at(started),
            finished_at: None,
            next_attempt_at: None,
            deadline_at: None,
            outcome_unknown: false,
        }
    }

    #[test]
    fn an_order_saga_shows_its_review_its_capture_and_its_return() {
        use crate::order_saga::{self, CONFIRM_ORDER, v2};
        let mut waiting = saga(vec![step(v2::REVIEW, Kind::Action, StepStatus::Waiting, 1)]);
        waiting.instance.saga_type = order_saga::SAGA_TYPE.into();
        waiting.instance.version = 2;
        waiting.instance.state = SagaState::Running;
        assert_eq!(
            phase(&waiting, Some(v2::REVIEW_SIGNAL)),
            Some("pending review")
        );
        assert_eq!(phase(&waiting, None), None);

        let mut capturing = saga(vec![
            step(CONFIRM_ORDER, Kind::Action, StepStatus::Succeeded, 1),
            step(v2::CAPTURE_PAYMENT, Kind::Action, StepStatus::Waiting, 2),
        ]);
        capturing.instance.saga_type = order_saga::SAGA_TYPE.into();
        capturing.instance.version = 2;
        capturing.instance.state = SagaState::Running;
        assert_eq!(phase(&capturing, None), Some("awaiting capture"));
        capturing.steps[1].status = StepStatus::Succeeded;
        capturing.instance.state = SagaState::Completed;
        assert_eq!(phase(&capturing, None), None);

        let mut returning = saga(vec![]);
        returning.instance.saga_type = crate::return_saga::SAGA_TYPE.into();
        returning.instance.state = SagaState::Running;
        assert_eq!(phase(&returning, None), Some("refunding"));
        returning.instance.state = SagaState::Completed;
        assert_eq!(phase(&returning, None), Some("returned"));
    }

    fn event(saga: u128, message: &str, summary: &str, seconds: i64) -> TraceEventRow {
        TraceEventRow {
            event_id: Uuid::new_v4(),
            correlation_id: "c".into(),
            order_id: None,
            service: "saga-orchestrator".into(),
            event_type: format!("ordersaga.saga.v1.{message}"),
            aggregate_type: "saga".into(),
            aggregate_id: Uuid::from_u128(saga).to_string(),
            aggregate_version: 1,
            causation_id: None,
            occurred_at: at(seconds),
            summary: summary.into(),
        }
    }

    #[test]
    fn attempts_run_from_one_end_to_the_next_and_an_unfinished_one_until_now_or_the_turn() {
        let saga = saga(vec![
            step("process-payment", Kind::Action, StepStatus::Failed, 1),
            step(
                "process-payment",
                Kind::Compensation,
                StepStatus::Waiting,
                9,
            ),
            step("confirm-order", Kind::Action, StepStatus::Waiting, 2),
        ]);
        let events = [
            event(
                7,
                "SagaStepFailed",
                "step process-payment failed (will retry): flaky",
                3,
            ),
            event(
                7,
                "SagaStepFailed",
                "step process-payment failed (gave up): flaky",
                8,
            ),
            // Another saga's, another step's, and not a step event at all.
            event(8, "SagaStepFailed", "step process-payment failed: x", 4),
            event(7, "SagaStepSucceeded", "step process-payments succeeded", 5),
            event(7, "SagaCompensationStarted", "compensation started: x", 8),
            event(
                7,
                "SagaStepFailed",
                "compensation of process-payment failed (will retry): down",
                10,
            ),
        ];
        let timeline = timeline(&saga, None, &events, at(12));
        let bars = |i: usize| -> Vec<(i64, i64, &str)> {
            timeline[i]
                .bars
                .iter()
                .map(|bar| {
                    (
                        bar.from.timestamp() - at(0).timestamp(),
                        bar.to.timestamp() - at(0).timestamp(),
                        bar.outcome,
                    )
                })
                .collect()
        };
        assert_eq!(bars(0), [(1, 3, "failed"), (3, 8, "failed")]);
        assert_eq!(
            bars(2),
            [(2, 9, "abandoned")],
            "stops where the saga turned back"
        );
        assert_eq!(timeline[1].kind, "compensation");
        assert_eq!(bars(1), [(9, 10, "failed"), (10, 12, "waiting")]);
    }

    #[test]
    fn the_trace_link_comes_from_the_traceparent() {
        let headers = [(
            "traceparent".to_owned(),
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01".to_owned(),
        )];
        let id = trace_id(&headers);
        assert_eq!(id.as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(
            trace_url(Some("http://jaeger:16686/trace/{trace_id}"), id.as_deref()).as_deref(),
            Some("http://jaeger:16686/trace/4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_url(None, id.as_deref()), None);
        let zero = [(
            "traceparent".to_owned(),
            format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32)),
        )];
        assert_eq!(trace_id(&zero), None);
        assert_eq!(trace_id(&[]), None);
    }
}
