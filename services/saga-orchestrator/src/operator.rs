//! The operators' actions on sagas: retry, compensate, pause, resume,
//! terminate and signal, as plain functions over the engine. SagaService's handlers
//! call them, and so can the dashboard: one rule per action, whichever
//! edge it comes from. Each runs in one transaction and answers with the
//! saga as it then stands, or why nothing was done ([`Refused`]).

use chrono::{DateTime, Utc};
use saga_engine::store;
use saga_engine::{
    Engine, NewSignal, RequestOutcome, SagaRecord, SagaState, Signal, SignalOutcome, Termination,
};
use service_runtime::fields;
use uuid::Uuid;

/// Longest operator's reason, for a compensation or a termination.
pub(crate) const MAX_REASON_CHARS: usize = 500;

/// An operator's reason for terminating a saga: 1 to 500 characters, no
/// NUL, not only spaces; stored trimmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TerminationReason(String);

impl TerminationReason {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let text = fields::text(text, MAX_REASON_CHARS).map_err(|error| error.to_string())?;
        let text = text.trim();
        if text.is_empty() {
            return Err("is required: say why the saga is terminated".to_owned());
        }
        Ok(Self(text.to_owned()))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why an action did nothing. Every refusal names what it found.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    #[error("no such saga")]
    NotFound,
    /// The action does not apply in the saga's state.
    #[error("{why}; it is {}", state.as_str())]
    InState { state: SagaState, why: &'static str },
    /// The pivot may have taken effect: the saga only goes forward.
    #[error(
        "the saga is past its pivot step {pivot} (attempted since {}): the order may be confirmed, so the saga only goes forward and cannot be {undone}",
        since.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    )]
    ForwardOnly {
        pivot: &'static str,
        since: DateTime<Utc>,
        undone: &'static str,
    },
    /// Terminating would leave these steps' effects in place, unacknowledged
    /// (a child saga's named by the step that started it: `refund/void`).
    #[error(
        "step{} {} may have taken effect and {} not compensated: terminating leaves {} in place (a charge, an open order); compensate the saga instead, or set acknowledge_effects to take {} on",
        plural(.0), .0.join(", "), if .0.len() == 1 { "is" } else { "are" },
        if .0.len() == 1 { "it" } else { "them" }, if .0.len() == 1 { "it" } else { "them" }
    )]
    EffectsNotAcknowledged(Vec<String>),
    /// A child saga under the saga cannot be terminated, so neither can it.
    #[error(
        "its child saga {saga_type} {child} (started by step {step}) cannot be terminated: {why}; nothing was terminated"
    )]
    ChildCannotBeTerminated {
        child: Uuid,
        saga_type: String,
        step: String,
        why: String,
    },
    /// No live replica carries the saga's definition at its version.
    #[error(
        "no definition of {saga_type} version {version} is carried by this replica: the saga waits for a replica that has it"
    )]
    UnknownVersion { saga_type: String, version: i32 },
    /// The saga's definition waits for no signal of this name.
    #[error("{saga_type} version {version} has no step waiting for signal {signal:?}; {}", known_signals(.known))]
    UnknownSignal {
        saga_type: String,
        version: i32,
        signal: String,
        known: Vec<&'static str>,
    },
    /// The signal's id was used before, for another signal or payload.
    #[error("signal id {:?} was already used for signal {:?} with another payload (received {})", .0.signal_id, .0.signal, .0.received_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))]
    SignalIdReused(Signal),
    /// Every step waiting for the signal is done.
    #[error("no step waits for this signal any more: step{} {} {} done", plural(.0), .0.join(", "), if .0.len() == 1 { "is" } else { "are" })]
    NoLongerAwaited(Vec<&'static str>),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

fn known_signals(known: &[&str]) -> String {
    if known.is_empty() {
        "it waits for no signal".to_owned()
    } else {
        format!("it waits for {}", known.join(", "))
    }
}

fn plural<T>(steps: &[T]) -> &'static str {
    if steps.len() == 1 { "" } else { "s" }
}

/// Resumes a FAILED saga with a fresh retry budget (see
/// [`Engine::retry`]).
pub(crate) async fn retry(engine: &Engine, saga_id: Uuid) -> Result<SagaRecord, Refused> {
    let mut tx = engine.pool().begin().await.map_err(anyhow::Error::from)?;
    let outcome = engine.retry(&mut tx, saga_id).await?;
    tx.commit().await.map_err(anyhow::Error::from)?;
    answer(
        engine,
        saga_id,
        outcome,
        "only a FAILED saga can be retried",
        "retried",
    )
    .await
}

