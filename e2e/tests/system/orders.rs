//! The order service through its gRPC API with the real binaries: read your
//! own writes, idempotent creation (also under concurrency), validation,
//! privacy between customers, paging, the command paths, concurrent
//! commands on one order, the read model rebuild, old events, and events
//! on the topic.

use std::time::Duration;

use api_order::v1::{
    CancelOrderRequest, ConfirmOrderRequest, CreateOrderRequest, GetOrderRequest,
    ListOrdersRequest, Order, OrderStatus, RebuildReadModelRequest, RejectOrderRequest,
    RequestOrderCancellationRequest,
};
use dev_stack::header;
use e2e::{Stack, line, order_request};
use messaging::EventEnvelope;
use prost::{Message as _, Name as _};
use rdkafka::Message as _;
use testkit::grpc::{bearer, violated_fields};
use tonic::Code;

async fn create(
    stack: &Stack,
    token: &str,
    request: CreateOrderRequest,
) -> Result<Order, tonic::Status> {
    stack
        .orders()
        .await
        .create_order(bearer(request, token))
        .await
        .map(tonic::Response::into_inner)
}

async fn get(stack: &Stack, token: &str, order_id: &str) -> Result<Order, tonic::Status> {
    let request = GetOrderRequest {
        order_id: order_id.to_owned(),
    };
    stack
        .orders()
        .await
        .get_order(bearer(request, token))
        .await
        .map(tonic::Response::into_inner)
}

async fn count(stack: &Stack, sql: &'static str) -> i64 {
    let pool = stack.scenario.inspect().await.unwrap();
    let n: i64 = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
    pool.close().await;
    n
}

/// Every row of the read model, in a comparable form.
async fn read_model(stack: &Stack) -> Vec<String> {
    let pool = stack.scenario.inspect().await.unwrap();
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT row_to_json(v)::text FROM orders.order_view v ORDER BY order_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    rows
}

#[tokio::test]
async fn a_created_order_is_readable_at_once_and_totals_its_lines() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let token = stack.customer_token("ada@example.com").await.unwrap();
    let created = create(&stack, &token, order_request("first-order", "tok_visa"))
        .await
        .unwrap();
    assert_eq!(created.status(), OrderStatus::Pending);
    assert_eq!(created.total.as_ref().unwrap().amount_minor, 2 * 1300 + 199);
    assert_eq!(created.total.as_ref().unwrap().currency, "EUR");
    assert_eq!(created.version, 1);
    assert!(!created.correlation_id.is_empty());

    let read = get(&stack, &token, &created.order_id).await.unwrap();
    assert_eq!(
        read, created,
        "the reply to CreateOrder is what GetOrder reads"
    );
}

#[tokio::test]
async fn the_same_idempotency_key_returns_the_first_order_and_a_different_request_is_refused() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let token = stack.customer_token("grace@example.com").await.unwrap();
    let first = create(&stack, &token, order_request("key-1", "tok_visa"))
        .await
        .unwrap();
    let again = create(&stack, &token, order_request("key-1", "tok_visa"))
        .await
        .unwrap();
    assert_eq!(again, first);

    let mut different = order_request("key-1", "tok_visa");
    different.items[0].quantity = 3;
    let refused = create(&stack, &token, different).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);

    // Keys belong to their customer: another customer may use the same one.
    let other = stack.customer_token("other@example.com").await.unwrap();
    let theirs = create(&stack, &other, order_request("key-1", "tok_visa"))
        .await
        .unwrap();
    assert_ne!(theirs.order_id, first.order_id);
    assert_eq!(count(&stack, "SELECT count(*) FROM orders.events").await, 2);
}

