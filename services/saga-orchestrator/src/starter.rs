//! Starts, signals and calls off sagas from the order events topic.
//!
//! OrderPlaced starts the order's saga (at most one per order, however
//! often the event is delivered: the saga's unique key and the inbox both
//! see to it); OrderCancellationRequested asks it to compensate;
//! OrderReviewApproved and OrderReviewDeclined are its review signal
//! (identified by the event's id, so a redelivery is the same signal);
//! OrderReturnRequested starts the order's return saga.
//!
//! Each is handled in the transaction that marks the event consumed, so a
//! signal or a start is kept exactly when the event is.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use api_order::v1::{
    OrderCancellationRequested, OrderPlaced, OrderReturnRequested, OrderReviewApproved,
    OrderReviewDeclined,
};
use messaging::envelope;
use messaging::{EventHandler, HandleError, ReceivedEvent};
use saga_engine::{Engine, NewSignal, RequestOutcome, SignalOutcome, Started};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::order_saga::v2::{REVIEW_SIGNAL, Review, review_decision};
use crate::order_saga::{OrderData, SAGA_TYPE};
use crate::return_saga::{self, ReturnData};

/// The orchestrator's handler of order events.
#[derive(Debug)]
pub(crate) struct SagaStarter {
    engine: Arc<Engine>,
    /// Which orders are reviewed.
    review: Review,
    /// Sagas started by events whose transaction has not committed yet,
    /// by event id: this replica drives each once it has. An event whose
    /// transaction rolls back is applied again, and its entry replaced.
    starting: Mutex<HashMap<Uuid, Started>>,
}

impl SagaStarter {
    pub(crate) fn new(engine: Arc<Engine>, review: Review) -> Self {
        Self {
            engine,
            review,
            starting: Mutex::default(),
        }
    }
}

impl EventHandler for SagaStarter {
    /// The order's other events are the saga's own doing.
    fn wants(&self, envelope: &messaging::EventEnvelope) -> bool {
        envelope::is::<OrderPlaced>(envelope)
            || envelope::is::<OrderCancellationRequested>(envelope)
            || envelope::is::<OrderReviewApproved>(envelope)
            || envelope::is::<OrderReviewDeclined>(envelope)
            || envelope::is::<OrderReturnRequested>(envelope)
    }

    /// The sagas these events started are in the database now: drive them.
    fn committed(&self, events: &[&ReceivedEvent]) {
        let mut starting = self.starting.lock().expect("not poisoned");
        for event in events {
            if let Some(started) = starting.remove(&event.event_id) {
                self.engine.adopt(started);
            }
        }
    }

    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: &ReceivedEvent,
    ) -> Result<(), HandleError> {
        let envelope = &event.envelope;
        if envelope::is::<OrderPlaced>(envelope) {
            let placed: OrderPlaced =
                envelope::open(envelope).map_err(|e| HandleError::Permanent(e.into()))?;
            let total = placed
                .total
                .context("an order without a total")
                .map_err(HandleError::Permanent)?;
            let data = OrderData {
                order_id: placed.order_id.clone(),
                customer_id: placed.customer_id,
                amount_minor: total.amount_minor,
                currency: total.currency,
                payment_method_token: placed.payment_method_token,
                review_required: self.review.required(total.amount_minor),
            };
            self.start(conn, event, SAGA_TYPE, &placed.order_id, &data)
                .await?;
        } else if let Some(approved) = envelope::is::<OrderReviewApproved>(envelope)
            .then(|| envelope::open::<OrderReviewApproved>(envelope))
        {
            let approved = approved.map_err(|e| HandleError::Permanent(e.into()))?;
            let decision = review_decision(true, "");
            self.signal_review(conn, event, &approved.order_id, &decision)
                .await?;
        } else if let Some(declined) = envelope::is::<OrderReviewDeclined>(envelope)
            .then(|| envelope::open::<OrderReviewDeclined>(envelope))
        {
            let declined = declined.map_err(|e| HandleError::Permanent(e.into()))?;
            let decision = review_decision(false, &declined.reason);
            self.signal_review(conn, event, &declined.order_id, &decision)
                .await?;
        } else if let Some(requested) = envelope::is::<OrderReturnRequested>(envelope)
            .then(|| envelope::open::<OrderReturnRequested>(envelope))
        {
            let requested = requested.map_err(|e| HandleError::Permanent(e.into()))?;
            let data = ReturnData {
                order_id: requested.order_id.clone(),
                payment_id: requested.payment_id,
                reason: requested.reason,
            };
            self.start(
                conn,
                event,
                return_saga::SAGA_TYPE,
                &requested.order_id,
                &data,
            )
            .await?;
        } else if envelope::is::<OrderCancellationRequested>(envelope) {
            let requested: OrderCancellationRequested =
                envelope::open(envelope).map_err(|e| HandleError::Permanent(e.into()))?;
            let saga_id = saga_engine::store::find_by_business_key(
                &mut *conn,
                SAGA_TYPE,
                &requested.order_id,
            )
            .await
            .map_err(HandleError::Transient)?;
            // OrderPlaced precedes it on the same partition, so the saga
            // exists; if not, the order was never ours to handle.
            let Some(saga_id) = saga_id else {
                return Err(HandleError::Permanent(anyhow::anyhow!(
                    "no saga for order {}",
                    requested.order_id
                )));
            };
            let reason = if requested.reason.is_empty() {
                "cancelled by the customer".to_owned()
            } else {
                format!("cancelled by the customer: {}", requested.reason)
            };
            let outcome = self
                .engine
                .request_compensation(conn, saga_id, &reason)
                .await
                .map_err(HandleError::Transient)?;
            match outcome {
                RequestOutcome::NotApplicable(state) => {
                    tracing::info!(%saga_id, state = state.as_str(), "cancellation arrived after the saga ended");
                }
                // The order decides: the cancellation it recorded makes the
                // saga's confirmation fail, and the saga then compensates.
                RequestOutcome::ForwardOnly { pivot, .. } => {
                    tracing::info!(%saga_id, pivot, "cancellation arrived while the order was being confirmed; the order decides");
                }
                RequestOutcome::Accepted
                | RequestOutcome::NotFound
                | RequestOutcome::UnknownVersion { .. } => {}
            }
        }
        // Other order events are the saga's own doing: nothing to start.
        Ok(())
    }
}

