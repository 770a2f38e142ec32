//! A large order held for review: approved or declined by an admin, each
//! decision once, and cancellable by its customer meanwhile.

use api_order::v1::OrderStatus;
use testkit::grpc::violated_fields;
use tonic::Code;

use crate::support::{Service, refused};

const PAYMENT: &str = "0193a000-0000-7000-8000-000000000001";

#[tokio::test]
async fn a_held_order_is_confirmed_only_after_an_admin_approves_it_once() {
    let service = Service::start().await;
    let tokens = &service.tokens;
    let order = service.place("review-approve").await;
    let held = service
        .hold(&order.order_id, &tokens.service)
        .await
        .unwrap();
    assert_eq!(held.status(), OrderStatus::PendingReview);
    // A retry of the hold changes nothing.
    assert_eq!(
        service
            .hold(&order.order_id, &tokens.service)
            .await
            .unwrap(),
        held
    );
    assert_eq!(
        service
            .get(&order.order_id, &tokens.customer)
            .await
            .unwrap(),
        held,
        "its customer sees it waiting for review"
    );
    assert_eq!(
        service.listed(OrderStatus::PendingReview).await,
        std::slice::from_ref(&order.order_id)
    );
    refused(
        service.confirm(&order.order_id, PAYMENT).await,
        "pending_review",
    );

    let approved = service
        .approve(&order.order_id, &tokens.admin)
        .await
        .unwrap();
    assert_eq!(approved.status(), OrderStatus::ReviewApproved);
    assert_eq!(
        service
            .approve(&order.order_id, &tokens.admin)
            .await
            .unwrap(),
        approved,
        "approving again changes nothing"
    );
    refused(
        service
            .decline(&order.order_id, "second thoughts", &tokens.admin)
            .await,
        "review_approved",
    );
    let confirmed = service.confirm(&order.order_id, PAYMENT).await.unwrap();
    assert_eq!(confirmed.status(), OrderStatus::Confirmed);
    refused(
        service.approve(&order.order_id, &tokens.admin).await,
        "confirmed",
    );
    assert_eq!(
        service.event_types(4).await,
        [
            "ordersaga.order.v1.OrderPlaced",
            "ordersaga.order.v1.OrderHeldForReview",
            "ordersaga.order.v1.OrderReviewApproved",
            "ordersaga.order.v1.OrderConfirmed",
        ]
    );
}

#[tokio::test]
async fn a_declined_order_keeps_its_reason_until_the_saga_rejects_it() {
    let service = Service::start().await;
    let tokens = &service.tokens;
    let order = service.place("review-decline").await;
    service
        .hold(&order.order_id, &tokens.service)
        .await
        .unwrap();
    let declined = service
        .decline(
            &order.order_id,
            "card used from three countries",
            &tokens.admin,
        )
        .await
        .unwrap();
    assert_eq!(declined.status(), OrderStatus::ReviewDeclined);
    assert_eq!(declined.status_reason, "card used from three countries");
    assert_eq!(
        service
            .decline(&order.order_id, "another reason", &tokens.admin)
            .await
            .unwrap(),
        declined,
        "declining again changes nothing; the first reason stands"
    );
    refused(
        service.approve(&order.order_id, &tokens.admin).await,
        "review_declined",
    );
    refused(
        service.confirm(&order.order_id, PAYMENT).await,
        "review_declined",
    );
    assert_eq!(
        service.listed(OrderStatus::ReviewDeclined).await,
        std::slice::from_ref(&order.order_id)
    );
    // The saga releases the payment, then rejects the order.
    let rejected = service
        .reject(&order.order_id, "declined in review")
        .await
        .unwrap();
    assert_eq!(rejected.status(), OrderStatus::Rejected);
    assert_eq!(
        service.event_types(4).await,
        [
            "ordersaga.order.v1.OrderPlaced",
            "ordersaga.order.v1.OrderHeldForReview",
            "ordersaga.order.v1.OrderReviewDeclined",
            "ordersaga.order.v1.OrderRejected",
        ]
    );
}