/// Calls off a saga that can still turn back (see
/// [`Engine::request_compensation`]); `reason` is the operator's, at most
/// [`MAX_REASON_CHARS`], and may be empty.
pub(crate) async fn compensate(
    engine: &Engine,
    saga_id: Uuid,
    reason: &str,
) -> Result<SagaRecord, Refused> {
    let reason = if reason.trim().is_empty() {
        "compensated by an operator".to_owned()
    } else {
        format!("compensated by an operator: {}", reason.trim())
    };
    let mut tx = engine.pool().begin().await.map_err(anyhow::Error::from)?;
    let outcome = engine
        .request_compensation(&mut tx, saga_id, &reason)
        .await?;
    tx.commit().await.map_err(anyhow::Error::from)?;
    // Asking a compensating saga to compensate is a no-op, not an error.
    let outcome = match outcome {
        RequestOutcome::NotApplicable(SagaState::Compensating) => RequestOutcome::Accepted,
        other => other,
    };
    answer(
        engine,
        saga_id,
        outcome,
        "the saga already finished",
        "compensated",
    )
    .await
}

/// Pauses a running or compensating saga between steps (see
/// [`Engine::pause`]).
pub(crate) async fn pause(engine: &Engine, saga_id: Uuid) -> Result<SagaRecord, Refused> {
    let mut tx = engine.pool().begin().await.map_err(anyhow::Error::from)?;
    let outcome = engine.pause(&mut tx, saga_id).await?;
    tx.commit().await.map_err(anyhow::Error::from)?;
    let why = match outcome {
        RequestOutcome::NotApplicable(SagaState::Failed) => {
            "a FAILED saga runs nothing until RetrySaga or CompensateSaga, so there is nothing to pause"
        }
        _ => "only a RUNNING or COMPENSATING saga can be paused",
    };
    answer(engine, saga_id, outcome, why, "paused").await
}

/// Resumes a paused saga where it stopped (see [`Engine::resume`]).
pub(crate) async fn resume(engine: &Engine, saga_id: Uuid) -> Result<SagaRecord, Refused> {
    let mut tx = engine.pool().begin().await.map_err(anyhow::Error::from)?;
    let outcome = engine.resume(&mut tx, saga_id).await?;
    tx.commit().await.map_err(anyhow::Error::from)?;
    answer(
        engine,
        saga_id,
        outcome,
        "only a PAUSED saga (or one asked to pause) can be resumed",
        "resumed",
    )
    .await
}

/// Stops a saga for good, without compensating (see [`Engine::terminate`]).
pub(crate) async fn terminate(
    engine: &Engine,
    saga_id: Uuid,
    reason: &TerminationReason,
    acknowledge_effects: bool,
) -> Result<SagaRecord, Refused> {
    let reason = format!("terminated by an operator: {}", reason.as_str());
    let mut tx = engine.pool().begin().await.map_err(anyhow::Error::from)?;
    let outcome = engine
        .terminate(&mut tx, saga_id, &reason, acknowledge_effects)
        .await?;
    match outcome {
        Termination::Terminated { .. } => {
            tx.commit().await.map_err(anyhow::Error::from)?;
            answer(engine, saga_id, RequestOutcome::Accepted, "", "terminated").await
        }
        Termination::EffectsNotAcknowledged(steps) => Err(Refused::EffectsNotAcknowledged(steps)),
        Termination::ChildRefused {
            child,
            saga_type,
            step,
            outcome,
        } => {
            let why = match outcome {
                RequestOutcome::ForwardOnly { pivot, since } => format!(
                    "it is past its pivot step {pivot} (attempted since {}), so it only goes forward",
                    since.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                ),
                RequestOutcome::UnknownVersion { version } => format!(
                    "no definition of {saga_type} version {version} is carried by this replica"
                ),
                other => format!("{other:?}"),
            };
            Err(Refused::ChildCannotBeTerminated {
                child,
                saga_type,
                step,
                why,
            })
        }
        Termination::Refused(outcome) => {
            answer(
                engine,
                saga_id,
                outcome,
                "the saga already finished",
                "terminated",
            )
            .await
        }
    }
}

