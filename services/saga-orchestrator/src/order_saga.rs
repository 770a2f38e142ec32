//! The order-processing saga: charge the order, then confirm it; undo what
//! was done when a step fails, the customer cancels, or an operator asks.
//!
//! | step | class | action | compensation |
//! |---|---|---|---|
//! | `open-order` | compensatable | (none: the saga takes charge of the order) | `close-order`: CancelOrder if money was taken back or the saga was called off, RejectOrder if the payment failed |
//! | `process-payment` | compensatable | ProcessPayment, idempotency key = saga id + step | RefundPayment by that key: refunds a capture, voids a charge not made (at the provider too) |
//! | `confirm-order` | pivot | ConfirmOrder with the payment id | (none: past it the saga only goes forward) |
//!
//! `confirm-order` is the point of no return, and the order aggregate is
//! what makes it one: it decides ConfirmOrder against the customer's
//! RequestOrderCancellation atomically. Once the saga has begun confirming, it can no
//! longer know the order is not confirmed, so it refuses to compensate and
//! repeats ConfirmOrder (idempotent) until the order answers for certain:
//! confirmed (done), or refused because the customer's cancellation came
//! first (then, and only then, it refunds and cancels).
//!
//! An unknown outcome of the charge (its answer was lost) needs no separate
//! question: refunding by the charge's key asks the payment service, which
//! asks the provider, under the key's lock, and undoes whatever happened.
//!
//! Compensation runs in reverse, so a refund always precedes the order's
//! cancellation. Every call is idempotent, so the engine may repeat any of
//! them after a timeout or a crash.

use std::sync::Arc;
use std::time::Duration;

use access_control::Scope;
use api_order::v1::order_service_client::OrderServiceClient;
use api_order::v1::{CancelOrderRequest, ConfirmOrderRequest, RejectOrderRequest};
use api_payment::v1::payment_service_client::PaymentServiceClient;
use api_payment::v1::refund_payment_request::Target;
use api_payment::v1::{PaymentStatus, ProcessPaymentRequest, RefundPaymentRequest};
use futures::FutureExt as _;
use futures::future::BoxFuture;
use saga_engine::{Action, RetryPolicy, SagaDefinition, Settle, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};
use service_runtime::client::Downstream;
use tonic::Code;

/// The saga type name.
pub const SAGA_TYPE: &str = "order-processing";

/// The scopes of the calls below, which the orchestrator's service token
/// asks for (its client must be granted them in `AUTH_SERVICE_CLIENTS`):
/// ProcessPayment, RefundPayment, and ConfirmOrder, RejectOrder, CancelOrder.
/// Nothing more: the saga never reads payments.
pub const SCOPES: [Scope; 3] = [
    Scope::PaymentsCharge,
    Scope::PaymentsRefund,
    Scope::OrdersSettle,
];

const PROCESS_PAYMENT: &str = "process-payment";
/// The saga's pivot.
pub const CONFIRM_ORDER: &str = "confirm-order";

/// What the saga knows about its order, from the OrderPlaced event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderData {
    pub order_id: String,
    pub customer_id: String,
    pub amount_minor: i64,
    pub currency: String,
    pub payment_method_token: String,
}

/// How hard the saga tries.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    pub attempt_timeout: Duration,
    pub step_deadline: Duration,
    pub retry: RetryPolicy,
    pub compensation_retry: RetryPolicy,
}

/// The downstream services the saga calls.
#[derive(Debug, Clone)]
pub struct Downstreams {
    pub orders: Downstream,
    pub payments: Downstream,
}

pub fn definition(downstreams: &Downstreams, tuning: Tuning) -> SagaDefinition {
    let step =
        |name, action: Option<Arc<dyn Action>>, compensation: Option<Arc<dyn Action>>| Step {
            name,
            action,
            compensation,
            retry: tuning.retry,
            compensation_retry: tuning.compensation_retry,
            attempt_timeout: tuning.attempt_timeout,
            compensation_attempt_timeout: tuning.attempt_timeout,
            deadline: tuning.step_deadline,
            // Only process-payment has both an action and a compensation,
            // and its refund by key settles an unknown charge by itself.
            settle: Settle::ByCompensation,
            condition: None,
            wait: None,
            child: None,
        };
    SagaDefinition::sequence(
        SAGA_TYPE,
        vec![
            step(
                "open-order",
                None,
                Some(Arc::new(CloseOrder(downstreams.orders.clone()))),
            ),
            step(
                PROCESS_PAYMENT,
                Some(Arc::new(ProcessPayment(downstreams.payments.clone()))),
                Some(Arc::new(RefundPayment(downstreams.payments.clone()))),
            ),
            step(
                CONFIRM_ORDER,
                Some(Arc::new(ConfirmOrder(downstreams.orders.clone()))),
                None,
            ),
        ],
    )
    .with_pivot(CONFIRM_ORDER)
}

