//! The order service's use cases, independent of gRPC.

use anyhow::Context as _;
use messaging::Publisher;
use messaging::envelope::Origin;
use service_runtime::paging::PageRequest;
use service_runtime::{fields, status};
use sqlx::PgPool;
use uuid::Uuid;

use crate::NAME;
use crate::domain::{
    CustomerId, DomainError, Order, OrderCommand, OrderId, OrderLines, OrderStatus,
    PaymentMethodToken, Placed,
};
use crate::event_store::{self, ExecuteError, Projection as _, Retry, Stream, Writer};
use crate::read_model::{self, OrderProjection, OrderView, Rebuilt};

/// A client's key for one order intent: 1 to 128 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IdempotencyKey(String);

impl IdempotencyKey {
    pub(crate) fn parse(text: &str) -> Result<Self, &'static str> {
        if text.is_empty() {
            return Err("is required: send a fresh key per order, and the same key when retrying");
        }
        fields::idempotency_key(text).map(|key| Self(key.to_owned()))
    }
}

/// A new order as the customer asked for it.
#[derive(Debug, Clone)]
pub(crate) struct NewOrder {
    pub(crate) customer_id: CustomerId,
    pub(crate) key: IdempotencyKey,
    /// Digest of the request without its key: the same key with a
    /// different request is refused.
    pub(crate) request_hash: Vec<u8>,
    pub(crate) lines: OrderLines,
    pub(crate) payment_method: PaymentMethodToken,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CreateError {
    #[error("{}", status::KEY_REUSED)]
    KeyReused,
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CommandError {
    #[error(transparent)]
    Refused(DomainError),
    #[error("the order kept changing concurrently")]
    Conflict,
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// The order service's state.
#[derive(Debug, Clone)]
pub(crate) struct Orders {
    pool: PgPool,
    order_events: Publisher,
    retry: Retry,
}

/// The purge of CreateOrder's idempotency keys older than `retention`.
///
/// Safe for money: a key only maps a customer's request to the order it
/// placed. A retry after its key is gone places a second order, with its own
/// saga and its own charge key, which the customer can see and cancel; it
/// can never make one order be charged twice.
pub(crate) fn idempotency_key_purge(retention: std::time::Duration) -> database::PurgeTarget {
    database::PurgeTarget {
        table: "idempotency_keys",
        retention,
        // Oldest first through `idempotency_keys_created_at`.
        statement: "DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY(
                        SELECT ctid FROM idempotency_keys WHERE created_at < now() - $1
                        ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED))",
    }
}

impl Orders {
    pub(crate) fn new(pool: PgPool, events_topic: String, retry: Retry) -> Self {
        Self {
            pool,
            order_events: Publisher::new(NAME, events_topic),
            retry,
        }
    }

    /// Places an order, once per idempotency key.
    pub(crate) async fn create(&self, order: NewOrder) -> Result<OrderView, CreateError> {
        let order_id = Uuid::now_v7();
        let mut tx = self.pool.begin().await.context("starting a transaction")?;
        // A concurrent request with the same key waits here for ours to
        // commit, then finds our row below and returns our order.
        let claimed = sqlx::query(
            "INSERT INTO idempotency_keys (customer_id, key, request_hash, order_id) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
        )
        .bind(order.customer_id.as_uuid())
        .bind(&order.key.0)
        .bind(&order.request_hash)
        .bind(order_id)
        .execute(&mut *tx)
        .await
        .context("claiming the idempotency key")?
        .rows_affected()
            == 1;
        if !claimed {
            drop(tx);
            return self.replay_create(&order).await;
        }

        let mut stream = Stream::<Order>::new(order_id);
        let placed = Placed {
            order_id: OrderId::new(order_id),
            customer_id: order.customer_id,
            lines: order.lines,
            payment_method: order.payment_method,
        };
        let events = stream
            .state
            .decide(&OrderCommand::Place(placed))
            .map_err(|error| anyhow::anyhow!("a new stream refused a placement: {error}"))?;
        event_store::append_and_publish(&mut tx, &mut stream, events, &self.writer())
            .await
            .map_err(|error| anyhow::anyhow!("appending to a new stream: {error}"))?;
        OrderProjection.apply(&mut tx, &stream, 1).await?;
        tx.commit().await.context("committing the new order")?;
        Ok(read_model::view_of(&stream).context("a placed order has a view")?)
    }

    /// The first order placed with this key, if the request is the same.
    async fn replay_create(&self, order: &NewOrder) -> Result<OrderView, CreateError> {
        let (hash, order_id): (Vec<u8>, Uuid) = sqlx::query_as(
            "SELECT request_hash, order_id FROM idempotency_keys WHERE customer_id = $1 AND key = $2",
        )
        .bind(order.customer_id.as_uuid())
        .bind(&order.key.0)
        .fetch_one(&self.pool)
        .await
        .context("reading the idempotency key")?;
        if hash != order.request_hash {
            return Err(CreateError::KeyReused);
        }
        let view = read_model::get(&self.pool, order_id).await?;
        Ok(view.context("an order committed with its key has a view")?)
    }

    /// An order, if it exists.
    pub(crate) async fn get(&self, order_id: OrderId) -> anyhow::Result<Option<OrderView>> {
        read_model::get(&self.pool, order_id.as_uuid()).await
    }

    /// `customer`'s orders, newest first: the page asked for, and one
    /// more if there is a next page ([`PageRequest::finish`] cuts it).
    pub(crate) async fn list(
        &self,
        customer: CustomerId,
        status: Option<OrderStatus>,
        page: PageRequest,
    ) -> anyhow::Result<Vec<OrderView>> {
        read_model::list(
            &self.pool,
            customer.as_uuid(),
            status,
            page.after,
            page.limit(),
        )
        .await
    }

    /// Carries out `command` on an existing order; retries conflicts.
    pub(crate) async fn handle(
        &self,
        order_id: OrderId,
        command: OrderCommand,
    ) -> Result<OrderView, CommandError> {
        let stream = event_store::execute(
            &self.pool,
            order_id.as_uuid(),
            &command,
            &self.writer(),
            &OrderProjection,
            self.retry,
        )
        .await
        .map_err(|error| match error {
            ExecuteError::Refused(refusal) => CommandError::Refused(refusal),
            ExecuteError::Conflict { .. } => CommandError::Conflict,
            ExecuteError::Unexpected(error) => CommandError::Unexpected(error),
        })?;
        Ok(read_model::view_of(&stream).context("an existing order has a view")?)
    }

    /// Replaces the read model with a replay of every event.
    pub(crate) async fn rebuild_read_model(&self) -> anyhow::Result<Rebuilt> {
        read_model::rebuild(&self.pool).await
    }

    /// The writer of events for the request being handled: its flow, and
    /// the request as their cause.
    fn writer(&self) -> Writer {
        Writer {
            publisher: self.order_events.clone(),
            origin: Origin::current(),
        }
    }
}
