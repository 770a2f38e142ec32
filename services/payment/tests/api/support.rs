//! The payment binary running in a scenario of its own, with a stand-in
//! for the auth service's public key API so its tokens verify, and helpers
//! to call it and look behind its back.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use access_control::{Claims, Role, Scope, Scopes};
use api_auth::v1::auth_service_server::{AuthService, AuthServiceServer};
use api_auth::v1::{
    GetPublicKeysRequest, GetPublicKeysResponse, IssueServiceTokenRequest, LoginRequest,
    LogoutRequest, LogoutResponse, PublicKey, RefreshRequest, RegisterRequest, RegisterResponse,
    RotateSigningKeyRequest, ServiceToken, TokenPair,
};
use api_common::v1::Money;
use api_payment::v1::payment_service_client::PaymentServiceClient;
use api_payment::v1::refund_payment_request::Target;
use api_payment::v1::{Payment, ProcessPaymentRequest, RefundPaymentRequest};
use dev_stack::TopicReader;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use testkit::grpc::{bearer, channel};
use testkit::{Binary, Scenario, ServiceUnderTest};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

pub(crate) const BINARY: Binary =
    Binary::new(&payment_service::MANIFEST, env!("CARGO_BIN_EXE_payment"));

/// The signing key of the stand-in auth service: RFC 8032's first Ed25519
/// test vector, its seed and public key.
const SEED: [u8; 32] = hex32("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60");
const PUBLIC_KEY: [u8; 32] =
    hex32("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
const KID: &str = "payment-tests";

const fn hex32(text: &str) -> [u8; 32] {
    const fn digit(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => panic!("not a hex digit"),
        }
    }
    let bytes = text.as_bytes();
    let mut out = [0; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = digit(bytes[2 * i]) * 16 + digit(bytes[2 * i + 1]);
        i += 1;
    }
    out
}

/// The auth service as the payment service sees it: its public keys. The
/// rest of its API is not needed here.
struct KeysOnly;

#[tonic::async_trait]
impl AuthService for KeysOnly {
    async fn register(
        &self,
        _: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        Err(Status::unimplemented("keys only"))
    }

    async fn login(&self, _: Request<LoginRequest>) -> Result<Response<TokenPair>, Status> {
        Err(Status::unimplemented("keys only"))
    }

    async fn refresh(&self, _: Request<RefreshRequest>) -> Result<Response<TokenPair>, Status> {
        Err(Status::unimplemented("keys only"))
    }

    async fn logout(&self, _: Request<LogoutRequest>) -> Result<Response<LogoutResponse>, Status> {
        Err(Status::unimplemented("keys only"))
    }

    async fn issue_service_token(
        &self,
        _: Request<IssueServiceTokenRequest>,
    ) -> Result<Response<ServiceToken>, Status> {
        Err(Status::unimplemented("keys only"))
    }

    async fn get_public_keys(
        &self,
        _: Request<GetPublicKeysRequest>,
    ) -> Result<Response<GetPublicKeysResponse>, Status> {
        Ok(Response::new(GetPublicKeysResponse {
            keys: vec![PublicKey {
                kid: KID.into(),
                algorithm: "EdDSA".into(),
                public_key: PUBLIC_KEY.to_vec(),
                created_at: None,
                verify_until: None,
            }],
        }))
    }

    async fn rotate_signing_key(
        &self,
        _: Request<RotateSigningKeyRequest>,
    ) -> Result<Response<PublicKey>, Status> {
        Err(Status::unimplemented("keys only"))
    }
}

/// A token the payment service accepts, signed with the test key.
pub(crate) fn token(sub: &str, role: Role, scope: Scopes) -> String {
    let now = i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();
    let claims = Claims {
        sub: sub.to_owned(),
        role,
        iat: now - 10,
        exp: now + 3600,
        iss: "ordersaga-auth".into(),
        aud: "ordersaga".into(),
        jti: uuid::Uuid::new_v4().to_string(),
        scope,
    };
    // PKCS#8 wrapping of an Ed25519 seed.
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(&SEED);
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(KID.into());
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(&der)).unwrap()
}

/// The payment binary with a database, topics and an auth stand-in of its
/// own.
pub(crate) struct Service {
    pub(crate) scenario: Scenario,
    /// Stops the binary when dropped.
    _service: ServiceUnderTest,
    pub(crate) service_token: String,
    channel: Channel,
    stop_auth: CancellationToken,
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop_auth.cancel();
    }
}

impl Service {
    /// Starts the binary with `env` on top of the scenario's, once it is
    /// SERVING.
    pub(crate) async fn start(env: &[(&str, &str)]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let auth_url = format!("http://{}", listener.local_addr().unwrap());
        let stop_auth = CancellationToken::new();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AuthServiceServer::new(KeysOnly))
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(listener),
                    stop_auth.clone().cancelled_owned(),
                ),
        );
        let scenario = Scenario::new(&[BINARY.manifest]).await.unwrap();
        let mut all_env = vec![("AUTH_URL", auth_url.as_str())];
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
            stop_auth,
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

    /// The payment events topic, from its beginning.
    pub(crate) fn events(&self) -> TopicReader {
        TopicReader::new(
            self.scenario.env.bootstrap_servers(),
            &self.scenario.topics.payment_events(),
            3,
        )
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

pub(crate) fn refund_of(payment_id: &str, key: &str) -> RefundPaymentRequest {
    RefundPaymentRequest {
        target: Some(Target::PaymentId(payment_id.to_owned())),
        idempotency_key: key.to_owned(),
        reason: "order cancelled".into(),
    }
}