impl SagaStarter {
    /// Starts a saga of `saga_type` for the order, unless it has one, in
    /// the event's transaction; this replica drives it once that commits.
    async fn start(
        &self,
        conn: &mut PgConnection,
        event: &ReceivedEvent,
        saga_type: &str,
        order_id: &str,
        data: &impl serde::Serialize,
    ) -> Result<(), HandleError> {
        let data = serde_json::to_value(data).map_err(|e| HandleError::Permanent(e.into()))?;
        let started = self
            .engine
            .start_here(
                conn,
                saga_type,
                order_id,
                data,
                &event.envelope.correlation_id,
            )
            .await
            .map_err(HandleError::Transient)?;
        match started {
            Some(started) => {
                tracing::info!(saga_id = %started.saga_id, %order_id, saga_type, "saga started");
                self.starting
                    .lock()
                    .expect("not poisoned")
                    .insert(event.event_id, started);
            }
            None => tracing::debug!(%order_id, saga_type, "the order already has this saga"),
        }
        Ok(())
    }

    /// Gives the order's saga its review decision, as a signal whose id is
    /// the event's: a redelivered event is the same signal, once.
    async fn signal_review(
        &self,
        conn: &mut PgConnection,
        event: &ReceivedEvent,
        order_id: &str,
        decision: &serde_json::Value,
    ) -> Result<(), HandleError> {
        let saga_id = saga_engine::store::find_by_business_key(&mut *conn, SAGA_TYPE, order_id)
            .await
            .map_err(HandleError::Transient)?;
        // OrderPlaced precedes it on the same partition, so the saga exists.
        let Some(saga_id) = saga_id else {
            return Err(HandleError::Permanent(anyhow::anyhow!(
                "no saga for order {order_id}"
            )));
        };
        let signal_id = event.event_id.to_string();
        let signal = NewSignal {
            signal: REVIEW_SIGNAL,
            signal_id: &signal_id,
            payload: decision,
        };
        match self
            .engine
            .signal(conn, saga_id, signal)
            .await
            .map_err(HandleError::Transient)?
        {
            SignalOutcome::Kept(_) | SignalOutcome::Repeated(_) => {
                tracing::info!(%saga_id, %order_id, "review decision given to the saga");
            }
            // The saga has moved on: the customer cancelled, or the review
            // timed out, first. The order's own state already says so.
            SignalOutcome::NotApplicable(state) => {
                tracing::info!(%saga_id, state = state.as_str(), "review decision arrived after the saga moved on");
            }
            SignalOutcome::NoLongerAwaited(_) => {
                tracing::info!(%saga_id, "review decision arrived after the review timed out");
            }
            // This replica cannot judge the signal; another that carries
            // the saga's version (a newer one, mid-rollout) can.
            SignalOutcome::UnknownVersion { saga_type, version } => {
                return Err(HandleError::Transient(anyhow::anyhow!(
                    "saga {saga_id} runs version {version} of {saga_type}, not carried here"
                )));
            }
            outcome @ (SignalOutcome::Conflict(_)
            | SignalOutcome::UnknownSignal { .. }
            | SignalOutcome::NotFound) => {
                return Err(HandleError::Permanent(anyhow::anyhow!(
                    "review decision for saga {saga_id} refused: {outcome:?}"
                )));
            }
        }
        Ok(())
    }
}
