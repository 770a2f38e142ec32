//! Retention of charge keys: the purge job deletes the claims of settled
//! keys and the simulated provider's settled keys while the service
//! serves, and a key whose claim is gone still charges at most once.

use std::time::Duration;

use api_payment::v1::PaymentStatus;

use crate::support::{Service, charge, refund_of, undo};

#[tokio::test]
async fn a_settled_key_whose_claim_was_purged_never_charges_again() {
    let service = Service::start(&[("PURGE_INTERVAL", "100ms"), ("PURGE_BATCH_SIZE", "2")]).await;
    let paid_request = charge("paid", "tok_visa", 2500);
    let paid = service.process(paid_request.clone()).await.unwrap();
    assert_eq!(paid.status(), PaymentStatus::Captured);
    let declined_request = charge("declined", "tok_declined", 1200);
    let declined = service.process(declined_request.clone()).await.unwrap();
    assert_eq!(declined.status(), PaymentStatus::Declined);
    let refunded_request = charge("refunded", "tok_visa", 700);
    let refunded = service.process(refunded_request.clone()).await.unwrap();
    service
        .refund(refund_of(&refunded.payment_id, "refund-1"))
        .await
        .unwrap();
    // A key claimed whose outcome was never recorded (its request lost):
    // in flight as far as anyone knows.
    service
        .count(
            "WITH claimed AS (
                 INSERT INTO payments.charge_claims (charge_key, intent, request_hash)
                 VALUES ('unsettled', 'charge', '\\x01') RETURNING 1)
             SELECT count(*) FROM claimed",
        )
        .await;

    // Time passes: every claim and every settled provider key is old.
    service
        .count(
            "WITH aged AS (
                 UPDATE payments.charge_claims SET updated_at = now() - interval '31 days' RETURNING 1)
             SELECT count(*) FROM aged",
        )
        .await;
    service
        .count(
            "WITH aged AS (
                 UPDATE payments.simulated_provider_charges SET settled_at = now() - interval '91 days'
                 WHERE settled_at IS NOT NULL RETURNING 1)
             SELECT count(*) FROM aged",
        )
        .await;
    service
        .until_count(
            "SELECT count(*) FROM payments.charge_claims",
            1,
            Duration::from_secs(20),
        )
        .await;
    service
        .until_count(
            "SELECT count(*) FROM payments.simulated_provider_charges",
            1,
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(
        service
            .count("SELECT count(*) FROM payments.charge_claims WHERE charge_key = 'unsettled'")
            .await,
        1,
        "a key without a recorded outcome keeps its claim"
    );
    assert_eq!(
        service.provider_attempts("paid").await,
        1,
        "the provider keeps the key whose money it holds"
    );
    assert_eq!(
        service
            .count("SELECT count(*) FROM payments.payments")
            .await,
        3,
        "the ledger is never purged"
    );

    // Retries of every settled key answer from the payment and ask the
    // provider nothing.
    assert_eq!(service.process(paid_request.clone()).await.unwrap(), paid);
    assert_eq!(service.process(declined_request).await.unwrap(), declined);
    let retried = service.process(refunded_request).await.unwrap();
    assert_eq!(retried.status(), PaymentStatus::Refunded);
    let undone = service.refund(undo("declined")).await.unwrap();
    assert_eq!(undone.payment_id, declined.payment_id);
    assert_eq!(service.provider_attempts("paid").await, 1);
    assert_eq!(
        service
            .count(
                "SELECT count(*) FROM payments.simulated_provider_charges
                 WHERE idempotency_key IN ('declined', 'refunded')"
            )
            .await,
        0,
        "nobody asked the provider about the keys it forgot"
    );
    assert_eq!(
        service
            .count("SELECT count(*) FROM payments.charge_claims WHERE charge_key <> 'unsettled'")
            .await,
        0,
        "no claim was taken for a settled key"
    );

    // The captured key can still be undone: it is claimed afresh and
    // refunded once.
    let undone = service.refund(undo("paid")).await.unwrap();
    assert_eq!(undone.status(), PaymentStatus::Refunded);
    assert_eq!(service.held(&paid_request.order_id).await, 0);
    assert_eq!(
        service.process(paid_request).await.unwrap().status(),
        PaymentStatus::Refunded
    );
}

#[tokio::test]
async fn an_authorization_whose_claim_was_purged_is_still_captured_or_voided_once() {
    use crate::support::{authorization, capture_of, void_of};
    let service = Service::start(&[("PURGE_INTERVAL", "100ms")]).await;
    let to_capture = authorization("auth-purged-1", "tok_visa", 800);
    let held = service.authorize(to_capture.clone()).await.unwrap();
    let to_void = authorization("auth-purged-2", "tok_visa", 900);
    let other = service.authorize(to_void.clone()).await.unwrap();
    // Time passes: the authorizations' claims are old (the holds are not).
    service
        .count(
            "WITH aged AS (
                 UPDATE payments.charge_claims SET updated_at = now() - interval '31 days' RETURNING 1)
             SELECT count(*) FROM aged",
        )
        .await;
    service
        .until_count(
            "SELECT count(*) FROM payments.charge_claims",
            0,
            Duration::from_secs(20),
        )
        .await;

    let captured = service.capture(capture_of(&held.payment_id)).await.unwrap();
    assert_eq!(captured.status(), PaymentStatus::Captured);
    assert_eq!(service.held(&to_capture.order_id).await, 800);
    let voided = service.void(void_of(&other.payment_id)).await.unwrap();
    assert_eq!(voided.status(), PaymentStatus::Voided);
    assert_eq!(service.authorized(&to_void.order_id).await, 0);
    // And a repeat of the authorization answers from the record.
    assert_eq!(
        service.authorize(to_capture).await.unwrap().status(),
        PaymentStatus::Captured
    );
    assert_eq!(service.provider_attempts("auth-purged-1").await, 1);
}
