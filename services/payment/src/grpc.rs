//! The gRPC face of the payment service.

use std::time::SystemTime;

use access_control::{Claims, Role};
use api_payment::v1 as pb;
use api_payment::v1::payment_service_server::PaymentService;
use money::{Currency, Money};
use prost::Message as _;
use service_runtime::status::{self, FieldViolations};
use sha2::{Digest as _, Sha256};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::app::{
    self, ChargeRequest, Ledger, PaymentRow, Payments, ProcessError, RefundError, RefundTarget,
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
        match self.payments.process(&charge).await {
            Ok(row) => Ok(Response::new(to_proto(&row))),
            Err(ProcessError::KeyReused) => Err(Status::failed_precondition(
                "the idempotency key was used before with a different request",
            )),
            Err(ProcessError::Provider(error)) => Err(provider_status(&error)),
            Err(ProcessError::Unexpected(error)) => Err(status::internal(&error)),
        }
    }

    async fn refund_payment(
        &self,
        request: Request<pb::RefundPaymentRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        let request = request.into_inner();
        let mut violations = FieldViolations::new();
        let target = match &request.target {
            None => {
                violations.add(
                    "payment_id",
                    "payment_id or charge_idempotency_key is required",
                );
                None
            }
            Some(pb::refund_payment_request::Target::PaymentId(id)) => {
                uuid_field(&mut violations, "payment_id", id).map(RefundTarget::Payment)
            }
            Some(pb::refund_payment_request::Target::ChargeIdempotencyKey(key)) => {
                key_field(&mut violations, "charge_idempotency_key", key)
                    .map(|()| RefundTarget::ChargeKey(key.clone()))
            }
        };
        let refund_key = key_field(&mut violations, "idempotency_key", &request.idempotency_key);
        if request.reason.chars().count() > 500 {
            violations.add("reason", "must be at most 500 characters");
        }
        let (Some(target), Some(())) = (target, refund_key) else {
            return Err(violations.into_status());
        };
        violations.into_result()?;
        match self
            .payments
            .refund(&target, &request.idempotency_key, request.reason.trim())
            .await
        {
            Ok(row) => Ok(Response::new(to_proto(&row))),
            Err(RefundError::NotFound) => Err(Status::not_found("no such payment")),
            Err(RefundError::NothingToRefund) => Err(Status::failed_precondition(
                "the payment was declined; there is nothing to refund",
            )),
            Err(RefundError::Provider(error)) => Err(provider_status(&error)),
            Err(RefundError::Unexpected(error)) => Err(status::internal(&error)),
        }
    }

    async fn get_payment(
        &self,
        request: Request<pb::GetPaymentRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        let claims = access_control::caller(&request)?.clone();
        let mut violations = FieldViolations::new();
        let payment_id = uuid_field(&mut violations, "payment_id", &request.get_ref().payment_id);
        let Some(payment_id) = payment_id else {
            return Err(violations.into_status());
        };
        let row = self
            .payments
            .get(payment_id)
            .await
            .map_err(|error| status::internal(&error))?;
        match row {
            Some(row) if may_see(&claims, &row) => Ok(Response::new(to_proto(&row))),
            _ => Err(Status::not_found("no such payment")),
        }
    }

    async fn list_payments_by_order(
        &self,
        request: Request<pb::ListPaymentsByOrderRequest>,
    ) -> Result<Response<pb::ListPaymentsByOrderResponse>, Status> {
        let claims = access_control::caller(&request)?.clone();
        let mut violations = FieldViolations::new();
        let order_id = uuid_field(&mut violations, "order_id", &request.get_ref().order_id);
        let Some(order_id) = order_id else {
            return Err(violations.into_status());
        };
        let (payments, ledger) = self
            .payments
            .by_order(order_id)
            .await
            .map_err(|error| status::internal(&error))?;
        // An order's payments all charge its customer: someone else sees none.
        if payments.iter().any(|row| !may_see(&claims, row)) {
            return Ok(Response::new(pb::ListPaymentsByOrderResponse::default()));
        }
        Ok(Response::new(pb::ListPaymentsByOrderResponse {
            payments: payments.iter().map(to_proto).collect(),
            ledger: ledger.map(|ledger| ledger_to_proto(order_id, &ledger)),
        }))
    }
}

