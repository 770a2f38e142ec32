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
use saga_engine::store::{self, WriteError};
use saga_engine::{
    Action, Engine, EngineConfig, RequestOutcome, RetryPolicy, SagaDefinition, SagaState, Step,
    StepContext, StepError,
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
    }
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
            if saga.instance.state() == state {
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
        (a.attempts, a.status.as_str(), a.last_error.as_deref()),
        (3, "succeeded", Some("still busy"))
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
    assert_eq!((a.attempts, a.status.as_str()), (2, "succeeded"));
    shutdown.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_past_its_deadline_fails_and_the_saga_compensates() {
    let pool = pool().await;
    let journal = Journal::default();
    let forever_busy = (0..100)
        .map(|_| StepError::Retryable("busy".into()))
        .collect();
    let mut slow = step("b", &journal, forever_busy);
    slow.retry = retry(100, 40);
    slow.deadline = Duration::from_millis(400);
    let definition = SagaDefinition::sequence("test", vec![step("a", &journal, vec![]), slow]);
    let engine = engine(&pool, definition, "worker-1");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(engine.clone().run(shutdown.clone()));

    let saga_id = start(&engine, "deadline").await;
    let saga = wait_for(&pool, saga_id, SagaState::Compensated).await;
    let b = saga
        .steps
        .iter()
        .find(|s| s.step == "b" && s.kind == "action")
        .unwrap();
    assert_eq!(b.status, "failed");
    assert!(
        b.last_error.as_deref().unwrap().contains("deadline"),
        "{b:?}"
    );
    assert!(saga.instance.failure_reason.unwrap().starts_with("b: "));
    // b was attempted, so it may have taken effect: both are undone, b first.
    let undone: Vec<String> = entries(&journal)
        .into_iter()
        .filter(|e| e.starts_with("undo"))
        .collect();
    assert_eq!(undone, vec!["undo b", "undo a"]);
    shutdown.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compensation_runs_in_reverse_order_over_what_was_attempted() {
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
        vec!["a", "b", "c", "undo c", "undo b", "undo a"],
        "d never ran"
    );
    assert_eq!(saga.instance.failure_reason.as_deref(), Some("c: refused"));
    let c = saga
        .steps
        .iter()
        .find(|s| s.step == "c" && s.kind == "action")
        .unwrap();
    assert_eq!(c.attempts, 1, "a permanent failure is not retried");
    shutdown.cancel();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_group_with_one_failing_branch_compensates_both_branches() {
    let pool = pool().await;
    let journal = Journal::default();
    let definition = SagaDefinition {
        name: "test",
        groups: vec![
            vec![step("reserve", &journal, vec![])],
            vec![
                step("left", &journal, vec![]),
                step("right", &journal, vec![StepError::Permanent("no".into())]),
            ],
            vec![step("after", &journal, vec![])],
        ],
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
    let mut undone = log[3..5].to_vec();
    undone.sort();
    assert_eq!(
        undone,
        vec!["undo left", "undo right"],
        "the group is undone together"
    );
    assert_eq!(log[5..], ["undo reserve"], "then the group before it");
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

    let first = store::claim(&pool, "replica-a", 10, lease).await.unwrap();
    assert_eq!(first.len(), 1);
    let (_, stale_fence) = first[0];
    assert!(
        store::claim(&pool, "replica-b", 10, lease)
            .await
            .unwrap()
            .is_empty(),
        "leased sagas are not claimed"
    );

    // replica-a stalls past its lease; replica-b takes over.
    tokio::time::sleep(lease + Duration::from_millis(50)).await;
    let second = store::claim(&pool, "replica-b", 10, lease).await.unwrap();
    assert_eq!(second.len(), 1);
    let (_, fence) = second[0];
    assert!(fence > stale_fence);

    let mut tx = pool.begin().await.unwrap();
    let stale = store::check_fence(&mut tx, saga_id, stale_fence, lease).await;
    assert!(
        matches!(stale, Err(WriteError::Fenced)),
        "the stale writer is refused"
    );
    drop(tx);
    assert!(matches!(
        store::release(&pool, saga_id, stale_fence, None).await,
        Err(WriteError::Fenced)
    ));
    let mut tx = pool.begin().await.unwrap();
    store::check_fence(&mut tx, saga_id, fence, lease)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    store::release(&pool, saga_id, fence, Some(chrono::Utc::now()))
        .await
        .unwrap();
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
    let claimed = store::claim(&pool, "doomed", 1, Duration::from_millis(500))
        .await
        .unwrap();
    let (_, fence) = claimed[0];
    let mut tx = pool.begin().await.unwrap();
    store::check_fence(&mut tx, saga_id, fence, Duration::from_millis(500))
        .await
        .unwrap();
    sqlx::query("INSERT INTO saga_steps (saga_id, step, kind, status, attempts) VALUES ($1, 'a', 'action', 'running', 1)")
        .bind(saga_id)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();

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
