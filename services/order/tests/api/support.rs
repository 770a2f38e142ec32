//! The order binary running in a scenario of its own, with a stand-in for
//! the auth service, and one helper per call its tests make.

use std::time::Duration;

use access_control::{Role, Scope};
use api_common::v1::Money;
use api_order::v1::order_service_client::OrderServiceClient;
use api_order::v1::{
    ApproveOrderRequest, CancelOrderRequest, ConfirmOrderRequest, CreateOrderRequest,
    DeclineOrderRequest, GetOrderRequest, HoldOrderForReviewRequest, LineItem, ListOrdersRequest,
    MarkOrderReturnedRequest, Order, OrderStatus, RejectOrderRequest,
    RequestOrderCancellationRequest, RequestReturnRequest,
};
use testkit::auth::{AuthStandIn, token};
use testkit::grpc::{bearer, channel};
use testkit::{Binary, Scenario, ServiceUnderTest};
use tonic::transport::Channel;
use tonic::{Response, Status};

pub(crate) const BINARY: Binary =
    Binary::new(&order_service::MANIFEST, env!("CARGO_BIN_EXE_order"));

/// Who calls.
#[derive(Debug, Clone)]
pub(crate) struct Tokens {
    /// The saga's: every scope.
    pub(crate) service: String,
    pub(crate) admin: String,
    pub(crate) customer: String,
    /// Another customer.
    pub(crate) stranger: String,
}

/// The order binary with a database, topics and an auth stand-in of its
/// own.
pub(crate) struct Service {
    pub(crate) scenario: Scenario,
    _service: ServiceUnderTest,
    _auth: AuthStandIn,
    channel: Channel,
    pub(crate) tokens: Tokens,
}

impl Service {
    pub(crate) async fn start() -> Self {
        let auth = AuthStandIn::start().await.unwrap();
        let scenario = Scenario::new(&[BINARY.manifest]).await.unwrap();
        let service =
            ServiceUnderTest::start(&scenario, BINARY, &[("AUTH_URL", auth.url.as_str())])
                .await
                .unwrap();
        let channel = channel(&service.process.url()).await.unwrap();
        let user = |role| token(&uuid::Uuid::new_v4().to_string(), role, Default::default());
        let tokens = Tokens {
            service: token(
                "saga-orchestrator",
                Role::Service,
                Scope::ALL.into_iter().collect(),
            ),
            admin: user(Role::Admin),
            customer: user(Role::Customer),
            stranger: user(Role::Customer),
        };
        Self {
            scenario,
            _service: service,
            _auth: auth,
            channel,
            tokens,
        }
    }

    pub(crate) fn client(&self) -> OrderServiceClient<Channel> {
        OrderServiceClient::new(self.channel.clone())
    }

    /// A two-line order of the customer's, placed.
    pub(crate) async fn place(&self, key: &str) -> Order {
        let request = CreateOrderRequest {
            idempotency_key: key.to_owned(),
            items: vec![LineItem {
                sku: "BOOK-42".into(),
                quantity: 2,
                unit_price: Some(Money {
                    amount_minor: 60_000,
                    currency: "EUR".into(),
                }),
            }],
            payment_method_token: "tok_visa".into(),
        };
        let order = self
            .client()
            .create_order(bearer(request, &self.tokens.customer))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(order.status(), OrderStatus::Pending);
        order
    }

    pub(crate) async fn get(&self, order_id: &str, token: &str) -> Result<Order, Status> {
        let request = GetOrderRequest {
            order_id: order_id.to_owned(),
        };
        self.client()
            .get_order(bearer(request, token))
            .await
            .map(Response::into_inner)
    }

    /// The customer's orders in `status`.
    pub(crate) async fn listed(&self, status: OrderStatus) -> Vec<String> {
        let request = ListOrdersRequest {
            status: status.into(),
            ..ListOrdersRequest::default()
        };
        self.client()
            .list_orders(bearer(request, &self.tokens.customer))
            .await
            .unwrap()
            .into_inner()
            .orders
            .into_iter()
            .map(|order| order.order_id)
            .collect()
    }

    pub(crate) async fn hold(&self, order_id: &str, token: &str) -> Result<Order, Status> {
        let request = HoldOrderForReviewRequest {
            order_id: order_id.to_owned(),
        };
        self.client()
            .hold_order_for_review(bearer(request, token))
            .await
            .map(Response::into_inner)
    }