fn data(context: &StepContext) -> Result<OrderData, StepError> {
    serde_json::from_value(context.data.clone())
        .map_err(|error| StepError::Permanent(format!("saga data: {error}")))
}

/// A request with the attempt's time left as its deadline and its id as
/// its request id.
fn request<T>(message: T, context: &StepContext) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(context.time_left);
    // Names this attempt as the cause of the events the call records.
    if let Ok(id) = context.request_id.parse() {
        request
            .metadata_mut()
            .insert(telemetry::causation::REQUEST_ID_HEADER, id);
    }
    request
}

/// What a failed call tells us. A call an open circuit refused was never
/// made, and costs no attempt. A call that timed out, was cancelled, or
/// broke (unavailable, unknown, internal) may have taken effect before its
/// answer was lost: unknown. A service that refused for now (overloaded, a
/// conflict, our token renewing) did nothing: retryable. Anything else is a
/// refusal for certain.
fn classify(status: &tonic::Status) -> StepError {
    let message = format!("{:?}: {}", status.code(), status.message());
    if let Some(retry_after) = service_runtime::client::refused_by_circuit(status) {
        return StepError::NotAttempted {
            reason: message,
            retry_after,
        };
    }
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Internal
        | Code::Unknown
        | Code::DataLoss => StepError::Unknown(message),
        Code::ResourceExhausted | Code::Aborted | Code::Unauthenticated => {
            StepError::Retryable(message)
        }
        _ => StepError::Permanent(message),
    }
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
                order_id: order.order_id,
                customer_id: order.customer_id,
                amount: Some(api_common::v1::Money {
                    amount_minor: order.amount_minor,
                    currency: order.currency,
                }),
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
                reason: context.failure_reason.clone().unwrap_or_default().chars().take(500).collect(),
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

struct ConfirmOrder(Downstream);

impl Action for ConfirmOrder {
    fn run<'a>(
        &'a self,
        context: &'a StepContext,
    ) -> BoxFuture<'a, Result<serde_json::Value, StepError>> {
        async move {
            let order = data(context)?;
            let payment_id = context.outputs[PROCESS_PAYMENT]["payment_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let confirm = ConfirmOrderRequest {
                order_id: order.order_id,
                payment_id,
            };
            let confirmed = OrderServiceClient::new(self.0.clone())
                .confirm_order(request(confirm, context))
                .await
                .map_err(|status| classify(&status))?
                .into_inner();
            Ok(serde_json::json!({ "order_version": confirmed.version }))
        }
        .boxed()
    }
}

struct CloseOrder(Downstream);

impl Action for CloseOrder {
    fn run<'a>(
        &'a self,
        context: &'a StepContext,
    ) -> BoxFuture<'a, Result<serde_json::Value, StepError>> {
        async move {
            let order = data(context)?;
            let mut client = OrderServiceClient::new(self.0.clone());
            let reason = context
                .failure_reason
                .clone()
                .unwrap_or_else(|| "cancelled".to_owned());
            let reason: String = reason.chars().take(500).collect();
            // The payment failed on its own and nothing was charged: the
            // order is rejected. Otherwise (money refunded, or the saga was
            // called off) it is cancelled.
            let refunded = context
                .compensation_outputs
                .get(PROCESS_PAYMENT)
                .is_some_and(|undone| {
                    undone["payment_status"] == PaymentStatus::Refunded.as_str_name()
                });
            let closed = match context
                .failed_actions
                .get(PROCESS_PAYMENT)
                .filter(|_| !refunded)
            {
                Some(payment_error) => {
                    let reason: String = payment_error.chars().take(500).collect();
                    client
                        .reject_order(request(
                            RejectOrderRequest {
                                order_id: order.order_id,
                                reason,
                            },
                            context,
                        ))
                        .await
                }
                None => {
                    client
                        .cancel_order(request(
                            CancelOrderRequest {
                                order_id: order.order_id,
                                reason,
                            },
                            context,
                        ))
                        .await
                }
            };
            let closed = closed.map_err(|status| classify(&status))?.into_inner();
            Ok(serde_json::json!({ "order_status": closed.status().as_str_name() }))
        }
        .boxed()
    }
}
