//! Starts and calls off order sagas from the order events topic.
//!
//! OrderPlaced starts the order's saga (at most one per order, however
//! often the event is delivered: the saga's unique key and the inbox both
//! see to it); OrderCancellationRequested asks it to compensate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use api_order::v1::{OrderCancellationRequested, OrderPlaced};
use messaging::envelope;
use messaging::{EventHandler, HandleError, ReceivedEvent};
use saga_engine::{Engine, RequestOutcome, Started};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::order_saga::{OrderData, SAGA_TYPE};

/// The orchestrator's handler of order events.
#[derive(Debug)]
pub(crate) struct SagaStarter {
    engine: Arc<Engine>,
    /// Sagas started by events whose transaction has not committed yet,
    /// by event id: this replica drives each once it has. An event whose
    /// transaction rolls back is applied again, and its entry replaced.
    starting: Mutex<HashMap<Uuid, Started>>,
}

impl SagaStarter {
    pub(crate) fn new(engine: Arc<Engine>) -> Self {
        Self {
            engine,
            starting: Mutex::default(),
        }
    }
}

impl EventHandler for SagaStarter {
    /// The order's other events are the saga's own doing.
    fn wants(&self, envelope: &messaging::EventEnvelope) -> bool {
        envelope::is::<OrderPlaced>(envelope)
            || envelope::is::<OrderCancellationRequested>(envelope)
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
            };
            let data = serde_json::to_value(data).map_err(|e| HandleError::Permanent(e.into()))?;
            let started = self
                .engine
                .start_here(
                    conn,
                    SAGA_TYPE,
                    &placed.order_id,
                    data,
                    &envelope.correlation_id,
                )
                .await
                .map_err(HandleError::Transient)?;
            match started {
                Some(started) => {
                    tracing::info!(saga_id = %started.saga_id, order_id = %placed.order_id, "saga started");
                    self.starting
                        .lock()
                        .expect("not poisoned")
                        .insert(event.event_id, started);
                }
                None => {
                    tracing::debug!(order_id = %placed.order_id, "the order already has its saga")
                }
            }
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
