//! The gRPC face of the payment service.

use std::time::SystemTime;

use access_control::{Claims, Role};
use api_payment::v1 as pb;
use api_payment::v1::payment_service_server::PaymentService;
use money::{Currency, Money};
use prost::Message as _;
use service_runtime::status::{self, FieldViolations};
use sha2::{Digest as _, Sha256};
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::app::{
    self, CaptureError, Ledger, Payments, ProcessError, RefundError, RefundTarget, VoidError,
};
use crate::domain::{
    ChargeDetails, ChargeKey, ChargeRequest, CustomerId, NothingToRefund, OrderId, Payment,
    PaymentId, PaymentKind, PaymentMethodToken, PaymentStatus, Refund, RefundKey, RefundReason,
    RequestHash,
};
use crate::provider::ProviderError;

#[derive(Debug, Clone)]
pub(crate) struct PaymentApi {
    pub(crate) payments: Payments,
}

#[tonic::async_trait]
impl PaymentService for PaymentApi {
    async fn process_payment(
        &self,
        request: Request<pb::ProcessPaymentRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        let charge = parse_process(request.into_inner())?;
        let payment = self.payments.process(&charge).await?;
        Ok(Response::new(to_proto(&payment)))
    }

    async fn authorize_payment(
        &self,
        request: Request<pb::AuthorizePaymentRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        let request = request.into_inner();
        // The same fields as a charge's, parsed and hashed the same way but
        // for the kind: a key is a charge's or an authorization's, never
        // both.
        let charge = parse_charge(
            PaymentKind::Authorization,
            pb::ProcessPaymentRequest {
                order_id: request.order_id,
                customer_id: request.customer_id,
                amount: request.amount,
                payment_method_token: request.payment_method_token,
                idempotency_key: request.idempotency_key,
            },
        )?;
        let payment = self.payments.process(&charge).await?;
        Ok(Response::new(to_proto(&payment)))
    }

    async fn capture_payment(
        &self,
        request: Request<pb::CapturePaymentRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        use pb::capture_payment_request::Target;
        let mut violations = FieldViolations::new();
        let target = parse_target(
            &mut violations,
            request
                .get_ref()
                .target
                .as_ref()
                .map(|target| match target {
                    Target::PaymentId(id) => TargetField::PaymentId(id),
                    Target::AuthorizationIdempotencyKey(key) => TargetField::Key(key),
                }),
        );
        let Some(target) = target else {
            return Err(violations.into_status());
        };
        let payment = self.payments.capture(&target).await?;
        Ok(Response::new(to_proto(&payment)))
    }

    async fn void_payment(
        &self,
        request: Request<pb::VoidPaymentRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        use pb::void_payment_request::Target;
        let request = request.get_ref();
        let mut violations = FieldViolations::new();
        let target = parse_target(
            &mut violations,
            request.target.as_ref().map(|target| match target {
                Target::PaymentId(id) => TargetField::PaymentId(id),
                Target::AuthorizationIdempotencyKey(key) => TargetField::Key(key),
            }),
        );
        let key = violations.check(
            "idempotency_key",
            RefundKey::parse(&request.idempotency_key),
        );
        let reason = violations.check("reason", RefundReason::parse(&request.reason));
        let (Some(target), Some(key), Some(reason)) = (target, key, reason) else {
            return Err(violations.into_status());
        };
        let payment = self.payments.void(&target, &Refund { key, reason }).await?;
        Ok(Response::new(to_proto(&payment)))
    }

    async fn refund_payment(
        &self,
        request: Request<pb::RefundPaymentRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        let (target, refund) = parse_refund(request.get_ref())?;
        let payment = self.payments.refund(&target, &refund).await?;
        Ok(Response::new(to_proto(&payment)))
    }

    async fn get_payment(
        &self,
        request: Request<pb::GetPaymentRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        let claims = access_control::caller(&request)?.clone();
        let payment_id = status::parse_field(
            "payment_id",
            PaymentId::parse(&request.get_ref().payment_id),
        )?;
        let payment = self
            .payments
            .get(payment_id)
            .await
            .map_err(|error| status::internal(&error))?;
        match payment {
            Some(payment) if may_see(&claims, &payment) => Ok(Response::new(to_proto(&payment))),
            _ => Err(Status::not_found("no such payment")),
        }
    }

    async fn list_payments_by_order(
        &self,
        request: Request<pb::ListPaymentsByOrderRequest>,
    ) -> Result<Response<pb::ListPaymentsByOrderResponse>, Status> {
        let claims = access_control::caller(&request)?.clone();
        let order_id =
            status::parse_field("order_id", OrderId::parse(&request.get_ref().order_id))?;
        let (payments, ledger) = self
            .payments
            .by_order(order_id)
            .await
            .map_err(|error| status::internal(&error))?;
        // An order's payments all charge its customer: someone else sees none.
        if payments.iter().any(|payment| !may_see(&claims, payment)) {
            return Ok(Response::new(pb::ListPaymentsByOrderResponse::default()));
        }
        Ok(Response::new(pb::ListPaymentsByOrderResponse {
            payments: payments.iter().map(to_proto).collect(),
            ledger: ledger.map(|ledger| ledger_to_proto(order_id, &ledger)),
        }))
    }
}

