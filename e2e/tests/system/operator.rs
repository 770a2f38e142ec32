//! The operators' controls across the four real binaries: a saga paused
//! while its charge is in flight (the charge finishes, nothing else runs),
//! still paused after the orchestrator restarts, resumed to completion;
//! stuck-saga detection on the way; termination and every refusal; and the
//! saga search with its filters.

use std::time::Duration;

use api_order::v1::{GetOrderRequest, OrderStatus};
use api_payment::v1::{ListPaymentsByOrderRequest, PaymentStatus};
use api_saga::v1::step_execution::{Kind, Status};
use api_saga::v1::{
    ListSagasRequest, PauseSagaRequest, ResumeSagaRequest, RetrySagaRequest, Saga, SagaState,
    TerminateSagaRequest,
};
use e2e::{Stack, http_get};
use testkit::grpc::bearer;
use tonic::Code;

const SETTLE: Duration = Duration::from_secs(60);

async fn order_status(stack: &Stack, customer: &str, order_id: &str) -> OrderStatus {
    let request = GetOrderRequest {
        order_id: order_id.to_owned(),
    };
    stack
        .orders()
        .await
        .get_order(bearer(request, customer))
        .await
        .unwrap()
        .into_inner()
        .status()
}

async fn payment_statuses(stack: &Stack, customer: &str, order_id: &str) -> Vec<PaymentStatus> {
    let request = ListPaymentsByOrderRequest {
        order_id: order_id.to_owned(),
    };
    stack
        .payments()
        .await
        .list_payments_by_order(bearer(request, customer))
        .await
        .unwrap()
        .into_inner()
        .payments
        .iter()
        .map(|p| p.status())
        .collect()
}

async fn pause(stack: &Stack, admin: &str, saga_id: &str) -> Result<Saga, tonic::Status> {
    let request = PauseSagaRequest {
        saga_id: saga_id.to_owned(),
    };
    stack
        .sagas()
        .await
        .pause_saga(bearer(request, admin))
        .await
        .map(tonic::Response::into_inner)
}

async fn resume(stack: &Stack, admin: &str, saga_id: &str) -> Result<Saga, tonic::Status> {
    let request = ResumeSagaRequest {
        saga_id: saga_id.to_owned(),
    };
    stack
        .sagas()
        .await
        .resume_saga(bearer(request, admin))
        .await
        .map(tonic::Response::into_inner)
}

async fn terminate(
    stack: &Stack,
    admin: &str,
    saga_id: &str,
    reason: &str,
    acknowledge_effects: bool,
) -> Result<Saga, tonic::Status> {
    let request = TerminateSagaRequest {
        saga_id: saga_id.to_owned(),
        reason: reason.to_owned(),
        acknowledge_effects,
    };
    stack
        .sagas()
        .await
        .terminate_saga(bearer(request, admin))
        .await
        .map(tonic::Response::into_inner)
}

async fn search(
    stack: &Stack,
    admin: &str,
    request: ListSagasRequest,
) -> Result<Vec<Saga>, tonic::Status> {
    stack
        .sagas()
        .await
        .list_sagas(bearer(request, admin))
        .await
        .map(|answer| answer.into_inner().sagas)
}

