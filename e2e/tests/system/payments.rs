//! The payment service with its simulated provider, through the real
//! binaries: every provider behaviour, exactly-once charges under racing
//! duplicates, refunds, validation, privacy, the ledger and the events.

use std::time::Duration;

use api_common::v1::Money;
use api_payment::v1::refund_payment_request::Target;
use api_payment::v1::{
    GetPaymentRequest, ListPaymentsByOrderRequest, Payment, PaymentStatus, ProcessPaymentRequest,
    RefundPaymentRequest,
};
use dev_stack::header;
use e2e::Stack;
use messaging::EventEnvelope;
use prost::Message as _;
use rdkafka::Message as _;
use testkit::grpc::{bearer, violated_fields};
use tonic::Code;

fn eur(amount_minor: i64) -> Money {
    Money {
        amount_minor,
        currency: "EUR".into(),
    }
}

fn charge(key: &str, token: &str, amount: Money, customer_id: &str) -> ProcessPaymentRequest {
    ProcessPaymentRequest {
        order_id: uuid::Uuid::new_v4().to_string(),
        customer_id: customer_id.to_owned(),
        amount: Some(amount),
        payment_method_token: token.to_owned(),
        idempotency_key: key.to_owned(),
    }
}

fn refund_of(payment_id: &str, key: &str) -> RefundPaymentRequest {
    RefundPaymentRequest {
        target: Some(Target::PaymentId(payment_id.to_owned())),
        idempotency_key: key.to_owned(),
        reason: "order cancelled".into(),
    }
}

struct Payments<'a> {
    stack: &'a Stack,
    service: String,
}

impl Payments<'_> {
    async fn process(&self, request: ProcessPaymentRequest) -> Result<Payment, tonic::Status> {
        self.stack
            .payments()
            .await
            .process_payment(bearer(request, &self.service))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn refund(&self, request: RefundPaymentRequest) -> Result<Payment, tonic::Status> {
        self.stack
            .payments()
            .await
            .refund_payment(bearer(request, &self.service))
            .await
            .map(tonic::Response::into_inner)
    }
}

async fn payments(stack: &Stack) -> Payments<'_> {
    Payments {
        stack,
        service: stack.service_token().await.unwrap(),
    }
}

async fn count(stack: &Stack, sql: &'static str) -> i64 {
    let pool = stack.scenario.inspect().await.unwrap();
    let n = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
    pool.close().await;
    n
}

/// What the simulated provider holds of an order's money: captured and
/// not refunded.
async fn held(stack: &Stack, order_id: &str) -> i64 {
    let pool = stack.scenario.inspect().await.unwrap();
    let held: Option<i64> = sqlx::query_scalar(
        "SELECT held_minor FROM payments.simulated_provider_holdings WHERE order_id = $1::uuid",
    )
    .bind(order_id)
    .fetch_optional(&pool)
    .await
    .unwrap();
    pool.close().await;
    held.unwrap_or(0)
}

/// How the simulated provider saw a key: charge attempts, and whether it
/// was voided.
async fn at_provider(stack: &Stack, key: &str) -> Option<(i32, bool)> {
    let pool = stack.scenario.inspect().await.unwrap();
    let seen = sqlx::query_as(
        "SELECT attempts, voided_at IS NOT NULL FROM payments.simulated_provider_charges
         WHERE idempotency_key = $1",
    )
    .bind(key)
    .fetch_optional(&pool)
    .await
    .unwrap();
    pool.close().await;
    seen
}

fn by_key(key: &str) -> RefundPaymentRequest {
    RefundPaymentRequest {
        target: Some(Target::ChargeIdempotencyKey(key.to_owned())),
        idempotency_key: format!("undo-{key}"),
        reason: "saga compensation".into(),
    }
}

