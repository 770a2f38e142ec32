//! The payment binary running in a scenario of its own, with a stand-in
//! for the auth service's public key API so its tokens verify, and helpers
//! to call it and look behind its back.

use std::time::Duration;

use access_control::{Role, Scope};
use api_common::v1::Money;
use api_payment::v1::payment_service_client::PaymentServiceClient;
use api_payment::v1::refund_payment_request::Target;
use api_payment::v1::{
    AuthorizePaymentRequest, CapturePaymentRequest, Payment, ProcessPaymentRequest,
    RefundPaymentRequest, VoidPaymentRequest, capture_payment_request, void_payment_request,
};
use dev_stack::TopicReader;
use testkit::auth::AuthStandIn;
pub(crate) use testkit::auth::token;
use testkit::grpc::{bearer, channel};
use testkit::{Binary, Scenario, ServiceUnderTest};
use tonic::transport::Channel;
use tonic::{Response, Status};

pub(crate) const BINARY: Binary =
    Binary::new(&payment_service::MANIFEST, env!("CARGO_BIN_EXE_payment"));

/// The payment binary with a database, topics and an auth stand-in of its
/// own.
pub(crate) struct Service {
    pub(crate) scenario: Scenario,
    /// Stops the binary when dropped.
    _service: ServiceUnderTest,
    pub(crate) service_token: String,
    channel: Channel,
    _auth: AuthStandIn,
}

impl Service {
    /// Starts the binary with `env` on top of the scenario's, once it is
    /// SERVING.
    pub(crate) async fn start(env: &[(&str, &str)]) -> Self {
        let auth = AuthStandIn::start().await.unwrap();
        let scenario = Scenario::new(&[BINARY.manifest]).await.unwrap();
        let mut all_env = vec![("AUTH_URL", auth.url.as_str())];
        all_env.extend_from_slice(env);
        let service = ServiceUnderTest::start(&scenario, BINARY, &all_env)
            .await
            .unwrap();
        let channel = channel(&service.process.url()).await.unwrap();
        Self {
            scenario,
            _service: service,
            // Every scope: the tests charge, refund and read as a service.
            service_token: token(
                "saga-orchestrator",
                Role::Service,
                Scope::ALL.into_iter().collect(),
            ),
            channel,
            _auth: auth,
        }
    }

    pub(crate) fn client(&self) -> PaymentServiceClient<Channel> {
        PaymentServiceClient::new(self.channel.clone())
    }

    pub(crate) async fn process(&self, request: ProcessPaymentRequest) -> Result<Payment, Status> {
        self.client()
            .process_payment(bearer(request, &self.service_token))
            .await
            .map(Response::into_inner)
    }

    pub(crate) async fn refund(&self, request: RefundPaymentRequest) -> Result<Payment, Status> {
        self.client()
            .refund_payment(bearer(request, &self.service_token))
            .await
            .map(Response::into_inner)
    }

    pub(crate) async fn authorize(
        &self,
        request: AuthorizePaymentRequest,
    ) -> Result<Payment, Status> {
        self.client()
            .authorize_payment(bearer(request, &self.service_token))
            .await
            .map(Response::into_inner)
    }

    pub(crate) async fn capture(&self, request: CapturePaymentRequest) -> Result<Payment, Status> {
        self.client()
            .capture_payment(bearer(request, &self.service_token))
            .await
            .map(Response::into_inner)
    }

    pub(crate) async fn void(&self, request: VoidPaymentRequest) -> Result<Payment, Status> {
        self.client()
            .void_payment(bearer(request, &self.service_token))
            .await
            .map(Response::into_inner)
    }

    /// The types of the next `count` events on the payment events topic
    /// (from its beginning), then that no more come.
    pub(crate) async fn event_types(&self, count: usize) -> Vec<String> {
        use prost::Message as _;
        use rdkafka::Message as _;
        let reader = self.events();
        let records = reader
            .receive(count, Duration::from_secs(20))
            .await
            .unwrap();
        if let Some(extra) = reader.next_within(Duration::from_millis(500)).await {
            let envelope = messaging::EventEnvelope::decode(extra.payload().unwrap()).unwrap();
            panic!("an event more than {count}: {}", envelope.event_type);
        }
        records
            .iter()
            .map(|record| {
                messaging::EventEnvelope::decode(record.payload().unwrap())
                    .unwrap()
                    .event_type
            })
            .collect()
    }

    /// What the simulated provider has reserved for an order under live
    /// authorizations (neither captured, voided nor lapsed).
    pub(crate) async fn authorized(&self, order_id: &str) -> i64 {
        self.count(&format!(
            "SELECT coalesce(sum(authorized_minor), 0)::bigint FROM payments.simulated_provider_holdings WHERE order_id = '{order_id}'"
        ))
        .await
    }