/// Sends a signal to a saga (see [`Engine::signal`]): the signal as kept,
/// or, for a repeated signal id, as it was kept the first time.
pub(crate) async fn signal(
    engine: &Engine,
    saga_id: Uuid,
    signal: NewSignal<'_>,
) -> Result<Signal, Refused> {
    let mut tx = engine.pool().begin().await.map_err(anyhow::Error::from)?;
    let outcome = engine.signal(&mut tx, saga_id, signal).await?;
    match outcome {
        SignalOutcome::Kept(kept) => {
            tx.commit().await.map_err(anyhow::Error::from)?;
            Ok(kept)
        }
        SignalOutcome::Repeated(first) => Ok(first),
        SignalOutcome::Conflict(first) => Err(Refused::SignalIdReused(first)),
        SignalOutcome::NotFound => Err(Refused::NotFound),
        SignalOutcome::NotApplicable(state) => Err(Refused::InState {
            state,
            why: "only a RUNNING saga (or one paused while running) waits for signals",
        }),
        SignalOutcome::UnknownSignal {
            saga_type,
            version,
            known,
        } => Err(Refused::UnknownSignal {
            saga_type,
            version,
            signal: signal.signal.to_owned(),
            known,
        }),
        SignalOutcome::NoLongerAwaited(steps) => Err(Refused::NoLongerAwaited(steps)),
        SignalOutcome::UnknownVersion { saga_type, version } => {
            Err(Refused::UnknownVersion { saga_type, version })
        }
    }
}

/// The saga as it stands after an accepted request, or the refusal.
async fn answer(
    engine: &Engine,
    saga_id: Uuid,
    outcome: RequestOutcome,
    why: &'static str,
    undone: &'static str,
) -> Result<SagaRecord, Refused> {
    match outcome {
        RequestOutcome::NotFound => Err(Refused::NotFound),
        RequestOutcome::NotApplicable(state) => Err(Refused::InState { state, why }),
        RequestOutcome::UnknownVersion { version } => {
            let saga_type = store::load(engine.pool(), saga_id)
                .await?
                .map(|saga| saga.instance.saga_type)
                .unwrap_or_default();
            Err(Refused::UnknownVersion { saga_type, version })
        }
        RequestOutcome::ForwardOnly { pivot, since } => Err(Refused::ForwardOnly {
            pivot,
            since,
            undone,
        }),
        RequestOutcome::Accepted => store::load(engine.pool(), saga_id)
            .await?
            .ok_or(Refused::NotFound),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_termination_needs_a_reason_of_bounded_length() {
        assert_eq!(
            TerminationReason::parse("  provider incident ").map(|r| r.0),
            Ok("provider incident".to_owned())
        );
        assert!(TerminationReason::parse("").is_err());
        assert!(TerminationReason::parse("   ").is_err());
        assert!(TerminationReason::parse(&"x".repeat(MAX_REASON_CHARS)).is_ok());
        assert!(TerminationReason::parse(&"x".repeat(MAX_REASON_CHARS + 1)).is_err());
        assert!(TerminationReason::parse("a\0b").is_err());
    }

    #[test]
    fn a_refusal_names_the_steps_left_in_effect() {
        let steps = |names: &[&str]| names.iter().map(|s| (*s).to_owned()).collect();
        let one = Refused::EffectsNotAcknowledged(steps(&["process-payment"])).to_string();
        assert!(
            one.starts_with("step process-payment may have taken effect and is not compensated"),
            "{one}"
        );
        let two =
            Refused::EffectsNotAcknowledged(steps(&["open-order", "refund/void"])).to_string();
        assert!(
            two.starts_with("steps open-order, refund/void may have taken effect and are not"),
            "{two}"
        );
        let child = Refused::ChildCannotBeTerminated {
            child: Uuid::nil(),
            saga_type: "payment-refund".into(),
            step: "refund".into(),
            why: "it is past its pivot step capture".into(),
        }
        .to_string();
        assert_eq!(
            child,
            format!(
                "its child saga payment-refund {} (started by step refund) cannot be terminated: it is past its pivot step capture; nothing was terminated",
                Uuid::nil()
            )
        );
        let state = Refused::InState {
            state: SagaState::Paused,
            why: "only a FAILED saga can be retried",
        };
        assert_eq!(
            state.to_string(),
            "only a FAILED saga can be retried; it is paused"
        );
    }
}