#[tokio::test]
async fn concurrent_duplicate_creates_make_exactly_one_order() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let token = stack.customer_token("alan@example.com").await.unwrap();
    let attempts: Vec<_> = (0..20)
        .map(|_| {
            let stack = &stack;
            let token = token.clone();
            async move { create(stack, &token, order_request("double-click", "tok_visa")).await }
        })
        .collect();
    let orders = futures::future::join_all(attempts).await;
    let first = orders[0].as_ref().unwrap();
    for order in &orders {
        assert_eq!(
            order.as_ref().unwrap(),
            first,
            "every duplicate gets the one order"
        );
    }
    assert_eq!(count(&stack, "SELECT count(*) FROM orders.events").await, 1);
    assert_eq!(
        count(&stack, "SELECT count(*) FROM orders.order_view").await,
        1
    );
    assert_eq!(
        count(&stack, "SELECT count(*) FROM orders.idempotency_keys").await,
        1
    );
}

#[tokio::test]
async fn invalid_orders_name_every_bad_field_and_write_nothing() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let token = stack.customer_token("barbara@example.com").await.unwrap();
    let base = || order_request("valid-key", "tok_visa");
    let cases: Vec<(CreateOrderRequest, Vec<&str>)> = vec![
        (
            CreateOrderRequest {
                idempotency_key: String::new(),
                ..base()
            },
            vec!["idempotency_key"],
        ),
        (
            CreateOrderRequest {
                items: vec![],
                ..base()
            },
            vec!["items"],
        ),
        (
            CreateOrderRequest {
                items: vec![line("A", 1, 100, "EUR"); 51],
                ..base()
            },
            vec!["items"],
        ),
        (
            CreateOrderRequest {
                payment_method_token: String::new(),
                ..base()
            },
            vec!["payment_method_token"],
        ),
        (
            CreateOrderRequest {
                items: vec![line("bad sku!", 1, 100, "EUR")],
                ..base()
            },
            vec!["items[0].sku"],
        ),
        (
            CreateOrderRequest {
                items: vec![line("A", 0, 100, "EUR")],
                ..base()
            },
            vec!["items[0].quantity"],
        ),
        (
            CreateOrderRequest {
                items: vec![line("A", 1001, 100, "EUR")],
                ..base()
            },
            vec!["items[0].quantity"],
        ),
        (
            CreateOrderRequest {
                items: vec![line("A", 1, 0, "EUR")],
                ..base()
            },
            vec!["items[0].unit_price.amount_minor"],
        ),
        (
            CreateOrderRequest {
                items: vec![line("A", 1, -5, "EUR")],
                ..base()
            },
            vec!["items[0].unit_price.amount_minor"],
        ),
        (
            CreateOrderRequest {
                items: vec![line("A", 1, 100, "EUD")],
                ..base()
            },
            vec!["items[0].unit_price.currency"],
        ),
        (
            CreateOrderRequest {
                items: vec![line("A", 1, 100, "EUR"), line("B", 1, 100, "USD")],
                ..base()
            },
            vec!["items"],
        ),
        (
            CreateOrderRequest {
                items: vec![line("A", 1000, 1_000_000_000_000, "EUR")],
                ..base()
            },
            vec!["items"],
        ),
        (
            CreateOrderRequest {
                idempotency_key: String::new(),
                items: vec![line("", 0, 100, "EUR"), line("B", 1, 100, "XXX")],
                payment_method_token: String::new(),
            },
            vec![
                "idempotency_key",
                "payment_method_token",
                "items[0].sku",
                "items[0].quantity",
                "items[1].unit_price.currency",
            ],
        ),
    ];
    for (request, fields) in cases {
        let error = create(&stack, &token, request).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{fields:?}: {error:?}");
        assert_eq!(violated_fields(&error), fields, "{error:?}");
    }
    let missing_price = CreateOrderRequest {
        items: vec![api_order::v1::LineItem {
            sku: "A".into(),
            quantity: 1,
            unit_price: None,
        }],
        ..base()
    };
    assert_eq!(
        violated_fields(&create(&stack, &token, missing_price).await.unwrap_err()),
        vec!["items[0].unit_price"]
    );
    let bad_id = get(&stack, &token, "not-a-uuid").await.unwrap_err();
    assert_eq!(
        (bad_id.code(), violated_fields(&bad_id)),
        (Code::InvalidArgument, vec!["order_id".to_owned()])
    );

    assert_eq!(count(&stack, "SELECT count(*) FROM orders.events").await, 0);
    assert_eq!(
        count(&stack, "SELECT count(*) FROM orders.idempotency_keys").await,
        0
    );
    assert_eq!(count(&stack, "SELECT count(*) FROM orders.outbox").await, 0);
}

