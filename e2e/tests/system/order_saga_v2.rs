//! Order saga version 2 across the four real binaries: authorize, review
//! large orders, confirm, capture; its review approved, declined and timed
//! out while the orchestrator dies and comes back, and a customer who
//! cancels during the review; the capture retried
//! through a payment outage past the pivot; an authorization that lapses
//! during the review; a return refunded by a child saga, also one asked
//! for before the capture; and sagas of
//! version 1 finishing as version 1 beside version 2 across a restart onto
//! a binary that starts version 2.

use std::time::Duration;

use api_order::v1::{
    ApproveOrderRequest, DeclineOrderRequest, Order, OrderStatus, RequestOrderCancellationRequest,
    RequestReturnRequest,
};
use api_payment::v1::{Payment, PaymentKind, PaymentStatus};
use api_saga::v1::step_execution::{Kind, Status};
use api_saga::v1::{
    GetSagaStatusRequest, ListSagasRequest, Saga, SagaState, get_saga_status_request,
};
use e2e::{Stack, line};
use saga_orchestrator::order_saga::v2;
use saga_orchestrator::return_saga;
use testkit::grpc::bearer;
use tonic::Code;

const SETTLE: Duration = Duration::from_secs(60);
const ORCHESTRATOR: &str = saga_orchestrator::NAME;

