//! The order-processing saga, in two versions. Both take an order to its
//! confirmation and its money, and undo what was done when a step fails,
//! the customer cancels, or an operator asks. A binary carries both: a saga
//! finishes on the version it started on, and new sagas start on the
//! version `ORDER_SAGA_VERSION` names.
//!
//! Version 1 ([`v1`]) charges the order, then confirms it:
//!
//! | step | class | action | compensation |
//! |---|---|---|---|
//! | `open-order` | compensatable | (none: the saga takes charge of the order) | `close-order`: RejectOrder if the payment failed, CancelOrder otherwise |
//! | `process-payment` | compensatable | ProcessPayment, idempotency key = saga id + step | RefundPayment by that key: refunds a capture, voids a charge not made (at the provider too) |
//! | `confirm-order` | pivot | ConfirmOrder with the payment id | (none: past it the saga only goes forward) |
//!
//! Version 2 ([`v2`]) holds the money first, has large orders reviewed,
//! confirms, and only then takes the money:
//!
//! | step | class | action | compensation |
//! |---|---|---|---|
//! | `open-order` | compensatable | (none) | `close-order`: RejectOrder if the payment or the review said no, CancelOrder otherwise |
//! | `authorize-payment` | compensatable | AuthorizePayment, key = saga id + step | VoidPayment by that key: releases the hold, or makes a late authorization hold nothing |
//! | `hold-for-review` | compensatable, only for an order at or above `REVIEW_THRESHOLD` | HoldOrderForReview | (none: closing the order ends the review) |
//! | `review` | the same | waits for the `review` signal (ApproveOrder, DeclineOrder), at most `REVIEW_TIMEOUT`, which counts as declined | (none) |
//! | `check-review` | the same | fails if the review declined, or if the authorization lapses too soon to capture | (none) |
//! | `confirm-order` | pivot | ConfirmOrder with the authorization's payment id | (none) |
//! | `capture-payment` | retriable | CapturePayment by the authorization's key | (none: retried until it answers) |
//!
//! Undoing a v2 order before its pivot voids the authorization: nothing is
//! ever refunded, because nothing was taken.
//!
//! `confirm-order` is the point of no return, and the order aggregate is
//! what makes it one: it decides ConfirmOrder against the customer's
//! RequestOrderCancellation (and, in v2, against a review that has not
//! approved) atomically. Once the saga has begun confirming, it can no
//! longer know the order is not confirmed, so it refuses to compensate and
//! repeats ConfirmOrder (idempotent) until the order answers for certain:
//! confirmed (done), or refused because the customer's cancellation came
//! first (then, and only then, it undoes the payment and cancels).
//!
//! An unknown outcome of the charge or the authorization (its answer was
//! lost) needs no separate question: undoing it by its key asks the payment
//! service, which asks the provider, under the key's lock, and undoes
//! whatever happened.
//!
//! Compensation runs in reverse, so the money is released before the
//! order is closed. Every call is idempotent, so the engine may repeat any
//! of them after a timeout or a crash.

pub mod v1;
pub mod v2;

use std::sync::Arc;
use std::time::Duration;

use access_control::Scope;
use api_order::v1::order_service_client::OrderServiceClient;
use api_order::v1::{CancelOrderRequest, ConfirmOrderRequest, RejectOrderRequest};
use api_payment::v1::PaymentStatus;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use saga_engine::{Action, RetryPolicy, SagaDefinition, Settle, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};
use service_runtime::client::Downstream;

use crate::calls::{classify, reason, request};

/// The saga type name.
pub const SAGA_TYPE: &str = "order-processing";

/// The scopes of the calls of the orchestrator's sagas, which its service
/// token asks for (its client must be granted them in
/// `AUTH_SERVICE_CLIENTS`): ProcessPayment, AuthorizePayment and
/// CapturePayment; RefundPayment and VoidPayment; and ConfirmOrder,
/// RejectOrder, CancelOrder, HoldOrderForReview and MarkOrderReturned.
/// Nothing more: the sagas never read payments.
pub const SCOPES: [Scope; 3] = [
    Scope::PaymentsCharge,
    Scope::PaymentsRefund,
    Scope::OrdersSettle,
];

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
    /// Whether the order is reviewed before it is confirmed (v2): decided
    /// once, when the saga starts, so that a change of `REVIEW_THRESHOLD`
    /// never changes the course of a saga under way.
    #[serde(default)]
    pub review_required: bool,
}

impl OrderData {
    /// The order's total, as the payment service takes it.
    pub(crate) fn total(&self) -> api_common::v1::Money {
        api_common::v1::Money {
            amount_minor: self.amount_minor,
            currency: self.currency.clone(),
        }
    }
}

/// How hard the saga tries.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    pub attempt_timeout: Duration,
    pub step_deadline: Duration,
    pub retry: RetryPolicy,
    pub compensation_retry: RetryPolicy,
}