#[tokio::test]
async fn another_customers_order_is_invisible() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let owner = stack.customer_token("owner@example.com").await.unwrap();
    let stranger = stack.customer_token("stranger@example.com").await.unwrap();
    let order = create(&stack, &owner, order_request("mine", "tok_visa"))
        .await
        .unwrap();

    assert_eq!(
        get(&stack, &stranger, &order.order_id)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let cancel = RequestOrderCancellationRequest {
        order_id: order.order_id.clone(),
        reason: String::new(),
    };
    let error = stack
        .orders()
        .await
        .request_order_cancellation(bearer(cancel, &stranger))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    let listed = stack
        .orders()
        .await
        .list_orders(bearer(ListOrdersRequest::default(), &stranger))
        .await
        .unwrap();
    assert!(listed.into_inner().orders.is_empty());

    // The owner and an admin see it; the stranger's attempt changed nothing.
    assert_eq!(
        get(&stack, &owner, &order.order_id).await.unwrap().status(),
        OrderStatus::Pending
    );
    let admin = stack.admin_token().await.unwrap();
    assert_eq!(
        get(&stack, &admin, &order.order_id).await.unwrap().order_id,
        order.order_id
    );
}

#[tokio::test]
async fn orders_are_listed_newest_first_in_pages_and_filtered_by_status() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let token = stack.customer_token("edsger@example.com").await.unwrap();
    let mut created = Vec::new();
    for n in 0..7 {
        created.push(
            create(
                &stack,
                &token,
                order_request(&format!("order-{n}"), "tok_visa"),
            )
            .await
            .unwrap()
            .order_id,
        );
    }
    let cancel = RequestOrderCancellationRequest {
        order_id: created[2].clone(),
        reason: "changed my mind".into(),
    };
    stack
        .orders()
        .await
        .request_order_cancellation(bearer(cancel, &token))
        .await
        .unwrap();

    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = ListOrdersRequest {
            page_size: 3,
            page_token: page_token.clone(),
            ..Default::default()
        };
        let page = stack
            .orders()
            .await
            .list_orders(bearer(request, &token))
            .await
            .unwrap()
            .into_inner();
        assert!(page.orders.len() <= 3);
        seen.extend(page.orders.into_iter().map(|order| order.order_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);

    let request = ListOrdersRequest {
        status: OrderStatus::CancellationRequested.into(),
        ..Default::default()
    };
    let filtered = stack
        .orders()
        .await
        .list_orders(bearer(request, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        filtered
            .orders
            .iter()
            .map(|o| o.order_id.clone())
            .collect::<Vec<_>>(),
        vec![created[2].clone()]
    );

    for (request, field) in [
        (
            ListOrdersRequest {
                page_size: 101,
                ..Default::default()
            },
            "page_size",
        ),
        (
            ListOrdersRequest {
                page_token: "forged".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            ListOrdersRequest {
                status: 42,
                ..Default::default()
            },
            "status",
        ),
    ] {
        let error = stack
            .orders()
            .await
            .list_orders(bearer(request, &token))
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&error), vec![field]);
    }
}

