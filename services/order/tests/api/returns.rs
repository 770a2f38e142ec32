//! A confirmed order's return: asked for by its customer (or an admin),
//! once, then marked returned by the saga once its payment is refunded.

use api_order::v1::OrderStatus;
use api_order::v1::RebuildReadModelRequest;
use testkit::grpc::{bearer, violated_fields};
use tonic::Code;

use crate::support::{Service, refused};

const PAYMENT: &str = "0193a000-0000-7000-8000-000000000002";

#[tokio::test]
async fn a_confirmed_order_is_returned_once_with_its_reason_and_payment() {
    let service = Service::start().await;
    let tokens = &service.tokens;
    let order = service.place("return-once").await;
    service.confirm(&order.order_id, PAYMENT).await.unwrap();

    let asked = service
        .request_return(&order.order_id, "arrived broken", &tokens.customer)
        .await
        .unwrap();
    assert_eq!(asked.status(), OrderStatus::ReturnRequested);
    assert_eq!(asked.status_reason, "arrived broken");
    assert_eq!(asked.payment_id, PAYMENT, "the payment to refund");
    // Again, by its customer or an admin: unchanged.
    assert_eq!(
        service
            .request_return(&order.order_id, "arrived broken", &tokens.customer)
            .await
            .unwrap(),
        asked
    );
    assert_eq!(
        service
            .request_return(&order.order_id, "on the customer's behalf", &tokens.admin)
            .await
            .unwrap(),
        asked
    );
    // Someone else's order does not exist for them.
    let stranger = service
        .request_return(&order.order_id, "mine now", &tokens.stranger)
        .await
        .unwrap_err();
    assert_eq!(stranger.code(), Code::NotFound);
    // Only the saga marks it returned.
    for token in [&tokens.customer, &tokens.admin] {
        let status = service
            .mark_returned(&order.order_id, token)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    let returned = service
        .mark_returned(&order.order_id, &tokens.service)
        .await
        .unwrap();
    assert_eq!(returned.status(), OrderStatus::Returned);
    assert_eq!(returned.payment_id, PAYMENT);
    assert_eq!(
        service
            .mark_returned(&order.order_id, &tokens.service)
            .await
            .unwrap(),
        returned
    );
    assert_eq!(
        service.listed(OrderStatus::Returned).await,
        std::slice::from_ref(&order.order_id)
    );
    assert_eq!(
        service.event_types(4).await,
        [
            "ordersaga.order.v1.OrderPlaced",
            "ordersaga.order.v1.OrderConfirmed",
            "ordersaga.order.v1.OrderReturnRequested",
            "ordersaga.order.v1.OrderReturned",
        ]
    );
}

#[tokio::test]
async fn only_a_confirmed_order_is_returned_and_bad_input_writes_nothing() {
    let service = Service::start().await;
    let tokens = &service.tokens;
    let pending = service.place("return-pending").await;
    refused(
        service
            .request_return(&pending.order_id, "changed my mind", &tokens.customer)
            .await,
        "pending",
    );
    refused(
        service
            .mark_returned(&pending.order_id, &tokens.service)
            .await,
        "pending",
    );
    let confirmed = service.place("return-confirmed").await;
    service.confirm(&confirmed.order_id, PAYMENT).await.unwrap();
    refused(
        service
            .mark_returned(&confirmed.order_id, &tokens.service)
            .await,
        "confirmed",
    );
    let before = service.stored_events().await;
    for reason in ["", "nul\0", &"é".repeat(501)] {
        let bad = service
            .request_return(&confirmed.order_id, reason, &tokens.customer)
            .await
            .unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument, "{reason:?}");
        assert_eq!(violated_fields(&bad), ["reason"]);
    }
    let bad = service
        .mark_returned("x", &tokens.service)
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&bad), ["order_id"]);
    assert_eq!(service.stored_events().await, before, "nothing was written");
}

#[tokio::test]
async fn the_rebuilt_read_model_shows_every_new_state_as_before() {
    let service = Service::start().await;
    let tokens = &service.tokens;
    let in_review = service.place("rebuild-review").await;
    service
        .hold(&in_review.order_id, &tokens.service)
        .await
        .unwrap();
    let approved = service.place("rebuild-approved").await;
    service
        .hold(&approved.order_id, &tokens.service)
        .await
        .unwrap();
    service
        .approve(&approved.order_id, &tokens.admin)
        .await
        .unwrap();
    let declined = service.place("rebuild-declined").await;
    service
        .hold(&declined.order_id, &tokens.service)
        .await
        .unwrap();
    service
        .decline(&declined.order_id, "too large", &tokens.admin)
        .await
        .unwrap();
    let returning = service.place("rebuild-returning").await;
    service.confirm(&returning.order_id, PAYMENT).await.unwrap();
    service
        .request_return(&returning.order_id, "wrong size", &tokens.customer)
        .await
        .unwrap();
    let returned = service.place("rebuild-returned").await;
    service.confirm(&returned.order_id, PAYMENT).await.unwrap();
    service
        .request_return(&returned.order_id, "wrong colour", &tokens.customer)
        .await
        .unwrap();
    service
        .mark_returned(&returned.order_id, &tokens.service)
        .await
        .unwrap();
    let ids = [
        &in_review.order_id,
        &approved.order_id,
        &declined.order_id,
        &returning.order_id,
        &returned.order_id,
    ];
    let mut before = Vec::new();
    for id in ids {
        before.push(service.get(id, &tokens.customer).await.unwrap());
    }
    assert_eq!(
        before
            .iter()
            .map(|order| order.status())
            .collect::<Vec<_>>(),
        [
            OrderStatus::PendingReview,
            OrderStatus::ReviewApproved,
            OrderStatus::ReviewDeclined,
            OrderStatus::ReturnRequested,
            OrderStatus::Returned,
        ]
    );

    let rebuilt = service
        .client()
        .rebuild_read_model(bearer(RebuildReadModelRequest {}, &tokens.admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rebuilt.orders, 5);
    for (id, was) in ids.into_iter().zip(before) {
        assert_eq!(service.get(id, &tokens.customer).await.unwrap(), was);
    }
    assert_eq!(
        service.listed(OrderStatus::ReturnRequested).await,
        std::slice::from_ref(&returning.order_id)
    );
}