    /// The payment events topic, from its beginning.
    pub(crate) fn events(&self) -> TopicReader {
        self.scenario
            .topic_reader(&self.scenario.topics.payment_events(), 3)
            .unwrap()
    }

    /// One number, read as the superuser (name the `payments.` tables).
    pub(crate) async fn count(&self, sql: &str) -> i64 {
        let pool = self.scenario.inspect().await.unwrap();
        let n = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(&pool)
            .await;
        pool.close().await;
        n.unwrap()
    }

    /// What the simulated provider holds of an order's money.
    pub(crate) async fn held(&self, order_id: &str) -> i64 {
        self.count(&format!(
            "SELECT coalesce(sum(held_minor), 0)::bigint FROM payments.simulated_provider_holdings WHERE order_id = '{order_id}'"
        ))
        .await
    }

    /// How often the simulated provider was asked to charge under `key`.
    pub(crate) async fn provider_attempts(&self, key: &str) -> i64 {
        self.count(&format!(
            "SELECT coalesce(sum(attempts), 0)::bigint FROM payments.simulated_provider_charges WHERE idempotency_key = '{key}'"
        ))
        .await
    }

    /// Waits until `sql` counts `n`: for work started in the background to
    /// reach a point the database shows.
    pub(crate) async fn until_count(&self, sql: &str, n: i64, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let seen = self.count(sql).await;
            if seen == n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{sql} counted {seen}, not {n}, within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub(crate) fn eur(amount_minor: i64) -> Money {
    Money {
        amount_minor,
        currency: "EUR".into(),
    }
}

/// A charge of a new order of a new customer.
pub(crate) fn charge(key: &str, token: &str, amount_minor: i64) -> ProcessPaymentRequest {
    ProcessPaymentRequest {
        order_id: uuid::Uuid::new_v4().to_string(),
        customer_id: uuid::Uuid::new_v4().to_string(),
        amount: Some(eur(amount_minor)),
        payment_method_token: token.to_owned(),
        idempotency_key: key.to_owned(),
    }
}

/// Undoes the charge with `key`, as the saga's compensation does.
pub(crate) fn undo(key: &str) -> RefundPaymentRequest {
    RefundPaymentRequest {
        target: Some(Target::ChargeIdempotencyKey(key.to_owned())),
        idempotency_key: format!("undo-{key}"),
        reason: "saga compensation".into(),
    }
}

/// An authorization for a new order of a new customer.
pub(crate) fn authorization(key: &str, token: &str, amount_minor: i64) -> AuthorizePaymentRequest {
    let charge = charge(key, token, amount_minor);
    AuthorizePaymentRequest {
        order_id: charge.order_id,
        customer_id: charge.customer_id,
        amount: charge.amount,
        payment_method_token: charge.payment_method_token,
        idempotency_key: charge.idempotency_key,
    }
}

/// Captures the authorization with payment id `payment_id`.
pub(crate) fn capture_of(payment_id: &str) -> CapturePaymentRequest {
    CapturePaymentRequest {
        target: Some(capture_payment_request::Target::PaymentId(
            payment_id.to_owned(),
        )),
    }
}

/// Captures the authorization made with `key`.
pub(crate) fn capture_by_key(key: &str) -> CapturePaymentRequest {
    CapturePaymentRequest {
        target: Some(capture_payment_request::Target::AuthorizationIdempotencyKey(key.to_owned())),
    }
}

/// Voids the authorization with payment id `payment_id`.
pub(crate) fn void_of(payment_id: &str) -> VoidPaymentRequest {
    VoidPaymentRequest {
        target: Some(void_payment_request::Target::PaymentId(
            payment_id.to_owned(),
        )),
        idempotency_key: format!("void-{payment_id}"),
        reason: "order declined in review".into(),
    }
}

/// Voids the authorization made with `key`, as the saga's compensation
/// will.
pub(crate) fn void_by_key(key: &str) -> VoidPaymentRequest {
    VoidPaymentRequest {
        target: Some(void_payment_request::Target::AuthorizationIdempotencyKey(
            key.to_owned(),
        )),
        idempotency_key: format!("void-{key}"),
        reason: "saga compensation".into(),
    }
}

pub(crate) fn refund_of(payment_id: &str, key: &str) -> RefundPaymentRequest {
    RefundPaymentRequest {
        target: Some(Target::PaymentId(payment_id.to_owned())),
        idempotency_key: key.to_owned(),
        reason: "order cancelled".into(),
    }
}
