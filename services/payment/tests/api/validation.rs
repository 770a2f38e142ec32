//! Every string of every payment RPC that could reach PostgreSQL is checked
//! at the edge: a NUL character (which PostgreSQL's text cannot hold) or an
//! oversized value is INVALID_ARGUMENT naming the field, never INTERNAL,
//! and nothing is written.

use access_control::{Role, Scopes};
use api_common::v1::Money;
use api_payment::v1::refund_payment_request::Target;
use api_payment::v1::{
    GetPaymentRequest, ListPaymentsByOrderRequest, PaymentStatus, ProcessPaymentRequest,
    RefundPaymentRequest,
};
use testkit::grpc::{bearer, violated_fields};
use tonic::Code;

use crate::support::{Service, charge, token};

/// Values no string field accepts, made from a valid one: NUL characters
/// in it, and far too long.
fn bad_variants(valid: &str) -> Vec<(String, &'static str)> {
    vec![
        (format!("{valid}\0"), "NUL at the end"),
        (format!("\0{valid}"), "NUL at the start"),
        ("\0".into(), "only NUL"),
        (valid.repeat(4000), "repeated far past any bound"),
        ("x".repeat(1_000_000), "a megabyte"),
        ("é".repeat(100_000), "long in characters and bytes"),
    ]
}

fn assert_names(result: Result<impl std::fmt::Debug, tonic::Status>, field: &str, case: &str) {
    let status = result.expect_err(&format!("{field}, {case}: accepted"));
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "{field}, {case}: {:?}",
        status.message()
    );
    assert_eq!(
        violated_fields(&status),
        vec![field.to_owned()],
        "{field}, {case}"
    );
}

#[tokio::test]
async fn nul_bytes_and_oversized_strings_in_every_field_are_invalid_arguments_naming_it() {
    let service = Service::start(&[]).await;
    let valid = charge("key-1", "tok_visa", 100);

    type Edit = fn(&mut ProcessPaymentRequest, String);
    let process_fields: [(&str, Edit); 5] = [
        ("order_id", |r, v| r.order_id = v),
        ("customer_id", |r, v| r.customer_id = v),
        ("amount.currency", |r, v| {
            r.amount = Some(Money {
                amount_minor: 100,
                currency: v,
            });
        }),
        ("payment_method_token", |r, v| r.payment_method_token = v),
        ("idempotency_key", |r, v| r.idempotency_key = v),
    ];
    for (field, edit) in process_fields {
        let base = match field {
            "order_id" => valid.order_id.clone(),
            "customer_id" => valid.customer_id.clone(),
            "amount.currency" => "EUR".into(),
            "payment_method_token" => valid.payment_method_token.clone(),
            _ => valid.idempotency_key.clone(),
        };
        for (value, case) in bad_variants(&base) {
            let mut request = valid.clone();
            edit(&mut request, value);
            assert_names(service.process(request).await, field, case);
        }
    }

    let refund = RefundPaymentRequest {
        target: Some(Target::ChargeIdempotencyKey("key-1".into())),
        idempotency_key: "refund-1".into(),
        reason: "order cancelled".into(),
    };
    let payment_id = uuid::Uuid::new_v4().to_string();
    for (value, case) in bad_variants(&payment_id) {
        let request = RefundPaymentRequest {
            target: Some(Target::PaymentId(value)),
            ..refund.clone()
        };
        assert_names(service.refund(request).await, "payment_id", case);
    }
    for (value, case) in bad_variants("key-1") {
        let request = RefundPaymentRequest {
            target: Some(Target::ChargeIdempotencyKey(value)),
            ..refund.clone()
        };
        assert_names(
            service.refund(request).await,
            "charge_idempotency_key",
            case,
        );
    }
    for (value, case) in bad_variants("refund-1") {
        let request = RefundPaymentRequest {
            idempotency_key: value,
            ..refund.clone()
        };
        assert_names(service.refund(request).await, "idempotency_key", case);
    }
    for (value, case) in bad_variants("order cancelled").into_iter().chain([
        ("cancelled\0 by the customer".to_owned(), "NUL inside"),
        ("é".repeat(501), "one character too many"),
    ]) {
        let request = RefundPaymentRequest {
            reason: value,
            ..refund.clone()
        };
        assert_names(service.refund(request).await, "reason", case);
    }

    // The reads, as a service and as a customer.
    let customer = token(&valid.customer_id, Role::Customer, Scopes::default());
    for caller in [&service.service_token, &customer] {
        for (value, case) in bad_variants(&payment_id) {
            let got = service
                .client()
                .get_payment(bearer(GetPaymentRequest { payment_id: value }, caller))
                .await;
            assert_names(got, "payment_id", case);
        }
        for (value, case) in bad_variants(&valid.order_id) {
            let listed = service
                .client()
                .list_payments_by_order(bearer(
                    ListPaymentsByOrderRequest { order_id: value },
                    caller,
                ))
                .await;
            assert_names(listed, "order_id", case);
        }
    }

    // Nothing reached the database or the provider.
    for table in ["payments", "charge_claims", "simulated_provider_charges"] {
        assert_eq!(
            service
                .count(&format!("SELECT count(*) FROM payments.{table}"))
                .await,
            0,
            "{table}"
        );
    }

    // The bounds themselves are accepted: a 128-character key and token, a
    // 500-character reason with any text but NUL.
    let longest = ProcessPaymentRequest {
        payment_method_token: format!("tok_{}", "v".repeat(124)),
        idempotency_key: "k".repeat(128),
        ..valid.clone()
    };
    assert_eq!(
        service.process(longest).await.unwrap().status(),
        PaymentStatus::Captured
    );
    let reason = format!("{}\n\t«»", "é".repeat(496));
    assert_eq!(reason.chars().count(), 500);
    let undone = service
        .refund(RefundPaymentRequest {
            target: Some(Target::ChargeIdempotencyKey("c".repeat(128))),
            idempotency_key: "r".repeat(128),
            reason,
        })
        .await
        .unwrap();
    assert_eq!(undone.status(), PaymentStatus::Voided);
}