fn customer() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test]
async fn each_simulated_provider_behaviour() {
    let stack = Stack::builder()
        .without_sagas()
        .env("payment", "PAYMENT_AMOUNT_LIMIT", "50000")
        .env("payment", "PROVIDER_SLOW_DELAY", "3s")
        .env("payment", "PROVIDER_FLAKY_FAILURES", "2")
        .start()
        .await
        .unwrap();
    let p = payments(&stack).await;

    let approved = p
        .process(charge("approve", "tok_visa", eur(2500), &customer()))
        .await
        .unwrap();
    assert_eq!(approved.status(), PaymentStatus::Captured);
    assert!(approved.provider_reference.starts_with("sim_ch_"));

    for (token, amount, reason) in [
        ("tok_declined", 2500, "card_declined"),
        ("tok_insufficient_funds", 2500, "insufficient_funds"),
        ("tok_visa", 50001, "amount_over_limit"),
    ] {
        let declined = p
            .process(charge(
                &format!("decline-{reason}"),
                token,
                eur(amount),
                &customer(),
            ))
            .await
            .unwrap();
        assert_eq!(
            (declined.status(), declined.decline_reason.as_str()),
            (PaymentStatus::Declined, reason)
        );
    }

    // Flaky: transient failures, then success, all under one key.
    let flaky = charge("flaky", "tok_flaky", eur(700), &customer());
    for _ in 0..2 {
        assert_eq!(
            p.process(flaky.clone()).await.unwrap_err().code(),
            Code::Unavailable
        );
    }
    assert_eq!(
        p.process(flaky).await.unwrap().status(),
        PaymentStatus::Captured
    );

    // Slow: the caller's deadline passes first, and nothing is charged...
    let slow = charge("slow", "tok_slow", eur(900), &customer());
    let mut request = bearer(slow.clone(), &p.service);
    request.set_timeout(Duration::from_millis(500));
    let error = stack
        .payments()
        .await
        .process_payment(request)
        .await
        .unwrap_err();
    assert!(
        matches!(error.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{error:?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM payments.payments WHERE idempotency_key = 'slow'"
        )
        .await,
        0
    );
    // ...and with patience it goes through.
    assert_eq!(
        p.process(slow).await.unwrap().status(),
        PaymentStatus::Captured
    );

    // Refund fails once, then succeeds.
    let fragile = p
        .process(charge(
            "fragile",
            "tok_refund_fails_once",
            eur(1200),
            &customer(),
        ))
        .await
        .unwrap();
    let error = p
        .refund(refund_of(&fragile.payment_id, "refund-fragile"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Unavailable);
    let refunded = p
        .refund(refund_of(&fragile.payment_id, "refund-fragile"))
        .await
        .unwrap();
    assert_eq!(refunded.status(), PaymentStatus::Refunded);
    assert!(refunded.refunded_at.is_some());
}

#[tokio::test]
async fn twenty_identical_concurrent_charges_charge_once() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let p = payments(&stack).await;
    let request = charge("one-charge", "tok_visa", eur(4999), &customer());
    let attempts: Vec<_> = (0..20).map(|_| p.process(request.clone())).collect();
    let results = futures::future::join_all(attempts).await;
    let first = results[0].as_ref().unwrap();
    for result in &results {
        assert_eq!(
            result.as_ref().unwrap(),
            first,
            "every caller gets the one payment"
        );
    }
    assert_eq!(
        count(&stack, "SELECT count(*) FROM payments.payments").await,
        1
    );
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM payments.simulated_provider_charges WHERE outcome = 'captured'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &stack,
            "SELECT attempts::bigint FROM payments.simulated_provider_charges"
        )
        .await,
        1,
        "the provider was asked once"
    );

    let mut different = request.clone();
    different.amount = Some(eur(5000));
    assert_eq!(
        p.process(different).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
}

