//! Tokens issued by the auth service, verified by another service (the
//! order service), with the real binaries: forgeries, expiry, audience and
//! issuer, algorithm confusion, key rotation, the auth service going away,
//! roles, and the scopes of service tokens.

use std::future::Future;
use std::time::{SystemTime, UNIX_EPOCH};

use access_control::{Scope, Scopes};
use api_auth::v1::{GetPublicKeysRequest, IssueServiceTokenRequest, RotateSigningKeyRequest};
use api_common::v1::Money;
use api_order::v1::{
    CancelOrderRequest, ConfirmOrderRequest, GetOrderRequest, HoldOrderForReviewRequest,
    MarkOrderReturnedRequest, OrderStatus, RejectOrderRequest, RequestReturnRequest,
};
use api_payment::v1::refund_payment_request::Target;
use api_payment::v1::{
    AuthorizePaymentRequest, CapturePaymentRequest, GetPaymentRequest, ListPaymentsByOrderRequest,
    PaymentStatus, ProcessPaymentRequest, RefundPaymentRequest, VoidPaymentRequest,
    capture_payment_request, void_payment_request,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use e2e::{SAGA_CLIENT_ID, SAGA_CLIENT_SECRET, Stack, order_request};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use testkit::grpc::bearer;
use tonic::Code;

/// What the order service answers `GetOrder` for a random order with
/// `token`: the code tells whether the token got past access control.
async fn get_order_with(stack: &Stack, token: &str) -> Code {
    let request = GetOrderRequest {
        order_id: uuid::Uuid::new_v4().to_string(),
    };
    match stack.orders().await.get_order(bearer(request, token)).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// Past access control: the service looked for the (absent) order.
fn admitted(code: Code) -> bool {
    code == Code::NotFound
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(sub: &str, iss: &str, aud: &str, exp: i64) -> serde_json::Value {
    serde_json::json!({
        "sub": sub, "role": "customer", "iat": now() - 10, "exp": exp,
        "iss": iss, "aud": aud, "jti": uuid::Uuid::new_v4().to_string(),
    })
}

/// The current signing key, read from the auth schema and opened with the
/// key-encryption key, as only an attacker with database access and that
/// key could: lets the test sign tokens that differ from genuine ones in
/// exactly one respect.
async fn stolen_signing_key(stack: &Stack) -> (String, EncodingKey) {
    let pool = stack.scenario.inspect().await.unwrap();
    let (kid, sealed): (String, Vec<u8>) = sqlx::query_as(
        "SELECT kid, sealed_private_key FROM auth.signing_keys WHERE retired_at IS NULL",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let seed = auth_service::KeyEncryptionKey::parse(testkit::TEST_KEY_ENCRYPTION_KEY)
        .unwrap()
        .open(&kid, &sealed)
        .unwrap();
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(&seed);
    (kid, EncodingKey::from_ed_der(&der))
}

fn sign(kid: &str, key: &EncodingKey, claims: &serde_json::Value) -> String {
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

#[tokio::test]
async fn forged_expired_and_misdirected_tokens_are_rejected_by_another_service() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let genuine = stack.customer_token("ada@example.com").await.unwrap();
    assert!(
        admitted(get_order_with(&stack, &genuine).await),
        "a genuine token is accepted"
    );
    let subject = {
        let payload = genuine.split('.').nth(1).unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        claims["sub"].as_str().unwrap().to_owned()
    };

    // Signed with the real key by the test itself: accepted, so each
    // rejection below is due to the one thing that differs.
    let (kid, key) = stolen_signing_key(&stack).await;
    let control = sign(
        &kid,
        &key,
        &claims(&subject, "ordersaga-auth", "ordersaga", now() + 600),
    );
    assert!(admitted(get_order_with(&stack, &control).await));

    let expired = sign(
        &kid,
        &key,
        &claims(&subject, "ordersaga-auth", "ordersaga", now() - 60),
    );
    let wrong_audience = sign(
        &kid,
        &key,
        &claims(&subject, "ordersaga-auth", "another-system", now() + 600),
    );
    let wrong_issuer = sign(
        &kid,
        &key,
        &claims(&subject, "someone-else", "ordersaga", now() + 600),
    );

    // A genuine token with its signature tampered with.
    let (signed, signature) = genuine.rsplit_once('.').unwrap();
    let mut bytes = URL_SAFE_NO_PAD.decode(signature).unwrap();
    bytes[0] ^= 0x01;
    let tampered_signature = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(bytes));
    // A genuine signature over different claims (an admin role).
    let escalated_claims = {
        let mut claims = claims(&subject, "ordersaga-auth", "ordersaga", now() + 600);
        claims["role"] = "admin".into();
        URL_SAFE_NO_PAD.encode(claims.to_string())
    };
    let header = genuine.split('.').next().unwrap();
    let swapped_claims = format!("{header}.{escalated_claims}.{signature}");

    // `alg: none`, no signature at all.
    let none_header =
        URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"none","typ":"JWT","kid":"{kid}"}}"#));
    let unsigned = format!("{none_header}.{escalated_claims}.");

    // HS256 "signed" with the public key as the HMAC secret: the classic
    // confusion attack against verifiers that trust the header's `alg`.
    let public_key = stack
        .auth()
        .await
        .get_public_keys(GetPublicKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys
        .remove(0)
        .public_key;
    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.kid = Some(kid.clone());
    let hs256 = jsonwebtoken::encode(
        &hs_header,
        &claims(&subject, "ordersaga-auth", "ordersaga", now() + 600),
        &EncodingKey::from_secret(&public_key),
    )
    .unwrap();
    let hs256_b64_secret = jsonwebtoken::encode(
        &hs_header,
        &claims(&subject, "ordersaga-auth", "ordersaga", now() + 600),
        &EncodingKey::from_secret(URL_SAFE_NO_PAD.encode(&public_key).as_bytes()),
    )
    .unwrap();

    // A key id the auth service never issued.
    let (_, other_key) = {
        let seed: [u8; 32] = [7; 32];
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend_from_slice(&seed);
        ((), EncodingKey::from_ed_der(&der))
    };
    let foreign = sign(
        "not-a-key-we-know",
        &other_key,
        &claims(&subject, "ordersaga-auth", "ordersaga", now() + 600),
    );
    let foreign_with_our_kid = sign(
        &kid,
        &other_key,
        &claims(&subject, "ordersaga-auth", "ordersaga", now() + 600),
    );

    for (name, token) in [
        ("expired", expired),
        ("wrong audience", wrong_audience),
        ("wrong issuer", wrong_issuer),
        ("tampered signature", tampered_signature),
        ("swapped claims", swapped_claims),
        ("alg none", unsigned),
        ("HS256 with the public key", hs256),
        ("HS256 with the encoded public key", hs256_b64_secret),
        ("unknown key id", foreign),
        ("another key under our key id", foreign_with_our_kid),
        ("garbage", "not.a.token".to_owned()),
    ] {
        assert_eq!(
            get_order_with(&stack, &token).await,
            Code::Unauthenticated,
            "{name}"
        );
    }
}

#[tokio::test]
async fn each_rpc_admits_only_the_roles_its_policy_names() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let customer = stack.customer_token("grace@example.com").await.unwrap();
    let admin = stack.admin_token().await.unwrap();
    let service = stack
        .auth()
        .await
        .issue_service_token(IssueServiceTokenRequest {
            client_id: SAGA_CLIENT_ID.into(),
            client_secret: SAGA_CLIENT_SECRET.into(),
            scope: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .access_token;
    let confirm = |token: Option<&str>| {
        let request = ConfirmOrderRequest {
            order_id: uuid::Uuid::new_v4().to_string(),
            payment_id: uuid::Uuid::new_v4().to_string(),
        };
        let stack = &stack;
        let token = token.map(str::to_owned);
        async move {
            let request = match &token {
                Some(token) => bearer(request, token),
                None => tonic::Request::new(request),
            };
            match stack.orders().await.confirm_order(request).await {
                Ok(_) => Code::Ok,
                Err(status) => status.code(),
            }
        }
    };

    assert_eq!(confirm(None).await, Code::Unauthenticated, "no token");
    assert_eq!(
        confirm(Some(&customer)).await,
        Code::PermissionDenied,
        "a customer on an internal RPC"
    );
    assert_eq!(
        confirm(Some(&admin)).await,
        Code::PermissionDenied,
        "internal RPCs are for services"
    );
    assert!(
        admitted(confirm(Some(&service)).await),
        "a service token passes"
    );

    assert!(admitted(get_order_with(&stack, &customer).await));
    assert!(
        admitted(get_order_with(&stack, &admin).await),
        "admins act as users too"
    );
    assert_eq!(
        get_order_with(&stack, &service).await,
        Code::PermissionDenied,
        "services are not users"
    );

    // Operator RPCs of the auth service itself.
    let rotate = stack
        .auth()
        .await
        .rotate_signing_key(bearer(RotateSigningKeyRequest {}, &customer))
        .await;
    assert_eq!(rotate.unwrap_err().code(), Code::PermissionDenied);
    let unauthenticated = stack
        .auth()
        .await
        .rotate_signing_key(RotateSigningKeyRequest {})
        .await;
    assert_eq!(unauthenticated.unwrap_err().code(), Code::Unauthenticated);
}

#[tokio::test]
async fn tokens_in_flight_survive_a_key_rotation() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let before = stack.customer_token("alan@example.com").await.unwrap();
    assert!(
        admitted(get_order_with(&stack, &before).await),
        "the order service has the first key"
    );

    let admin = stack.admin_token().await.unwrap();
    let new_key = stack
        .auth()
        .await
        .rotate_signing_key(bearer(RotateSigningKeyRequest {}, &admin))
        .await
        .unwrap();
    let after = stack.customer_token("barbara@example.com").await.unwrap();
    let kid_of = |token: &str| -> String {
        let header: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(token.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap();
        header["kid"].as_str().unwrap().to_owned()
    };
    assert_eq!(
        kid_of(&after),
        new_key.into_inner().kid,
        "the new key signs"
    );
    assert_ne!(kid_of(&after), kid_of(&before));

    // The order service has never seen the new key: it fetches it on sight,
    // and keeps accepting tokens of the old one.
    assert!(admitted(get_order_with(&stack, &after).await));
    assert!(admitted(get_order_with(&stack, &before).await));
    let published = stack
        .auth()
        .await
        .get_public_keys(GetPublicKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(published.len(), 2);
    assert!(
        published[1].verify_until.is_some(),
        "the retired key says until when it verifies"
    );
}

#[tokio::test]
async fn the_order_service_keeps_verifying_while_the_auth_service_is_down() {
    let mut stack = Stack::builder().without_sagas().start().await.unwrap();
    let token = stack.customer_token("edsger@example.com").await.unwrap();
    assert!(admitted(get_order_with(&stack, &token).await));

    let code = stack
        .service_mut(auth_service::NAME)
        .stop(std::time::Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(code, Some(0));

    assert!(
        admitted(get_order_with(&stack, &token).await),
        "verified from the cached keys"
    );
    assert_eq!(
        get_order_with(&stack, "still.not.valid").await,
        Code::Unauthenticated
    );
}

/// Service tokens to try an internal RPC with, each with the scopes it
/// carries.
struct ServiceTokens(Vec<(String, Scopes, String)>);

impl ServiceTokens {
    /// One token per scope; the orchestrator's own; and a service token
    /// without a `scope` claim, as the auth service signed them before
    /// scopes existed (signed here with the stolen key, since auth no
    /// longer issues one).
    async fn of(stack: &Stack) -> Self {
        let mut tokens = Vec::new();
        for scope in Scope::ALL {
            tokens.push((
                format!("a token of only {scope}"),
                [scope].into_iter().collect(),
                stack.service_token_with([scope]).await.unwrap(),
            ));
        }
        tokens.push((
            "the orchestrator's token".to_owned(),
            saga_orchestrator::SCOPES.into_iter().collect(),
            stack.service_token().await.unwrap(),
        ));
        let (kid, key) = stolen_signing_key(stack).await;
        let mut unscoped = claims(SAGA_CLIENT_ID, "ordersaga-auth", "ordersaga", now() + 600);
        unscoped["role"] = "service".into();
        tokens.push((
            "a service token without scopes".to_owned(),
            Scopes::default(),
            sign(&kid, &key, &unscoped),
        ));
        Self(tokens)
    }

    /// The token of exactly `scope`.
    fn only(&self, scope: Scope) -> &str {
        let only: Scopes = [scope].into_iter().collect();
        self.0
            .iter()
            .find(|(_, scopes, _)| *scopes == only)
            .map(|(_, _, token)| token.as_str())
            .unwrap()
    }

    /// Every token that lacks `scope`.
    fn without(&self, scope: Scope) -> impl Iterator<Item = (&str, &str)> {
        self.0
            .iter()
            .filter(move |(_, scopes, _)| !scopes.contains(scope))
            .map(|(name, _, token)| (name.as_str(), token.as_str()))
    }
}

/// Everything an internal RPC could change, read as the superuser: the
/// event store, payments and their states, claims, and what the simulated
/// provider was asked (outboxes are left out: the relay empties them).
async fn writes(stack: &Stack) -> Vec<i64> {
    let pool = stack.scenario.inspect().await.unwrap();
    let row: (i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM orders.events),
                (SELECT count(*) FROM payments.payments),
                (SELECT count(*) FROM payments.payments WHERE status <> 'captured'),
                (SELECT count(*) FROM payments.charge_claims),
                (SELECT coalesce(sum(attempts), 0)::bigint FROM payments.simulated_provider_charges),
                (SELECT count(*) FROM payments.simulated_provider_charges WHERE voided_at IS NOT NULL)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    vec![row.0, row.1, row.2, row.3, row.4, row.5]
}

/// Calls an internal RPC with every token that lacks `scope`, each of which
/// must get PERMISSION_DENIED naming the scope and change nothing; then
/// with the token of `scope` alone, whose answer it returns.
async fn requires<T, F, Fut>(
    stack: &Stack,
    tokens: &ServiceTokens,
    scope: Scope,
    call: F,
) -> Result<T, tonic::Status>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let before = writes(stack).await;
    let mut refused = 0;
    for (name, token) in tokens.without(scope) {
        let status = call(token.to_owned())
            .await
            .err()
            .unwrap_or_else(|| panic!("{name} was let through where {scope} is required"));
        assert_eq!(status.code(), Code::PermissionDenied, "{name}: {status:?}");
        assert!(
            status.message().contains(scope.as_str()),
            "{name}: the refusal names the missing scope: {status:?}"
        );
        refused += 1;
    }
    assert!(refused >= Scope::ALL.len(), "tried {refused} wrong tokens");
    assert_eq!(
        writes(stack).await,
        before,
        "the refused calls needing {scope} changed nothing"
    );
    call(tokens.only(scope).to_owned())
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn each_internal_rpc_requires_its_scope_and_without_it_writes_nothing() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let stack = &stack;
    let customer = stack.customer_token("margaret@example.com").await.unwrap();
    let tokens = ServiceTokens::of(stack).await;
    let mut placed = Vec::new();
    for key in ["to-confirm", "to-reject", "to-abort", "to-review"] {
        let order = stack
            .orders()
            .await
            .create_order(bearer(order_request(key, "tok_visa"), &customer))
            .await
            .unwrap()
            .into_inner();
        placed.push(order);
    }
    let [to_confirm, to_reject, to_abort, to_review] = &placed[..] else {
        unreachable!()
    };

    // The finding: a token that may only read cannot charge anyone.
    let charge = ProcessPaymentRequest {
        order_id: to_confirm.order_id.clone(),
        customer_id: to_confirm.customer_id.clone(),
        amount: Some(Money {
            amount_minor: 2799,
            currency: "EUR".into(),
        }),
        payment_method_token: "tok_visa".into(),
        idempotency_key: "a-fresh-key-each-time".into(),
    };
    let read_only = stack
        .payments()
        .await
        .process_payment(bearer(charge.clone(), tokens.only(Scope::PaymentsRead)))
        .await
        .unwrap_err();
    assert_eq!(read_only.code(), Code::PermissionDenied);
    assert!(
        read_only.message().contains("payments:charge"),
        "{read_only:?}"
    );

    let captured = requires(stack, &tokens, Scope::PaymentsCharge, |token| {
        let request = bearer(charge.clone(), &token);
        async move { stack.payments().await.process_payment(request).await }
    })
    .await
    .unwrap();
    assert_eq!(captured.status(), PaymentStatus::Captured);

    let got = requires(stack, &tokens, Scope::PaymentsRead, |token| {
        let request = bearer(
            GetPaymentRequest {
                payment_id: captured.payment_id.clone(),
            },
            &token,
        );
        async move { stack.payments().await.get_payment(request).await }
    })
    .await
    .unwrap();
    assert_eq!(got, captured);
    let listed = requires(stack, &tokens, Scope::PaymentsRead, |token| {
        let request = bearer(
            ListPaymentsByOrderRequest {
                order_id: to_confirm.order_id.clone(),
            },
            &token,
        );
        async move { stack.payments().await.list_payments_by_order(request).await }
    })
    .await
    .unwrap();
    assert_eq!(listed.payments, vec![captured.clone()]);

    let refunded = requires(stack, &tokens, Scope::PaymentsRefund, |token| {
        let request = bearer(
            RefundPaymentRequest {
                target: Some(Target::PaymentId(captured.payment_id.clone())),
                idempotency_key: "refund-once".into(),
                reason: "order cancelled".into(),
            },
            &token,
        );
        async move { stack.payments().await.refund_payment(request).await }
    })
    .await
    .unwrap();
    assert_eq!(refunded.status(), PaymentStatus::Refunded);

    let confirmed = requires(stack, &tokens, Scope::OrdersSettle, |token| {
        let request = bearer(
            ConfirmOrderRequest {
                order_id: to_confirm.order_id.clone(),
                payment_id: captured.payment_id.clone(),
            },
            &token,
        );
        async move { stack.orders().await.confirm_order(request).await }
    })
    .await
    .unwrap();
    assert_eq!(confirmed.status(), OrderStatus::Confirmed);

    let rejected = requires(stack, &tokens, Scope::OrdersSettle, |token| {
        let request = bearer(
            RejectOrderRequest {
                order_id: to_reject.order_id.clone(),
                reason: "card_declined".into(),
            },
            &token,
        );
        async move { stack.orders().await.reject_order(request).await }
    })
    .await
    .unwrap();
    assert_eq!(rejected.status(), OrderStatus::Rejected);

    let aborted = requires(stack, &tokens, Scope::OrdersSettle, |token| {
        let request = bearer(
            CancelOrderRequest {
                order_id: to_abort.order_id.clone(),
                reason: "called off".into(),
            },
            &token,
        );
        async move { stack.orders().await.cancel_order(request).await }
    })
    .await
    .unwrap();
    assert_eq!(aborted.status(), OrderStatus::Cancelled);

    // Order saga v2's calls: hold for review, authorize, capture, void,
    // and a return marked done.
    let held = requires(stack, &tokens, Scope::OrdersSettle, |token| {
        let request = bearer(
            HoldOrderForReviewRequest {
                order_id: to_review.order_id.clone(),
            },
            &token,
        );
        async move { stack.orders().await.hold_order_for_review(request).await }
    })
    .await
    .unwrap();
    assert_eq!(held.status(), OrderStatus::PendingReview);
    let authorize = |key: &str| AuthorizePaymentRequest {
        order_id: to_review.order_id.clone(),
        customer_id: to_review.customer_id.clone(),
        amount: Some(Money {
            amount_minor: 2799,
            currency: "EUR".into(),
        }),
        payment_method_token: "tok_visa".into(),
        idempotency_key: key.into(),
    };
    let mut authorizations = Vec::new();
    for key in ["authorize-to-capture", "authorize-to-void"] {
        let authorized = requires(stack, &tokens, Scope::PaymentsCharge, |token| {
            let request = bearer(authorize(key), &token);
            async move { stack.payments().await.authorize_payment(request).await }
        })
        .await
        .unwrap();
        assert_eq!(authorized.status(), PaymentStatus::Authorized);
        authorizations.push(authorized);
    }
    let captured = requires(stack, &tokens, Scope::PaymentsCharge, |token| {
        let request = bearer(
            CapturePaymentRequest {
                target: Some(capture_payment_request::Target::PaymentId(
                    authorizations[0].payment_id.clone(),
                )),
            },
            &token,
        );
        async move { stack.payments().await.capture_payment(request).await }
    })
    .await
    .unwrap();
    assert_eq!(captured.status(), PaymentStatus::Captured);
    let voided = requires(stack, &tokens, Scope::PaymentsRefund, |token| {
        let request = bearer(
            VoidPaymentRequest {
                target: Some(void_payment_request::Target::PaymentId(
                    authorizations[1].payment_id.clone(),
                )),
                idempotency_key: "void-once".into(),
                reason: "declined in review".into(),
            },
            &token,
        );
        async move { stack.payments().await.void_payment(request).await }
    })
    .await
    .unwrap();
    assert_eq!(voided.status(), PaymentStatus::Voided);
    // The customer asks for the return (no scope: their own order); the
    // saga's token marks it returned.
    let asked = stack
        .orders()
        .await
        .request_return(bearer(
            RequestReturnRequest {
                order_id: to_confirm.order_id.clone(),
                reason: "does not fit".into(),
            },
            &customer,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(asked.status(), OrderStatus::ReturnRequested);
    let returned = requires(stack, &tokens, Scope::OrdersSettle, |token| {
        let request = bearer(
            MarkOrderReturnedRequest {
                order_id: to_confirm.order_id.clone(),
            },
            &token,
        );
        async move { stack.orders().await.mark_order_returned(request).await }
    })
    .await
    .unwrap();
    assert_eq!(returned.status(), OrderStatus::Returned);

    // A customer still reads their own payments, without any scope.
    let own = stack
        .payments()
        .await
        .list_payments_by_order(bearer(
            ListPaymentsByOrderRequest {
                order_id: to_confirm.order_id.clone(),
            },
            &customer,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.payments.len(), 1);
}

#[tokio::test]
async fn a_client_gets_no_token_for_a_scope_it_was_not_granted() {
    let stack = Stack::builder().without_sagas().start().await.unwrap();
    let mut auth = stack.auth().await;
    let asked = auth
        .issue_service_token(IssueServiceTokenRequest {
            client_id: SAGA_CLIENT_ID.into(),
            client_secret: SAGA_CLIENT_SECRET.into(),
            scope: "payments:charge payments:read".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(asked.code(), Code::PermissionDenied);
    assert!(asked.message().contains("payments:read"), "{asked:?}");

    // What the orchestrator is granted, and asks for, is what its saga calls.
    let own = auth
        .issue_service_token(IssueServiceTokenRequest {
            client_id: SAGA_CLIENT_ID.into(),
            client_secret: SAGA_CLIENT_SECRET.into(),
            scope: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let granted: Scopes = saga_orchestrator::SCOPES.into_iter().collect();
    assert_eq!(own.scope, granted.to_string());
    let payload = own.access_token.split('.').nth(1).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    assert_eq!(
        claims["scope"],
        "payments:charge payments:refund orders:settle"
    );
}