#[tokio::test]
async fn the_command_paths_of_an_order() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let customer = stack.customer_token("linus@example.com").await.unwrap();
    let service = stack.service_token().await.unwrap();
    let payment_id = uuid::Uuid::new_v4().to_string();
    let mut orders = stack.orders().await;

    // Confirmed, idempotently; then the customer can no longer cancel it.
    let paid = create(&stack, &customer, order_request("paid", "tok_visa"))
        .await
        .unwrap();
    let confirm = ConfirmOrderRequest {
        order_id: paid.order_id.clone(),
        payment_id: payment_id.clone(),
    };
    let confirmed = orders
        .confirm_order(bearer(confirm.clone(), &service))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            confirmed.status(),
            confirmed.payment_id.as_str(),
            confirmed.version
        ),
        (OrderStatus::Confirmed, payment_id.as_str(), 2)
    );
    let again = orders
        .confirm_order(bearer(confirm, &service))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.version, 2, "confirming twice records nothing more");
    let other_payment = ConfirmOrderRequest {
        order_id: paid.order_id.clone(),
        payment_id: uuid::Uuid::new_v4().to_string(),
    };
    assert_eq!(
        orders
            .confirm_order(bearer(other_payment, &service))
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    let cancel = RequestOrderCancellationRequest {
        order_id: paid.order_id.clone(),
        reason: String::new(),
    };
    let error = orders
        .request_order_cancellation(bearer(cancel, &customer))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert!(error.message().contains("confirmed"), "{}", error.message());

    // Rejected when payment fails.
    let declined = create(&stack, &customer, order_request("declined", "tok_declined"))
        .await
        .unwrap();
    let reject = RejectOrderRequest {
        order_id: declined.order_id.clone(),
        reason: "card_declined".into(),
    };
    let rejected = orders
        .reject_order(bearer(reject, &service))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (rejected.status(), rejected.status_reason.as_str()),
        (OrderStatus::Rejected, "card_declined")
    );

    // Cancellation asked by the customer, carried out by the saga; a
    // cancelled order cannot be confirmed.
    let unwanted = create(&stack, &customer, order_request("unwanted", "tok_visa"))
        .await
        .unwrap();
    let cancel = RequestOrderCancellationRequest {
        order_id: unwanted.order_id.clone(),
        reason: "changed my mind".into(),
    };
    let requested = orders
        .request_order_cancellation(bearer(cancel.clone(), &customer))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(requested.status(), OrderStatus::CancellationRequested);
    assert_eq!(
        orders
            .request_order_cancellation(bearer(cancel, &customer))
            .await
            .unwrap()
            .into_inner()
            .version,
        2
    );
    let abort = CancelOrderRequest {
        order_id: unwanted.order_id.clone(),
        reason: "cancelled by the customer".into(),
    };
    let cancelled = orders
        .cancel_order(bearer(abort, &service))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.status(), OrderStatus::Cancelled);
    let confirm = ConfirmOrderRequest {
        order_id: unwanted.order_id.clone(),
        payment_id,
    };
    assert_eq!(
        orders
            .confirm_order(bearer(confirm, &service))
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );

    let unknown = ConfirmOrderRequest {
        order_id: uuid::Uuid::new_v4().to_string(),
        payment_id: uuid::Uuid::new_v4().to_string(),
    };
    assert_eq!(
        orders
            .confirm_order(bearer(unknown, &service))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let no_reason = RejectOrderRequest {
        order_id: declined.order_id,
        reason: String::new(),
    };
    assert_eq!(
        violated_fields(
            &orders
                .reject_order(bearer(no_reason, &service))
                .await
                .unwrap_err()
        ),
        vec!["reason"]
    );
}

#[tokio::test]
async fn fifty_concurrent_commands_on_one_order_leave_one_outcome_and_no_gap() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let customer = stack.customer_token("margaret@example.com").await.unwrap();
    let service = stack.service_token().await.unwrap();
    let order = create(&stack, &customer, order_request("contested", "tok_visa"))
        .await
        .unwrap();
    let payment_id = uuid::Uuid::new_v4().to_string();

    // Half the callers confirm, half ask to cancel, all at once: the two
    // outcomes exclude each other, so exactly one may be recorded.
    let calls: Vec<_> = (0..50)
        .map(|n| {
            let stack = &stack;
            let (customer, service, order_id, payment_id) =
                (&customer, &service, &order.order_id, &payment_id);
            async move {
                let mut orders = stack.orders().await;
                let outcome = if n % 2 == 0 {
                    let request = ConfirmOrderRequest {
                        order_id: order_id.clone(),
                        payment_id: payment_id.clone(),
                    };
                    orders.confirm_order(bearer(request, service)).await
                } else {
                    let request = RequestOrderCancellationRequest {
                        order_id: order_id.clone(),
                        reason: String::new(),
                    };
                    orders
                        .request_order_cancellation(bearer(request, customer))
                        .await
                };
                outcome
                    .map(|reply| reply.into_inner().status())
                    .map_err(|status| status.code())
            }
        })
        .collect();
    let outcomes = futures::future::join_all(calls).await;
    let succeeded: Vec<OrderStatus> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().ok().copied())
        .collect();
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Ok(_) | Err(Code::FailedPrecondition))),
        "{outcomes:?}"
    );
    assert!(!succeeded.is_empty());
    assert!(
        succeeded.iter().all(|status| *status == succeeded[0]),
        "one outcome won: {succeeded:?}"
    );

    let pool = stack.scenario.inspect().await.unwrap();
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM orders.events ORDER BY version")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        versions,
        vec![1, 2],
        "the placement and the one outcome, nothing lost or doubled"
    );
    let stored = get(&stack, &customer, &order.order_id).await.unwrap();
    assert_eq!((stored.status(), stored.version), (succeeded[0], 2));
}

