//! Racing requests for one charge key: however they interleave, the
//! provider charges at most once, a voided key never holds money, and a
//! refund is made once.

use std::time::Duration;

use api_payment::v1::PaymentStatus;
use futures::future::join_all;

use crate::support::{Service, charge, refund_of, undo};

#[tokio::test]
async fn racing_duplicates_of_a_slow_charge_ask_the_provider_once_and_get_one_payment() {
    let service = Service::start(&[("PROVIDER_SLOW_DELAY", "1s")]).await;
    let request = charge("dup", "tok_slow", 4999);
    let began = std::time::Instant::now();
    let results = join_all((0..20).map(|_| service.process(request.clone()))).await;
    // The waiting duplicates are woken when the charge is recorded, not when
    // its lease (request timeout + 5 s) would run out.
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "the duplicates answered {:?} after they were sent",
        began.elapsed()
    );
    let first = results[0].as_ref().unwrap();
    assert_eq!(first.status(), PaymentStatus::Captured);
    for result in &results {
        assert_eq!(
            result.as_ref().unwrap(),
            first,
            "every caller gets the one payment"
        );
    }
    assert_eq!(
        service.provider_attempts("dup").await,
        1,
        "the provider was asked once"
    );
    assert_eq!(
        service.held(&request.order_id).await,
        4999,
        "and holds one charge"
    );
    assert_eq!(
        service
            .count("SELECT count(*) FROM payments.payments")
            .await,
        1
    );
    assert_eq!(
        service
            .count(
                "SELECT provider_calls::bigint FROM payments.charge_claims WHERE charge_key = 'dup'"
            )
            .await,
        1
    );
}

#[tokio::test]
async fn a_void_during_a_charge_wins_for_good_and_nothing_is_held() {
    let service = Service::start(&[("PROVIDER_SLOW_DELAY", "2s")]).await;
    let request = charge("in-flight", "tok_slow", 2500);
    let charging = service.process(request.clone());
    let voiding = async {
        // The charge is at the provider, deciding.
        service
            .until_count(
                "SELECT count(*) FROM payments.simulated_provider_charges WHERE idempotency_key = 'in-flight'",
                1,
                Duration::from_secs(5),
            )
            .await;
        service.refund(undo("in-flight")).await
    };
    let (charged, voided) = tokio::join!(charging, voiding);
    let voided = voided.unwrap();
    assert_eq!(voided.status(), PaymentStatus::Voided);
    assert_eq!(
        charged.unwrap(),
        voided,
        "the late charge answers with the void"
    );
    assert_eq!(service.held(&request.order_id).await, 0);
    assert_eq!(
        service
            .count("SELECT count(*) FROM payments.payments")
            .await,
        1
    );
    // Retried, it still charges nothing, and never asks the provider again.
    for _ in 0..3 {
        assert_eq!(service.process(request.clone()).await.unwrap(), voided);
    }
    assert_eq!(service.provider_attempts("in-flight").await, 1);
    assert_eq!(service.held(&request.order_id).await, 0);
}

#[tokio::test]
async fn duplicates_and_voids_racing_on_one_key_leave_one_payment_and_nothing_held() {
    let service = Service::start(&[("PROVIDER_SLOW_DELAY", "300ms")]).await;
    for round in 0..5 {
        let key = format!("mixed-{round}");
        let request = charge(&key, "tok_slow", 700);
        let charges = join_all((0..8).map(|_| service.process(request.clone())));
        let voids = join_all((0..3).map(|_| service.refund(undo(&key))));
        let (charges, voids) = tokio::join!(charges, voids);
        let answers: Vec<_> = charges
            .into_iter()
            .chain(voids)
            .map(Result::unwrap)
            .collect();
        // Charges that answered before the void see the capture; everyone
        // after sees the void's outcome.
        let last = answers
            .iter()
            .find(|answer| answer.status() != PaymentStatus::Captured);
        let settled = last.unwrap_or_else(|| panic!("no void answered: {answers:?}"));
        assert!(
            matches!(
                settled.status(),
                PaymentStatus::Voided | PaymentStatus::Refunded
            ),
            "{settled:?}"
        );
        for answer in &answers {
            assert_eq!(answer.payment_id, settled.payment_id, "one payment per key");
        }
        assert_eq!(service.held(&request.order_id).await, 0, "round {round}");
        assert!(service.provider_attempts(&key).await <= 1, "round {round}");
    }
    assert_eq!(
        service
            .count("SELECT count(*) FROM payments.payments")
            .await,
        5
    );
}

#[tokio::test]
async fn refunds_racing_each_other_and_repeat_charges_refund_once() {
    let service = Service::start(&[]).await;
    let request = charge("to-refund", "tok_visa", 3000);
    let paid = service.process(request.clone()).await.unwrap();
    let by_id =
        (0..6).map(|n| service.refund(refund_of(&paid.payment_id, &format!("refund-{}", n % 2))));
    let by_key = (0..4).map(|_| service.refund(undo("to-refund")));
    let refunds = join_all(by_id.chain(by_key));
    let repeats = join_all((0..5).map(|_| service.process(request.clone())));
    let (refunds, repeats) = tokio::join!(refunds, repeats);
    let refunded = refunds[0].as_ref().unwrap();
    assert_eq!(refunded.status(), PaymentStatus::Refunded);
    for refund in &refunds {
        assert_eq!(refund.as_ref().unwrap(), refunded);
    }
    for repeat in repeats {
        assert_eq!(repeat.unwrap().payment_id, paid.payment_id);
    }
    assert_eq!(service.held(&request.order_id).await, 0);
    assert_eq!(
        service
            .count("SELECT refund_attempts::bigint FROM payments.simulated_provider_charges WHERE idempotency_key = 'to-refund'")
            .await,
        1,
        "the provider was asked to refund once"
    );
    assert_eq!(service.provider_attempts("to-refund").await, 1);
    // One capture and one refund announced, no more.
    let reader = service.events();
    reader.receive(2, Duration::from_secs(20)).await.unwrap();
    assert!(reader.next_within(Duration::from_secs(1)).await.is_none());
}
