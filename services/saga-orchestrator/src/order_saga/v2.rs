//! Version 2 of the order saga: authorize, have a large order reviewed,
//! confirm, capture. See the table in [`super`].

use std::sync::Arc;
use std::time::Duration;

use api_order::v1::HoldOrderForReviewRequest;
use api_order::v1::order_service_client::OrderServiceClient;
use api_payment::v1::payment_service_client::PaymentServiceClient;
use api_payment::v1::{
    AuthorizePaymentRequest, CapturePaymentRequest, PaymentStatus, VoidPaymentRequest,
    capture_payment_request, void_payment_request,
};
use chrono::{DateTime, Utc};
use futures::FutureExt as _;
use futures::future::BoxFuture;
use saga_engine::{
    Action, Condition, Facts, OnTimeout, SagaDefinition, SignalWait, Step, StepContext, StepError,
};
use service_runtime::client::Downstream;

use super::{CONFIRM_ORDER, Downstreams, SAGA_TYPE, Tuning, confirm_order, data, open_order};
use crate::calls::{classify, reason, request};

pub const AUTHORIZE_PAYMENT: &str = "authorize-payment";
pub const HOLD_FOR_REVIEW: &str = "hold-for-review";
pub const REVIEW: &str = "review";
pub const CHECK_REVIEW: &str = "check-review";
pub const CAPTURE_PAYMENT: &str = "capture-payment";
/// The signal the review waits for: [`review_decision`]'s payload.
pub const REVIEW_SIGNAL: &str = "review";
/// How `check-review`'s refusal of a decline begins (then `: ` and the
/// reviewer's reason, or the timeout's).
pub const REVIEW_DECLINED: &str = "review declined";
/// How the reason of a review that timed out begins (then the timeout).
pub const REVIEW_TIMED_OUT: &str = "the review timed out after";
/// How `check-review`'s refusal of an approval too late to capture
/// begins (then when the authorization lapses).
pub const AUTHORIZATION_LAPSES: &str = "the payment authorization lapses at";

/// Which orders are reviewed, and for how long at most.
#[derive(Debug, Clone, Copy)]
pub struct Review {
    /// Orders of at least this many minor units (of any currency) are
    /// reviewed.
    pub threshold_minor: i64,
    /// A review with no decision by then is declined.
    pub timeout: Duration,
}

impl Review {
    /// Whether an order of `amount_minor` is reviewed.
    pub fn required(&self, amount_minor: i64) -> bool {
        amount_minor >= self.threshold_minor
    }
}

/// The payload of the review signal: the reviewer's decision.
pub fn review_decision(approved: bool, why: &str) -> serde_json::Value {
    serde_json::json!({ "approved": approved, "reason": why })
}

pub fn definition(downstreams: &Downstreams, tuning: Tuning, review: Review) -> SagaDefinition {
    let reviewed: Condition = Arc::new(|facts: &Facts<'_>| {
        facts.data["review_required"] == serde_json::Value::Bool(true)
    });
    let timed_out = format!(
        "{REVIEW_TIMED_OUT} {}",
        humantime::format_duration(review.timeout)
    );
    SagaDefinition::sequence(
        SAGA_TYPE,
        vec![
            open_order(tuning, downstreams, &[AUTHORIZE_PAYMENT, CHECK_REVIEW]),
            Step {
                action: Some(Arc::new(Authorize(downstreams.payments.clone()))),
                compensation: Some(Arc::new(Void(downstreams.payments.clone()))),
                ..tuning.step(AUTHORIZE_PAYMENT)
            },
            Step {
                action: Some(Arc::new(HoldForReview(downstreams.orders.clone()))),
                condition: Some(reviewed.clone()),
                ..tuning.step(HOLD_FOR_REVIEW)
            },
            Step {
                condition: Some(reviewed.clone()),
                wait: Some(SignalWait {
                    signal: REVIEW_SIGNAL,
                    timeout: review.timeout,
                    on_timeout: OnTimeout::Output(review_decision(false, &timed_out)),
                }),
                ..tuning.step(REVIEW)
            },
            Step {
                action: Some(Arc::new(CheckReview {
                    // The capture comes right after the confirmation, and
                    // is retried for at most about a step's deadline
                    // before it is overdue.
                    capture_margin: tuning.step_deadline,
                })),
                condition: Some(reviewed),
                ..tuning.step(CHECK_REVIEW)
            },
            confirm_order(tuning, downstreams, AUTHORIZE_PAYMENT),
            Step {
                action: Some(Arc::new(Capture(downstreams.payments.clone()))),
                ..tuning.step(CAPTURE_PAYMENT)
            },
        ],
    )
    .with_pivot(CONFIRM_ORDER)
    .with_version(2)
}