/// A stack that starts new orders on version 2, with `env` for some
/// services.
async fn stack_v2(env: &[(&'static str, &str, &str)], proxied: Option<&'static str>) -> Stack {
    let mut builder = Stack::builder().order_saga_version(2);
    for (service, key, value) in env {
        builder = builder.env(service, key, value);
    }
    if let Some(service) = proxied {
        builder = builder.proxy(service);
    }
    builder.start().await.unwrap()
}

/// An order of 1 500.00 EUR: at or above the default `REVIEW_THRESHOLD`
/// (1 000.00), so it is reviewed.
async fn place_large(stack: &Stack, customer: &str, key: &str) -> Order {
    let request = api_order::v1::CreateOrderRequest {
        idempotency_key: key.to_owned(),
        items: vec![line("TV-55", 1, 150_000, "EUR")],
        payment_method_token: "tok_visa".into(),
    };
    stack
        .orders()
        .await
        .create_order(bearer(request, customer))
        .await
        .unwrap()
        .into_inner()
}

async fn order(stack: &Stack, customer: &str, order_id: &str) -> Order {
    stack.order(customer, order_id).await
}

/// Waits until the order is in `status`.
async fn order_reaching(
    stack: &Stack,
    customer: &str,
    order_id: &str,
    status: OrderStatus,
) -> Order {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let seen = order(stack, customer, order_id).await;
        if seen.status() == status {
            return seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "order never reached {status:?}: {seen:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn payments(stack: &Stack, customer: &str, order_id: &str) -> Vec<Payment> {
    stack.payments_of(customer, order_id).await
}

/// What the simulated provider holds of an order: taken, and reserved by
/// live authorizations.
async fn provider_holds(stack: &Stack, order_id: &str) -> (i64, i64) {
    let pool = stack.scenario.inspect().await.unwrap();
    sqlx::query_as(
        "SELECT coalesce(sum(held_minor), 0)::bigint, coalesce(sum(authorized_minor), 0)::bigint
         FROM payments.simulated_provider_holdings WHERE order_id = $1::uuid",
    )
    .bind(order_id)
    .fetch_one(&pool)
    .await
    .unwrap()
}

fn action<'a>(saga: &'a Saga, name: &str) -> Option<&'a api_saga::v1::StepExecution> {
    saga.steps
        .iter()
        .find(|s| s.step == name && s.kind() == Kind::Action)
}

fn compensations(saga: &Saga) -> Vec<&str> {
    saga.steps
        .iter()
        .filter(|s| s.kind() == Kind::Compensation)
        .map(|s| s.step.as_str())
        .collect()
}

/// Waits until the order's saga waits for its review, and returns it.
async fn waiting_for_review(stack: &Stack, order_id: &str) -> Saga {
    let admin = stack.admin_token().await.unwrap();
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        if let Ok(saga) = stack.saga_status(order_id, &admin).await
            && saga.waiting_for_signal == v2::REVIEW_SIGNAL
        {
            return saga;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the saga never waited for its review"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The dashboard's view of a saga (`/api/saga?{query}`).
async fn dashboard_saga(stack: &Stack, query: &str) -> serde_json::Value {
    let admin = stack.admin_token().await.unwrap();
    let address = stack.service(ORCHESTRATOR).http_address().unwrap();
    let body = e2e::http_get(&format!("http://{address}/api/saga?{query}"), Some(&admin)).await;
    serde_json::from_str(&body).unwrap()
}

/// SIGKILLs the orchestrator (every replica of it this stack has) and
/// starts it again.
async fn crash_orchestrator(stack: &mut Stack) {
    stack.crash(ORCHESTRATOR).await.unwrap();
    stack.restart(ORCHESTRATOR).await.unwrap();
}

async fn approve(stack: &Stack, order_id: &str) -> Result<Order, tonic::Status> {
    let admin = stack.admin_token().await.unwrap();
    let request = ApproveOrderRequest {
        order_id: order_id.to_owned(),
    };
    stack
        .orders()
        .await
        .approve_order(bearer(request, &admin))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn a_large_order_waits_for_its_review_across_a_crash_and_is_captured_once_approved() {
    let mut stack = stack_v2(&[], None).await;
    let customer = stack.customer_token("reviewed@example.com").await.unwrap();

    // A small order skips the review: its three steps are recorded as
    // skipped, and it is authorized, confirmed and captured.
    let small = stack.place_order(&customer, "small", "tok_visa").await;
    let saga = stack.settled_saga(&small.order_id, SETTLE).await.unwrap();
    assert_eq!(saga.state(), SagaState::Completed, "{saga:#?}");
    assert_eq!(saga.version, 2);
    for skipped in [v2::HOLD_FOR_REVIEW, v2::REVIEW, v2::CHECK_REVIEW] {
        assert_eq!(
            action(&saga, skipped).unwrap().status(),
            Status::Skipped,
            "{skipped}"
        );
    }
    let paid = payments(&stack, &customer, &small.order_id).await;
    assert_eq!(paid.len(), 1, "{paid:?}");
    assert_eq!(paid[0].kind(), PaymentKind::Authorization);
    assert_eq!(paid[0].status(), PaymentStatus::Captured);

    // A large one waits for its review, also through a crash.
    let large = place_large(&stack, &customer, "large").await;
    order_reaching(
        &stack,
        &customer,
        &large.order_id,
        OrderStatus::PendingReview,
    )
    .await;
    let waiting = waiting_for_review(&stack, &large.order_id).await;
    assert_eq!(waiting.state(), SagaState::Running);
    assert!(
        action(&waiting, v2::REVIEW)
            .unwrap()
            .waiting_until
            .is_some()
    );
    assert_eq!(provider_holds(&stack, &large.order_id).await, (0, 150_000));
    crash_orchestrator(&mut stack).await;
    let waiting = waiting_for_review(&stack, &large.order_id).await;
    assert!(
        waiting.stuck_since.is_none(),
        "a wait is not stuck: {waiting:#?}"
    );
    let shown = dashboard_saga(&stack, &format!("order={}", large.order_id)).await;
    assert_eq!(shown["saga"]["phase"], "pending review", "{shown:#}");
    assert_eq!(shown["saga"]["waiting_for_signal"], "review", "{shown:#}");

    let approved = approve(&stack, &large.order_id).await.unwrap();
    assert_eq!(approved.status(), OrderStatus::ReviewApproved);
    let saga = stack.settled_saga(&large.order_id, SETTLE).await.unwrap();
    assert_eq!(saga.state(), SagaState::Completed, "{saga:#?}");
    let steps: Vec<(&str, Status)> = saga
        .steps
        .iter()
        .map(|s| (s.step.as_str(), s.status()))
        .collect();
    assert_eq!(
        steps,
        vec![
            ("open-order", Status::Succeeded),
            (v2::AUTHORIZE_PAYMENT, Status::Succeeded),
            (v2::HOLD_FOR_REVIEW, Status::Succeeded),
            (v2::REVIEW, Status::Succeeded),
            (v2::CHECK_REVIEW, Status::Succeeded),
            ("confirm-order", Status::Succeeded),
            (v2::CAPTURE_PAYMENT, Status::Succeeded),
        ]
    );
    let confirmed = order(&stack, &customer, &large.order_id).await;
    assert_eq!(confirmed.status(), OrderStatus::Confirmed);
    let paid = payments(&stack, &customer, &large.order_id).await;
    assert_eq!(paid.len(), 1, "{paid:?}");
    assert_eq!(paid[0].status(), PaymentStatus::Captured);
    assert_eq!(confirmed.payment_id, paid[0].payment_id);
    assert_eq!(provider_holds(&stack, &large.order_id).await, (150_000, 0));
}

#[tokio::test]
async fn a_declined_review_voids_the_authorization_and_rejects_the_order() {
    let mut stack = stack_v2(&[], None).await;
    let customer = stack
        .customer_token("declined-review@example.com")
        .await
        .unwrap();
    let large = place_large(&stack, &customer, "large").await;
    waiting_for_review(&stack, &large.order_id).await;

    // Declined while no orchestrator runs: the decision waits on the topic.
    stack.crash(ORCHESTRATOR).await.unwrap();
    let admin = stack.admin_token().await.unwrap();
    let request = DeclineOrderRequest {
        order_id: large.order_id.clone(),
        reason: "address does not match".into(),
    };
    let declined = stack
        .orders()
        .await
        .decline_order(bearer(request, &admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(declined.status(), OrderStatus::ReviewDeclined);
    stack.restart(ORCHESTRATOR).await.unwrap();

    let saga = stack.settled_saga(&large.order_id, SETTLE).await.unwrap();
    assert_eq!(saga.state(), SagaState::Compensated, "{saga:#?}");
    assert!(
        saga.failure_reason
            .contains("review declined: address does not match"),
        "{}",
        saga.failure_reason
    );
    assert!(action(&saga, "confirm-order").is_none(), "never confirmed");
    assert_eq!(
        compensations(&saga),
        vec![v2::AUTHORIZE_PAYMENT, "open-order"]
    );
    let rejected = order(&stack, &customer, &large.order_id).await;
    assert_eq!(rejected.status(), OrderStatus::Rejected);
    assert!(
        rejected.status_reason.contains("address does not match"),
        "{rejected:?}"
    );
    let paid = payments(&stack, &customer, &large.order_id).await;
    assert_eq!(
        paid.iter().map(Payment::status).collect::<Vec<_>>(),
        vec![PaymentStatus::Voided],
        "voided, never refunded"
    );
    assert_eq!(provider_holds(&stack, &large.order_id).await, (0, 0));

    // A customer who changes their mind while the order waits for its
    // review: voided and cancelled, not rejected.
    let second = place_large(&stack, &customer, "changed-mind").await;
    waiting_for_review(&stack, &second.order_id).await;
    let request = RequestOrderCancellationRequest {
        order_id: second.order_id.clone(),
        reason: "found it cheaper".into(),
    };
    stack
        .orders()
        .await
        .request_order_cancellation(bearer(request, &customer))
        .await
        .unwrap();
    let saga = stack.settled_saga(&second.order_id, SETTLE).await.unwrap();
    assert_eq!(saga.state(), SagaState::Compensated, "{saga:#?}");
    assert_eq!(
        order(&stack, &customer, &second.order_id).await.status(),
        OrderStatus::Cancelled
    );
    let paid = payments(&stack, &customer, &second.order_id).await;
    assert_eq!(paid[0].status(), PaymentStatus::Voided);
    assert_eq!(provider_holds(&stack, &second.order_id).await, (0, 0));
}

#[tokio::test]
async fn a_review_that_times_out_is_declined_on_a_restarted_orchestrator() {
    let mut stack = stack_v2(&[(ORCHESTRATOR, "REVIEW_TIMEOUT", "3s")], None).await;
    let customer = stack.customer_token("timed-out@example.com").await.unwrap();
    let large = place_large(&stack, &customer, "large").await;
    let waiting = waiting_for_review(&stack, &large.order_id).await;
    let until = action(&waiting, v2::REVIEW)
        .unwrap()
        .waiting_until
        .expect("the wait's timer");

    // The timer passes while no orchestrator runs; the restarted one finds
    // it in the database and fires it.
    stack.crash(ORCHESTRATOR).await.unwrap();
    let left = (until.seconds - chrono::Utc::now().timestamp()).clamp(0, 10);
    tokio::time::sleep(Duration::from_secs(left as u64 + 1)).await;
    stack.restart(ORCHESTRATOR).await.unwrap();

    let saga = stack.settled_saga(&large.order_id, SETTLE).await.unwrap();
    assert_eq!(saga.state(), SagaState::Compensated, "{saga:#?}");
    assert!(
        saga.failure_reason
            .contains("the review timed out after 3s"),
        "{}",
        saga.failure_reason
    );
    let rejected = order(&stack, &customer, &large.order_id).await;
    assert_eq!(rejected.status(), OrderStatus::Rejected);
    let paid = payments(&stack, &customer, &large.order_id).await;
    assert_eq!(paid[0].status(), PaymentStatus::Voided);
    assert_eq!(provider_holds(&stack, &large.order_id).await, (0, 0));
    // Too late to approve: the order is closed.
    let late = approve(&stack, &large.order_id).await.unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");
}

#[tokio::test]
async fn a_capture_is_retried_through_a_payment_outage_after_the_pivot_and_never_compensated() {
    let stack = stack_v2(&[], Some("payment")).await;
    let customer = stack.customer_token("outage@example.com").await.unwrap();
    let large = place_large(&stack, &customer, "large").await;
    waiting_for_review(&stack, &large.order_id).await;

    // The payment service is cut off once the money is held; the order is
    // confirmed regardless, and the capture waits for the service.
    stack.proxy("payment").cut();
    approve(&stack, &large.order_id).await.unwrap();
    order_reaching(&stack, &customer, &large.order_id, OrderStatus::Confirmed).await;
    let admin = stack.admin_token().await.unwrap();
    let deadline = tokio::time::Instant::now() + SETTLE;
    let retrying = loop {
        let saga = stack.saga_status(&large.order_id, &admin).await.unwrap();
        if action(&saga, v2::CAPTURE_PAYMENT).is_some_and(|s| s.attempts >= 2) {
            break saga;
        }
        assert!(tokio::time::Instant::now() < deadline, "{saga:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(retrying.state(), SagaState::Running, "{retrying:#?}");
    assert!(compensations(&retrying).is_empty(), "{retrying:#?}");
    assert_eq!(provider_holds(&stack, &large.order_id).await, (0, 150_000));

    stack.proxy("payment").restore();
    let saga = stack.settled_saga(&large.order_id, SETTLE).await.unwrap();
    assert_eq!(saga.state(), SagaState::Completed, "{saga:#?}");
    assert!(compensations(&saga).is_empty());
    let paid = payments(&stack, &customer, &large.order_id).await;
    assert_eq!(paid.len(), 1);
    assert_eq!(paid[0].status(), PaymentStatus::Captured);
    assert_eq!(provider_holds(&stack, &large.order_id).await, (150_000, 0));
}

#[tokio::test]
async fn an_authorization_that_lapses_before_it_can_be_captured_rejects_the_order() {
    // Authorizations last 3 s, and a capture is given a step's deadline
    // (3 s) before the authorization lapses: every approval is too late.
    let stack = stack_v2(
        &[
            ("payment", "AUTHORIZATION_LIFETIME", "3s"),
            (ORCHESTRATOR, "SAGA_STEP_DEADLINE", "3s"),
            (ORCHESTRATOR, "SAGA_ATTEMPT_TIMEOUT", "2s"),
        ],
        None,
    )
    .await;
    let customer = stack.customer_token("lapsed@example.com").await.unwrap();
    let large = place_large(&stack, &customer, "large").await;
    waiting_for_review(&stack, &large.order_id).await;
    approve(&stack, &large.order_id).await.unwrap();

    let saga = stack.settled_saga(&large.order_id, SETTLE).await.unwrap();
    assert_eq!(saga.state(), SagaState::Compensated, "{saga:#?}");
    assert!(
        saga.failure_reason.contains("too soon to capture"),
        "{}",
        saga.failure_reason
    );
    assert!(action(&saga, "confirm-order").is_none(), "never confirmed");
    let rejected = order(&stack, &customer, &large.order_id).await;
    assert_eq!(rejected.status(), OrderStatus::Rejected);
    let paid = payments(&stack, &customer, &large.order_id).await;
    assert!(
        matches!(
            paid[0].status(),
            PaymentStatus::Voided | PaymentStatus::Expired
        ),
        "{paid:?}"
    );
    assert_eq!(
        provider_holds(&stack, &large.order_id).await.0,
        0,
        "nothing taken"
    );
}

#[tokio::test]
async fn a_return_is_refunded_by_a_child_saga_and_the_order_marked_returned() {
    let stack = stack_v2(&[], None).await;
    let customer = stack.customer_token("returns@example.com").await.unwrap();
    let placed = stack.place_order(&customer, "to-return", "tok_visa").await;
    let saga = stack.settled_saga(&placed.order_id, SETTLE).await.unwrap();
    assert_eq!(saga.state(), SagaState::Completed, "{saga:#?}");

    let request = RequestReturnRequest {
        order_id: placed.order_id.clone(),
        reason: "does not fit".into(),
    };
    let asked = stack
        .orders()
        .await
        .request_return(bearer(request, &customer))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(asked.status(), OrderStatus::ReturnRequested);
    order_reaching(&stack, &customer, &placed.order_id, OrderStatus::Returned).await;

    let admin = stack.admin_token().await.unwrap();
    let mut sagas = stack.sagas().await;
    let listed = sagas
        .list_sagas(bearer(
            ListSagasRequest {
                saga_type: return_saga::SAGA_TYPE.into(),
                order_id: placed.order_id.clone(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .sagas;
    assert_eq!(listed.len(), 1, "{listed:#?}");
    let status = |saga_id: String| {
        let mut sagas = sagas.clone();
        let admin = admin.clone();
        async move {
            sagas
                .get_saga_status(bearer(
                    GetSagaStatusRequest {
                        lookup: Some(get_saga_status_request::Lookup::SagaId(saga_id)),
                    },
                    &admin,
                ))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let returned = status(listed[0].saga_id.clone()).await;
    assert_eq!(returned.state(), SagaState::Completed, "{returned:#?}");
    assert_eq!(returned.children.len(), 1, "{returned:#?}");
    let child = &returned.children[0];
    assert_eq!(child.saga_type, return_saga::REFUND_SAGA_TYPE);
    assert_eq!(child.step, return_saga::REFUND_PAYMENT);
    assert_eq!(child.state(), SagaState::Completed);
    let refund = status(child.saga_id.clone()).await;
    assert_eq!(refund.parent_saga_id, returned.saga_id);
    assert_eq!(refund.correlation_id, returned.correlation_id, "one flow");
    let shown = dashboard_saga(&stack, &format!("saga={}", returned.saga_id)).await;
    assert_eq!(shown["saga"]["phase"], "returned", "{shown:#}");
    assert_eq!(
        shown["children"].as_array().map(Vec::len),
        Some(1),
        "{shown:#}"
    );

    let paid = payments(&stack, &customer, &placed.order_id).await;
    assert_eq!(
        paid.iter().map(Payment::status).collect::<Vec<_>>(),
        vec![PaymentStatus::Refunded]
    );
    assert_eq!(provider_holds(&stack, &placed.order_id).await, (0, 0));
}

#[tokio::test]
async fn a_return_asked_for_before_the_capture_waits_for_it_and_is_refunded() {
    // Version 2 confirms, then captures. The first capture of
    // `tok_capture_fails_once` fails transiently and its retry waits 4 to
    // 8 s: the order is confirmed, and its money not taken yet, when its
    // customer returns it. The refund must wait for the capture, not turn
    // the return back and leave the order RETURN_REQUESTED.
    let stack = stack_v2(
        &[
            (ORCHESTRATOR, "SAGA_RETRY_BACKOFF", "8s"),
            (ORCHESTRATOR, "SAGA_RETRY_MAX_BACKOFF", "8s"),
        ],
        None,
    )
    .await;
    let customer = stack.customer_token("early@example.com").await.unwrap();
    let placed = stack
        .place_order(&customer, "early-return", "tok_capture_fails_once")
        .await;
    order_reaching(&stack, &customer, &placed.order_id, OrderStatus::Confirmed).await;
    let paid = payments(&stack, &customer, &placed.order_id).await;
    assert_eq!(paid[0].status(), PaymentStatus::Authorized, "{paid:?}");

    let request = RequestReturnRequest {
        order_id: placed.order_id.clone(),
        reason: "arrived broken".into(),
    };
    stack
        .orders()
        .await
        .request_return(bearer(request, &customer))
        .await
        .unwrap();
    order_reaching(&stack, &customer, &placed.order_id, OrderStatus::Returned).await;
    let paid = payments(&stack, &customer, &placed.order_id).await;
    assert_eq!(
        paid.iter().map(Payment::status).collect::<Vec<_>>(),
        vec![PaymentStatus::Refunded]
    );
    assert_eq!(provider_holds(&stack, &placed.order_id).await, (0, 0));
    let saga = stack.settled_saga(&placed.order_id, SETTLE).await.unwrap();
    assert_eq!(saga.state(), SagaState::Completed, "{saga:#?}");
}

#[tokio::test]
async fn version_1_sagas_in_flight_finish_as_version_1_beside_version_2_across_a_restart() {
    // The payment service is cut off, so sagas stay in flight; they retry
    // patiently meanwhile.
    let patient = [
        (ORCHESTRATOR, "SAGA_STEP_MAX_ATTEMPTS", "100"),
        (ORCHESTRATOR, "SAGA_RETRY_MAX_BACKOFF", "500ms"),
    ];
    let mut builder = Stack::builder().order_saga_version(1).proxy("payment");
    for (service, key, value) in patient {
        builder = builder.env(service, key, value);
    }
    let mut stack = builder.start().await.unwrap();
    let customer = stack.customer_token("rolling@example.com").await.unwrap();
    stack.proxy("payment").cut();
    let old = stack.place_order(&customer, "before", "tok_visa").await;
    stack
        .saga_reaching(&old.order_id, "process-payment", SETTLE)
        .await
        .unwrap();

    // The orchestrator is replaced by one that starts version 2 (and, as
    // every build does, carries version 1 too).
    stack
        .service_mut(ORCHESTRATOR)
        .stop(Duration::from_secs(10))
        .await
        .unwrap();
    stack.set_env(ORCHESTRATOR, "ORDER_SAGA_VERSION", "2");
    stack.restart(ORCHESTRATOR).await.unwrap();
    let new = stack.place_order(&customer, "after", "tok_visa").await;
    stack
        .saga_reaching(&new.order_id, v2::AUTHORIZE_PAYMENT, SETTLE)
        .await
        .unwrap();
    stack.proxy("payment").restore();

    let old_saga = stack.settled_saga(&old.order_id, SETTLE).await.unwrap();
    assert_eq!(old_saga.state(), SagaState::Completed, "{old_saga:#?}");
    assert_eq!(old_saga.version, 1);
    assert!(action(&old_saga, "process-payment").is_some());
    assert!(action(&old_saga, v2::AUTHORIZE_PAYMENT).is_none());
    let old_paid = payments(&stack, &customer, &old.order_id).await;
    assert_eq!(old_paid.len(), 1);
    assert_eq!(old_paid[0].kind(), PaymentKind::Charge);
    assert_eq!(old_paid[0].status(), PaymentStatus::Captured);

    let new_saga = stack.settled_saga(&new.order_id, SETTLE).await.unwrap();
    assert_eq!(new_saga.state(), SagaState::Completed, "{new_saga:#?}");
    assert_eq!(new_saga.version, 2);
    assert!(action(&new_saga, v2::CAPTURE_PAYMENT).is_some());
    let new_paid = payments(&stack, &customer, &new.order_id).await;
    assert_eq!(new_paid.len(), 1);
    assert_eq!(new_paid[0].kind(), PaymentKind::Authorization);
    assert_eq!(new_paid[0].status(), PaymentStatus::Captured);
    for order_id in [&old.order_id, &new.order_id] {
        assert_eq!(
            order(&stack, &customer, order_id).await.status(),
            OrderStatus::Confirmed
        );
    }
}