#[tokio::test]
async fn the_rebuilt_read_model_equals_the_live_one() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let customer = stack.customer_token("ken@example.com").await.unwrap();
    let service = stack.service_token().await.unwrap();
    let admin = stack.admin_token().await.unwrap();
    let mut orders = stack.orders().await;
    for n in 0..12 {
        let order = create(
            &stack,
            &customer,
            order_request(&format!("rebuild-{n}"), "tok_visa"),
        )
        .await
        .unwrap();
        let order_id = order.order_id.clone();
        match n % 4 {
            0 => {}
            1 => {
                let request = ConfirmOrderRequest {
                    order_id,
                    payment_id: uuid::Uuid::new_v4().to_string(),
                };
                orders
                    .confirm_order(bearer(request, &service))
                    .await
                    .unwrap();
            }
            2 => {
                let request = RejectOrderRequest {
                    order_id,
                    reason: "insufficient_funds".into(),
                };
                orders
                    .reject_order(bearer(request, &service))
                    .await
                    .unwrap();
            }
            _ => {
                let request = RequestOrderCancellationRequest {
                    order_id: order_id.clone(),
                    reason: "too slow".into(),
                };
                orders
                    .request_order_cancellation(bearer(request, &customer))
                    .await
                    .unwrap();
                let request = CancelOrderRequest {
                    order_id,
                    reason: "cancelled by the customer".into(),
                };
                orders
                    .cancel_order(bearer(request, &service))
                    .await
                    .unwrap();
            }
        }
    }
    let live = read_model(&stack).await;
    assert_eq!(live.len(), 12);

    let rebuilt = orders
        .rebuild_read_model(bearer(RebuildReadModelRequest {}, &admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (rebuilt.orders, rebuilt.events_replayed),
        (12, 12 + 3 + 3 + 3 * 2)
    );
    assert_eq!(read_model(&stack).await, live);

    let error = orders
        .rebuild_read_model(bearer(RebuildReadModelRequest {}, &customer))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn orders_stored_in_the_old_event_form_are_read_through_the_upcaster() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let customer = stack.customer_token("ada-old@example.com").await.unwrap();
    let claims: serde_json::Value = {
        use base64::Engine as _;
        let payload = customer.split('.').nth(1).unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap()
    };
    // An order placed by an older release: OrderPlaced schema version 1.
    let order_id = uuid::Uuid::now_v7();
    let v1 = api_order::v1::OrderPlacedV1 {
        order_id: order_id.to_string(),
        customer_id: claims["sub"].as_str().unwrap().to_owned(),
        lines: vec![api_order::v1::order_placed_v1::Line {
            sku: "LEGACY-1".into(),
            quantity: 3,
            unit_price_minor: 500,
        }],
        currency: "EUR".into(),
        total_minor: 1500,
        payment_method_token: "tok_visa".into(),
    };
    let envelope = EventEnvelope {
        event_id: uuid::Uuid::now_v7().to_string(),
        event_type: api_order::v1::OrderPlaced::full_name(),
        schema_version: 1,
        aggregate_type: "order".into(),
        aggregate_id: order_id.to_string(),
        aggregate_version: 1,
        occurred_at: Some(std::time::SystemTime::now().into()),
        correlation_id: "legacy-flow".into(),
        causation_id: String::new(),
        producer: "order".into(),
        payload: v1.encode_to_vec(),
    };
    let pool = stack.scenario.inspect().await.unwrap();
    sqlx::query(
        "INSERT INTO orders.events (stream_id, version, event_id, event_type, schema_version, envelope)
         VALUES ($1, 1, $2, $3, 1, $4)",
    )
    .bind(order_id)
    .bind(uuid::Uuid::parse_str(&envelope.event_id).unwrap())
    .bind(&envelope.event_type)
    .bind(envelope.encode_to_vec())
    .execute(&pool)
    .await
    .unwrap();

    // The rebuild reads it...
    let admin = stack.admin_token().await.unwrap();
    stack
        .orders()
        .await
        .rebuild_read_model(bearer(RebuildReadModelRequest {}, &admin))
        .await
        .unwrap();
    let order = get(&stack, &customer, &order_id.to_string()).await.unwrap();
    assert_eq!(order.total.as_ref().unwrap().amount_minor, 1500);
    assert_eq!(
        order.items[0].unit_price.as_ref().unwrap().currency,
        "EUR",
        "each price got its currency"
    );
    assert_eq!(order.correlation_id, "legacy-flow");
    // ...and so does a command, which loads the aggregate from the stream.
    let cancel = RequestOrderCancellationRequest {
        order_id: order_id.to_string(),
        reason: String::new(),
    };
    let cancelled = stack
        .orders()
        .await
        .request_order_cancellation(bearer(cancel, &customer))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (cancelled.status(), cancelled.version),
        (OrderStatus::CancellationRequested, 2)
    );
}