/// The authorization's idempotency key, which capture and void name it by.
fn authorization_key(context: &StepContext) -> String {
    format!("{}:{AUTHORIZE_PAYMENT}", context.saga_id)
}

struct Authorize(Downstream);

impl Action for Authorize {
    fn run<'a>(
        &'a self,
        context: &'a StepContext,
    ) -> BoxFuture<'a, Result<serde_json::Value, StepError>> {
        async move {
            let order = data(context)?;
            let hold = AuthorizePaymentRequest {
                amount: Some(order.total()),
                order_id: order.order_id,
                customer_id: order.customer_id,
                payment_method_token: order.payment_method_token,
                idempotency_key: authorization_key(context),
            };
            let payment = PaymentServiceClient::new(self.0.clone())
                .authorize_payment(request(hold, context))
                .await
                .map_err(|status| classify(&status))?
                .into_inner();
            match payment.status() {
                PaymentStatus::Authorized => {
                    let expires_at = payment
                        .authorization_expires_at
                        .and_then(|at| DateTime::from_timestamp(at.seconds, 0))
                        .map(|at| at.to_rfc3339());
                    Ok(serde_json::json!({
                        "payment_id": payment.payment_id,
                        "expires_at": expires_at,
                    }))
                }
                PaymentStatus::Declined => Err(StepError::Permanent(format!(
                    "payment declined: {}",
                    payment.decline_reason
                ))),
                other => Err(StepError::Permanent(format!(
                    "payment authorization is {}",
                    other.as_str_name()
                ))),
            }
        }
        .boxed()
    }
}

/// Undoes the authorization by its key: releases a hold, and makes an
/// authorization still in flight (or lost) hold nothing.
struct Void(Downstream);

impl Action for Void {
    fn run<'a>(
        &'a self,
        context: &'a StepContext,
    ) -> BoxFuture<'a, Result<serde_json::Value, StepError>> {
        async move {
            let void = VoidPaymentRequest {
                target: Some(void_payment_request::Target::AuthorizationIdempotencyKey(
                    authorization_key(context),
                )),
                idempotency_key: format!("{}:void", authorization_key(context)),
                reason: reason(
                    context
                        .failure_reason
                        .as_deref()
                        .unwrap_or("order not placed"),
                ),
            };
            let payment = PaymentServiceClient::new(self.0.clone())
                .void_payment(request(void, context))
                .await
                .map_err(|status| classify(&status))?
                .into_inner();
            Ok(serde_json::json!({
                "payment_status": payment.status().as_str_name(),
                "payment_id": payment.payment_id,
            }))
        }
        .boxed()
    }
}

struct HoldForReview(Downstream);

impl Action for HoldForReview {
    fn run<'a>(
        &'a self,
        context: &'a StepContext,
    ) -> BoxFuture<'a, Result<serde_json::Value, StepError>> {
        async move {
            let order = data(context)?;
            let hold = HoldOrderForReviewRequest {
                order_id: order.order_id,
            };
            let held = OrderServiceClient::new(self.0.clone())
                .hold_order_for_review(request(hold, context))
                .await
                .map_err(|status| classify(&status))?
                .into_inner();
            Ok(serde_json::json!({ "order_status": held.status().as_str_name() }))
        }
        .boxed()
    }
}

/// Turns the review's decision into the saga's course: a decline (or a
/// timeout) fails the step, so the saga voids and rejects. So does an
/// approval that came too late to capture before the authorization
/// lapses: better a rejected order than a confirmed one without its money.
/// Calls nothing, so an attempt has no effect to undo.
struct CheckReview {
    capture_margin: Duration,
}

