//! Authorizations through the API, checked against the provider's books:
//! what it holds (`authorized_minor`) and what it took (`held_minor`).

use std::time::Duration;

use api_payment::v1::{GetPaymentRequest, PaymentKind, PaymentStatus};
use futures::future::join_all;
use testkit::grpc::bearer;
use tonic::Code;

use crate::support::{
    Service, authorization, capture_by_key, capture_of, charge, refund_of, void_by_key, void_of,
};

#[tokio::test]
async fn racing_duplicates_of_an_authorization_hold_once_and_get_one_payment() {
    let service = Service::start(&[("PROVIDER_SLOW_DELAY", "1s")]).await;
    let request = authorization("auth-dup", "tok_slow", 4999);
    let results = join_all((0..12).map(|_| service.authorize(request.clone()))).await;
    let first = results[0].as_ref().unwrap();
    assert_eq!(first.status(), PaymentStatus::Authorized);
    assert_eq!(first.kind(), PaymentKind::Authorization);
    assert!(first.authorization_expires_at.is_some());
    for result in &results {
        assert_eq!(result.as_ref().unwrap(), first, "one payment for all");
    }
    // Asked again later with the same key: the same answer, from our record.
    assert_eq!(&service.authorize(request.clone()).await.unwrap(), first);
    assert_eq!(service.provider_attempts("auth-dup").await, 1);
    assert_eq!(
        service.authorized(&request.order_id).await,
        4999,
        "one hold"
    );
    assert_eq!(service.held(&request.order_id).await, 0, "nothing taken");
    assert_eq!(
        service
            .count("SELECT count(*) FROM payments.payments")
            .await,
        1
    );
    assert_eq!(
        service.event_types(1).await,
        ["ordersaga.payment.v1.PaymentAuthorized"]
    );
}