#[tokio::test]
async fn every_field_of_the_authorization_rpcs_is_checked_and_nothing_is_written() {
    use api_payment::v1::{
        AuthorizePaymentRequest, CapturePaymentRequest, VoidPaymentRequest,
        capture_payment_request, void_payment_request,
    };
    let service = Service::start(&[]).await;
    let valid = crate::support::authorization("auth-1", "tok_visa", 100);

    type Edit = fn(&mut AuthorizePaymentRequest, String);
    let fields: [(&str, Edit); 5] = [
        ("order_id", |r, v| r.order_id = v),
        ("customer_id", |r, v| r.customer_id = v),
        ("amount.currency", |r, v| {
            r.amount = Some(Money {
                amount_minor: 100,
                currency: v,
            });
        }),
        ("payment_method_token", |r, v| r.payment_method_token = v),
        ("idempotency_key", |r, v| r.idempotency_key = v),
    ];
    for (field, edit) in fields {
        for (value, case) in bad_variants("x") {
            let mut request = valid.clone();
            edit(&mut request, value);
            assert_names(service.authorize(request).await, field, case);
        }
    }
    for (amount_minor, case) in [(0, "zero"), (-5, "negative")] {
        let request = AuthorizePaymentRequest {
            amount: Some(Money {
                amount_minor,
                currency: "EUR".into(),
            }),
            ..valid.clone()
        };
        assert_names(
            service.authorize(request).await,
            "amount.amount_minor",
            case,
        );
    }
    let request = AuthorizePaymentRequest {
        amount: None,
        ..valid.clone()
    };
    assert_names(service.authorize(request).await, "amount", "missing");

    let payment_id = uuid::Uuid::new_v4().to_string();
    for (value, case) in bad_variants(&payment_id) {
        let by_id = CapturePaymentRequest {
            target: Some(capture_payment_request::Target::PaymentId(value.clone())),
        };
        assert_names(service.capture(by_id).await, "payment_id", case);
        let by_key = CapturePaymentRequest {
            target: Some(capture_payment_request::Target::AuthorizationIdempotencyKey(value)),
        };
        assert_names(
            service.capture(by_key).await,
            "authorization_idempotency_key",
            case,
        );
    }
    assert_names(
        service
            .capture(CapturePaymentRequest { target: None })
            .await,
        "payment_id",
        "no target",
    );

    let void = crate::support::void_by_key("auth-1");
    for (value, case) in bad_variants("auth-1") {
        let by_key = VoidPaymentRequest {
            target: Some(void_payment_request::Target::AuthorizationIdempotencyKey(
                value.clone(),
            )),
            ..void.clone()
        };
        assert_names(
            service.void(by_key).await,
            "authorization_idempotency_key",
            case,
        );
        let by_id = VoidPaymentRequest {
            target: Some(void_payment_request::Target::PaymentId(value.clone())),
            ..void.clone()
        };
        assert_names(service.void(by_id).await, "payment_id", case);
        let key = VoidPaymentRequest {
            idempotency_key: value.clone(),
            ..void.clone()
        };
        assert_names(service.void(key).await, "idempotency_key", case);
        let reason = VoidPaymentRequest {
            reason: value,
            ..void.clone()
        };
        assert_names(service.void(reason).await, "reason", case);
    }
    assert_names(
        service
            .void(VoidPaymentRequest {
                target: None,
                ..void.clone()
            })
            .await,
        "payment_id",
        "no target",
    );

    for table in ["payments", "charge_claims", "simulated_provider_charges"] {
        assert_eq!(
            service
                .count(&format!("SELECT count(*) FROM payments.{table}"))
                .await,
            0,
            "{table}"
        );
    }
}