impl Tuning {
    /// A step of the saga with this tuning, doing nothing yet.
    pub(crate) fn step(&self, name: &'static str) -> Step {
        Step {
            name,
            action: None,
            compensation: None,
            retry: self.retry,
            compensation_retry: self.compensation_retry,
            attempt_timeout: self.attempt_timeout,
            compensation_attempt_timeout: self.attempt_timeout,
            deadline: self.step_deadline,
            // The steps that have both an action and a compensation undo
            // by the action's key, which settles an unknown outcome too.
            settle: Settle::ByCompensation,
            condition: None,
            wait: None,
            child: None,
        }
    }
}

/// The downstream services the sagas call.
#[derive(Debug, Clone)]
pub struct Downstreams {
    pub orders: Downstream,
    pub payments: Downstream,
}

/// The newest version of the order saga.
pub const NEWEST: u32 = 2;

/// Every version of the order saga: a replica carries them all, whichever
/// it starts, so that a saga started anywhere finishes here.
pub fn definitions(
    downstreams: &Downstreams,
    tuning: Tuning,
    review: v2::Review,
) -> Vec<SagaDefinition> {
    vec![
        v1::definition(downstreams, tuning),
        v2::definition(downstreams, tuning, review),
    ]
}

pub(crate) fn data(context: &StepContext) -> Result<OrderData, StepError> {
    serde_json::from_value(context.data.clone())
        .map_err(|error| StepError::Permanent(format!("saga data: {error}")))
}

/// `open-order`'s compensation: closes an order that did not go through.
/// Rejected when one of `rejecting` failed (the payment, or the review,
/// said no) and its own undoing took no money back; cancelled otherwise
/// (the customer or an operator called it off, or money was refunded).
pub(crate) struct CloseOrder {
    pub(crate) orders: Downstream,
    pub(crate) rejecting: &'static [&'static str],
}

impl Action for CloseOrder {
    fn run<'a>(
        &'a self,
        context: &'a StepContext,
    ) -> BoxFuture<'a, Result<serde_json::Value, StepError>> {
        async move {
            let order = data(context)?;
            let mut client = OrderServiceClient::new(self.orders.clone());
            let refunded = |step: &str| {
                context
                    .compensation_outputs
                    .get(step)
                    .is_some_and(|undone| {
                        undone["payment_status"] == PaymentStatus::Refunded.as_str_name()
                    })
            };
            let refusal = self.rejecting.iter().find_map(|step| {
                context
                    .failed_actions
                    .get(*step)
                    .filter(|_| !refunded(step))
            });
            let closed = match refusal {
                Some(refusal) => {
                    let reject = RejectOrderRequest {
                        order_id: order.order_id,
                        reason: reason(refusal),
                    };
                    client.reject_order(request(reject, context)).await
                }
                None => {
                    let why = context.failure_reason.as_deref().unwrap_or("cancelled");
                    let cancel = CancelOrderRequest {
                        order_id: order.order_id,
                        reason: reason(why),
                    };
                    client.cancel_order(request(cancel, context)).await
                }
            };
            let closed = closed.map_err(|status| classify(&status))?.into_inner();
            Ok(serde_json::json!({ "order_status": closed.status().as_str_name() }))
        }
        .boxed()
    }
}

/// The pivot: confirms the order with the payment that `payment_step`
/// made.
pub(crate) struct ConfirmOrder {
    pub(crate) orders: Downstream,
    pub(crate) payment_step: &'static str,
}

impl Action for ConfirmOrder {
    fn run<'a>(
        &'a self,
        context: &'a StepContext,
    ) -> BoxFuture<'a, Result<serde_json::Value, StepError>> {
        async move {
            let order = data(context)?;
            let payment_id = context.outputs[self.payment_step]["payment_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let confirm = ConfirmOrderRequest {
                order_id: order.order_id,
                payment_id,
            };
            let confirmed = OrderServiceClient::new(self.orders.clone())
                .confirm_order(request(confirm, context))
                .await
                .map_err(|status| classify(&status))?
                .into_inner();
            Ok(serde_json::json!({ "order_version": confirmed.version }))
        }
        .boxed()
    }
}

/// `open-order`: the saga takes charge of the order; undone by closing it.
pub(crate) fn open_order(
    tuning: Tuning,
    downstreams: &Downstreams,
    rejecting: &'static [&'static str],
) -> Step {
    Step {
        compensation: Some(Arc::new(CloseOrder {
            orders: downstreams.orders.clone(),
            rejecting,
        })),
        ..tuning.step("open-order")
    }
}

/// `confirm-order`, the pivot, with the payment of `payment_step`.
pub(crate) fn confirm_order(
    tuning: Tuning,
    downstreams: &Downstreams,
    payment_step: &'static str,
) -> Step {
    Step {
        action: Some(Arc::new(ConfirmOrder {
            orders: downstreams.orders.clone(),
            payment_step,
        })),
        ..tuning.step(CONFIRM_ORDER)
    }
}