    pub(crate) async fn approve(&self, order_id: &str, token: &str) -> Result<Order, Status> {
        let request = ApproveOrderRequest {
            order_id: order_id.to_owned(),
        };
        self.client()
            .approve_order(bearer(request, token))
            .await
            .map(Response::into_inner)
    }

    pub(crate) async fn decline(
        &self,
        order_id: &str,
        reason: &str,
        token: &str,
    ) -> Result<Order, Status> {
        let request = DeclineOrderRequest {
            order_id: order_id.to_owned(),
            reason: reason.to_owned(),
        };
        self.client()
            .decline_order(bearer(request, token))
            .await
            .map(Response::into_inner)
    }

    pub(crate) async fn request_cancellation(&self, order_id: &str) -> Result<Order, Status> {
        let request = RequestOrderCancellationRequest {
            order_id: order_id.to_owned(),
            reason: "found it cheaper".into(),
        };
        self.client()
            .request_order_cancellation(bearer(request, &self.tokens.customer))
            .await
            .map(Response::into_inner)
    }

    pub(crate) async fn confirm(&self, order_id: &str, payment_id: &str) -> Result<Order, Status> {
        let request = ConfirmOrderRequest {
            order_id: order_id.to_owned(),
            payment_id: payment_id.to_owned(),
        };
        self.client()
            .confirm_order(bearer(request, &self.tokens.service))
            .await
            .map(Response::into_inner)
    }

    pub(crate) async fn reject(&self, order_id: &str, reason: &str) -> Result<Order, Status> {
        let request = RejectOrderRequest {
            order_id: order_id.to_owned(),
            reason: reason.to_owned(),
        };
        self.client()
            .reject_order(bearer(request, &self.tokens.service))
            .await
            .map(Response::into_inner)
    }

    pub(crate) async fn cancel(&self, order_id: &str, reason: &str) -> Result<Order, Status> {
        let request = CancelOrderRequest {
            order_id: order_id.to_owned(),
            reason: reason.to_owned(),
        };
        self.client()
            .cancel_order(bearer(request, &self.tokens.service))
            .await
            .map(Response::into_inner)
    }

    pub(crate) async fn request_return(
        &self,
        order_id: &str,
        reason: &str,
        token: &str,
    ) -> Result<Order, Status> {
        let request = RequestReturnRequest {
            order_id: order_id.to_owned(),
            reason: reason.to_owned(),
        };
        self.client()
            .request_return(bearer(request, token))
            .await
            .map(Response::into_inner)
    }

    pub(crate) async fn mark_returned(&self, order_id: &str, token: &str) -> Result<Order, Status> {
        let request = MarkOrderReturnedRequest {
            order_id: order_id.to_owned(),
        };
        self.client()
            .mark_order_returned(bearer(request, token))
            .await
            .map(Response::into_inner)
    }

    /// Events stored for all orders, as the superuser counts them.
    pub(crate) async fn stored_events(&self) -> i64 {
        let pool = self.scenario.inspect().await.unwrap();
        let n = sqlx::query_scalar("SELECT count(*) FROM orders.events")
            .fetch_one(&pool)
            .await;
        pool.close().await;
        n.unwrap()
    }

    /// The types of the next `count` events on the order events topic
    /// (from its beginning), then that no more come.
    pub(crate) async fn event_types(&self, count: usize) -> Vec<String> {
        use prost::Message as _;
        use rdkafka::Message as _;
        let reader = self
            .scenario
            .topic_reader(&self.scenario.topics.order_events(), 3)
            .unwrap();
        let records = reader
            .receive(count, Duration::from_secs(20))
            .await
            .unwrap();
        assert!(
            reader
                .next_within(Duration::from_millis(500))
                .await
                .is_none(),
            "more than {count} events"
        );
        let mut types: Vec<(i64, String)> = records
            .iter()
            .map(|record| {
                let envelope = messaging::EventEnvelope::decode(record.payload().unwrap()).unwrap();
                (
                    i64::try_from(envelope.aggregate_version).unwrap(),
                    envelope.event_type,
                )
            })
            .collect();
        // One order's events, in its stream's order.
        types.sort();
        types
            .into_iter()
            .map(|(_, event_type)| event_type)
            .collect()
    }
}

/// The status a refusal is about, for asserting on FAILED_PRECONDITION.
pub(crate) fn refused(result: Result<Order, Status>, status_named: &str) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains(status_named),
        "the refusal names {status_named}: {status:?}"
    );
}
