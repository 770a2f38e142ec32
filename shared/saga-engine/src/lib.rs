//! A durable saga engine on PostgreSQL, for any number of replicas.
//!
//! A saga is a sequence of step groups ([`SagaDefinition`]); each step has
//! an action, a compensation, a retry policy and a deadline. Instances and
//! their step log live in the service's schema. A replica that claims a
//! saga keeps its record in memory while it holds the lease, and writes
//! each turn as one fenced transaction: the outcomes of the attempts just
//! made, the transitions they lead to, the write-ahead of the next
//! attempts, and the saga events, which go to the outbox in that
//! transaction. A happy three-step saga costs three such transactions.
//!
//! A definition may name a pivot, its point of no return: once the pivot
//! may have taken effect the saga only goes forward (see [`StepClass`]).
//! An attempt whose answer was lost has an unknown outcome, not a failed
//! one, and is settled before its step is compensated (see [`Settle`]).
//!
//! A definition has a version, and each saga runs on the version it
//! started on; a replica claims only the sagas whose version it carries,
//! and says which it carries in `saga_definitions`, so that a saga no live
//! replica can run is reported (and counted stuck) instead of run wrongly.
//! A step may have a condition (skipped when it does not hold), wait
//! for a named signal with a timeout that is a durable timer, or start a
//! saga of another type as its child and wait for its outcome.
//!
//! Any replica may drive any saga. Due work is claimed with `FOR UPDATE
//! SKIP LOCKED` under a lease, and each claim carries a fencing version that
//! every later write checks, so a replica that lost its lease (it stalled,
//! or died) cannot overwrite the new owner's work. Timers (retry backoff,
//! deadlines) are a column, so they survive restarts; new work wakes the
//! engines with `NOTIFY`, so a saga moves on in milliseconds, not polls.
//!
//! - `definition`: describing sagas; `plan`: the pure rules deciding what a
//!   saga does next; `turn`: applying attempts, outcomes and transitions to
//!   the record in memory; `store`: its tables (every statement, and what
//!   fences each write); `engine`: claiming and driving.

mod definition;
mod engine;
mod plan;
pub mod store;
mod turn;

pub use definition::{
    Action, ChildSaga, Condition, Facts, FnAction, Journal, OnTimeout, RetryPolicy, SagaDefinition,
    Settle, SignalWait, Step, StepClass, StepContext, StepError, attempt_id,
};
pub use engine::{
    Engine, EngineConfig, NewSignal, RequestOutcome, SignalOutcome, Started, Termination,
};
pub use store::{Child, Kind, SagaRecord, SagaState, Signal, StepRecord, StepStatus};

/// The saga tables, applied in the orchestrator's schema.
pub const MIGRATIONS: database::MigrationSet = database::migrations!(
    "saga-engine",
    [
        "0001_sagas.sql",
        "0002_pivot.sql",
        "0003_operator_controls.sql",
        "0004_search.sql",
        "0005_finished_sagas_by_age.sql",
        "0006_versions_conditions_signals.sql",
        "0007_child_sagas.sql",
        "0008_children_and_stuck.sql",
    ]
);
