//! The engine against a real PostgreSQL: retries with backoff, deadlines,
//! compensation in reverse order, parallel groups, fencing, crash recovery
//! and operator requests. Actions are test closures that record what they
//! were asked to do.

use std::str::FromStr as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use database::{DatabaseSettings, MigrationSet, ServiceAccount};
use dev_stack::TestEnv;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use saga_engine::store;
use saga_engine::{
    Action, Engine, EngineConfig, Kind, RequestOutcome, RetryPolicy, SagaDefinition, SagaState,
    Settle, Step, StepContext, StepError, StepStatus,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What the actions did, in order: "a", "b", "undo a", ...
type Journal = Arc<Mutex<Vec<(String, Instant)>>>;

fn retry(max_attempts: u32, initial_ms: u64) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(initial_ms),
        max_backoff: Duration::from_millis(initial_ms * 8),
    }
}

/// An action that journals each call, failing with the queued errors (one
/// per attempt) before it succeeds.
struct Recorder {
    entry: String,
    journal: Journal,
    failures: Mutex<Vec<StepError>>,
}

impl Action for Recorder {
    fn run<'a>(
        &'a self,
        _: &'a StepContext,
    ) -> BoxFuture<'a, Result<serde_json::Value, StepError>> {
        self.journal
            .lock()
            .unwrap()
            .push((self.entry.clone(), Instant::now()));
        let next = {
            let mut failures = self.failures.lock().unwrap();
            if failures.is_empty() {
                None
            } else {
                Some(failures.remove(0))
            }
        };
        async move { next.map_or(Ok(serde_json::json!({ "done": true })), Err) }.boxed()
    }
}

/// A step whose action fails with `failures` before it succeeds, and whose
/// compensation always succeeds; both journal their calls.
fn step(name: &'static str, journal: &Journal, failures: Vec<StepError>) -> Step {
    let recorder = |entry: String, failures| {
        Arc::new(Recorder {
            entry,
            journal: journal.clone(),
            failures: Mutex::new(failures),
        })
    };
    Step {
        name,
        action: Some(recorder(name.to_owned(), failures)),
        compensation: Some(recorder(format!("undo {name}"), vec![])),
        retry: retry(3, 50),
        compensation_retry: retry(3, 50),
        attempt_timeout: Duration::from_secs(2),
        compensation_attempt_timeout: Duration::from_secs(2),
        deadline: Duration::from_secs(10),
        settle: Settle::ByRepeating,
        condition: None,
        wait: None,
        child: None,
    }
}

/// What an engine carrying version 1 of the test saga claims.
fn test_v1() -> store::Carried {
    store::Carried::of(&[("test", 1)])
}

const TABLES: MigrationSet = saga_engine::MIGRATIONS;

async fn pool() -> PgPool {
    let db = TestEnv::get().await.database().await.unwrap();
    let account = ServiceAccount {
        schema: "sagas",
        role: "sagas_service",
        password: "sagas-test".into(),
    };
    let url = db.provision(&account).await.unwrap();
    let settings = DatabaseSettings {
        url: sqlx::postgres::PgConnectOptions::from_str(&url).unwrap(),
        max_connections: 20,
        connect_timeout: Duration::from_secs(10),
    };
    let pool = database::connect(&settings, "sagas").await.unwrap();
    database::migrate(&pool, &[messaging::MIGRATIONS, TABLES])
        .await
        .unwrap();
    pool
}

fn engine(pool: &PgPool, definition: SagaDefinition, worker: &str) -> Arc<Engine> {
    let config = EngineConfig {
        worker_id: worker.to_owned(),
        lease: Duration::from_secs(5),
        concurrency: 8,
        events_topic: "test.saga.events".into(),
        producer: "test",
    };
    Arc::new(Engine::new(pool.clone(), vec![definition], config).unwrap())
}

async fn start(engine: &Engine, key: &str) -> Uuid {
    let mut tx = engine.pool().begin().await.unwrap();
    let id = engine
        .start(
            &mut tx,
            "test",
            key,
            serde_json::json!({ "key": key }),
            "flow-1",
        )
        .await
        .unwrap()
        .unwrap();
    tx.commit().await.unwrap();
    id
}