/// The customer who was charged, services and admins may see a payment.
fn may_see(claims: &Claims, row: &PaymentRow) -> bool {
    match claims.role {
        Role::Service | Role::Admin => true,
        Role::Customer => row
            .customer_id
            .is_some_and(|customer| customer.to_string() == claims.sub),
    }
}

fn parse_process(request: pb::ProcessPaymentRequest) -> Result<ChargeRequest, Status> {
    let mut violations = FieldViolations::new();
    let order_id = uuid_field(&mut violations, "order_id", &request.order_id);
    let customer_id = uuid_field(&mut violations, "customer_id", &request.customer_id);
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
    let token = &request.payment_method_token;
    if token.is_empty() {
        violations.add("payment_method_token", "must not be empty");
    } else if token.len() > 128 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        violations.add(
            "payment_method_token",
            "must be 1 to 128 visible ASCII characters",
        );
    }
    let key = key_field(&mut violations, "idempotency_key", &request.idempotency_key);
    let (Some(order_id), Some(customer_id), Some(amount), Some(())) =
        (order_id, customer_id, amount, key)
    else {
        return Err(violations.into_status());
    };
    violations.into_result()?;
    let request_hash = Sha256::digest(
        pb::ProcessPaymentRequest {
            idempotency_key: String::new(),
            ..request.clone()
        }
        .encode_to_vec(),
    )
    .to_vec();
    Ok(ChargeRequest {
        order_id,
        customer_id,
        amount,
        payment_method: request.payment_method_token,
        idempotency_key: request.idempotency_key,
        request_hash,
    })
}

fn uuid_field(violations: &mut FieldViolations, field: &str, text: &str) -> Option<Uuid> {
    if text.is_empty() {
        violations.add(field, "must not be empty");
        return None;
    }
    Uuid::parse_str(text)
        .map_err(|_| violations.add(field, "must be a UUID"))
        .ok()
}

fn key_field(violations: &mut FieldViolations, field: &str, key: &str) -> Option<()> {
    let problem = match key.len() {
        0 => Some("must not be empty"),
        1..=128 if key.bytes().all(|b| b.is_ascii_graphic()) => None,
        1..=128 => Some("must be visible ASCII without spaces"),
        _ => Some("must be at most 128 characters"),
    };
    match problem {
        Some(problem) => {
            violations.add(field, problem);
            None
        }
        None => Some(()),
    }
}

fn provider_status(error: &ProviderError) -> Status {
    match error {
        ProviderError::Transient(reason) => {
            tracing::warn!(%reason, "provider failed transiently");
            Status::unavailable(format!(
                "the payment provider failed transiently ({reason}); retry with the same key"
            ))
        }
        ProviderError::Unexpected(error) => status::internal(error),
    }
}

fn to_proto(row: &PaymentRow) -> pb::Payment {
    let status = match row.status.as_str() {
        "captured" => pb::PaymentStatus::Captured,
        "declined" => pb::PaymentStatus::Declined,
        "refunded" => pb::PaymentStatus::Refunded,
        "voided" => pb::PaymentStatus::Voided,
        _ => pb::PaymentStatus::Unspecified,
    };
    pb::Payment {
        payment_id: row.payment_id.to_string(),
        order_id: row.order_id.map(|id| id.to_string()).unwrap_or_default(),
        customer_id: row.customer_id.map(|id| id.to_string()).unwrap_or_default(),
        status: status.into(),
        amount: app::money_of(row),
        decline_reason: row.decline_reason.clone().unwrap_or_default(),
        provider_reference: row.provider_reference.clone().unwrap_or_default(),
        created_at: Some(SystemTime::from(row.created_at).into()),
        refunded_at: row.refunded_at.map(|at| SystemTime::from(at).into()),
    }
}

fn ledger_to_proto(order_id: Uuid, ledger: &Ledger) -> pb::OrderLedger {
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