/// Waits until the saga of `order_id` satisfies `check`, and returns it.
async fn saga_when(
    stack: &Stack,
    admin: &str,
    order_id: &str,
    what: &str,
    check: impl Fn(&Saga) -> bool,
) -> Saga {
    let deadline = tokio::time::Instant::now() + SETTLE;
    let mut last = None;
    while tokio::time::Instant::now() < deadline {
        if let Ok(saga) = stack.saga_status(order_id, admin).await {
            if check(&saga) {
                return saga;
            }
            last = Some(saga);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the saga of {order_id} never {what}; last seen: {last:#?}")
}

fn step<'a>(saga: &'a Saga, name: &str) -> Option<&'a api_saga::v1::StepExecution> {
    saga.steps
        .iter()
        .find(|s| s.step == name && s.kind() == Kind::Action)
}

/// The orchestrator's gauge `name`, as its metrics endpoint shows it now.
async fn gauge(stack: &Stack, name: &str) -> f64 {
    let address = stack
        .service("saga-orchestrator")
        .http_address()
        .expect("the orchestrator serves metrics");
    let body = http_get(&format!("http://{address}/metrics"), None).await;
    body.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no gauge {name} in:\n{body}"))
}

#[tokio::test]
async fn a_stuck_saga_paused_mid_charge_stays_paused_across_a_restart_and_completes_once_resumed() {
    let mut stack = Stack::builder()
        .env("payment", "PROVIDER_SLOW_DELAY", "4s")
        .env("saga-orchestrator", "SAGA_ATTEMPT_TIMEOUT", "15s")
        .env("saga-orchestrator", "SAGA_STUCK_AFTER", "1s")
        .start()
        .await
        .unwrap();
    let customer = stack.customer_token("paused@example.com").await.unwrap();
    let admin = stack.admin_token().await.unwrap();
    let placed = stack.place_order(&customer, "paused", "tok_slow").await;
    let saga = stack
        .saga_reaching(&placed.order_id, "process-payment", SETTLE)
        .await
        .unwrap();

    // The charge takes 4 s: past SAGA_STUCK_AFTER, the saga is stuck,
    // flagged, listed, counted and logged once.
    let stuck = saga_when(&stack, &admin, &placed.order_id, "got stuck", |saga| {
        saga.stuck_since.is_some()
    })
    .await;
    assert!(
        stuck.stuck_reason.starts_with("no progress since"),
        "{}",
        stuck.stuck_reason
    );
    let listed = search(
        &stack,
        &admin,
        ListSagasRequest {
            stuck_only: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        listed.iter().map(|s| &s.saga_id).collect::<Vec<_>>(),
        [&saga.saga_id]
    );
    assert_eq!(gauge(&stack, "sagas_stuck").await, 1.0);

    // Paused with the charge in flight: the pause waits for it.
    let requested = pause(&stack, &admin, &saga.saga_id).await.unwrap();
    assert_eq!(requested.state(), SagaState::Running);
    assert!(requested.pause_requested);
    let paused = saga_when(&stack, &admin, &placed.order_id, "paused", |saga| {
        saga.state() == SagaState::Paused
    })
    .await;
    let charge = step(&paused, "process-payment").unwrap();
    assert_eq!(
        (charge.status(), charge.attempts),
        (Status::Succeeded, 1),
        "{paused:#?}"
    );
    assert!(step(&paused, "confirm-order").is_none(), "{paused:#?}");
    assert_eq!(paused.resumes_to(), SagaState::Running);
    assert!(paused.stuck_since.is_none(), "a paused saga is not stuck");
    assert_eq!(
        payment_statuses(&stack, &customer, &placed.order_id).await,
        [PaymentStatus::Captured]
    );
    assert_eq!(
        order_status(&stack, &customer, &placed.order_id).await,
        OrderStatus::Pending
    );
    let logs = stack.service("saga-orchestrator").logs();
    assert_eq!(
        logs.matches("saga is stuck").count(),
        1,
        "logged once:\n{logs}"
    );

    // The orchestrator restarts; it drives a new order, not the paused one.
    stack
        .service_mut("saga-orchestrator")
        .stop(Duration::from_secs(10))
        .await
        .unwrap();
    stack.restart("saga-orchestrator").await.unwrap();
    let canary = stack.place_order(&customer, "canary", "tok_visa").await;
    let done = stack.settled_saga(&canary.order_id, SETTLE).await.unwrap();
    assert_eq!(done.state(), SagaState::Completed);
    let still = stack.saga_status(&placed.order_id, &admin).await.unwrap();
    assert_eq!(still.state(), SagaState::Paused, "{still:#?}");
    assert_eq!(gauge(&stack, "sagas_stuck").await, 0.0);

    let resumed = resume(&stack, &admin, &saga.saga_id).await.unwrap();
    assert_eq!(resumed.state(), SagaState::Running);
    let saga = stack.settled_saga(&placed.order_id, SETTLE).await.unwrap();
    assert_eq!(saga.state(), SagaState::Completed, "{saga:#?}");
    assert_eq!(
        order_status(&stack, &customer, &placed.order_id).await,
        OrderStatus::Confirmed
    );
    assert_eq!(
        payment_statuses(&stack, &customer, &placed.order_id).await,
        [PaymentStatus::Captured],
        "charged once"
    );

    // The trace view shows the operator's actions.
    let trace = stack
        .traces()
        .await
        .get_trace_by_order(bearer(
            api_trace::v1::GetTraceByOrderRequest {
                order_id: placed.order_id.clone(),
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let types: Vec<&str> = trace
        .events
        .iter()
        .map(|e| e.event_type.rsplit('.').next().unwrap())
        .collect();
    assert!(types.contains(&"SagaPaused"), "{types:?}");
    assert!(types.contains(&"SagaResumed"), "{types:?}");
}

#[tokio::test]
async fn terminate_pause_and_resume_refuse_what_they_cannot_do_and_the_search_finds_by_each_filter()
{
    let mut stack = Stack::builder()
        .env("payment", "PROVIDER_SLOW_DELAY", "3s")
        .env("saga-orchestrator", "SAGA_ATTEMPT_TIMEOUT", "15s")
        .env("saga-orchestrator", "SAGA_RETRY_BACKOFF", "100ms")
        .env("saga-orchestrator", "CIRCUIT_BREAKER_COOLDOWN", "100ms")
        .start()
        .await
        .unwrap();
    let customer = stack.customer_token("terminate@example.com").await.unwrap();
    let admin = stack.admin_token().await.unwrap();

    // A completed saga: nothing to pause, resume or terminate.
    let happy = stack.place_order(&customer, "happy", "tok_visa").await;
    let completed = stack.settled_saga(&happy.order_id, SETTLE).await.unwrap();
    for refused in [
        pause(&stack, &admin, &completed.saga_id).await,
        resume(&stack, &admin, &completed.saga_id).await,
        terminate(&stack, &admin, &completed.saga_id, "too late", true).await,
    ] {
        let refused = refused.unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert!(
            refused.message().contains("it is completed"),
            "{}",
            refused.message()
        );
    }
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_eq!(
        pause(&stack, &admin, &unknown).await.unwrap_err().code(),
        Code::NotFound
    );
    let malformed = resume(&stack, &admin, "not-a-uuid").await.unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument);
    assert!(malformed.message().contains("saga_id"), "{malformed:?}");

    // A charge in flight: terminating would leave it, and the order, open.
    let open = stack.place_order(&customer, "open", "tok_slow").await;
    let saga = stack
        .saga_reaching(&open.order_id, "process-payment", SETTLE)
        .await
        .unwrap();
    let running = resume(&stack, &admin, &saga.saga_id).await.unwrap_err();
    assert_eq!(running.code(), Code::FailedPrecondition);
    assert!(running.message().contains("it is running"), "{running:?}");
    let no_reason = terminate(&stack, &admin, &saga.saga_id, "  ", true)
        .await
        .unwrap_err();
    assert_eq!(no_reason.code(), Code::InvalidArgument);
    assert!(no_reason.message().contains("reason"), "{no_reason:?}");
    let long = terminate(&stack, &admin, &saga.saga_id, &"x".repeat(501), true)
        .await
        .unwrap_err();
    assert_eq!(long.code(), Code::InvalidArgument);
    let unacknowledged = terminate(&stack, &admin, &saga.saga_id, "fraud", false)
        .await
        .unwrap_err();
    assert_eq!(unacknowledged.code(), Code::FailedPrecondition);
    assert!(
        unacknowledged
            .message()
            .contains("steps open-order, process-payment may have taken effect"),
        "{}",
        unacknowledged.message()
    );
    let terminated = terminate(&stack, &admin, &saga.saga_id, "fraud", true)
        .await
        .unwrap();
    assert_eq!(terminated.state(), SagaState::Terminated);
    assert_eq!(
        terminated.failure_reason,
        "terminated by an operator: fraud"
    );
    assert_eq!(
        terminated.steps_left_in_effect,
        ["open-order", "process-payment"]
    );
    assert!(terminated.finished_at.is_some());
    // The charge the saga cut off still lands; nothing confirms or refunds it.
    let after = stack.saga_status(&open.order_id, &admin).await.unwrap();
    assert_eq!(after.state(), SagaState::Terminated);
    let retried = stack
        .sagas()
        .await
        .retry_saga(bearer(
            RetrySagaRequest {
                saga_id: saga.saga_id.clone(),
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(retried.code(), Code::FailedPrecondition);
    assert!(
        retried.message().contains("it is terminated"),
        "{retried:?}"
    );

    // Past the pivot (ConfirmOrder in flight, the order service held),
    // termination is refused, naming the pivot.
    let late = stack.place_order(&customer, "late", "tok_slow").await;
    stack
        .saga_reaching(&late.order_id, "process-payment", SETTLE)
        .await
        .unwrap();
    stack.service_mut("order").process().signal("STOP").unwrap();
    let in_flight = stack
        .saga_reaching(&late.order_id, "confirm-order", SETTLE)
        .await;
    let refused = match &in_flight {
        Ok(saga) => terminate(&stack, &admin, &saga.saga_id, "operator", true).await,
        Err(_) => Ok(Saga::default()),
    };
    stack.service_mut("order").process().signal("CONT").unwrap();
    in_flight.unwrap();
    let refused = refused.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("past its pivot step confirm-order"),
        "{}",
        refused.message()
    );
    let confirmed = stack.settled_saga(&late.order_id, SETTLE).await.unwrap();
    assert_eq!(confirmed.state(), SagaState::Completed);

    // A declined card, for the failure-reason filter.
    let declined = stack
        .place_order(&customer, "declined", "tok_declined")
        .await;
    let declined = stack
        .settled_saga(&declined.order_id, SETTLE)
        .await
        .unwrap();

    // The search: by order, state, customer, failure fragment, created and
    // finished ranges; newest first, paged.
    let by_order = search(
        &stack,
        &admin,
        ListSagasRequest {
            order_id: happy.order_id.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        by_order.iter().map(|s| &s.saga_id).collect::<Vec<_>>(),
        [&completed.saga_id]
    );
    let by_state = search(
        &stack,
        &admin,
        ListSagasRequest {
            states: vec![SagaState::Terminated.into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        by_state.iter().map(|s| &s.saga_id).collect::<Vec<_>>(),
        [&saga.saga_id]
    );
    let by_customer = search(
        &stack,
        &admin,
        ListSagasRequest {
            customer_id: completed.customer_id.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(!completed.customer_id.is_empty());
    assert_eq!(
        by_customer.iter().map(|s| &s.saga_id).collect::<Vec<_>>(),
        [
            &declined.saga_id,
            &confirmed.saga_id,
            &saga.saga_id,
            &completed.saga_id
        ],
        "newest first"
    );
    let by_failure = search(
        &stack,
        &admin,
        ListSagasRequest {
            failure_reason_contains: "CARD_DECLINED".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        by_failure.iter().map(|s| &s.saga_id).collect::<Vec<_>>(),
        [&declined.saga_id]
    );
    let since_the_start = completed.started_at;
    let finished = search(
        &stack,
        &admin,
        ListSagasRequest {
            finished_after: since_the_start,
            created_after: since_the_start,
            states: vec![SagaState::Completed.into()],
            page_size: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        finished.iter().map(|s| &s.saga_id).collect::<Vec<_>>(),
        [&confirmed.saga_id],
        "one page of one, newest first"
    );

    // Every field that is wrong is named.
    let wrong = search(
        &stack,
        &admin,
        ListSagasRequest {
            page_size: 101,
            order_id: "nope".into(),
            failure_reason_contains: "ab".into(),
            created_after: completed.finished_at,
            created_before: completed.started_at,
            page_token: "garbage".into(),
            states: vec![99],
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(wrong.code(), Code::InvalidArgument);
    for field in [
        "page_size",
        "order_id",
        "failure_reason_contains",
        "created_after",
        "page_token",
        "states",
    ] {
        assert!(wrong.message().contains(field), "{field}: {wrong:?}");
    }
}

async fn signal(
    stack: &Stack,
    token: &str,
    order_id: &str,
    name: &str,
    signal_id: &str,
    payload: &str,
) -> Result<api_saga::v1::SignalSagaResponse, tonic::Status> {
    use api_saga::v1::SignalSagaRequest;
    use api_saga::v1::signal_saga_request::Lookup;
    let request = SignalSagaRequest {
        lookup: Some(Lookup::OrderId(order_id.to_owned())),
        signal: name.to_owned(),
        signal_id: signal_id.to_owned(),
        payload: payload.to_owned(),
    };
    stack
        .sagas()
        .await
        .signal_saga(bearer(request, token))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn signal_saga_is_for_admins_and_signal_tokens_and_writes_nothing_it_refuses() {
    use access_control::Scope;
    let stack = Stack::start().await.unwrap();
    let customer = stack.customer_token("signals@example.com").await.unwrap();
    let admin = stack.admin_token().await.unwrap();
    let settle_token = stack
        .service_token_with([Scope::OrdersSettle])
        .await
        .unwrap();
    let signal_token = stack
        .service_token_with([Scope::SagasSignal])
        .await
        .unwrap();

    let done = stack
        .place_order(&customer, "signal-done", "tok_visa")
        .await;
    let saga = stack.settled_saga(&done.order_id, SETTLE).await.unwrap();
    assert_eq!(saga.state(), SagaState::Completed);
    assert_eq!(saga.version, 1, "the order saga's only version");
    assert!(!saga.version_unknown, "a live replica carries it");

    // Who may call it: an admin, or a service token with sagas:signal.
    for (token, who) in [
        (&customer, "a customer"),
        (&settle_token, "orders:settle only"),
    ] {
        let refused = signal(&stack, token, &done.order_id, "review", "r-1", "{}")
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{who}: {refused:?}");
    }
    let refused = signal(&stack, &settle_token, &done.order_id, "review", "r-1", "{}")
        .await
        .unwrap_err();
    assert!(refused.message().contains("sagas:signal"), "{refused:?}");
    for token in [&admin, &signal_token] {
        let refused = signal(&stack, token, &done.order_id, "review", "r-1", "{}")
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert!(refused.message().contains("completed"), "{refused:?}");
    }

    // A running saga (paused while running, so it stays so) of a definition
    // that waits for no signal: the name is refused, naming what it waits for.
    let slow = stack
        .place_order(&customer, "signal-slow", "tok_slow")
        .await;
    stack
        .saga_reaching(&slow.order_id, "process-payment", SETTLE)
        .await
        .unwrap();
    let running = stack.saga_status(&slow.order_id, &admin).await.unwrap();
    pause(&stack, &admin, &running.saga_id).await.unwrap();
    saga_when(&stack, &admin, &slow.order_id, "paused", |s| {
        s.state() == SagaState::Paused
    })
    .await;
    let refused = signal(
        &stack,
        &admin,
        &slow.order_id,
        "review",
        "r-1",
        "{\"approved\": true}",
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("signal: order-processing version 1 has no step waiting for signal \"review\"; it waits for no signal"),
        "{refused:?}"
    );
    // Malformed requests name each field.
    let refused = signal(&stack, &admin, &slow.order_id, "", "", "{not json")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    for field in [
        "signal: is required",
        "signal_id: is required",
        "payload: is not JSON",
    ] {
        assert!(refused.message().contains(field), "{field}: {refused:?}");
    }
    let refused = signal(
        &stack,
        &admin,
        &slow.order_id,
        "review",
        "r\0-1",
        r#"{"note": "a\u0000b"}"#,
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    for field in ["signal_id: ", "payload: must not contain NUL"] {
        assert!(refused.message().contains(field), "{field}: {refused:?}");
    }
    let refused = signal(&stack, &admin, "not-a-uuid", "review", "r-1", "")
        .await
        .unwrap_err();
    assert!(refused.message().contains("order_id"), "{refused:?}");

    // Nothing was written for any of them.
    let pool = stack.scenario.inspect().await.unwrap();
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM saga.saga_signals")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(kept, 0);
    let pending: bool =
        sqlx::query_scalar("SELECT bool_or(signal_pending) FROM saga.saga_instances")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(!pending);

    // Search by version needs the type; with it, finds the order sagas.
    let refused = search(
        &stack,
        &admin,
        ListSagasRequest {
            version: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(
        refused.message().contains("version: needs saga_type"),
        "{refused:?}"
    );
    let found = search(
        &stack,
        &admin,
        ListSagasRequest {
            saga_type: "order-processing".into(),
            version: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(found.len(), 2);
    assert!(found.iter().all(|s| s.version == 1 && !s.version_unknown));
    let unknown = search(
        &stack,
        &admin,
        ListSagasRequest {
            unknown_version_only: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(unknown.is_empty());
    assert_eq!(gauge(&stack, "sagas_unknown_version").await, 0.0);
    resume(&stack, &admin, &running.saga_id).await.unwrap();
}