/// The customer who was charged, services and admins may see a payment.
fn may_see(claims: &Claims, payment: &Payment) -> bool {
    match claims.role {
        Role::Service | Role::Admin => true,
        Role::Customer => payment
            .charge
            .as_ref()
            .is_some_and(|charge| charge.customer_id.to_string() == claims.sub),
    }
}

// The edge: every field of a write is parsed into a domain value here,
// once, so that nothing unchecked reaches the database. Each bad field is
// named in the INVALID_ARGUMENT, and nothing is written.

fn parse_process(request: pb::ProcessPaymentRequest) -> Result<ChargeRequest, Status> {
    parse_charge(PaymentKind::Charge, request)
}

/// What names an authorization, as sent.
#[derive(Clone, Copy)]
enum TargetField<'a> {
    PaymentId(&'a str),
    Key(&'a str),
}

fn parse_target(
    violations: &mut FieldViolations,
    target: Option<TargetField<'_>>,
) -> Option<RefundTarget> {
    match target {
        None => {
            violations.add(
                "payment_id",
                "payment_id or authorization_idempotency_key is required",
            );
            None
        }
        Some(TargetField::PaymentId(id)) => violations
            .check("payment_id", PaymentId::parse(id))
            .map(RefundTarget::Payment),
        Some(TargetField::Key(key)) => violations
            .check("authorization_idempotency_key", ChargeKey::parse(key))
            .map(RefundTarget::ChargeKey),
    }
}

fn parse_charge(
    kind: PaymentKind,
    request: pb::ProcessPaymentRequest,
) -> Result<ChargeRequest, Status> {
    let mut violations = FieldViolations::new();
    let order_id = violations.check("order_id", OrderId::parse(&request.order_id));
    let customer_id = violations.check("customer_id", CustomerId::parse(&request.customer_id));
    let amount = match &request.amount {
        None => {
            violations.add("amount", "is required");
            None
        }
        Some(amount) => match Currency::parse(&amount.currency) {
            Err(error) => {
                violations.add("amount.currency", error.to_string());
                None
            }
            Ok(currency) => Money::positive(amount.amount_minor, currency)
                .map_err(|error| violations.add("amount.amount_minor", error.to_string()))
                .ok(),
        },
    };
    let payment_method = violations.check(
        "payment_method_token",
        PaymentMethodToken::parse(&request.payment_method_token),
    );
    let key = violations.check(
        "idempotency_key",
        ChargeKey::parse(&request.idempotency_key),
    );
    let (Some(order_id), Some(customer_id), Some(amount), Some(payment_method), Some(key)) =
        (order_id, customer_id, amount, payment_method, key)
    else {
        return Err(violations.into_status());
    };
    // The digest of everything but the key: the same key with another
    // request is refused. An authorization's digest starts from its kind,
    // so that it never equals a charge's.
    let mut digest = Sha256::new();
    if kind == PaymentKind::Authorization {
        digest.update(b"authorization\0");
    }
    digest.update(
        pb::ProcessPaymentRequest {
            idempotency_key: String::new(),
            ..request
        }
        .encode_to_vec(),
    );
    let request_hash = RequestHash::new(digest.finalize().to_vec());
    Ok(ChargeRequest {
        key,
        kind,
        details: ChargeDetails {
            order_id,
            customer_id,
            amount,
        },
        payment_method,
        request_hash,
    })
}

fn parse_refund(request: &pb::RefundPaymentRequest) -> Result<(RefundTarget, Refund), Status> {
    use pb::refund_payment_request::Target;
    let mut violations = FieldViolations::new();
    let target = match &request.target {
        None => {
            violations.add(
                "payment_id",
                "payment_id or charge_idempotency_key is required",
            );
            None
        }
        Some(Target::PaymentId(id)) => violations
            .check("payment_id", PaymentId::parse(id))
            .map(RefundTarget::Payment),
        Some(Target::ChargeIdempotencyKey(key)) => violations
            .check("charge_idempotency_key", ChargeKey::parse(key))
            .map(RefundTarget::ChargeKey),
    };
    let key = violations.check(
        "idempotency_key",
        RefundKey::parse(&request.idempotency_key),
    );
    let reason = violations.check("reason", RefundReason::parse(&request.reason));
    let (Some(target), Some(key), Some(reason)) = (target, key, reason) else {
        return Err(violations.into_status());
    };
    Ok((target, Refund { key, reason }))
}

// Each use case's errors become statuses here, each variant on purpose.

impl From<ProcessError> for Status {
    fn from(error: ProcessError) -> Self {
        match error {
            ProcessError::KeyReused(_) => status::key_reused(),
            ProcessError::Provider(error) => error.into(),
            ProcessError::Unexpected(error) => status::internal(&error),
        }
    }
}

impl From<RefundError> for Status {
    fn from(error: RefundError) -> Self {
        match error {
            RefundError::NotFound => Status::not_found("no such payment"),
            // Named in an `ErrorInfo`, so that a caller can tell "not
            // captured yet" from "declined" without reading the message.
            RefundError::NothingToRefund(error @ NothingToRefund::OnlyAuthorized) => {
                Status::with_error_details(
                    Code::FailedPrecondition,
                    error.to_string(),
                    ErrorDetails::with_error_info(
                        api_payment::NOT_CAPTURED,
                        api_payment::ERROR_DOMAIN,
                        std::collections::HashMap::<String, String>::new(),
                    ),
                )
            }
            RefundError::NothingToRefund(error) => Status::failed_precondition(error.to_string()),
            RefundError::Provider(error) => error.into(),
            RefundError::Unexpected(error) => status::internal(&error),
        }
    }
}

impl From<CaptureError> for Status {
    fn from(error: CaptureError) -> Self {
        match error {
            CaptureError::NotFound => Status::not_found("no such authorization"),
            CaptureError::Refused(refusal) => Status::failed_precondition(refusal.to_string()),
            CaptureError::Provider(error) => error.into(),
            CaptureError::Unexpected(error) => status::internal(&error),
        }
    }
}

impl From<VoidError> for Status {
    fn from(error: VoidError) -> Self {
        match error {
            VoidError::NotFound => Status::not_found("no such payment"),
            VoidError::Refused(refusal) => Status::failed_precondition(refusal.to_string()),
            VoidError::Provider(error) => error.into(),
            VoidError::Unexpected(error) => status::internal(&error),
        }
    }
}

impl From<ProviderError> for Status {
    fn from(error: ProviderError) -> Self {
        match error {
            ProviderError::Transient(reason) => {
                tracing::warn!(%reason, "provider failed transiently");
                Status::unavailable(format!(
                    "the payment provider failed transiently ({reason}); retry with the same key"
                ))
            }
            ProviderError::Unexpected(error) => status::internal(&error),
        }
    }
}

fn to_proto(payment: &Payment) -> pb::Payment {
    // As it is now: an authorization past its expiry has lapsed, whether
    // or not anyone has recorded it yet.
    let status = match payment.status_at(chrono::Utc::now()) {
        PaymentStatus::Authorized => pb::PaymentStatus::Authorized,
        PaymentStatus::Captured => pb::PaymentStatus::Captured,
        PaymentStatus::Declined => pb::PaymentStatus::Declined,
        PaymentStatus::Refunded => pb::PaymentStatus::Refunded,
        PaymentStatus::Voided => pb::PaymentStatus::Voided,
        PaymentStatus::Expired => pb::PaymentStatus::Expired,
    };
    let kind = match payment.kind {
        PaymentKind::Charge => pb::PaymentKind::Charge,
        PaymentKind::Authorization => pb::PaymentKind::Authorization,
    };
    let timestamp =
        |at: Option<chrono::DateTime<chrono::Utc>>| at.map(|at| SystemTime::from(at).into());
    let charge = payment.charge.as_ref();
    pb::Payment {
        payment_id: payment.id.to_string(),
        order_id: charge
            .map(|charge| charge.order_id.to_string())
            .unwrap_or_default(),
        customer_id: charge
            .map(|charge| charge.customer_id.to_string())
            .unwrap_or_default(),
        status: status.into(),
        amount: app::money_of(payment),
        decline_reason: payment.decline_reason.clone().unwrap_or_default(),
        provider_reference: payment.provider_reference.clone().unwrap_or_default(),
        created_at: Some(SystemTime::from(payment.created_at).into()),
        refunded_at: timestamp(payment.refunded_at),
        kind: kind.into(),
        authorization_expires_at: timestamp(payment.authorization_expires_at),
        captured_at: timestamp(payment.captured_at),
        voided_at: timestamp(payment.voided_at),
    }
}

fn ledger_to_proto(order_id: OrderId, ledger: &Ledger) -> pb::OrderLedger {
    let money = |amount_minor| {
        Some(api_common::v1::Money {
            amount_minor,
            currency: ledger.currency.clone(),
        })
    };
    pb::OrderLedger {
        order_id: order_id.to_string(),
        captured: money(ledger.captured_minor),
        refunded: money(ledger.refunded_minor),
        net: money(ledger.captured_minor - ledger.refunded_minor),
    }
}