#[tokio::test]
async fn a_customer_may_cancel_an_order_waiting_for_its_review() {
    let service = Service::start().await;
    let tokens = &service.tokens;
    let order = service.place("review-cancel").await;
    service
        .hold(&order.order_id, &tokens.service)
        .await
        .unwrap();
    let asked = service.request_cancellation(&order.order_id).await.unwrap();
    assert_eq!(asked.status(), OrderStatus::CancellationRequested);
    assert_eq!(asked.status_reason, "found it cheaper");
    // Too late to decide the review: the saga undoes the order instead.
    refused(
        service.approve(&order.order_id, &tokens.admin).await,
        "cancellation_requested",
    );
    refused(
        service
            .decline(&order.order_id, "fraud", &tokens.admin)
            .await,
        "cancellation_requested",
    );
    let cancelled = service
        .cancel(&order.order_id, "cancelled by the customer")
        .await
        .unwrap();
    assert_eq!(cancelled.status(), OrderStatus::Cancelled);
}

#[tokio::test]
async fn only_the_saga_holds_only_an_admin_decides_and_only_a_held_order_is_decided() {
    let service = Service::start().await;
    let tokens = &service.tokens;
    let order = service.place("review-who").await;
    let before = service.stored_events().await;
    for token in [&tokens.customer, &tokens.admin] {
        let status = service.hold(&order.order_id, token).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    for token in [&tokens.customer, &tokens.service] {
        let status = service.approve(&order.order_id, token).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        let status = service
            .decline(&order.order_id, "no", token)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    // A placed order not held is not for an admin to decide.
    refused(
        service.approve(&order.order_id, &tokens.admin).await,
        "pending",
    );
    refused(
        service.decline(&order.order_id, "no", &tokens.admin).await,
        "pending",
    );
    let missing = service
        .approve(&uuid::Uuid::new_v4().to_string(), &tokens.admin)
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // Bad input names its field.
    let bad = service
        .approve("not-a-uuid", &tokens.admin)
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&bad), ["order_id"]);
    let bad = service.hold("", &tokens.service).await.unwrap_err();
    assert_eq!(violated_fields(&bad), ["order_id"]);
    for reason in ["", "   ", "nul\0inside", &"x".repeat(501)] {
        let bad = service
            .decline(&order.order_id, reason, &tokens.admin)
            .await
            .unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument, "{reason:?}");
        assert_eq!(violated_fields(&bad), ["reason"], "{reason:?}");
    }
    let bad = service
        .decline("nope", "", &tokens.admin)
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&bad), ["order_id", "reason"]);
    assert_eq!(service.stored_events().await, before, "nothing was written");
}

#[tokio::test]
async fn racing_decisions_leave_one_the_others_repeat_it_or_are_refused() {
    let service = Service::start().await;
    let tokens = &service.tokens;
    let order = service.place("review-race").await;
    service
        .hold(&order.order_id, &tokens.service)
        .await
        .unwrap();
    let before = service.stored_events().await;
    let (service, order_id) = (&service, order.order_id.as_str());
    let decisions = futures::future::join_all((0..10).map(|n| async move {
        if n % 2 == 0 {
            service.approve(order_id, &tokens.admin).await
        } else {
            service.decline(order_id, "too large", &tokens.admin).await
        }
    }))
    .await;
    let decided = service
        .get(&order.order_id, &tokens.customer)
        .await
        .unwrap();
    assert!(
        matches!(
            decided.status(),
            OrderStatus::ReviewApproved | OrderStatus::ReviewDeclined
        ),
        "{decided:?}"
    );
    for result in decisions {
        match result {
            Ok(answer) => assert_eq!(answer, decided, "every success agrees"),
            Err(status) => assert!(
                matches!(status.code(), Code::FailedPrecondition | Code::Aborted),
                "{status:?}"
            ),
        }
    }
    assert_eq!(
        service.stored_events().await,
        before + 1,
        "one decision recorded"
    );
}