#[tokio::test]
async fn a_capture_takes_the_amount_once_a_repeat_answers_the_same_and_a_refund_gives_it_back() {
    let service = Service::start(&[]).await;
    let request = authorization("auth-cap", "tok_visa", 2500);
    let held = service.authorize(request.clone()).await.unwrap();

    // Racing captures, by id and by key: one capture at the provider.
    let captures = join_all((0..6).map(|n| {
        let capture = if n % 2 == 0 {
            capture_of(&held.payment_id)
        } else {
            capture_by_key("auth-cap")
        };
        service.capture(capture)
    }))
    .await;
    let captured = captures[0].as_ref().unwrap();
    assert_eq!(captured.status(), PaymentStatus::Captured);
    assert_eq!(captured.payment_id, held.payment_id);
    assert!(captured.captured_at.is_some());
    for result in &captures {
        assert_eq!(result.as_ref().unwrap(), captured);
    }
    assert_eq!(
        &service.capture(capture_of(&held.payment_id)).await.unwrap(),
        captured
    );
    assert_eq!(service.authorized(&request.order_id).await, 0);
    assert_eq!(service.held(&request.order_id).await, 2500, "taken once");
    assert_eq!(
        service
            .count(
                "SELECT capture_attempts::bigint FROM payments.simulated_provider_charges
                 WHERE idempotency_key = 'auth-cap'"
            )
            .await,
        1,
        "the provider was asked to capture once"
    );
    let ledger = service
        .client()
        .list_payments_by_order(bearer(
            api_payment::v1::ListPaymentsByOrderRequest {
                order_id: request.order_id.clone(),
            },
            &service.service_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .ledger
        .unwrap();
    assert_eq!(ledger.net.unwrap().amount_minor, 2500);

    // Captured: a void is refused, a refund is what undoes it.
    let refused = service.void(void_of(&held.payment_id)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("refund"), "{refused:?}");
    assert_eq!(service.held(&request.order_id).await, 2500);
    let refunded = service
        .refund(refund_of(&held.payment_id, "refund-cap"))
        .await
        .unwrap();
    assert_eq!(refunded.status(), PaymentStatus::Refunded);
    assert_eq!(service.held(&request.order_id).await, 0);
    // Capturing it again answers with what it came to; nothing is taken.
    assert_eq!(
        service
            .capture(capture_of(&held.payment_id))
            .await
            .unwrap()
            .status(),
        PaymentStatus::Refunded
    );
    assert_eq!(service.held(&request.order_id).await, 0);
    assert_eq!(
        service.event_types(3).await,
        [
            "ordersaga.payment.v1.PaymentAuthorized",
            "ordersaga.payment.v1.PaymentCaptured",
            "ordersaga.payment.v1.PaymentRefunded",
        ]
    );
}

#[tokio::test]
async fn a_void_releases_the_hold_and_a_capture_after_it_is_refused_saying_so() {
    let service = Service::start(&[]).await;
    let request = authorization("auth-void", "tok_visa", 1800);
    let held = service.authorize(request.clone()).await.unwrap();
    assert_eq!(service.authorized(&request.order_id).await, 1800);

    let voided = service.void(void_of(&held.payment_id)).await.unwrap();
    assert_eq!(voided.status(), PaymentStatus::Voided);
    assert!(voided.voided_at.is_some());
    assert_eq!(voided.amount, request.amount, "it keeps what it was for");
    assert_eq!(
        service.authorized(&request.order_id).await,
        0,
        "nothing held"
    );
    // Again, by id or by key: the same answer.
    assert_eq!(
        service.void(void_of(&held.payment_id)).await.unwrap(),
        voided
    );
    assert_eq!(
        service.void(void_by_key("auth-void")).await.unwrap(),
        voided
    );

    let refused = service
        .capture(capture_of(&held.payment_id))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("voided"), "{refused:?}");
    assert_eq!(service.held(&request.order_id).await, 0, "nothing taken");
    assert_eq!(service.authorized(&request.order_id).await, 0);
    // A refund of a voided authorization answers with it, moving nothing.
    assert_eq!(
        service
            .refund(refund_of(&held.payment_id, "refund-void"))
            .await
            .unwrap(),
        voided
    );
    assert_eq!(
        service.event_types(2).await,
        [
            "ordersaga.payment.v1.PaymentAuthorized",
            "ordersaga.payment.v1.PaymentVoided",
        ]
    );
}

#[tokio::test]
async fn a_lapsed_authorization_holds_nothing_and_its_capture_is_refused_saying_it_expired() {
    let service = Service::start(&[("AUTHORIZATION_LIFETIME", "1s")]).await;
    let request = authorization("auth-lapse", "tok_visa", 990);
    let held = service.authorize(request.clone()).await.unwrap();
    assert_eq!(held.status(), PaymentStatus::Authorized);
    assert_eq!(service.authorized(&request.order_id).await, 990);
    tokio::time::sleep(Duration::from_millis(1300)).await;

    // Read before anyone recorded it: it shows as lapsed.
    let read = service
        .client()
        .get_payment(bearer(
            GetPaymentRequest {
                payment_id: held.payment_id.clone(),
            },
            &service.service_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.status(), PaymentStatus::Expired);
    assert_eq!(service.authorized(&request.order_id).await, 0);

    let refused = service
        .capture(capture_of(&held.payment_id))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("expired"), "{refused:?}");
    assert_eq!(service.held(&request.order_id).await, 0, "nothing taken");
    assert_eq!(
        service
            .count("SELECT count(*) FROM payments.payments WHERE status = 'expired'")
            .await,
        1,
        "the capture recorded the expiry"
    );
    // Refused again, without asking the provider; a void answers with it.
    assert_eq!(
        service
            .capture(capture_by_key("auth-lapse"))
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        service
            .void(void_by_key("auth-lapse"))
            .await
            .unwrap()
            .status(),
        PaymentStatus::Expired
    );
    assert_eq!(
        service.event_types(2).await,
        [
            "ordersaga.payment.v1.PaymentAuthorized",
            "ordersaga.payment.v1.PaymentAuthorizationExpired",
        ]
    );
}

#[tokio::test]
async fn a_capture_the_provider_fails_transiently_is_unavailable_and_its_retry_captures() {
    let service = Service::start(&[]).await;
    let request = authorization("auth-flaky", "tok_capture_fails_once", 700);
    let held = service.authorize(request.clone()).await.unwrap();
    let failed = service
        .capture(capture_of(&held.payment_id))
        .await
        .unwrap_err();
    assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
    assert_eq!(
        service.authorized(&request.order_id).await,
        700,
        "still held"
    );
    let captured = service.capture(capture_of(&held.payment_id)).await.unwrap();
    assert_eq!(captured.status(), PaymentStatus::Captured);
    assert_eq!(service.held(&request.order_id).await, 700);
}

#[tokio::test]
async fn a_void_by_the_key_of_an_authorization_never_seen_voids_it_for_good() {
    let service = Service::start(&[]).await;
    let voided = service.void(void_by_key("auth-lost")).await.unwrap();
    assert_eq!(voided.status(), PaymentStatus::Voided);
    // The authorization arrives late: it holds nothing and answers with
    // the void.
    let request = authorization("auth-lost", "tok_visa", 1200);
    assert_eq!(service.authorize(request.clone()).await.unwrap(), voided);
    assert_eq!(service.authorized(&request.order_id).await, 0);
    assert_eq!(service.provider_attempts("auth-lost").await, 0);
    // And nothing was announced: no money moved.
    assert!(
        service
            .events()
            .next_within(Duration::from_secs(1))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn a_void_by_key_releases_a_hold_whose_answer_was_lost_and_records_it() {
    let service = Service::start(&[]).await;
    // The provider holds the amount, but every answer saying so is lost.
    let request = authorization("auth-lost-answer", "tok_capture_answer_lost", 1600);
    for _ in 0..2 {
        let lost = service.authorize(request.clone()).await.unwrap_err();
        assert_eq!(lost.code(), Code::Unavailable, "{lost:?}");
    }
    assert_eq!(service.authorized(&request.order_id).await, 1600);
    assert_eq!(
        service
            .count("SELECT count(*) FROM payments.payments")
            .await,
        0
    );

    // The saga's compensation voids by key: the provider releases the hold
    // and says what it was; it is recorded authorized, then voided.
    let voided = service.void(void_by_key("auth-lost-answer")).await.unwrap();
    assert_eq!(voided.status(), PaymentStatus::Voided);
    assert_eq!(voided.kind(), PaymentKind::Authorization);
    assert_eq!(voided.order_id, request.order_id, "what the provider held");
    assert_eq!(voided.amount, request.amount);
    assert_eq!(service.authorized(&request.order_id).await, 0);
    assert_eq!(service.held(&request.order_id).await, 0);
    assert_eq!(service.authorize(request).await.unwrap(), voided);
    assert_eq!(
        service.event_types(2).await,
        [
            "ordersaga.payment.v1.PaymentAuthorized",
            "ordersaga.payment.v1.PaymentVoided",
        ]
    );
}

#[tokio::test]
async fn a_charge_key_is_no_authorization_and_a_charge_cannot_be_captured_or_voided() {
    let service = Service::start(&[]).await;
    let sale = charge("sale-1", "tok_visa", 500);
    let paid = service.process(sale.clone()).await.unwrap();
    assert_eq!(paid.kind(), PaymentKind::Charge);
    let same_fields = api_payment::v1::AuthorizePaymentRequest {
        order_id: sale.order_id.clone(),
        customer_id: sale.customer_id.clone(),
        amount: sale.amount,
        payment_method_token: sale.payment_method_token.clone(),
        idempotency_key: sale.idempotency_key.clone(),
    };
    let reused = service.authorize(same_fields).await.unwrap_err();
    assert_eq!(reused.code(), Code::FailedPrecondition, "{reused:?}");

    let not_held = service
        .capture(capture_of(&paid.payment_id))
        .await
        .unwrap_err();
    assert_eq!(not_held.code(), Code::FailedPrecondition);
    assert!(
        not_held.message().contains("not an authorization"),
        "{not_held:?}"
    );
    let taken = service.void(void_of(&paid.payment_id)).await.unwrap_err();
    assert_eq!(taken.code(), Code::FailedPrecondition);
    assert!(taken.message().contains("refund"), "{taken:?}");
    assert_eq!(service.held(&sale.order_id).await, 500, "unchanged");

    // An authorization is refunded only once captured: before, it is
    // voided.
    let held = service
        .authorize(authorization("auth-2", "tok_visa", 300))
        .await
        .unwrap();
    let refused = service
        .refund(refund_of(&held.payment_id, "refund-early"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("void"), "{refused:?}");

    let missing = service
        .capture(capture_by_key("never-authorized"))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test]
async fn a_declined_authorization_holds_nothing_and_cannot_be_captured() {
    let service = Service::start(&[]).await;
    let request = authorization("auth-declined", "tok_insufficient_funds", 400);
    let declined = service.authorize(request.clone()).await.unwrap();
    assert_eq!(declined.status(), PaymentStatus::Declined);
    assert_eq!(declined.decline_reason, "insufficient_funds");
    let refused = service
        .capture(capture_of(&declined.payment_id))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("declined"), "{refused:?}");
    assert_eq!(
        service.void(void_of(&declined.payment_id)).await.unwrap(),
        declined
    );
    assert_eq!(service.authorized(&request.order_id).await, 0);
    assert_eq!(service.held(&request.order_id).await, 0);
}