#[tokio::test]
async fn every_change_reaches_the_topic_with_the_requests_correlation_id() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let customer = stack.customer_token("barbara-l@example.com").await.unwrap();
    let service = stack.service_token().await.unwrap();
    let reader = stack.reader(&stack.scenario.topics.order_events());

    let mut request = bearer(order_request("traced", "tok_visa"), &customer);
    request
        .metadata_mut()
        .insert("x-correlation-id", "flow-create-1".parse().unwrap());
    let order = stack
        .orders()
        .await
        .create_order(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(order.correlation_id, "flow-create-1");
    let mut request = bearer(
        ConfirmOrderRequest {
            order_id: order.order_id.clone(),
            payment_id: uuid::Uuid::new_v4().to_string(),
        },
        &service,
    );
    request
        .metadata_mut()
        .insert("x-correlation-id", "flow-create-1".parse().unwrap());
    stack.orders().await.confirm_order(request).await.unwrap();

    let records = reader.receive(2, Duration::from_secs(20)).await.unwrap();
    let envelopes: Vec<EventEnvelope> = records
        .iter()
        .map(|r| EventEnvelope::decode(r.payload().unwrap()).unwrap())
        .collect();
    assert_eq!(
        envelopes
            .iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>(),
        vec![
            "ordersaga.order.v1.OrderPlaced",
            "ordersaga.order.v1.OrderConfirmed"
        ]
    );
    for (record, envelope) in records.iter().zip(&envelopes) {
        assert_eq!(
            record.key(),
            Some(order.order_id.as_bytes()),
            "keyed by order id"
        );
        assert_eq!(envelope.correlation_id, "flow-create-1");
        assert_eq!(
            header(record, "x-correlation-id").as_deref(),
            Some("flow-create-1")
        );
        assert!(header(record, "traceparent").is_some());
        assert_eq!(envelope.aggregate_id, order.order_id);
    }
    assert_eq!(
        envelopes
            .iter()
            .map(|e| e.aggregate_version)
            .collect::<Vec<_>>(),
        vec![1, 2]
    );
    let placed = api_order::v1::OrderPlaced::decode(envelopes[0].payload.as_slice()).unwrap();
    assert_eq!(placed.payment_method_token, "tok_visa");
    assert_eq!(placed.total.unwrap().amount_minor, 2799);
}