/// Waits until the saga reaches `state`.
async fn wait_for(pool: &PgPool, saga_id: Uuid, state: SagaState) -> saga_engine::SagaRecord {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let saga = store::load(pool, saga_id).await.unwrap().unwrap();
            if saga.instance.state == state {
                return saga;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the saga did not become {state:?}"))
}

fn entries(journal: &Journal) -> Vec<String> {
    journal
        .lock()
        .unwrap()
        .iter()
        .map(|(entry, _)| entry.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn states_are_stored_as_the_text_the_tables_allow_and_nothing_else_is_read() {
    let pool = pool().await;
    let journal = Journal::default();
    let engine = engine(
        &pool,
        SagaDefinition::sequence("test", vec![step("a", &journal, vec![])]),
        "unused",
    );
    let saga_id = start(&engine, "states").await;
    // Every value the engine writes passes the table's CHECK constraint and
    // reads back as itself.
    for state in SagaState::ALL {
        let read: SagaState = sqlx::query_scalar(
            "UPDATE saga_instances SET state = $2 WHERE saga_id = $1 RETURNING state",
        )
        .bind(saga_id)
        .bind(state)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(read, state);
    }
    for kind in Kind::ALL {
        for status in StepStatus::ALL {
            let read: (Kind, StepStatus) = sqlx::query_as(
                "INSERT INTO saga_steps (saga_id, step, kind, status) VALUES ($1, 'a', $2, $3)
                 ON CONFLICT (saga_id, step, kind) DO UPDATE SET status = EXCLUDED.status
                 RETURNING kind, status",
            )
            .bind(saga_id)
            .bind(kind)
            .bind(status)
            .fetch_one(&pool)
            .await
            .unwrap();
            assert_eq!(read, (kind, status));
        }
    }
    // A value the engine does not know is an error, not a guess.
    let unknown = sqlx::query_scalar::<_, StepStatus>("SELECT 'stalled'::text")
        .fetch_one(&pool)
        .await;
    assert!(
        matches!(&unknown, Err(sqlx::Error::ColumnDecode { source, .. })
            if source.to_string() == "unknown step status \"stalled\""),
        "{unknown:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retryable_failure_is_retried_with_growing_backoff_until_it_succeeds() {
    let pool = pool().await;
    let journal = Journal::default();
    let flaky = vec![
        StepError::Retryable("busy".into()),
        StepError::Retryable("still busy".into()),
    ];
    let definition = SagaDefinition::sequence(
        "test",
        vec![step("a", &journal, flaky), step("b", &journal, vec![])],
    );
    let engine = engine(&pool, definition, "worker-1");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine.clone().run(shutdown.clone()));

    let saga_id = start(&engine, "retry").await;
    let saga = wait_for(&pool, saga_id, SagaState::Completed).await;
    assert_eq!(entries(&journal), vec!["a", "a", "a", "b"]);
    let a = saga.steps.iter().find(|s| s.step == "a").unwrap();
    assert_eq!(
        (a.attempts, a.status, a.last_error.as_deref()),
        (3, StepStatus::Succeeded, Some("still busy"))
    );
    // Full jitter keeps each pause within [half, all] of 50 ms, then 100 ms.
    let times: Vec<Instant> = journal.lock().unwrap().iter().map(|(_, at)| *at).collect();
    assert!(
        times[1] - times[0] >= Duration::from_millis(25),
        "{:?}",
        times[1] - times[0]
    );
    assert!(
        times[2] - times[1] >= Duration::from_millis(50),
        "{:?}",
        times[2] - times[1]
    );
    shutdown.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_refused_before_they_were_made_cost_no_attempt() {
    let pool = pool().await;
    let journal = Journal::default();
    // Five refusals (an open circuit) then a real failure, against a budget
    // of three attempts: only the real failure spends one.
    let mut failures: Vec<StepError> = (0..5)
        .map(|_| StepError::NotAttempted {
            reason: "circuit open".into(),
            retry_after: Duration::from_millis(20),
        })
        .collect();
    failures.push(StepError::Retryable("busy".into()));
    let definition = SagaDefinition::sequence("test", vec![step("a", &journal, failures)]);
    let engine = engine(&pool, definition, "worker-1");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine.clone().run(shutdown.clone()));

    let saga_id = start(&engine, "refused").await;
    let saga = wait_for(&pool, saga_id, SagaState::Completed).await;
    assert_eq!(
        entries(&journal).len(),
        7,
        "five refusals, a failure, a success"
    );
    let a = saga.steps.iter().find(|s| s.step == "a").unwrap();
    assert_eq!((a.attempts, a.status), (2, StepStatus::Succeeded));
    shutdown.cancel();
    running.await.unwrap();
}

/// Starts a saga leased to `engine` in a committed transaction, as the
/// orchestrator's starter does (the caller adopts it, or not).
async fn start_here(engine: &Engine, key: &str) -> saga_engine::Started {
    let mut tx = engine.pool().begin().await.unwrap();
    let started = engine
        .start_here(
            &mut tx,
            "test",
            key,
            serde_json::json!({ "key": key }),
            "flow-1",
        )
        .await
        .unwrap()
        .unwrap();
    tx.commit().await.unwrap();
    started
}

async fn fence_and_owner(pool: &PgPool, saga_id: Uuid) -> (i64, Option<String>) {
    sqlx::query_as("SELECT fence, lease_owner FROM saga_instances WHERE saga_id = $1")
        .bind(saga_id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_started_here_is_driven_at_once_without_being_claimed() {
    let pool = pool().await;
    let journal = Journal::default();
    let definition = SagaDefinition::sequence(
        "test",
        vec![step("a", &journal, vec![]), step("b", &journal, vec![])],
    );
    let engine = engine(&pool, definition, "worker-1");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine.clone().run(shutdown.clone()));

    let started = start_here(&engine, "eager").await;
    let saga_id = started.saga_id;
    // Leased to this replica from the start: no other can claim it.
    assert_eq!(
        fence_and_owner(&pool, saga_id).await,
        (1, Some("worker-1".to_owned()))
    );
    engine.adopt(started);
    wait_for(&pool, saga_id, SagaState::Completed).await;
    assert_eq!(entries(&journal), ["a", "b"]);
    // A claim would have taken fence 2.
    assert_eq!(fence_and_owner(&pool, saga_id).await, (1, None));
    shutdown.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_started_by_a_replica_that_died_before_driving_it_is_claimed_when_its_lease_runs_out()
 {
    let pool = pool().await;
    let journal = Journal::default();
    let definition = SagaDefinition::sequence("test", vec![step("a", &journal, vec![])]);
    let dead = engine(&pool, definition.clone(), "worker-dead");
    let started = start_here(&dead, "orphan").await;
    let saga_id = started.saga_id;
    drop(started); // its replica died after the commit, before adopting it

    let survivor = engine(&pool, definition, "worker-2");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(survivor.clone().run(shutdown.clone()));
    let saga = wait_for(&pool, saga_id, SagaState::Completed).await;
    assert_eq!(entries(&journal), ["a"]);
    assert!(
        saga.instance.updated_at - saga.instance.created_at >= chrono::Duration::seconds(5),
        "claimed only once the dead replica's lease ran out"
    );
    assert_eq!(fence_and_owner(&pool, saga_id).await, (2, None));
    shutdown.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_started_here_but_not_yet_driven_is_released_at_shutdown() {
    let pool = pool().await;
    let journal = Journal::default();
    let definition = SagaDefinition::sequence("test", vec![step("a", &journal, vec![])]);
    let stopping = engine(&pool, definition.clone(), "worker-stopping");
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let started = start_here(&stopping, "handed-over").await;
    let saga_id = started.saga_id;
    stopping.adopt(started);
    // Stopping at once, it gives the saga back instead of driving it.
    stopping.clone().run(shutdown).await;
    assert!(entries(&journal).is_empty());
    assert_eq!(fence_and_owner(&pool, saga_id).await, (1, None));

    let successor = engine(&pool, definition, "worker-2");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(successor.clone().run(shutdown.clone()));
    wait_for(&pool, saga_id, SagaState::Completed).await;
    assert_eq!(entries(&journal), ["a"]);
    shutdown.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_past_its_deadline_fails_and_the_saga_compensates() {
    let pool = pool().await;
    let journal = Journal::default();
    let forever_lost = (0..100)
        .map(|_| StepError::Unknown("timed out".into()))
        .collect();
    let mut slow = step("b", &journal, forever_lost);
    slow.retry = retry(100, 40);
    slow.deadline = Duration::from_millis(400);
    slow.settle = Settle::ByCompensation;
    let definition = SagaDefinition::sequence("test", vec![step("a", &journal, vec![]), slow]);
    let engine = engine(&pool, definition, "worker-1");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine.clone().run(shutdown.clone()));

    let saga_id = start(&engine, "deadline").await;
    let saga = wait_for(&pool, saga_id, SagaState::Compensated).await;
    let b = saga
        .steps
        .iter()
        .find(|s| s.step == "b" && s.kind == Kind::Action)
        .unwrap();
    assert_eq!(b.status, StepStatus::Failed);
    assert!(
        b.last_error.as_deref().unwrap().contains("deadline"),
        "{b:?}"
    );
    assert!(saga.instance.failure_reason.unwrap().starts_with("b: "));
    // b's answers were lost, so it may have taken effect: its compensation
    // (which settles that by itself) runs, then a's.
    let undone: Vec<String> = entries(&journal)
        .into_iter()
        .filter(|e| e.starts_with("undo"))
        .collect();
    assert_eq!(undone, vec!["undo b", "undo a"]);
    shutdown.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compensation_runs_in_reverse_order_over_what_may_have_taken_effect() {
    let pool = pool().await;
    let journal = Journal::default();
    let definition = SagaDefinition::sequence(
        "test",
        vec![
            step("a", &journal, vec![]),
            step("b", &journal, vec![]),
            step("c", &journal, vec![StepError::Permanent("refused".into())]),
            step("d", &journal, vec![]),
        ],
    );
    let engine = engine(&pool, definition, "worker-1");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine.clone().run(shutdown.clone()));

    let saga_id = start(&engine, "reverse").await;
    let saga = wait_for(&pool, saga_id, SagaState::Compensated).await;
    assert_eq!(
        entries(&journal),
        vec!["a", "b", "c", "undo b", "undo a"],
        "c was refused for certain, so there is nothing to undo; d never ran"
    );
    assert_eq!(saga.instance.failure_reason.as_deref(), Some("c: refused"));
    let c = saga
        .steps
        .iter()
        .find(|s| s.step == "c" && s.kind == Kind::Action)
        .unwrap();
    assert_eq!(c.attempts, 1, "a permanent failure is not retried");
    shutdown.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_group_with_one_refused_branch_undoes_the_other() {
    let pool = pool().await;
    let journal = Journal::default();
    let definition = SagaDefinition {
        name: "test",
        version: 1,
        groups: vec![
            vec![step("reserve", &journal, vec![])],
            vec![
                step("left", &journal, vec![]),
                step("right", &journal, vec![StepError::Permanent("no".into())]),
            ],
            vec![step("after", &journal, vec![])],
        ],
        pivot: None,
    };
    let engine = engine(&pool, definition, "worker-1");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine.clone().run(shutdown.clone()));

    let saga_id = start(&engine, "parallel").await;
    wait_for(&pool, saga_id, SagaState::Compensated).await;
    let log = entries(&journal);
    assert_eq!(log[0], "reserve");
    let mut branches = log[1..3].to_vec();
    branches.sort();
    assert_eq!(branches, vec!["left", "right"], "the branches ran together");
    assert_eq!(
        log[3..],
        ["undo left", "undo reserve"],
        "the branch that ran is undone (the refused one did nothing), then the group before it"
    );
    assert!(!log.contains(&"after".to_owned()));
    shutdown.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_claim_is_fenced_off() {
    let pool = pool().await;
    let journal = Journal::default();
    let engine = engine(
        &pool,
        SagaDefinition::sequence("test", vec![step("a", &journal, vec![])]),
        "unused",
    );
    let saga_id = start(&engine, "fence").await;
    let lease = Duration::from_millis(200);

    let mut first = store::claim(&pool, "replica-a", &test_v1(), 10, lease)
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    let stale = first.remove(0);
    assert!(
        store::claim(&pool, "replica-b", &test_v1(), 10, lease)
            .await
            .unwrap()
            .is_empty(),
        "leased sagas are not claimed"
    );

    // replica-a stalls past its lease; replica-b takes over.
    tokio::time::sleep(lease + Duration::from_millis(50)).await;
    let mut second = store::claim(&pool, "replica-b", &test_v1(), 10, lease)
        .await
        .unwrap();
    assert_eq!(second.len(), 1);
    let current = second.remove(0);
    assert!(current.fence() > stale.fence());

    // The stale owner's first write is refused: it begins nothing.
    let shutdown = CancellationToken::new();
    engine.drive(stale, &shutdown).await;
    assert!(entries(&journal).is_empty(), "the stale writer did nothing");
    let saga = store::load(&pool, saga_id).await.unwrap().unwrap();
    assert!(saga.steps.is_empty());
    assert_eq!(saga.instance.lease_owner.as_deref(), Some("replica-b"));

    engine.drive(current, &shutdown).await;
    assert_eq!(entries(&journal), vec!["a"]);
    let saga = store::load(&pool, saga_id).await.unwrap().unwrap();
    assert_eq!(saga.instance.state, SagaState::Completed);
    assert_eq!(saga.instance.lease_owner, None, "released at the end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_whose_replica_died_mid_step_is_finished_by_another() {
    let pool = pool().await;
    let journal = Journal::default();
    let quick = |mut step: Step| {
        step.attempt_timeout = Duration::from_millis(200);
        step.compensation_attempt_timeout = Duration::from_millis(200);
        step
    };
    let definition = SagaDefinition::sequence(
        "test",
        vec![
            quick(step("a", &journal, vec![])),
            quick(step("b", &journal, vec![])),
        ],
    );
    let config = EngineConfig {
        worker_id: "survivor".into(),
        lease: Duration::from_millis(500),
        concurrency: 4,
        events_topic: "test.saga.events".into(),
        producer: "test",
    };
    let engine = Arc::new(Engine::new(pool.clone(), vec![definition], config).unwrap());
    let saga_id = start(&engine, "crash").await;

    // A replica claims the saga, records that it attempts step a, and dies.
    let claimed = store::claim(&pool, "doomed", &test_v1(), 1, Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    sqlx::query("INSERT INTO saga_steps (saga_id, step, kind, status, attempts) VALUES ($1, 'a', 'action', 'running', 1)")
        .bind(saga_id)
        .execute(&pool)
        .await
        .unwrap();

    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine.clone().run(shutdown.clone()));
    let saga = wait_for(&pool, saga_id, SagaState::Completed).await;
    let a = saga.steps.iter().find(|s| s.step == "a").unwrap();
    assert_eq!(a.attempts, 2, "the lost attempt counts");
    assert_eq!(entries(&journal), vec!["a", "b"]);
    shutdown.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_saga_per_business_key_and_requests_between_steps() {
    let pool = pool().await;
    let journal = Journal::default();
    let engine = engine(
        &pool,
        SagaDefinition::sequence("test", vec![step("a", &journal, vec![])]),
        "worker",
    );
    let saga_id = start(&engine, "once").await;
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(
        engine
            .start(&mut tx, "test", "once", serde_json::json!({}), "flow-2")
            .await
            .unwrap(),
        None
    );

    // Asked to compensate before it ran anything: it compensates nothing.
    assert_eq!(
        engine
            .request_compensation(&mut tx, saga_id, "customer cancelled")
            .await
            .unwrap(),
        RequestOutcome::Accepted
    );
    tx.commit().await.unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine.clone().run(shutdown.clone()));
    let saga = wait_for(&pool, saga_id, SagaState::Compensated).await;
    assert_eq!(
        saga.instance.failure_reason.as_deref(),
        Some("customer cancelled")
    );
    assert!(entries(&journal).is_empty());

    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(
        engine.retry(&mut conn, saga_id).await.unwrap(),
        RequestOutcome::NotApplicable(SagaState::Compensated)
    );
    assert_eq!(
        engine.retry(&mut conn, Uuid::now_v7()).await.unwrap(),
        RequestOutcome::NotFound
    );
    shutdown.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_outcome_is_asked_again_before_it_is_compensated() {
    let pool = pool().await;
    let lost = || StepError::Unknown("timed out".into());
    for (settled, undone) in [
        (None, vec!["undo b", "undo a"]),
        (
            Some(StepError::Permanent("never happened".into())),
            vec!["undo a"],
        ),
    ] {
        let journal = Journal::default();
        // b's three attempts lose their answers; then the saga turns back,
        // and asks b once more: it answers that it happened (or, for
        // certain, that it did not).
        let mut failures = vec![lost(), lost(), lost()];
        failures.extend(settled.clone());
        let definition = SagaDefinition::sequence(
            "test",
            vec![step("a", &journal, vec![]), step("b", &journal, failures)],
        );
        let engine = engine(&pool, definition, "worker-1");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(engine.clone().run(shutdown.clone()));
        let saga_id = start(&engine, &format!("settle-{}", settled.is_some())).await;
        let saga = wait_for(&pool, saga_id, SagaState::Compensated).await;
        let log = entries(&journal);
        assert_eq!(log[..5], ["a", "b", "b", "b", "b"], "asked once more");
        assert_eq!(log[5..], undone, "settled: {settled:?}");
        let b = saga
            .steps
            .iter()
            .find(|s| s.step == "b" && s.kind == Kind::Action)
            .unwrap();
        assert!(!b.outcome_unknown(), "settled: {b:?}");
        shutdown.cancel();
        running.await.unwrap();
    }
}

/// a, then the pivot p, then the retriable r.
fn pivoted(journal: &Journal, p: Vec<StepError>, r: Vec<StepError>) -> SagaDefinition {
    let mut pivot = step("p", journal, p);
    pivot.compensation = None;
    let mut after = step("r", journal, r);
    after.compensation = None;
    for step in [&mut pivot, &mut after] {
        step.retry = retry(2, 20);
        step.deadline = Duration::from_millis(150);
    }
    SagaDefinition::sequence("test", vec![step("a", journal, vec![]), pivot, after]).with_pivot("p")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_pivot_the_saga_only_goes_forward_and_flags_overdue_steps() {
    let pool = pool().await;
    let journal = Journal::default();
    let lost = (0..8).map(|_| StepError::Unknown("lost".into())).collect();
    let busy = (0..4)
        .map(|_| StepError::Retryable("busy".into()))
        .collect();
    let engine = engine(&pool, pivoted(&journal, lost, busy), "worker-1");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine.clone().run(shutdown.clone()));
    let saga_id = start(&engine, "forward").await;

    // Once p was attempted, a compensation request is refused.
    let overdue = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let saga = store::load(&pool, saga_id).await.unwrap().unwrap();
            if saga.instance.overdue_step.is_some() {
                return saga;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("p is flagged once past its deadline");
    assert_eq!(overdue.instance.overdue_step.as_deref(), Some("p"));
    assert!(overdue.instance.forward_only_since.is_some());
    let mut tx = pool.begin().await.unwrap();
    let refused = engine
        .request_compensation(&mut tx, saga_id, "operator")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(
        matches!(refused, RequestOutcome::ForwardOnly { pivot: "p", .. }),
        "{refused:?}"
    );

    // p and r go on past their attempt budgets and deadlines, and succeed.
    let saga = wait_for(&pool, saga_id, SagaState::Completed).await;
    let log = entries(&journal);
    assert!(log.iter().all(|e| !e.starts_with("undo")), "{log:?}");
    assert_eq!(log.iter().filter(|e| *e == "p").count(), 9);
    assert_eq!(log.iter().filter(|e| *e == "r").count(), 5);
    assert_eq!(saga.instance.overdue_step, None, "cleared once it moved on");
    assert_eq!(saga.instance.compensation_requested, None);
    shutdown.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pivot_refused_for_certain_turns_the_saga_back_and_a_step_after_it_parks() {
    let pool = pool().await;
    let journal = Journal::default();
    let refused = vec![
        StepError::Unknown("lost".into()),
        StepError::Permanent("refused".into()),
    ];
    let turning = engine(&pool, pivoted(&journal, refused, vec![]), "worker-1");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(turning.clone().run(shutdown.clone()));
    let saga_id = start(&turning, "refused").await;
    let saga = wait_for(&pool, saga_id, SagaState::Compensated).await;
    assert_eq!(entries(&journal), vec!["a", "p", "p", "undo a"]);
    assert_eq!(saga.instance.forward_only_since, None);
    assert_eq!(saga.instance.failure_reason.as_deref(), Some("p: refused"));
    shutdown.cancel();
    running.await.unwrap();

    // A step after the pivot that is refused cannot turn the saga back: it
    // waits for an operator, whose retry sends it forward again.
    let journal = Journal::default();
    let engine = engine(
        &pool,
        pivoted(&journal, vec![], vec![StepError::Permanent("no".into())]),
        "worker-2",
    );
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine.clone().run(shutdown.clone()));
    let saga_id = start(&engine, "parked").await;
    let failed = wait_for(&pool, saga_id, SagaState::Failed).await;
    assert!(
        failed
            .instance
            .failure_reason
            .as_deref()
            .unwrap()
            .starts_with("r: no"),
        "{:?}",
        failed.instance.failure_reason
    );
    let mut tx = pool.begin().await.unwrap();
    assert!(matches!(
        engine
            .request_compensation(&mut tx, saga_id, "operator")
            .await
            .unwrap(),
        RequestOutcome::ForwardOnly { pivot: "p", .. }
    ));
    assert_eq!(
        engine.retry(&mut tx, saga_id).await.unwrap(),
        RequestOutcome::Accepted
    );
    tx.commit().await.unwrap();
    wait_for(&pool, saga_id, SagaState::Completed).await;
    assert_eq!(entries(&journal), vec!["a", "p", "r", "r"]);
    shutdown.cancel();
    running.await.unwrap();
}

/// The randomised money check: an order saga's shape (open the order,
/// charge, confirm as the pivot) over a model of the order aggregate and
/// the provider, with random lost answers, hung calls, refusals, customer
/// cancellations, operator compensations and replica crashes. Whatever the
/// interleaving, the money ends right: held = total for a confirmed order,
/// 0 for every other, and the saga completes exactly when the order is
/// confirmed.
mod money {
    use std::collections::HashMap;

    use rand::rngs::StdRng;
    use rand::{Rng as _, SeedableRng as _};

    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum OrderState {
        Pending,
        CancellationRequested,
        Confirmed,
        Cancelled,
        Rejected,
    }

    /// What the provider knows of one charge key.
    #[derive(Debug, Default, Clone, Copy)]
    struct Charge {
        captured: bool,
        declined: bool,
        refunded: bool,
        voided: bool,
    }

    /// How one call goes.
    #[derive(Debug, Clone, Copy)]
    enum Fate {
        Answer,
        /// Refused for certain (a decline, for the charge).
        Refuse,
        /// Takes effect, then the answer is lost.
        LostAfter,
        /// Lost before it took effect.
        LostBefore,
        /// Takes effect, then hangs past the attempt's time limit.
        Hang,
    }

    #[derive(Debug, Default)]
    struct World {
        orders: HashMap<u64, OrderState>,
        charges: HashMap<u64, Charge>,
        fates: HashMap<(u64, &'static str), Vec<Fate>>,
    }

    type Shared = Arc<Mutex<World>>;

    fn order_of(context: &StepContext) -> u64 {
        context.data["order"].as_u64().unwrap()
    }

    fn fate(world: &Shared, order: u64, call: &'static str) -> Fate {
        let mut world = world.lock().unwrap();
        let fates = world.fates.entry((order, call)).or_default();
        if fates.is_empty() {
            Fate::Answer
        } else {
            fates.remove(0)
        }
    }

    /// Runs `effect` on the world as `fate` says, and answers as it says.
    async fn call(
        world: &Shared,
        order: u64,
        name: &'static str,
        effect: impl FnOnce(&mut World, u64) -> Result<(), String>,
    ) -> Result<serde_json::Value, StepError> {
        let fate = fate(world, order, name);
        let applied = match fate {
            Fate::LostBefore => None,
            Fate::Refuse if name == "charge" => {
                let mut world = world.lock().unwrap();
                let charge = world.charges.entry(order).or_default();
                if !charge.captured && !charge.voided {
                    charge.declined = true;
                }
                Some(effect(&mut world, order))
            }
            _ => Some(effect(&mut world.lock().unwrap(), order)),
        };
        match (fate, applied) {
            (Fate::Hang, _) => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                unreachable!("the attempt's time limit ends it")
            }
            (Fate::LostAfter | Fate::LostBefore, _) => Err(StepError::Unknown("lost".into())),
            (_, Some(Err(refusal))) => Err(StepError::Permanent(refusal)),
            _ => Ok(serde_json::Value::Null),
        }
    }

    /// A call to the modelled world.
    struct Call {
        world: Shared,
        name: &'static str,
        effect: fn(&mut World, u64) -> Result<(), String>,
    }

    impl Action for Call {
        fn run<'a>(
            &'a self,
            context: &'a StepContext,
        ) -> BoxFuture<'a, Result<serde_json::Value, StepError>> {
            call(&self.world, order_of(context), self.name, self.effect).boxed()
        }
    }

    fn action(
        world: &Shared,
        name: &'static str,
        effect: fn(&mut World, u64) -> Result<(), String>,
    ) -> Arc<dyn Action> {
        Arc::new(Call {
            world: world.clone(),
            name,
            effect,
        })
    }

    fn charge(world: &mut World, order: u64) -> Result<(), String> {
        let charge = world.charges.entry(order).or_default();
        if charge.voided || (charge.declined && !charge.captured) {
            return Err("declined".into());
        }
        charge.captured = true;
        Ok(())
    }

    /// Refund-or-void by the charge's key: undoes whatever it came to.
    fn reverse(world: &mut World, order: u64) -> Result<(), String> {
        let charge = world.charges.entry(order).or_default();
        if charge.captured {
            charge.refunded = true;
        } else {
            charge.voided = true;
        }
        Ok(())
    }

    /// The aggregate: confirming is refused once cancellation was asked for.
    fn confirm(world: &mut World, order: u64) -> Result<(), String> {
        let state = world.orders.get_mut(&order).unwrap();
        match *state {
            OrderState::Pending => *state = OrderState::Confirmed,
            OrderState::Confirmed => {}
            other => return Err(format!("the order is {other:?}")),
        }
        Ok(())
    }

    fn close(world: &mut World, order: u64) -> Result<(), String> {
        let refunded = world.charges.get(&order).is_some_and(|c| c.refunded);
        let state = world.orders.get_mut(&order).unwrap();
        match *state {
            OrderState::Confirmed => return Err("the order is confirmed".into()),
            OrderState::Pending | OrderState::CancellationRequested => {
                *state = if refunded || *state == OrderState::CancellationRequested {
                    OrderState::Cancelled
                } else {
                    OrderState::Rejected
                };
            }
            OrderState::Cancelled | OrderState::Rejected => {}
        }
        Ok(())
    }

    fn definition(world: &Shared) -> SagaDefinition {
        let quick = |mut step: Step| {
            step.attempt_timeout = Duration::from_millis(150);
            step.compensation_attempt_timeout = Duration::from_millis(150);
            step.retry = retry(3, 5);
            step.compensation_retry = retry(20, 5);
            step.deadline = Duration::from_millis(400);
            step
        };
        let journal = Journal::default();
        let mut open = quick(step("open-order", &journal, vec![]));
        open.action = None;
        open.compensation = Some(action(world, "close", close));
        let mut pay = quick(step("process-payment", &journal, vec![]));
        pay.action = Some(action(world, "charge", charge));
        pay.compensation = Some(action(world, "reverse", reverse));
        pay.settle = Settle::ByCompensation;
        let mut confirm_order = quick(step("confirm-order", &journal, vec![]));
        confirm_order.action = Some(action(world, "confirm", confirm));
        confirm_order.compensation = None;
        SagaDefinition::sequence("test", vec![open, pay, confirm_order]).with_pivot("confirm-order")
    }

    fn random_fates(rng: &mut StdRng, refusals: bool) -> Vec<Fate> {
        (0..rng.random_range(0..5))
            .map(|_| match rng.random_range(0..10) {
                0..=3 => Fate::LostAfter,
                4..=5 => Fate::LostBefore,
                6 => Fate::Hang,
                7 if refusals => Fate::Refuse,
                _ => Fate::Answer,
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn random_interleavings_keep_the_money_invariant() {
        let seed = std::env::var("SAGA_MONEY_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random::<u64>);
        eprintln!("SAGA_MONEY_SEED={seed}");
        let mut rng = StdRng::seed_from_u64(seed);
        let pool = pool().await;
        let world = Shared::default();
        let definition = definition(&world);
        let config = |n: usize| EngineConfig {
            worker_id: format!("replica-{n}"),
            lease: Duration::from_millis(600),
            concurrency: 16,
            events_topic: "test.saga.events".into(),
            producer: "test",
        };
        let replica = |n: usize| {
            let engine =
                Arc::new(Engine::new(pool.clone(), vec![definition.clone()], config(n)).unwrap());
            tokio::spawn(engine.run(CancellationToken::new()))
        };

        const SAGAS: u64 = 100;
        let starter =
            Arc::new(Engine::new(pool.clone(), vec![definition.clone()], config(0)).unwrap());
        let mut sagas = Vec::new();
        let mut requests = Vec::new();
        for order in 0..SAGAS {
            {
                let mut world = world.lock().unwrap();
                world.orders.insert(order, OrderState::Pending);
                for (call, refusals) in [
                    ("charge", true),
                    ("reverse", false),
                    ("confirm", false),
                    ("close", false),
                ] {
                    world
                        .fates
                        .insert((order, call), random_fates(&mut rng, refusals));
                }
            }
            let mut tx = pool.begin().await.unwrap();
            let saga_id = starter
                .start(
                    &mut tx,
                    "test",
                    &order.to_string(),
                    serde_json::json!({ "order": order }),
                    "flow",
                )
                .await
                .unwrap()
                .unwrap();
            tx.commit().await.unwrap();
            sagas.push((order, saga_id));
            // A customer cancels, or an operator compensates, at a random moment.
            match rng.random_range(0..4) {
                0 => requests.push((
                    order,
                    saga_id,
                    true,
                    Duration::from_millis(rng.random_range(0..300)),
                )),
                1 => requests.push((
                    order,
                    saga_id,
                    false,
                    Duration::from_millis(rng.random_range(0..300)),
                )),
                _ => {}
            }
        }
        let mut replicas: Vec<_> = (1..=2).map(replica).collect();
        let mut asking = tokio::task::JoinSet::new();
        for (order, saga_id, customer, after) in requests {
            let (pool, world, engine) = (pool.clone(), world.clone(), starter.clone());
            asking.spawn(async move {
                tokio::time::sleep(after).await;
                if customer {
                    // The aggregate records it only while the order is pending.
                    let mut world = world.lock().unwrap();
                    let state = world.orders.get_mut(&order).unwrap();
                    if *state != OrderState::Pending {
                        return;
                    }
                    *state = OrderState::CancellationRequested;
                }
                let mut tx = pool.begin().await.unwrap();
                engine
                    .request_compensation(&mut tx, saga_id, "called off")
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
            });
        }
        // Replicas die mid-flight (their in-flight calls are dropped, their
        // outcomes never recorded) and come back under new names.
        for crash in 0..6 {
            tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
            let victim = rng.random_range(0..replicas.len());
            replicas.remove(victim).abort();
            replicas.push(replica(3 + crash));
        }
        while asking.join_next().await.is_some() {}

        let deadline = Instant::now() + Duration::from_secs(60);
        for (order, saga_id) in &sagas {
            let saga = loop {
                let saga = store::load(&pool, *saga_id).await.unwrap().unwrap();
                let state = saga.instance.state;
                if matches!(
                    state,
                    SagaState::Completed | SagaState::Compensated | SagaState::Failed
                ) || Instant::now() > deadline
                {
                    break saga;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            let world = world.lock().unwrap();
            let state = world.orders[order];
            let charge = world.charges.get(order).copied().unwrap_or_default();
            let held = charge.captured && !charge.refunded;
            let context =
                format!("seed {seed}, order {order}: {state:?}, {charge:?}, saga {saga:#?}");
            match saga.instance.state {
                SagaState::Completed => {
                    assert_eq!(state, OrderState::Confirmed, "{context}");
                    assert!(held, "a confirmed order has its money: {context}");
                }
                SagaState::Compensated => {
                    assert!(
                        matches!(state, OrderState::Cancelled | OrderState::Rejected),
                        "{context}"
                    );
                    assert!(!held, "a called-off order holds no money: {context}");
                }
                other => panic!("the saga ended {other:?}: {context}"),
            }
        }
        for replica in replicas {
            replica.abort();
        }
    }
}

/// Operators' controls (pause, resume, terminate), stuck-saga detection and
/// the search's indexes.
mod operator {
    use super::*;
    use saga_engine::Termination;
    use saga_engine::store::SagaFilter;
    use tokio::sync::Semaphore;

    /// An action that journals its call, then waits until the test lets it
    /// finish: an attempt the test holds in flight.
    struct Gate {
        entry: &'static str,
        journal: Journal,
        open: Arc<Semaphore>,
    }

    impl Action for Gate {
        fn run<'a>(
            &'a self,
            _: &'a StepContext,
        ) -> BoxFuture<'a, Result<serde_json::Value, StepError>> {
            self.journal
                .lock()
                .unwrap()
                .push((self.entry.to_owned(), Instant::now()));
            async move {
                self.open.acquire().await.unwrap().forget();
                Ok(serde_json::json!({ "done": true }))
            }
            .boxed()
        }
    }

    /// Steps a (held at its gate until opened) then b.
    fn gated(journal: &Journal, open: &Arc<Semaphore>) -> SagaDefinition {
        let mut a = step("a", journal, vec![]);
        a.action = Some(Arc::new(Gate {
            entry: "a",
            journal: journal.clone(),
            open: open.clone(),
        }));
        a.attempt_timeout = Duration::from_secs(4);
        a.deadline = Duration::from_secs(60);
        SagaDefinition::sequence("test", vec![a, step("b", journal, vec![])])
    }

    async fn until_journal_has(journal: &Journal, entry: &str) {
        tokio::time::timeout(Duration::from_secs(20), async {
            while !entries(journal).iter().any(|e| e == entry) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{entry} never ran"));
    }

    /// Waits until `check` holds of the saga, and returns it.
    async fn until(
        pool: &PgPool,
        saga_id: Uuid,
        what: &str,
        check: impl Fn(&saga_engine::SagaRecord) -> bool,
    ) -> saga_engine::SagaRecord {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let saga = store::load(pool, saga_id).await.unwrap().unwrap();
                if check(&saga) {
                    return saga;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the saga never {what}"))
    }

    async fn request(
        pool: &PgPool,
        act: impl AsyncFnOnce(&mut sqlx::PgConnection) -> RequestOutcome,
    ) -> RequestOutcome {
        let mut tx = pool.begin().await.unwrap();
        let outcome = act(&mut tx).await;
        tx.commit().await.unwrap();
        outcome
    }

    /// The saga events of `saga_id` in the outbox, by type name.
    async fn published(pool: &PgPool, saga_id: Uuid) -> Vec<String> {
        let payloads: Vec<Vec<u8>> = sqlx::query_scalar("SELECT envelope FROM outbox ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap();
        payloads
            .iter()
            .filter_map(|bytes| {
                use prost::Message as _;
                messaging::EventEnvelope::decode(bytes.as_slice()).ok()
            })
            .filter(|envelope| envelope.aggregate_id == saga_id.to_string())
            .map(|envelope| envelope.event_type.rsplit('.').next().unwrap().to_owned())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pause_lets_the_attempt_in_flight_finish_then_nothing_runs_until_resumed_even_across_restarts()
     {
        let pool = pool().await;
        let journal = Journal::default();
        let open = Arc::new(Semaphore::new(0));
        let first = engine(&pool, gated(&journal, &open), "replica-1");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(first.clone().run(shutdown.clone()));
        let saga_id = start(&first, "paused").await;
        until_journal_has(&journal, "a").await;

        // a is in flight: the pause is a request its replica takes between
        // steps.
        let outcome = request(&pool, async |tx| first.pause(tx, saga_id).await.unwrap()).await;
        assert_eq!(outcome, RequestOutcome::Accepted);
        let requested = store::load(&pool, saga_id).await.unwrap().unwrap();
        assert_eq!(requested.instance.state, SagaState::Running);
        assert!(requested.instance.pause_requested_at.is_some());
        open.add_permits(1);
        let paused = wait_for(&pool, saga_id, SagaState::Paused).await;
        let a = paused.steps.iter().find(|s| s.step == "a").unwrap();
        assert_eq!(
            (a.status, a.attempts),
            (StepStatus::Succeeded, 1),
            "{paused:?}"
        );
        assert!(paused.steps.iter().all(|s| s.step != "b"), "{paused:?}");
        assert_eq!(paused.instance.paused_from, Some(SagaState::Running));
        assert_eq!(paused.instance.pause_requested_at, None);
        assert_eq!(paused.instance.next_run_at, None, "no timer runs");
        // Pausing again changes nothing; retrying or compensating-by-retry
        // a paused saga is refused with its state.
        let again = request(&pool, async |tx| first.pause(tx, saga_id).await.unwrap()).await;
        assert_eq!(again, RequestOutcome::Accepted);
        let retried = request(&pool, async |tx| first.retry(tx, saga_id).await.unwrap()).await;
        assert_eq!(retried, RequestOutcome::NotApplicable(SagaState::Paused));

        // Every replica restarts: the new one drives other sagas, not it.
        shutdown.cancel();
        running.await.unwrap();
        let second = engine(&pool, gated(&journal, &open), "replica-2");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(second.clone().run(shutdown.clone()));
        open.add_permits(1);
        let canary = start(&second, "canary").await;
        wait_for(&pool, canary, SagaState::Completed).await;
        let still = store::load(&pool, saga_id).await.unwrap().unwrap();
        assert_eq!(still.instance.state, SagaState::Paused);
        assert_eq!(
            entries(&journal).iter().filter(|e| *e == "b").count(),
            1,
            "only the canary's b ran"
        );

        let resumed = request(&pool, async |tx| second.resume(tx, saga_id).await.unwrap()).await;
        assert_eq!(resumed, RequestOutcome::Accepted);
        let done = wait_for(&pool, saga_id, SagaState::Completed).await;
        assert_eq!(done.instance.paused_from, None);
        assert_eq!(
            entries(&journal).iter().filter(|e| *e == "a").count(),
            2,
            "a ran once for each saga: its outcome was kept across the pause"
        );
        // Resuming a saga that is not paused is refused with its state.
        let refused = request(&pool, async |tx| second.resume(tx, saga_id).await.unwrap()).await;
        assert_eq!(refused, RequestOutcome::NotApplicable(SagaState::Completed));
        let refused = request(&pool, async |tx| second.pause(tx, saga_id).await.unwrap()).await;
        assert_eq!(refused, RequestOutcome::NotApplicable(SagaState::Completed));
        assert_eq!(
            published(&pool, saga_id).await,
            [
                "SagaStarted",
                "SagaStepSucceeded",
                "SagaPaused",
                "SagaResumed",
                "SagaStepSucceeded",
                "SagaCompleted"
            ]
        );
        shutdown.cancel();
        running.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_saga_nobody_drives_pauses_at_once_and_a_failed_or_final_one_is_refused() {
        let pool = pool().await;
        let journal = Journal::default();
        let definition = SagaDefinition::sequence("test", vec![step("a", &journal, vec![])]);
        let engine = engine(&pool, definition, "replica");
        let saga_id = start(&engine, "idle").await;
        let (fence, _) = fence_and_owner(&pool, saga_id).await;
        let outcome = request(&pool, async |tx| engine.pause(tx, saga_id).await.unwrap()).await;
        assert_eq!(outcome, RequestOutcome::Accepted);
        let paused = store::load(&pool, saga_id).await.unwrap().unwrap();
        assert_eq!(paused.instance.state, SagaState::Paused);
        assert_eq!(paused.instance.next_run_at, None);
        assert_eq!(
            paused.instance.fence,
            fence + 1,
            "a stalled owner is fenced off"
        );
        // A customer's cancellation while paused is kept for when it resumes.
        let cancelled = request(&pool, async |tx| {
            engine
                .request_compensation(tx, saga_id, "customer cancelled")
                .await
                .unwrap()
        })
        .await;
        assert_eq!(cancelled, RequestOutcome::Accepted);
        let resumed = request(&pool, async |tx| engine.resume(tx, saga_id).await.unwrap()).await;
        assert_eq!(resumed, RequestOutcome::Accepted);
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(engine.clone().run(shutdown.clone()));
        let saga = wait_for(&pool, saga_id, SagaState::Compensated).await;
        assert_eq!(
            saga.instance.failure_reason.as_deref(),
            Some("customer cancelled")
        );
        assert!(
            entries(&journal).is_empty(),
            "nothing ran: it was called off first"
        );

        // A failed saga runs nothing: there is nothing to pause.
        sqlx::query("UPDATE saga_instances SET state = 'failed' WHERE saga_id = $1")
            .bind(saga_id)
            .execute(&pool)
            .await
            .unwrap();
        let refused = request(&pool, async |tx| engine.pause(tx, saga_id).await.unwrap()).await;
        assert_eq!(refused, RequestOutcome::NotApplicable(SagaState::Failed));
        let missing = request(&pool, async |tx| {
            engine.pause(tx, Uuid::now_v7()).await.unwrap()
        })
        .await;
        assert_eq!(missing, RequestOutcome::NotFound);
        shutdown.cancel();
        running.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn terminate_leaves_no_effect_unacknowledged_and_cuts_off_the_attempt_in_flight() {
        let pool = pool().await;
        let journal = Journal::default();
        let open = Arc::new(Semaphore::new(0));
        let mut definition = gated(&journal, &open);
        definition
            .groups
            .insert(0, vec![step("z", &journal, vec![])]);
        let engine = engine(&pool, definition, "replica");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(engine.clone().run(shutdown.clone()));
        let saga_id = start(&engine, "terminated").await;
        until_journal_has(&journal, "a").await;

        let terminate = async |acknowledge| {
            let mut tx = pool.begin().await.unwrap();
            let outcome = engine
                .terminate(
                    &mut tx,
                    saga_id,
                    "terminated by an operator: test",
                    acknowledge,
                )
                .await
                .unwrap();
            tx.commit().await.unwrap();
            outcome
        };
        // z succeeded and a is in flight: both may have taken effect.
        assert_eq!(
            terminate(false).await,
            Termination::EffectsNotAcknowledged(vec!["z".to_owned(), "a".to_owned()])
        );
        assert_eq!(
            store::load(&pool, saga_id)
                .await
                .unwrap()
                .unwrap()
                .instance
                .state,
            SagaState::Running,
            "nothing was done"
        );
        assert_eq!(
            terminate(true).await,
            Termination::Terminated {
                left_in_effect: vec!["z".to_owned(), "a".to_owned()],
                children: vec![],
            }
        );
        // a's attempt finishes, and its replica's write is fenced off.
        open.add_permits(1);
        let canary = start(&engine, "canary").await;
        open.add_permits(1);
        wait_for(&pool, canary, SagaState::Completed).await;
        let saga = store::load(&pool, saga_id).await.unwrap().unwrap();
        assert_eq!(saga.instance.state, SagaState::Terminated);
        assert_eq!(
            saga.instance.failure_reason.as_deref(),
            Some("terminated by an operator: test")
        );
        assert_eq!(
            saga.instance.left_in_effect,
            Some(vec!["z".to_owned(), "a".to_owned()])
        );
        assert!(saga.instance.finished_at.is_some());
        assert!(!saga.steps.iter().any(|s| s.step == "b" && s.attempts > 0));
        assert!(
            published(&pool, saga_id)
                .await
                .contains(&"SagaTerminated".to_owned())
        );
        assert_eq!(
            terminate(true).await,
            Termination::Refused(RequestOutcome::NotApplicable(SagaState::Terminated))
        );
        shutdown.cancel();
        running.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn terminate_is_refused_once_the_pivot_may_have_taken_effect() {
        let pool = pool().await;
        let journal = Journal::default();
        let lost = (0..1000)
            .map(|_| StepError::Unknown("lost".into()))
            .collect();
        let engine = engine(&pool, pivoted(&journal, lost, vec![]), "replica");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(engine.clone().run(shutdown.clone()));
        let saga_id = start(&engine, "pivoted").await;
        until(&pool, saga_id, "passed its pivot", |saga| {
            saga.instance.forward_only_since.is_some()
        })
        .await;
        let mut tx = pool.begin().await.unwrap();
        let outcome = engine
            .terminate(&mut tx, saga_id, "operator", true)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert!(
            matches!(
                outcome,
                Termination::Refused(RequestOutcome::ForwardOnly { pivot: "p", .. })
            ),
            "{outcome:?}"
        );
        assert_eq!(
            store::load(&pool, saga_id)
                .await
                .unwrap()
                .unwrap()
                .instance
                .state,
            SagaState::Running
        );
        shutdown.cancel();
        running.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_saga_without_progress_is_flagged_stuck_once_and_no_longer_once_it_moves_on() {
        let pool = pool().await;
        let journal = Journal::default();
        let open = Arc::new(Semaphore::new(0));
        let stuck_after = Duration::from_secs(1);
        let engine = engine(&pool, gated(&journal, &open), "replica-1");
        let other = self::engine(&pool, gated(&journal, &open), "replica-2");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(engine.clone().run(shutdown.clone()));
        // Two replicas watch; the saga is flagged (and logged) by one.
        let watchers = [
            tokio::spawn(engine.clone().watch_stuck(stuck_after, shutdown.clone())),
            tokio::spawn(other.clone().watch_stuck(stuck_after, shutdown.clone())),
        ];
        let saga_id = start(&engine, "stuck").await;
        until_journal_has(&journal, "a").await;
        let stuck = until(&pool, saga_id, "was flagged stuck", |saga| {
            saga.instance.stuck_since.is_some()
        })
        .await;
        let reason = stuck.instance.stuck_reason.clone().unwrap();
        assert!(reason.starts_with("no progress since "), "{reason}");
        assert!(
            stuck.instance.stuck_since.unwrap() - stuck.instance.progressed_at
                >= chrono::Duration::seconds(1)
        );
        assert!(
            store::flag_stuck(&pool, stuck_after)
                .await
                .unwrap()
                .is_empty(),
            "flagged once"
        );

        // a finishes: the saga progressed, and is no longer stuck.
        open.add_permits(1);
        let done = wait_for(&pool, saga_id, SagaState::Completed).await;
        assert_eq!(done.instance.stuck_since, None);
        assert_eq!(done.instance.stuck_reason, None);
        assert!(done.instance.progressed_at > stuck.instance.stuck_since.unwrap());

        // A paused saga is never stuck, however long it waits.
        let paused = start(&engine, "paused").await;
        until(&pool, paused, "ran a", |saga| {
            saga.steps.iter().any(|s| s.step == "a")
        })
        .await;
        request(&pool, async |tx| engine.pause(tx, paused).await.unwrap()).await;
        open.add_permits(1);
        wait_for(&pool, paused, SagaState::Paused).await;
        sqlx::query("UPDATE saga_instances SET progressed_at = now() - interval '1 hour' WHERE saga_id = $1")
            .bind(paused)
            .execute(&pool)
            .await
            .unwrap();
        assert!(
            store::flag_stuck(&pool, stuck_after)
                .await
                .unwrap()
                .is_empty()
        );
        shutdown.cancel();
        running.await.unwrap();
        for watcher in watchers {
            watcher.await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_search_filter_is_served_by_an_index_over_many_finished_sagas() {
        let pool = pool().await;
        // 50 000 finished sagas over two weeks, one in ten compensated with
        // a reason, a thousand customers; and one stuck running saga.
        sqlx::query(
            "INSERT INTO saga_instances (saga_id, saga_type, business_key, state, data, correlation_id,
                                         failure_reason, created_at, finished_at, progressed_at)
             SELECT gen_random_uuid(), 'test', 'order-' || n,
                    CASE WHEN n % 10 = 0 THEN 'compensated' ELSE 'completed' END,
                    jsonb_build_object('customer_id', 'customer-' || (n % 1000)), 'flow-' || n,
                    CASE WHEN n % 10 = 0 THEN 'process-payment: card_declined ' || (n % 7) END,
                    now() - make_interval(secs => n * 24), now() - make_interval(secs => n * 24 - 2),
                    now() - make_interval(secs => n * 24 - 2)
             FROM generate_series(1, 50000) AS n",
        )
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO saga_instances (saga_id, saga_type, business_key, state, data, correlation_id,
                                         stuck_since, stuck_reason)
             VALUES (gen_random_uuid(), 'test', 'order-stuck', 'running', '{\"customer_id\": \"customer-7\"}',
                     'flow-stuck', now(), 'no progress')",
        )
        .execute(&pool)
        .await
        .unwrap();
        // Version 2 of the test saga is carried; version 1 no longer is.
        sqlx::query(
            "INSERT INTO saga_definitions (saga_type, version, carried_until)
             VALUES ('test', 1, now() - interval '1 hour'), ('test', 2, now() + interval '1 hour')",
        )
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query("ANALYZE saga_instances")
            .execute(&pool)
            .await
            .unwrap();

        let now = chrono::Utc::now();
        let hours = |h: i64| now - chrono::Duration::hours(h);
        let filters: Vec<(&str, SagaFilter)> = vec![
            ("nothing", SagaFilter::default()),
            (
                "state",
                SagaFilter {
                    states: vec![SagaState::Compensated],
                    ..Default::default()
                },
            ),
            (
                "states",
                SagaFilter {
                    states: vec![SagaState::Running, SagaState::Failed],
                    ..Default::default()
                },
            ),
            (
                "type",
                SagaFilter {
                    saga_type: Some("test".into()),
                    ..Default::default()
                },
            ),
            (
                "created",
                SagaFilter {
                    created_after: Some(hours(3)),
                    created_before: Some(hours(2)),
                    ..Default::default()
                },
            ),
            (
                "finished",
                SagaFilter {
                    finished_after: Some(hours(3)),
                    finished_before: Some(hours(2)),
                    ..Default::default()
                },
            ),
            (
                "failure",
                SagaFilter {
                    failure_reason_contains: Some("DECLINED 3".into()),
                    ..Default::default()
                },
            ),
            (
                "order",
                SagaFilter {
                    business_key: Some("order-42".into()),
                    ..Default::default()
                },
            ),
            (
                "customer",
                SagaFilter {
                    customer_id: Some("customer-7".into()),
                    ..Default::default()
                },
            ),
            (
                "stuck",
                SagaFilter {
                    stuck_only: true,
                    ..Default::default()
                },
            ),
            (
                "version",
                SagaFilter {
                    saga_type: Some("test".into()),
                    version: Some(2),
                    ..Default::default()
                },
            ),
            (
                "unknown version",
                SagaFilter {
                    unknown_version_only: true,
                    ..Default::default()
                },
            ),
            (
                "state and created",
                SagaFilter {
                    states: vec![SagaState::Compensated],
                    created_after: Some(hours(48)),
                    ..Default::default()
                },
            ),
            (
                "failure and finished",
                SagaFilter {
                    failure_reason_contains: Some("card_declined".into()),
                    finished_after: Some(hours(24)),
                    ..Default::default()
                },
            ),
            (
                "customer and state",
                SagaFilter {
                    customer_id: Some("customer-7".into()),
                    states: vec![SagaState::Completed],
                    ..Default::default()
                },
            ),
            (
                "type, state and stuck",
                SagaFilter {
                    saga_type: Some("test".into()),
                    states: vec![SagaState::Running],
                    stuck_only: true,
                    ..Default::default()
                },
            ),
        ];
        let cursor = store::ListCursor {
            created_at: hours(100),
            saga_id: Uuid::max(),
        };
        // The selective filters read their own index; every other plan at
        // least reads one, in page order, and stops at a page.
        let own_index = |name: &str| match name {
            "state" => Some("saga_instances_by_state"),
            "created" => Some("saga_instances_by_created"),
            "finished" => Some("saga_instances_finished"),
            "order" => Some("saga_instances_by_key"),
            "customer" | "customer and state" => Some("saga_instances_by_customer"),
            "stuck" => Some("saga_instances_stuck"),
            "version" => Some("saga_instances_by_version"),
            "unknown version" => Some("saga_instances_unfinished"),
            _ => None,
        };
        for (name, filter) in &filters {
            for page in [None, Some(cursor)] {
                let plan = store::explain_search(&pool, filter, page, 21)
                    .await
                    .unwrap();
                assert!(
                    !plan.contains("Seq Scan"),
                    "{name} (page {page:?}) scans the table:\n{plan}"
                );
                if let Some(index) = own_index(name) {
                    assert!(
                        plan.contains(index),
                        "{name} (page {page:?}) does not read {index}:\n{plan}"
                    );
                }
            }
        }

        // The stuck detector reads what may become stuck (or is), never
        // the history of finished sagas.
        // (Each statement starts from the stuck sagas, the unprogressed or
        // the unfinished ones, whichever the planner finds fewer: every
        // one of these indexes holds only live sagas.)
        for (name, plan) in store::explain_stuck(&pool).await.unwrap() {
            // (saga_definitions has a row per definition: that one may.)
            assert!(
                !plan.contains("Seq Scan on saga_instances"),
                "stuck {name} scans:\n{plan}"
            );
            // Either partial index of live sagas will do; which one the
            // planner picks for so few live rows depends on its statistics.
            let indexes: &[&str] = match name {
                "unprogressed" | "next" => {
                    &["saga_instances_unprogressed", "saga_instances_unfinished"]
                }
                _ => &["Index"],
            };
            assert!(
                indexes.iter().any(|index| plan.contains(index)),
                "stuck {name} reads none of {indexes:?}:\n{plan}"
            );
        }

        // What they find, and pages that follow on.
        let customer = SagaFilter {
            customer_id: Some("customer-7".into()),
            ..Default::default()
        };
        let first = store::search(&pool, &customer, None, 30).await.unwrap();
        assert_eq!(first.len(), 30);
        assert_eq!(first[0].business_key, "order-stuck", "newest first");
        let last = first.last().unwrap();
        let next = store::search(
            &pool,
            &customer,
            Some(store::ListCursor {
                created_at: last.created_at,
                saga_id: last.saga_id,
            }),
            100,
        )
        .await
        .unwrap();
        assert_eq!(
            first.len() + next.len(),
            51,
            "50 finished and the stuck one"
        );
        assert!(next.iter().all(|s| s.created_at < last.created_at));
        let failure = SagaFilter {
            failure_reason_contains: Some("DECLINED 3".into()),
            ..Default::default()
        };
        let found = store::search(&pool, &failure, None, 1000).await.unwrap();
        assert_eq!(
            found.len(),
            (1..=5000).filter(|k| (10 * k) % 7 == 3).count()
        );
        assert!(found.iter().all(|s| {
            s.failure_reason
                .as_deref()
                .unwrap()
                .ends_with("card_declined 3")
        }));
        let literal = SagaFilter {
            failure_reason_contains: Some("100%".into()),
            ..Default::default()
        };
        assert!(
            store::search(&pool, &literal, None, 10)
                .await
                .unwrap()
                .is_empty(),
            "% is a character"
        );
        let stuck = SagaFilter {
            stuck_only: true,
            ..Default::default()
        };
        let stuck = store::search(&pool, &stuck, None, 10).await.unwrap();
        assert_eq!(stuck.len(), 1);
        assert_eq!(stuck[0].business_key, "order-stuck");
    }
}

/// Versioned definitions, conditional steps, and signals with durable
/// timeouts.
mod second_wave {
    use super::*;
    use saga_engine::store::SagaFilter;
    use saga_engine::{Facts, NewSignal, OnTimeout, SignalOutcome, SignalWait};

    /// A step that waits for `signal` for at most `timeout`.
    fn waits(
        name: &'static str,
        signal: &'static str,
        timeout: Duration,
        on_timeout: OnTimeout,
    ) -> Step {
        let journal = Journal::default();
        let mut step = step(name, &journal, vec![]);
        step.action = None;
        step.compensation = None;
        step.wait = Some(SignalWait {
            signal,
            timeout,
            on_timeout,
        });
        step
    }

    fn when(mut step: Step, holds: impl Fn(&Facts<'_>) -> bool + Send + Sync + 'static) -> Step {
        step.condition = Some(Arc::new(holds));
        step
    }

    fn engine_of(pool: &PgPool, definitions: Vec<SagaDefinition>, worker: &str) -> Arc<Engine> {
        let config = EngineConfig {
            worker_id: worker.to_owned(),
            lease: Duration::from_secs(5),
            concurrency: 8,
            events_topic: "test.saga.events".into(),
            producer: "test",
        };
        Arc::new(Engine::new(pool.clone(), definitions, config).unwrap())
    }

    async fn signal(
        engine: &Engine,
        saga_id: Uuid,
        name: &str,
        id: &str,
        payload: serde_json::Value,
    ) -> SignalOutcome {
        let mut tx = engine.pool().begin().await.unwrap();
        let outcome = engine
            .signal(
                &mut tx,
                saga_id,
                NewSignal {
                    signal: name,
                    signal_id: id,
                    payload: &payload,
                },
            )
            .await
            .unwrap();
        tx.commit().await.unwrap();
        outcome
    }

    async fn until(
        pool: &PgPool,
        saga_id: Uuid,
        what: &str,
        check: impl Fn(&saga_engine::SagaRecord) -> bool,
    ) -> saga_engine::SagaRecord {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let saga = store::load(pool, saga_id).await.unwrap().unwrap();
                if check(&saga) {
                    return saga;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the saga never {what}"))
    }

    fn waiting_on(saga: &saga_engine::SagaRecord, step: &str) -> bool {
        saga.steps
            .iter()
            .any(|s| s.step == step && s.status == StepStatus::Waiting)
    }

    fn record<'a>(saga: &'a saga_engine::SagaRecord, step: &str) -> &'a saga_engine::StepRecord {
        saga.steps
            .iter()
            .find(|s| s.step == step && s.kind == Kind::Action)
            .unwrap_or_else(|| panic!("no {step} in {saga:#?}"))
    }

    /// v1: a, then a wait for "go", then b. v2: a, then c.
    fn versions(journal: &Journal) -> (SagaDefinition, SagaDefinition) {
        let v1 = SagaDefinition::sequence(
            "test",
            vec![
                step("a", journal, vec![]),
                waits(
                    "go",
                    "go",
                    Duration::from_secs(60),
                    OnTimeout::Fail("no go".into()),
                ),
                step("b", journal, vec![]),
            ],
        );
        let v2 = SagaDefinition::sequence(
            "test",
            vec![step("a", journal, vec![]), step("c", journal, vec![])],
        )
        .with_version(2);
        (v1, v2)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_saga_started_on_v1_finishes_as_v1_after_a_restart_onto_a_binary_with_v1_and_v2() {
        let pool = pool().await;
        let journal = Journal::default();
        let (v1, v2) = versions(&journal);
        // The old binary carries v1 only: its saga is v1, and waits for go.
        let old = engine_of(&pool, vec![v1.clone()], "old");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(old.clone().run(shutdown.clone()));
        let first = start(&old, "first").await;
        until(&pool, first, "waited for go", |s| waiting_on(s, "go")).await;
        shutdown.cancel();
        running.await.unwrap();

        // The new binary carries both: new sagas start on v2, and the v1
        // saga goes on as v1 once signalled.
        let new = engine_of(&pool, vec![v2, v1], "new");
        assert_eq!(new.newest_version("test"), Some(2));
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(new.clone().run(shutdown.clone()));
        let second = start(&new, "second").await;
        let second = wait_for(&pool, second, SagaState::Completed).await;
        assert_eq!(second.instance.version, 2);
        let steps: Vec<&str> = second.steps.iter().map(|s| s.step.as_str()).collect();
        assert_eq!(steps, ["a", "c"]);
        assert!(matches!(
            signal(&new, first, "go", "go-1", serde_json::json!({"ok": true})).await,
            SignalOutcome::Kept(_)
        ));
        let first = wait_for(&pool, first, SagaState::Completed).await;
        assert_eq!(first.instance.version, 1);
        let steps: Vec<&str> = first.steps.iter().map(|s| s.step.as_str()).collect();
        assert_eq!(steps, ["a", "go", "b"], "v1's steps, to its end");
        assert_eq!(
            record(&first, "go").output.as_ref().map(|o| o.0.clone()),
            Some(serde_json::json!({"ok": true}))
        );
        assert_eq!(entries(&journal), ["a", "a", "c", "b"]);
        shutdown.cancel();
        running.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_engine_without_its_version_leaves_a_saga_alone_and_it_is_reported() {
        let pool = pool().await;
        let journal = Journal::default();
        let (v1, v2) = versions(&journal);
        let old = engine_of(&pool, vec![v1], "old");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(old.clone().run(shutdown.clone()));
        let orphan = start(&old, "orphan").await;
        until(&pool, orphan, "waited for go", |s| waiting_on(s, "go")).await;
        shutdown.cancel();
        running.await.unwrap();
        assert_eq!(
            store::unknown_version_count(&pool).await.unwrap(),
            0,
            "v1 was carried lately"
        );

        // Every replica with v1 is gone (its word that it carries v1 has run
        // out: two leases) and the saga's timer falls due.
        sqlx::query("UPDATE saga_definitions SET carried_until = now() - interval '1 second' WHERE version = 1")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("UPDATE saga_instances SET next_run_at = now() WHERE saga_id = $1")
            .bind(orphan)
            .execute(&pool)
            .await
            .unwrap();
        let before = store::load(&pool, orphan).await.unwrap().unwrap();
        let new = engine_of(&pool, vec![v2], "new");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(new.clone().run(shutdown.clone()));
        let canary = start(&new, "canary").await;
        wait_for(&pool, canary, SagaState::Completed).await;
        let after = store::load(&pool, orphan).await.unwrap().unwrap();
        assert_eq!(after.instance.fence, before.instance.fence, "never claimed");
        assert_eq!(after.instance.lease_owner, None);
        assert_eq!(after.steps.len(), before.steps.len());
        assert!(matches!(
            signal(&new, orphan, "go", "go-1", serde_json::json!(null)).await,
            SignalOutcome::UnknownVersion { version: 1, .. }
        ));

        // Reported: counted, found by search, and flagged stuck.
        assert_eq!(store::unknown_version_count(&pool).await.unwrap(), 1);
        let unknown = SagaFilter {
            unknown_version_only: true,
            ..Default::default()
        };
        let found = store::search(&pool, &unknown, None, 10).await.unwrap();
        assert_eq!(
            found.iter().map(|s| s.saga_id).collect::<Vec<_>>(),
            [orphan]
        );
        let v1_only = SagaFilter {
            saga_type: Some("test".into()),
            version: Some(1),
            ..Default::default()
        };
        let found = store::search(&pool, &v1_only, None, 10).await.unwrap();
        assert_eq!(
            found.iter().map(|s| s.saga_id).collect::<Vec<_>>(),
            [orphan]
        );
        let carried = store::carried_definitions(&pool).await.unwrap();
        assert_eq!(carried, [("test".to_owned(), 2)]);
        let stuck = store::flag_stuck(&pool, Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(
            stuck.iter().map(|s| s.saga_id).collect::<Vec<_>>(),
            [orphan]
        );
        assert_eq!(
            stuck[0].stuck_reason,
            "no live replica carries version 1 of its definition test"
        );
        shutdown.cancel();
        running.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_skipped_step_is_recorded_and_nothing_is_compensated_for_it() {
        let pool = pool().await;
        let journal = Journal::default();
        let definition = SagaDefinition::sequence(
            "test",
            vec![
                step("a", &journal, vec![]),
                // Only for express orders: this one is not.
                when(step("express", &journal, vec![]), |facts| {
                    facts.data["express"] == true
                }),
                // Reads a's output: it holds.
                when(step("t", &journal, vec![]), |facts| {
                    facts.output("a").is_some_and(|out| out["done"] == true)
                }),
                step("b", &journal, vec![StepError::Permanent("refused".into())]),
            ],
        );
        let engine = engine(&pool, definition, "replica");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(engine.clone().run(shutdown.clone()));
        let mut tx = pool.begin().await.unwrap();
        let saga_id = engine
            .start(
                &mut tx,
                "test",
                "skip",
                serde_json::json!({"express": false}),
                "flow-1",
            )
            .await
            .unwrap()
            .unwrap();
        tx.commit().await.unwrap();
        let saga = wait_for(&pool, saga_id, SagaState::Compensated).await;
        assert_eq!(entries(&journal), ["a", "t", "b", "undo t", "undo a"]);
        let express = record(&saga, "express");
        assert_eq!((express.status, express.attempts), (StepStatus::Skipped, 0));
        assert!(express.finished_at.is_some());
        assert!(
            !saga
                .steps
                .iter()
                .any(|s| s.step == "express" && s.kind == Kind::Compensation),
            "nothing to undo for a skipped step"
        );
        let events = operator_published(&pool, saga_id).await;
        assert!(events.contains(&"SagaStepSkipped".to_owned()), "{events:?}");
        shutdown.cancel();
        running.await.unwrap();
    }

    /// The saga events of `saga_id` in the outbox, by type name.
    async fn operator_published(pool: &PgPool, saga_id: Uuid) -> Vec<String> {
        let payloads: Vec<Vec<u8>> = sqlx::query_scalar("SELECT envelope FROM outbox ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap();
        payloads
            .iter()
            .filter_map(|bytes| {
                use prost::Message as _;
                messaging::EventEnvelope::decode(bytes.as_slice()).ok()
            })
            .filter(|envelope| envelope.aggregate_id == saga_id.to_string())
            .map(|envelope| envelope.event_type.rsplit('.').next().unwrap().to_owned())
            .collect()
    }

    /// a, a review that waits for "review", then ship only if approved.
    fn reviewed(journal: &Journal, timeout: Duration) -> SagaDefinition {
        SagaDefinition::sequence(
            "test",
            vec![
                step("a", journal, vec![]),
                waits(
                    "review",
                    "review",
                    timeout,
                    OnTimeout::Output(serde_json::json!({"approved": false})),
                ),
                when(step("ship", journal, vec![]), |facts| {
                    facts
                        .output("review")
                        .is_some_and(|r| r["approved"] == true)
                }),
            ],
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_signal_before_the_wait_is_kept_and_a_repeated_one_is_one_signal() {
        let pool = pool().await;
        let journal = Journal::default();
        let engine = engine(
            &pool,
            reviewed(&journal, Duration::from_secs(60)),
            "replica",
        );
        let saga_id = start(&engine, "early").await;
        // Before anything ran: the signal is kept.
        let approved = serde_json::json!({"approved": true, "by": "reviewer-1"});
        let SignalOutcome::Kept(kept) =
            signal(&engine, saga_id, "review", "r-1", approved.clone()).await
        else {
            panic!("kept");
        };
        assert_eq!(
            signal(&engine, saga_id, "review", "r-1", approved.clone()).await,
            SignalOutcome::Repeated(kept.clone()),
            "the same id again is the same signal"
        );
        assert_eq!(
            signal(
                &engine,
                saga_id,
                "review",
                "r-1",
                serde_json::json!({"approved": false})
            )
            .await,
            SignalOutcome::Conflict(kept.clone())
        );
        assert_eq!(
            signal(&engine, saga_id, "reveiw", "r-2", approved.clone()).await,
            SignalOutcome::UnknownSignal {
                saga_type: "test".into(),
                version: 1,
                known: vec!["review"]
            }
        );
        assert_eq!(
            signal(&engine, saga_id, "review", "r-3", approved.clone()).await,
            SignalOutcome::NoLongerAwaited(vec!["review"]),
            "its one step waiting for a review has its signal"
        );
        let kept_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM saga_signals")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(kept_rows, 1, "one signal, nothing written for the rest");

        let shutdown = CancellationToken::new();
        let running = tokio::spawn(engine.clone().run(shutdown.clone()));
        let saga = wait_for(&pool, saga_id, SagaState::Completed).await;
        assert_eq!(entries(&journal), ["a", "ship"], "approved: shipped");
        let review = record(&saga, "review");
        assert_eq!(review.status, StepStatus::Succeeded);
        assert_eq!(
            review.output.as_ref().map(|o| o.0.clone()),
            Some(approved.clone())
        );
        assert_eq!(
            signal(&engine, saga_id, "review", "r-4", approved.clone()).await,
            SignalOutcome::NotApplicable(SagaState::Completed)
        );
        assert_eq!(
            signal(&engine, saga_id, "review", "r-1", approved).await,
            SignalOutcome::Repeated(kept),
            "a repeat answers as the first, even once the saga is done"
        );
        shutdown.cancel();
        running.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wait_times_out_on_another_engine_after_the_first_one_stopped() {
        let pool = pool().await;
        let journal = Journal::default();
        let timeout = Duration::from_millis(1500);
        let first = engine(&pool, reviewed(&journal, timeout), "replica-1");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(first.clone().run(shutdown.clone()));
        let saga_id = start(&first, "timeout").await;
        let waiting = until(&pool, saga_id, "waited", |s| waiting_on(s, "review")).await;
        let review = record(&waiting, "review");
        let until_at = review.deadline_at.expect("its timer is a row");
        assert!(until_at - review.started_at >= chrono::Duration::milliseconds(1500));
        assert_eq!(waiting.instance.lease_owner, None, "released while waiting");
        assert_eq!(
            waiting.instance.next_run_at,
            Some(until_at),
            "due when the timer fires"
        );
        assert!(
            waiting.instance.progressed_at >= until_at,
            "waiting within its timeout is not being stuck"
        );
        shutdown.cancel();
        running.await.unwrap();

        let second = engine(&pool, reviewed(&journal, timeout), "replica-2");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(second.clone().run(shutdown.clone()));
        let saga = wait_for(&pool, saga_id, SagaState::Completed).await;
        let review = record(&saga, "review");
        assert_eq!(
            review.output.as_ref().map(|o| o.0.clone()),
            Some(serde_json::json!({"approved": false})),
            "timed out: the definition's outcome"
        );
        assert!(review.finished_at.unwrap() >= until_at);
        assert_eq!(
            record(&saga, "ship").status,
            StepStatus::Skipped,
            "declined: not shipped"
        );
        assert_eq!(entries(&journal), ["a"]);
        shutdown.cancel();
        running.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wait_that_times_out_into_a_failure_turns_the_saga_back() {
        let pool = pool().await;
        let journal = Journal::default();
        let definition = SagaDefinition::sequence(
            "test",
            vec![
                step("a", &journal, vec![]),
                waits(
                    "review",
                    "review",
                    Duration::from_millis(300),
                    OnTimeout::Fail("nobody reviewed it".into()),
                ),
                step("ship", &journal, vec![]),
            ],
        );
        let engine = engine(&pool, definition, "replica");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(engine.clone().run(shutdown.clone()));
        let saga_id = start(&engine, "declined").await;
        let saga = wait_for(&pool, saga_id, SagaState::Compensated).await;
        assert_eq!(
            saga.instance.failure_reason.as_deref(),
            Some("review: timed out waiting for signal review: nobody reviewed it")
        );
        assert_eq!(entries(&journal), ["a", "undo a"]);
        shutdown.cancel();
        running.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_signal_to_a_paused_saga_is_kept_and_taken_once_it_resumes() {
        let pool = pool().await;
        let journal = Journal::default();
        let timeout = Duration::from_millis(1500);
        let engine = engine(&pool, reviewed(&journal, timeout), "replica");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(engine.clone().run(shutdown.clone()));
        let saga_id = start(&engine, "paused").await;
        until(&pool, saga_id, "waited", |s| waiting_on(s, "review")).await;
        let mut tx = pool.begin().await.unwrap();
        assert_eq!(
            engine.pause(&mut tx, saga_id).await.unwrap(),
            RequestOutcome::Accepted
        );
        tx.commit().await.unwrap();
        let approved = serde_json::json!({"approved": true});
        assert!(matches!(
            signal(&engine, saga_id, "review", "r-1", approved.clone()).await,
            SignalOutcome::Kept(_)
        ));
        // Longer than the timeout: a paused saga's timers do not fire, and
        // the signal does not move it.
        tokio::time::sleep(timeout + Duration::from_millis(500)).await;
        let paused = store::load(&pool, saga_id).await.unwrap().unwrap();
        assert_eq!(paused.instance.state, SagaState::Paused);
        assert!(paused.instance.signal_pending);
        assert_eq!(record(&paused, "review").status, StepStatus::Waiting);

        let mut tx = pool.begin().await.unwrap();
        assert_eq!(
            engine.resume(&mut tx, saga_id).await.unwrap(),
            RequestOutcome::Accepted
        );
        tx.commit().await.unwrap();
        let saga = wait_for(&pool, saga_id, SagaState::Completed).await;
        assert_eq!(
            record(&saga, "review").output.as_ref().map(|o| o.0.clone()),
            Some(approved)
        );
        assert_eq!(entries(&journal), ["a", "ship"]);
        assert!(!saga.instance.signal_pending);
        shutdown.cancel();
        running.await.unwrap();
    }

    /// An action that journals its call, then waits until the test lets it
    /// finish.
    struct Held {
        entry: &'static str,
        journal: Journal,
        open: Arc<tokio::sync::Semaphore>,
    }

    impl Action for Held {
        fn run<'a>(
            &'a self,
            _: &'a StepContext,
        ) -> BoxFuture<'a, Result<serde_json::Value, StepError>> {
            self.journal
                .lock()
                .unwrap()
                .push((self.entry.to_owned(), Instant::now()));
            async move {
                self.open.acquire().await.unwrap().forget();
                Ok(serde_json::json!({ "done": true }))
            }
            .boxed()
        }
    }

    /// The child saga "child" (c1, c2) and its parent "test": a, then kid
    /// (the child, given a's output), then b.
    fn family(journal: &Journal, c2: Vec<StepError>, b: Vec<StepError>) -> Vec<SagaDefinition> {
        let child = SagaDefinition::sequence(
            "child",
            vec![step("c1", journal, vec![]), step("c2", journal, c2)],
        );
        let mut kid = step("kid", journal, vec![]);
        kid.action = None;
        kid.compensation = None;
        kid.child = Some(saga_engine::ChildSaga {
            saga_type: "child",
            data: Arc::new(
                |facts: &Facts<'_>| serde_json::json!({ "a": facts.output("a").cloned(), "key": facts.data["key"] }),
            ),
        });
        let parent = SagaDefinition::sequence(
            "test",
            vec![step("a", journal, vec![]), kid, step("b", journal, b)],
        );
        vec![parent, child]
    }

    async fn child_of(pool: &PgPool, parent: Uuid) -> saga_engine::Child {
        let mut children = store::children(pool, &[parent]).await.unwrap();
        assert_eq!(children.len(), 1, "{children:?}");
        children.remove(0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_child_saga_runs_as_a_step_and_its_completion_moves_the_parent_on() {
        let pool = pool().await;
        let journal = Journal::default();
        let engine = engine_of(&pool, family(&journal, vec![], vec![]), "replica");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(engine.clone().run(shutdown.clone()));
        let parent = start(&engine, "family").await;
        let saga = wait_for(&pool, parent, SagaState::Completed).await;
        assert_eq!(entries(&journal), ["a", "c1", "c2", "b"]);
        let child = child_of(&pool, parent).await;
        assert_eq!(
            (child.state, child.parent_step.as_str()),
            (SagaState::Completed, "kid")
        );
        assert_eq!(
            record(&saga, "kid").output.as_ref().map(|o| o.0.clone()),
            Some(serde_json::json!({ "child_saga_id": child.saga_id }))
        );
        let child_saga = store::load(&pool, child.saga_id).await.unwrap().unwrap();
        assert_eq!(child_saga.instance.parent_saga_id, Some(parent));
        assert_eq!(
            child_saga.instance.data.0,
            serde_json::json!({ "a": { "done": true }, "key": "family" })
        );
        assert_eq!(
            child_saga.instance.correlation_id,
            saga.instance.correlation_id
        );
        shutdown.cancel();
        running.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_child_that_fails_fails_its_step_and_the_parent_compensates() {
        let pool = pool().await;
        let journal = Journal::default();
        let refused = vec![StepError::Permanent("no".into())];
        let engine = engine_of(&pool, family(&journal, refused, vec![]), "replica");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(engine.clone().run(shutdown.clone()));
        let parent = start(&engine, "family").await;
        let saga = wait_for(&pool, parent, SagaState::Compensated).await;
        assert_eq!(entries(&journal), ["a", "c1", "c2", "undo c1", "undo a"]);
        let reason = saga.instance.failure_reason.unwrap();
        assert!(reason.starts_with("kid: child saga child "), "{reason}");
        assert!(reason.contains("compensated: c2: no"), "{reason}");
        assert_eq!(child_of(&pool, parent).await.state, SagaState::Compensated);
        shutdown.cancel();
        running.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compensating_the_parent_reopens_its_completed_child_and_undoes_it() {
        let pool = pool().await;
        let journal = Journal::default();
        let refused = vec![StepError::Permanent("no".into())];
        let engine = engine_of(&pool, family(&journal, vec![], refused), "replica");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(engine.clone().run(shutdown.clone()));
        let parent = start(&engine, "family").await;
        let saga = wait_for(&pool, parent, SagaState::Compensated).await;
        assert_eq!(
            entries(&journal),
            ["a", "c1", "c2", "b", "undo c2", "undo c1", "undo a"],
            "the child is undone, in reverse, before what came before it"
        );
        let child = child_of(&pool, parent).await;
        assert_eq!(child.state, SagaState::Compensated);
        assert_eq!(
            record(&saga, "kid").status,
            StepStatus::Succeeded,
            "the child completed"
        );
        let undone = saga
            .steps
            .iter()
            .find(|s| s.step == "kid" && s.kind == Kind::Compensation)
            .unwrap();
        assert_eq!(undone.status, StepStatus::Succeeded);
        shutdown.cancel();
        running.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelling_the_parent_reaches_its_running_child() {
        let pool = pool().await;
        let journal = Journal::default();
        let open = Arc::new(tokio::sync::Semaphore::new(0));
        let mut definitions = family(&journal, vec![], vec![]);
        definitions[1].groups[0][0].action = Some(Arc::new(Held {
            entry: "c1",
            journal: journal.clone(),
            open: open.clone(),
        }));
        let engine = engine_of(&pool, definitions, "replica");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(engine.clone().run(shutdown.clone()));
        let parent = start(&engine, "family").await;
        tokio::time::timeout(Duration::from_secs(20), async {
            while !entries(&journal).iter().any(|e| e == "c1") {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        let mut tx = pool.begin().await.unwrap();
        assert_eq!(
            engine
                .request_compensation(&mut tx, parent, "customer cancelled")
                .await
                .unwrap(),
            RequestOutcome::Accepted
        );
        tx.commit().await.unwrap();
        // The parent turns back and asks the child, whose c1 is in flight.
        let child = until(
            &pool,
            child_of(&pool, parent).await.saga_id,
            "was asked",
            |s| s.instance.compensation_requested.is_some(),
        )
        .await;
        assert!(
            child
                .instance
                .compensation_requested
                .as_deref()
                .unwrap()
                .ends_with("compensates: customer cancelled"),
            "{:?}",
            child.instance.compensation_requested
        );
        open.add_permits(1);
        let saga = wait_for(&pool, parent, SagaState::Compensated).await;
        assert_eq!(entries(&journal), ["a", "c1", "undo c1", "undo a"]);
        assert_eq!(
            saga.instance.failure_reason.as_deref(),
            Some("customer cancelled")
        );
        assert_eq!(child_of(&pool, parent).await.state, SagaState::Compensated);
        shutdown.cancel();
        running.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retention_keeps_a_finished_child_while_its_parent_may_still_compensate_it() {
        let pool = pool().await;
        let (parent, child, done_parent, done_child) = (
            Uuid::now_v7(),
            Uuid::now_v7(),
            Uuid::now_v7(),
            Uuid::now_v7(),
        );
        for (id, state, parent_id, key) in [
            (parent, "running", None, "p"),
            (child, "completed", Some(parent), "p/kid"),
            (done_parent, "completed", None, "q"),
            (done_child, "completed", Some(done_parent), "q/kid"),
        ] {
            sqlx::query(
                "INSERT INTO saga_instances (saga_id, saga_type, business_key, state, data, correlation_id,
                                             parent_saga_id, parent_step, finished_at)
                 VALUES ($1, 'test', $3, $2, '{}', 'flow', $4, CASE WHEN $4 IS NULL THEN NULL ELSE 'kid' END,
                         CASE WHEN $2 = 'completed' THEN now() - interval '1 day' END)",
            )
            .bind(id)
            .bind(state)
            .bind(key)
            .bind(parent_id)
            .execute(&pool)
            .await
            .unwrap();
        }
        let purge = store::finished_purge(Duration::from_secs(3600));
        sqlx::query(purge.statement)
            .bind(chrono::Duration::hours(1))
            .bind(100_i64)
            .execute(&pool)
            .await
            .unwrap();
        let left: Vec<Uuid> =
            sqlx::query_scalar("SELECT saga_id FROM saga_instances ORDER BY saga_id")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(
            left,
            [parent, child],
            "the running parent's child stays; the rest is purged"
        );
    }

    async fn terminate(
        engine: &Engine,
        saga_id: Uuid,
        acknowledge: bool,
    ) -> saga_engine::Termination {
        let mut tx = engine.pool().begin().await.unwrap();
        let outcome = engine
            .terminate(
                &mut tx,
                saga_id,
                "terminated by an operator: test",
                acknowledge,
            )
            .await
            .unwrap();
        tx.commit().await.unwrap();
        outcome
    }

    /// `family`, with the child's step `held` (c1 or c2) held in flight until
    /// the test opens `open`.
    fn held_family(
        journal: &Journal,
        open: &Arc<tokio::sync::Semaphore>,
        held: usize,
    ) -> Vec<SagaDefinition> {
        let mut definitions = family(journal, vec![], vec![]);
        let step = &mut definitions[1].groups[held][0];
        step.action = Some(Arc::new(Held {
            entry: step.name,
            journal: journal.clone(),
            open: open.clone(),
        }));
        definitions
    }

    async fn until_journal_has(journal: &Journal, entry: &str) {
        tokio::time::timeout(Duration::from_secs(20), async {
            while !entries(journal).iter().any(|e| e == entry) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{entry} never ran"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn terminating_the_parent_terminates_its_running_child_and_owns_what_the_child_leaves_in_effect()
     {
        let pool = pool().await;
        let journal = Journal::default();
        let open = Arc::new(tokio::sync::Semaphore::new(0));
        let engine = engine_of(&pool, held_family(&journal, &open, 0), "replica");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(engine.clone().run(shutdown.clone()));
        let parent = start(&engine, "family").await;
        until_journal_has(&journal, "c1").await;
        let child = child_of(&pool, parent).await.saga_id;

        // a succeeded, and the child's c1 is in flight: both may have taken
        // effect, the child's named by the step that started it.
        let both = vec!["a".to_owned(), "kid/c1".to_owned()];
        assert_eq!(
            terminate(&engine, parent, false).await,
            saga_engine::Termination::EffectsNotAcknowledged(both.clone())
        );
        assert_eq!(
            child_of(&pool, parent).await.state,
            SagaState::Running,
            "nothing was done"
        );
        assert_eq!(
            terminate(&engine, parent, true).await,
            saga_engine::Termination::Terminated {
                left_in_effect: both.clone(),
                children: vec![child],
            }
        );

        // c1's attempt finishes, and its replica's write is fenced off: c2
        // never runs. A canary family runs through.
        open.add_permits(1);
        let canary = start(&engine, "canary").await;
        open.add_permits(1);
        wait_for(&pool, canary, SagaState::Completed).await;
        assert_eq!(entries(&journal), ["a", "c1", "a", "c1", "c2", "b"]);
        let terminated = store::load(&pool, parent).await.unwrap().unwrap();
        assert_eq!(terminated.instance.state, SagaState::Terminated);
        assert_eq!(terminated.instance.left_in_effect, Some(both));
        let child_saga = store::load(&pool, child).await.unwrap().unwrap();
        assert_eq!(child_saga.instance.state, SagaState::Terminated);
        assert_eq!(
            child_saga.instance.failure_reason,
            Some(format!(
                "terminated with its parent saga {parent}: terminated by an operator: test"
            ))
        );
        assert_eq!(
            child_saga.instance.left_in_effect,
            Some(vec!["c1".to_owned()]),
            "the child records its own"
        );
        assert!(child_saga.instance.finished_at.is_some());
        assert!(!child_saga.steps.iter().any(|s| s.step == "c2"));
        for saga_id in [parent, child] {
            let events = operator_published(&pool, saga_id).await;
            assert!(events.contains(&"SagaTerminated".to_owned()), "{events:?}");
        }
        assert_eq!(
            terminate(&engine, parent, true).await,
            saga_engine::Termination::Refused(RequestOutcome::NotApplicable(SagaState::Terminated))
        );
        shutdown.cancel();
        running.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn terminating_the_parent_is_refused_while_its_child_is_past_its_pivot() {
        let pool = pool().await;
        let journal = Journal::default();
        let open = Arc::new(tokio::sync::Semaphore::new(0));
        let mut definitions = held_family(&journal, &open, 1);
        // The child's c2 is its pivot, held in flight.
        definitions[1].groups[1][0].compensation = None;
        definitions[1] = definitions[1].clone().with_pivot("c2");
        let engine = engine_of(&pool, definitions, "replica");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(engine.clone().run(shutdown.clone()));
        let parent = start(&engine, "family").await;
        until_journal_has(&journal, "c2").await;
        let child = child_of(&pool, parent).await.saga_id;
        until(&pool, child, "passed its pivot", |s| {
            s.instance.forward_only_since.is_some()
        })
        .await;

        let outcome = terminate(&engine, parent, true).await;
        assert!(
            matches!(
                &outcome,
                saga_engine::Termination::ChildRefused {
                    child: refused,
                    saga_type,
                    step,
                    outcome: RequestOutcome::ForwardOnly { pivot: "c2", .. },
                } if *refused == child && saga_type == "child" && step == "kid"
            ),
            "{outcome:?}"
        );
        for saga_id in [parent, child] {
            let saga = store::load(&pool, saga_id).await.unwrap().unwrap();
            assert_eq!(saga.instance.state, SagaState::Running, "nothing was done");
        }
        open.add_permits(1);
        wait_for(&pool, parent, SagaState::Completed).await;
        assert_eq!(entries(&journal), ["a", "c1", "c2", "b"]);
        shutdown.cancel();
        running.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn terminating_a_child_on_its_own_wakes_its_parent_which_turns_back() {
        let pool = pool().await;
        let journal = Journal::default();
        let open = Arc::new(tokio::sync::Semaphore::new(0));
        let engine = engine_of(&pool, held_family(&journal, &open, 0), "replica");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(engine.clone().run(shutdown.clone()));
        let parent = start(&engine, "family").await;
        until_journal_has(&journal, "c1").await;
        let child = child_of(&pool, parent).await.saga_id;
        assert_eq!(
            terminate(&engine, child, true).await,
            saga_engine::Termination::Terminated {
                left_in_effect: vec!["c1".to_owned()],
                children: vec![],
            }
        );
        let saga = wait_for(&pool, parent, SagaState::Compensated).await;
        let reason = saga.instance.failure_reason.unwrap();
        assert!(
            reason.starts_with(&format!("kid: child saga child {child} terminated: ")),
            "{reason}"
        );
        open.add_permits(1);
        assert_eq!(entries(&journal), ["a", "c1", "undo a"]);
        shutdown.cancel();
        running.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_parent_waiting_on_its_child_is_stuck_only_if_the_child_is_or_once_it_ended_and_the_parent_does_not_move_on()
     {
        let pool = pool().await;
        let journal = Journal::default();
        let stuck_after = Duration::from_secs(1);
        let long = Duration::from_secs(60);
        let child_type = SagaDefinition::sequence(
            "child",
            vec![
                waits("go", "go", long, OnTimeout::Fail("no go".into())),
                waits("more", "more", long, OnTimeout::Fail("no more".into())),
            ],
        );
        let mut parent_type = family(&journal, vec![], vec![]).remove(0);
        parent_type.groups.pop();
        let engine = engine_of(&pool, vec![parent_type, child_type.clone()], "replica");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(engine.clone().run(shutdown.clone()));
        let parent = start(&engine, "family").await;
        until(&pool, parent, "waited for its child", |s| {
            s.instance.awaits_child
        })
        .await;
        let child = child_of(&pool, parent).await.saga_id;
        until(&pool, child, "waited for go", |s| waiting_on(s, "go")).await;

        // The child takes far longer than stuck_after (it waits for a
        // signal, within its timeout): its parent is not stuck, and the
        // detector does not wake for it.
        let age = |saga_id: Uuid| {
            let pool = pool.clone();
            async move {
                sqlx::query("UPDATE saga_instances SET progressed_at = now() - interval '1 hour' WHERE saga_id = $1")
                    .bind(saga_id)
                    .execute(&pool)
                    .await
                    .unwrap();
            }
        };
        age(parent).await;
        assert!(
            store::flag_stuck(&pool, stuck_after)
                .await
                .unwrap()
                .is_empty()
        );
        let next = store::next_stuck(&pool, stuck_after)
            .await
            .unwrap()
            .unwrap();
        assert!(
            next > Duration::from_secs(30),
            "{next:?}: the child's timer"
        );

        // The child is stuck: so is its parent, for it.
        age(child).await;
        let stuck = store::flag_stuck(&pool, stuck_after).await.unwrap();
        assert_eq!(
            stuck.iter().map(|s| s.saga_id).collect::<Vec<_>>(),
            [child, parent]
        );
        assert!(
            stuck[1].stuck_reason.starts_with(&format!(
                "child saga child {child} is stuck: no progress since "
            )),
            "{}",
            stuck[1].stuck_reason
        );

        // The child moves on: neither is stuck any more.
        let go = serde_json::json!({ "go": true });
        assert!(matches!(
            signal(&engine, child, "go", "go-1", go.clone()).await,
            SignalOutcome::Kept(_)
        ));
        until(&pool, child, "waited for more", |s| {
            waiting_on(s, "more") && s.instance.stuck_since.is_none()
        })
        .await;
        assert!(
            store::flag_stuck(&pool, stuck_after)
                .await
                .unwrap()
                .is_empty()
        );
        let waiting = store::load(&pool, parent).await.unwrap().unwrap();
        assert_eq!(waiting.instance.stuck_since, None, "{waiting:#?}");

        // The child ends, and no replica drives its parent (the only one
        // left carries the child's type alone): the parent is woken, and
        // stuck once it does not move on for stuck_after.
        shutdown.cancel();
        running.await.unwrap();
        let children_only = engine_of(&pool, vec![child_type], "children-only");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(children_only.clone().run(shutdown.clone()));
        assert!(matches!(
            signal(&children_only, child, "more", "more-1", go).await,
            SignalOutcome::Kept(_)
        ));
        let ended = wait_for(&pool, child, SagaState::Completed).await;
        let woken = store::load(&pool, parent).await.unwrap().unwrap();
        assert!(!woken.instance.awaits_child);
        assert!(woken.instance.signal_pending);
        assert!(woken.instance.progressed_at >= ended.instance.finished_at.unwrap());
        assert!(
            store::flag_stuck(&pool, stuck_after)
                .await
                .unwrap()
                .is_empty(),
            "its progress counts from the child's end"
        );
        age(parent).await;
        let stuck = store::flag_stuck(&pool, stuck_after).await.unwrap();
        assert_eq!(
            stuck.iter().map(|s| s.saga_id).collect::<Vec<_>>(),
            [parent]
        );
        assert!(stuck[0].stuck_reason.starts_with("no progress since "));
        shutdown.cancel();
        running.await.unwrap();
    }
}
