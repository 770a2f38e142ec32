//! Version 1 of the order saga: charge, then confirm. See the table in
//! [`super`]. Kept unchanged for the sagas that started on it.

use std::sync::Arc;

use api_payment::v1::payment_service_client::PaymentServiceClient;
use api_payment::v1::refund_payment_request::Target;
use api_payment::v1::{PaymentStatus, ProcessPaymentRequest, RefundPaymentRequest};
use futures::FutureExt as _;
use futures::future::BoxFuture;
use saga_engine::{Action, SagaDefinition, Step, StepContext, StepError};
use service_runtime::client::Downstream;

use super::{CONFIRM_ORDER, Downstreams, SAGA_TYPE, Tuning, confirm_order, data, open_order};
use crate::calls::{classify, reason, request};

const PROCESS_PAYMENT: &str = "process-payment";

pub fn definition(downstreams: &Downstreams, tuning: Tuning) -> SagaDefinition {
    SagaDefinition::sequence(
        SAGA_TYPE,
        vec![
            open_order(tuning, downstreams, &[PROCESS_PAYMENT]),
            Step {
                action: Some(Arc::new(ProcessPayment(downstreams.payments.clone()))),
                compensation: Some(Arc::new(RefundPayment(downstreams.payments.clone()))),
                ..tuning.step(PROCESS_PAYMENT)
            },
            confirm_order(tuning, downstreams, PROCESS_PAYMENT),
        ],
    )
    .with_pivot(CONFIRM_ORDER)
}

struct ProcessPayment(Downstream);

impl Action for ProcessPayment {
    fn run<'a>(
        &'a self,
        context: &'a StepContext,
    ) -> BoxFuture<'a, Result<serde_json::Value, StepError>> {
        async move {
            let order = data(context)?;
            let charge = ProcessPaymentRequest {
                amount: Some(order.total()),
                order_id: order.order_id,
                customer_id: order.customer_id,
                payment_method_token: order.payment_method_token,
                idempotency_key: context.idempotency_key(),
            };
            let payment = PaymentServiceClient::new(self.0.clone())
                .process_payment(request(charge, context))
                .await
                .map_err(|status| classify(&status))?
                .into_inner();
            match payment.status() {
                PaymentStatus::Captured => {
                    Ok(serde_json::json!({ "payment_id": payment.payment_id }))
                }
                PaymentStatus::Declined => Err(StepError::Permanent(format!(
                    "payment declined: {}",
                    payment.decline_reason
                ))),
                other => Err(StepError::Permanent(format!(
                    "payment is {}",
                    other.as_str_name()
                ))),
            }
        }
        .boxed()
    }
}

struct RefundPayment(Downstream);

impl Action for RefundPayment {
    fn run<'a>(
        &'a self,
        context: &'a StepContext,
    ) -> BoxFuture<'a, Result<serde_json::Value, StepError>> {
        async move {
            // By the charge's key: refunds a capture, and voids a charge that
            // was not made (or is still in flight), whatever we know of it.
            let refund = RefundPaymentRequest {
                target: Some(Target::ChargeIdempotencyKey(format!("{}:{PROCESS_PAYMENT}", context.saga_id))),
                idempotency_key: context.idempotency_key(),
                reason: reason(context.failure_reason.as_deref().unwrap_or_default()),
            };
            let payment = PaymentServiceClient::new(self.0.clone())
                .refund_payment(request(refund, context))
                .await
                .map_err(|status| classify(&status))?
                .into_inner();
            Ok(serde_json::json!({ "payment_status": payment.status().as_str_name(), "payment_id": payment.payment_id }))
        }
        .boxed()
    }
}