impl Action for CheckReview {
    fn run<'a>(
        &'a self,
        context: &'a StepContext,
    ) -> BoxFuture<'a, Result<serde_json::Value, StepError>> {
        async move {
            let decision = &context.outputs[REVIEW];
            if decision["approved"] != serde_json::Value::Bool(true) {
                let why = decision["reason"].as_str().unwrap_or_default();
                return Err(StepError::Permanent(if why.is_empty() {
                    REVIEW_DECLINED.to_owned()
                } else {
                    format!("{REVIEW_DECLINED}: {why}")
                }));
            }
            let expires_at = context.outputs[AUTHORIZE_PAYMENT]["expires_at"]
                .as_str()
                .and_then(|at| DateTime::parse_from_rfc3339(at).ok())
                .map(|at| at.with_timezone(&Utc));
            let margin =
                chrono::Duration::from_std(self.capture_margin).unwrap_or(chrono::Duration::MAX);
            if let Some(expires_at) = expires_at
                && expires_at - Utc::now() < margin
            {
                return Err(StepError::Permanent(format!(
                    "{AUTHORIZATION_LAPSES} {}, too soon to capture",
                    expires_at.to_rfc3339()
                )));
            }
            Ok(serde_json::json!({ "approved": true }))
        }
        .boxed()
    }
}

struct Capture(Downstream);

impl Action for Capture {
    fn run<'a>(
        &'a self,
        context: &'a StepContext,
    ) -> BoxFuture<'a, Result<serde_json::Value, StepError>> {
        async move {
            let capture = CapturePaymentRequest {
                target: Some(
                    capture_payment_request::Target::AuthorizationIdempotencyKey(
                        authorization_key(context),
                    ),
                ),
            };
            let payment = PaymentServiceClient::new(self.0.clone())
                .capture_payment(request(capture, context))
                .await
                .map_err(|status| classify(&status))?
                .into_inner();
            Ok(serde_json::json!({
                "payment_id": payment.payment_id,
                "payment_status": payment.status().as_str_name(),
            }))
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn context(review: serde_json::Value, expires_in: chrono::Duration) -> StepContext {
        let expires_at = (Utc::now() + expires_in).to_rfc3339();
        StepContext {
            saga_id: uuid::Uuid::now_v7(),
            step: CHECK_REVIEW,
            data: serde_json::json!({}),
            outputs: HashMap::from([
                (REVIEW.to_owned(), review),
                (
                    AUTHORIZE_PAYMENT.to_owned(),
                    serde_json::json!({ "payment_id": "p", "expires_at": expires_at }),
                ),
            ]),
            compensation_outputs: HashMap::new(),
            failed_actions: HashMap::new(),
            failure_reason: None,
            attempt: 1,
            time_left: Duration::from_secs(5),
            correlation_id: "c".into(),
            request_id: "r".into(),
        }
    }

    async fn check(
        review: serde_json::Value,
        expires_in: chrono::Duration,
    ) -> Result<serde_json::Value, StepError> {
        let check = CheckReview {
            capture_margin: Duration::from_secs(60),
        };
        check.run(&context(review, expires_in)).await
    }

    #[test]
    fn an_order_is_reviewed_from_the_threshold_on() {
        let review = Review {
            threshold_minor: 100_000,
            timeout: Duration::from_secs(60),
        };
        assert!(!review.required(99_999));
        assert!(review.required(100_000));
    }

    #[tokio::test]
    async fn an_approval_in_time_lets_the_order_go_on() {
        let outcome = check(review_decision(true, ""), chrono::Duration::days(7)).await;
        assert_eq!(outcome, Ok(serde_json::json!({ "approved": true })));
    }

    #[tokio::test]
    async fn a_decline_or_a_timeout_fails_the_step_with_its_reason() {
        let declined = check(review_decision(false, "fraud"), chrono::Duration::days(7)).await;
        assert_eq!(
            declined,
            Err(StepError::Permanent("review declined: fraud".into()))
        );
        // What the wait's timeout gives (see `definition`).
        let timed_out = review_decision(false, "the review timed out after 1day");
        let outcome = check(timed_out, chrono::Duration::days(7)).await;
        assert_eq!(
            outcome,
            Err(StepError::Permanent(
                "review declined: the review timed out after 1day".into()
            ))
        );
        // A payload that is not a decision is no approval.
        let garbled = check(serde_json::json!("yes"), chrono::Duration::days(7)).await;
        assert_eq!(garbled, Err(StepError::Permanent("review declined".into())));
    }

    #[tokio::test]
    async fn an_approval_too_late_to_capture_before_the_authorization_lapses_is_a_decline() {
        let outcome = check(review_decision(true, ""), chrono::Duration::seconds(30)).await;
        let Err(StepError::Permanent(message)) = outcome else {
            panic!("{outcome:?}");
        };
        assert!(message.contains("too soon to capture"), "{message}");
    }
}
