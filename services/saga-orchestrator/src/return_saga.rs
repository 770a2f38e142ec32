//! The return of a confirmed order: refund its payment, then mark it
//! returned. Started by OrderReturnRequested (`OrderService/RequestReturn`).
//!
//! | saga | step | class | action |
//! |---|---|---|---|
//! | `order-return` | `refund-payment` | compensatable | a `payment-refund` child saga, waited for |
//! | `order-return` | `mark-returned` | compensatable | MarkOrderReturned |
//! | `payment-refund` (child) | `refund` | pivot | RefundPayment of the order's payment, key = child saga id + step |
//!
//! The refund is a saga of its own so that it can be followed, retried and
//! reported on its own, and so that any flow that gives money back (a
//! return today, a partial refund or a goodwill credit tomorrow) runs the
//! same one. Once the refund has begun it only goes forward: the child's
//! pivot is its one step, so compensating the return never takes the
//! refund back (a compensation that would reach a completed refund fails,
//! for an operator). A v2 order is confirmed before its payment is
//! captured, so a return may come while the capture is still being
//! retried: the refund, told the payment is not captured yet
//! (`PAYMENT_NOT_CAPTURED`), waits for it and asks again, as a pivot that
//! never gives up (once the authorization is captured it is refunded; if
//! it lapses instead, nothing was taken and the refund answers so). A
//! refund refused for certain (the payment was declined, say) fails the
//! child, and with it the return, which then reports why; the order stays
//! RETURN_REQUESTED for an operator.

use std::sync::Arc;

use api_order::v1::MarkOrderReturnedRequest;
use api_order::v1::order_service_client::OrderServiceClient;
use api_payment::v1::RefundPaymentRequest;
use api_payment::v1::payment_service_client::PaymentServiceClient;
use api_payment::v1::refund_payment_request::Target;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use saga_engine::{Action, ChildSaga, Facts, SagaDefinition, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};
use service_runtime::client::Downstream;

use crate::calls::{classify, reason, request};
use crate::order_saga::{Downstreams, Tuning};

/// The return saga's type.
pub const SAGA_TYPE: &str = "order-return";
/// The refund child's type.
pub const REFUND_SAGA_TYPE: &str = "payment-refund";
pub const REFUND_PAYMENT: &str = "refund-payment";
pub const MARK_RETURNED: &str = "mark-returned";
const REFUND: &str = "refund";

/// What the return saga knows, from the OrderReturnRequested event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReturnData {
    pub order_id: String,
    /// The payment the order was confirmed with: the one to refund.
    pub payment_id: String,
    pub reason: String,
}

/// What the refund child knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RefundData {
    payment_id: String,
    reason: String,
}

/// The return saga and its refund child.
pub fn definitions(downstreams: &Downstreams, tuning: Tuning) -> Vec<SagaDefinition> {
    let refund_data = |facts: &Facts<'_>| {
        serde_json::json!({
            "payment_id": facts.data["payment_id"],
            "reason": facts.data["reason"],
        })
    };
    let order_return = SagaDefinition::sequence(
        SAGA_TYPE,
        vec![
            Step {
                child: Some(ChildSaga {
                    saga_type: REFUND_SAGA_TYPE,
                    data: Arc::new(refund_data),
                }),
                ..tuning.step(REFUND_PAYMENT)
            },
            Step {
                action: Some(Arc::new(MarkReturned(downstreams.orders.clone()))),
                ..tuning.step(MARK_RETURNED)
            },
        ],
    );
    let refund = SagaDefinition::sequence(
        REFUND_SAGA_TYPE,
        vec![Step {
            action: Some(Arc::new(Refund(downstreams.payments.clone()))),
            ..tuning.step(REFUND)
        }],
    )
    .with_pivot(REFUND);
    vec![order_return, refund]
}

fn data<T: serde::de::DeserializeOwned>(context: &StepContext) -> Result<T, StepError> {
    serde_json::from_value(context.data.clone())
        .map_err(|error| StepError::Permanent(format!("saga data: {error}")))
}

struct Refund(Downstream);

impl Action for Refund {
    fn run<'a>(
        &'a self,
        context: &'a StepContext,
    ) -> BoxFuture<'a, Result<serde_json::Value, StepError>> {
        async move {
            let refund: RefundData = data(context)?;
            let request_message = RefundPaymentRequest {
                target: Some(Target::PaymentId(refund.payment_id)),
                idempotency_key: context.idempotency_key(),
                reason: reason(&refund.reason),
            };
            let payment = PaymentServiceClient::new(self.0.clone())
                .refund_payment(request(request_message, context))
                .await
                .map_err(|status| {
                    // Confirmed before captured (order saga v2): the order
                    // saga's capture, retried until it answers, is coming.
                    // Refunding is waiting for it, as the pivot waits.
                    if not_captured_yet(&status) {
                        StepError::Retryable(format!(
                            "the payment is not captured yet; waiting for its capture: {}",
                            status.message()
                        ))
                    } else {
                        classify(&status)
                    }
                })?
                .into_inner();
            Ok(serde_json::json!({
                "payment_id": payment.payment_id,
                "payment_status": payment.status().as_str_name(),
            }))
        }
        .boxed()
    }
}

/// RefundPayment's refusal of an authorization not captured (yet).
fn not_captured_yet(status: &tonic::Status) -> bool {
    use tonic_types::StatusExt as _;
    status.code() == tonic::Code::FailedPrecondition
        && status.get_details_error_info().is_some_and(|info| {
            info.reason == api_payment::NOT_CAPTURED && info.domain == api_payment::ERROR_DOMAIN
        })
}

struct MarkReturned(Downstream);

impl Action for MarkReturned {
    fn run<'a>(
        &'a self,
        context: &'a StepContext,
    ) -> BoxFuture<'a, Result<serde_json::Value, StepError>> {
        async move {
            let order: ReturnData = data(context)?;
            let mark = MarkOrderReturnedRequest {
                order_id: order.order_id,
            };
            let returned = OrderServiceClient::new(self.0.clone())
                .mark_order_returned(request(mark, context))
                .await
                .map_err(|status| classify(&status))?
                .into_inner();
            Ok(serde_json::json!({ "order_status": returned.status().as_str_name() }))
        }
        .boxed()
    }
}