#[tokio::test]
async fn a_payment_is_refunded_once_however_often_it_is_asked() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let p = payments(&stack).await;
    let paid = p
        .process(charge("to-refund", "tok_visa", eur(3000), &customer()))
        .await
        .unwrap();
    let refunds: Vec<_> = (0..10)
        .map(|n| p.refund(refund_of(&paid.payment_id, &format!("refund-{}", n % 2))))
        .collect();
    let results = futures::future::join_all(refunds).await;
    let first = results[0].as_ref().unwrap();
    assert_eq!(first.status(), PaymentStatus::Refunded);
    for result in &results {
        assert_eq!(
            result.as_ref().unwrap(),
            first,
            "later refunds return the earlier result"
        );
    }
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM payments.simulated_provider_charges WHERE refunded_at IS NOT NULL"
        )
        .await,
        1
    );

    let declined = p
        .process(charge("declined", "tok_declined", eur(3000), &customer()))
        .await
        .unwrap();
    let error = p
        .refund(refund_of(&declined.payment_id, "refund-declined"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    let unknown = p
        .refund(refund_of(
            &uuid::Uuid::new_v4().to_string(),
            "refund-unknown",
        ))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn undoing_a_charge_by_its_key_refunds_it_or_voids_it_for_good() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let p = payments(&stack).await;

    // Captured: refunded.
    p.process(charge("made", "tok_visa", eur(100), &customer()))
        .await
        .unwrap();
    assert_eq!(
        p.refund(by_key("made")).await.unwrap().status(),
        PaymentStatus::Refunded
    );
    // Declined: nothing to undo, and that is the answer.
    p.process(charge("refused", "tok_declined", eur(100), &customer()))
        .await
        .unwrap();
    assert_eq!(
        p.refund(by_key("refused")).await.unwrap().status(),
        PaymentStatus::Declined
    );
    // Never made: voided, and a late charge with that key charges nothing.
    assert_eq!(
        p.refund(by_key("never")).await.unwrap().status(),
        PaymentStatus::Voided
    );
    let late_charge = charge("never", "tok_visa", eur(100), &customer());
    let late = p.process(late_charge.clone()).await.unwrap();
    assert_eq!(late.status(), PaymentStatus::Voided);
    // The provider was told, and was never asked to charge.
    assert_eq!(
        at_provider(&stack, "never").await,
        Some((0, true)),
        "voided at the provider before any attempt"
    );
    assert_eq!(held(&stack, &late_charge.order_id).await, 0);

    // Tried and failed transiently, then voided: nothing was charged, and
    // a retry charges nothing.
    let flaky = charge("flaky-then-undone", "tok_flaky", eur(100), &customer());
    assert_eq!(
        p.process(flaky.clone()).await.unwrap_err().code(),
        Code::Unavailable
    );
    assert_eq!(
        p.refund(by_key("flaky-then-undone"))
            .await
            .unwrap()
            .status(),
        PaymentStatus::Voided
    );
    for _ in 0..3 {
        assert_eq!(
            p.process(flaky.clone()).await.unwrap().status(),
            PaymentStatus::Voided
        );
    }
    assert_eq!(
        at_provider(&stack, "flaky-then-undone").await,
        Some((1, true))
    );
    assert_eq!(held(&stack, &flaky.order_id).await, 0);
}

#[tokio::test]
async fn a_capture_whose_answer_was_lost_is_found_by_its_key_and_refunded() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let p = payments(&stack).await;
    let reader = stack.reader(&stack.scenario.topics.payment_events());
    let lost = charge("lost", "tok_capture_answer_lost", eur(1500), &customer());

    // The provider captures, but the answer never arrives: every attempt
    // is UNAVAILABLE, we record nothing, and the provider holds the money.
    for _ in 0..2 {
        assert_eq!(
            p.process(lost.clone()).await.unwrap_err().code(),
            Code::Unavailable
        );
    }
    assert_eq!(
        count(&stack, "SELECT count(*) FROM payments.payments").await,
        0
    );
    assert_eq!(held(&stack, &lost.order_id).await, 1500);

    // Undone by its key: the provider is asked, refunds what it captured,
    // and says what that was.
    let undone = p.refund(by_key("lost")).await.unwrap();
    assert_eq!(undone.status(), PaymentStatus::Refunded);
    assert_eq!(undone.amount, Some(eur(1500)));
    assert_eq!(
        (undone.order_id.as_str(), undone.customer_id.as_str()),
        (lost.order_id.as_str(), lost.customer_id.as_str())
    );
    assert!(undone.provider_reference.starts_with("sim_ch_"));
    assert!(undone.refunded_at.is_some());
    assert_eq!(held(&stack, &lost.order_id).await, 0);
    assert_eq!(
        p.refund(by_key("lost")).await.unwrap(),
        undone,
        "asking again gives the same answer"
    );

    // Our ledger agrees with the provider: captured, refunded, net 0.
    let read_token = stack
        .service_token_with([access_control::Scope::PaymentsRead])
        .await
        .unwrap();
    let listed = stack
        .payments()
        .await
        .list_payments_by_order(bearer(
            ListPaymentsByOrderRequest {
                order_id: lost.order_id.clone(),
            },
            &read_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.payments, vec![undone.clone()]);
    let ledger = listed.ledger.unwrap();
    assert_eq!(
        (ledger.captured, ledger.refunded, ledger.net),
        (Some(eur(1500)), Some(eur(1500)), Some(eur(0)))
    );

    // And the events say what happened, in order.
    let records = reader.receive(2, Duration::from_secs(20)).await.unwrap();
    let events: Vec<(String, String)> = records
        .iter()
        .map(|record| {
            let envelope = EventEnvelope::decode(record.payload().unwrap()).unwrap();
            (envelope.event_type, envelope.aggregate_id)
        })
        .collect();
    assert_eq!(
        events,
        vec![
            (
                "ordersaga.payment.v1.PaymentCaptured".to_owned(),
                undone.payment_id.clone()
            ),
            (
                "ordersaga.payment.v1.PaymentRefunded".to_owned(),
                undone.payment_id.clone()
            ),
        ]
    );

    // A late or retried charge with the key returns the refund and never
    // reaches the provider.
    let attempts = at_provider(&stack, "lost").await;
    assert_eq!(attempts, Some((2, false)));
    assert_eq!(p.process(lost.clone()).await.unwrap(), undone);
    assert_eq!(at_provider(&stack, "lost").await, attempts);
    assert_eq!(held(&stack, &lost.order_id).await, 0);
}

#[tokio::test]
async fn bad_amounts_and_fields_are_named_and_nothing_is_written() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let p = payments(&stack).await;
    let base = || charge("key", "tok_visa", eur(100), &customer());
    let cases = [
        (
            ProcessPaymentRequest {
                amount: Some(eur(-1)),
                ..base()
            },
            "amount.amount_minor",
        ),
        (
            ProcessPaymentRequest {
                amount: Some(eur(0)),
                ..base()
            },
            "amount.amount_minor",
        ),
        (
            ProcessPaymentRequest {
                amount: Some(eur(1_000_000_000_001)),
                ..base()
            },
            "amount.amount_minor",
        ),
        (
            ProcessPaymentRequest {
                amount: Some(eur(i64::MAX)),
                ..base()
            },
            "amount.amount_minor",
        ),
        (
            ProcessPaymentRequest {
                amount: Some(Money {
                    amount_minor: 100,
                    currency: "EUD".into(),
                }),
                ..base()
            },
            "amount.currency",
        ),
        (
            ProcessPaymentRequest {
                amount: Some(Money {
                    amount_minor: 100,
                    currency: "eur".into(),
                }),
                ..base()
            },
            "amount.currency",
        ),
        (
            ProcessPaymentRequest {
                amount: None,
                ..base()
            },
            "amount",
        ),
        (
            ProcessPaymentRequest {
                order_id: "order-1".into(),
                ..base()
            },
            "order_id",
        ),
        (
            ProcessPaymentRequest {
                customer_id: String::new(),
                ..base()
            },
            "customer_id",
        ),
        (
            ProcessPaymentRequest {
                payment_method_token: String::new(),
                ..base()
            },
            "payment_method_token",
        ),
        (
            ProcessPaymentRequest {
                idempotency_key: String::new(),
                ..base()
            },
            "idempotency_key",
        ),
        (
            ProcessPaymentRequest {
                idempotency_key: "k".repeat(129),
                ..base()
            },
            "idempotency_key",
        ),
    ];
    for (request, field) in cases {
        let error = p.process(request).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{field}");
        assert_eq!(violated_fields(&error), vec![field]);
    }
    let no_target = RefundPaymentRequest {
        target: None,
        idempotency_key: "k".into(),
        reason: String::new(),
    };
    assert_eq!(
        violated_fields(&p.refund(no_target).await.unwrap_err()),
        vec!["payment_id"]
    );
    assert_eq!(
        count(&stack, "SELECT count(*) FROM payments.payments").await,
        0
    );
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM payments.simulated_provider_charges"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn customers_see_their_own_payments_and_the_ledger_nets_refunds() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let p = payments(&stack).await;
    let customer_token = stack.customer_token("ada-pays@example.com").await.unwrap();
    let stranger_token = stack
        .customer_token("stranger-pays@example.com")
        .await
        .unwrap();
    let customer_id = {
        use base64::Engine as _;
        let payload = customer_token.split('.').nth(1).unwrap();
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap();
        claims["sub"].as_str().unwrap().to_owned()
    };
    let order_id = uuid::Uuid::new_v4().to_string();
    let attempt = |key: &str, token: &str| ProcessPaymentRequest {
        order_id: order_id.clone(),
        ..charge(key, token, eur(2000), &customer_id)
    };
    p.process(attempt("attempt-1", "tok_declined"))
        .await
        .unwrap();
    let first = p.process(attempt("attempt-2", "tok_visa")).await.unwrap();
    p.process(attempt("attempt-3", "tok_visa")).await.unwrap();
    p.refund(refund_of(&first.payment_id, "refund-attempt-2"))
        .await
        .unwrap();

    let list = ListPaymentsByOrderRequest {
        order_id: order_id.clone(),
    };
    let mine = stack
        .payments()
        .await
        .list_payments_by_order(bearer(list.clone(), &customer_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        mine.payments.iter().map(|p| p.status()).collect::<Vec<_>>(),
        vec![
            PaymentStatus::Declined,
            PaymentStatus::Refunded,
            PaymentStatus::Captured
        ]
    );
    let ledger = mine.ledger.unwrap();
    assert_eq!(
        (
            ledger.captured.unwrap().amount_minor,
            ledger.refunded.unwrap().amount_minor,
            ledger.net.unwrap().amount_minor
        ),
        (4000, 2000, 2000)
    );
    let theirs = stack
        .payments()
        .await
        .list_payments_by_order(bearer(list, &stranger_token))
        .await
        .unwrap()
        .into_inner();
    assert!(theirs.payments.is_empty() && theirs.ledger.is_none());

    let get = GetPaymentRequest {
        payment_id: first.payment_id.clone(),
    };
    let seen = stack
        .payments()
        .await
        .get_payment(bearer(get.clone(), &customer_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen.payment_id, first.payment_id);
    let hidden = stack
        .payments()
        .await
        .get_payment(bearer(get, &stranger_token))
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound);
    let forbidden = stack
        .payments()
        .await
        .process_payment(bearer(attempt("x", "tok_visa"), &customer_token))
        .await;
    assert_eq!(
        forbidden.unwrap_err().code(),
        Code::PermissionDenied,
        "customers cannot charge"
    );
}

#[tokio::test]
async fn captures_declines_and_refunds_reach_the_topic_with_the_correlation_id() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let p = payments(&stack).await;
    let reader = stack.reader(&stack.scenario.topics.payment_events());
    let with_flow = |request: ProcessPaymentRequest| {
        let mut request = bearer(request, &p.service);
        request
            .metadata_mut()
            .insert("x-correlation-id", "payment-flow".parse().unwrap());
        request
    };
    let captured = stack
        .payments()
        .await
        .process_payment(with_flow(charge("c", "tok_visa", eur(10), &customer())))
        .await
        .unwrap()
        .into_inner();
    stack
        .payments()
        .await
        .process_payment(with_flow(charge("d", "tok_declined", eur(10), &customer())))
        .await
        .unwrap();
    let mut refund = bearer(refund_of(&captured.payment_id, "r"), &p.service);
    refund
        .metadata_mut()
        .insert("x-correlation-id", "payment-flow".parse().unwrap());
    stack.payments().await.refund_payment(refund).await.unwrap();

    let records = reader.receive(3, Duration::from_secs(20)).await.unwrap();
    let mut types: Vec<String> = records
        .iter()
        .map(|record| {
            let envelope = EventEnvelope::decode(record.payload().unwrap()).unwrap();
            assert_eq!(envelope.correlation_id, "payment-flow");
            assert_eq!(
                header(record, "x-correlation-id").as_deref(),
                Some("payment-flow")
            );
            envelope.event_type
        })
        .collect();
    types.sort();
    assert_eq!(
        types,
        vec![
            "ordersaga.payment.v1.PaymentCaptured",
            "ordersaga.payment.v1.PaymentDeclined",
            "ordersaga.payment.v1.PaymentRefunded"
        ]
    );
}
