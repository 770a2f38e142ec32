//! The payment service's use cases, independent of gRPC.
//!
//! Every write takes a per-key advisory lock first (the charge's
//! idempotency key), so a charge, its retries, its racing duplicates and
//! its voiding are serialised by the database: one key, one charge.

use std::sync::Arc;

use anyhow::Context as _;
use api_payment::v1 as pb;
use chrono::{DateTime, Utc};
use messaging::envelope::EventMeta;
use messaging::{EventEnvelope, Topics};
use money::Money;
use prost::{Message, Name};
use sqlx::{PgConnection, PgPool};
use telemetry::CorrelationId;
use uuid::Uuid;

use crate::NAME;
use crate::provider::{Charge, ChargeOutcome, PaymentProvider, ProviderError};

/// A payment as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct PaymentRow {
    pub(crate) payment_id: Uuid,
    pub(crate) idempotency_key: String,
    pub(crate) status: String,
    pub(crate) request_hash: Option<Vec<u8>>,
    pub(crate) order_id: Option<Uuid>,
    pub(crate) customer_id: Option<Uuid>,
    pub(crate) amount_minor: Option<i64>,
    pub(crate) currency: Option<String>,
    pub(crate) decline_reason: Option<String>,
    pub(crate) provider_reference: Option<String>,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) refunded_at: Option<DateTime<Utc>>,
}

/// Columns of [`PaymentRow`], for queries that read whole rows.
macro_rules! payment_columns {
    () => {
        "payment_id, idempotency_key, status, request_hash, order_id, customer_id, amount_minor, currency, \
         decline_reason, provider_reference, created_at, refunded_at"
    };
}

/// A charge as asked for.
#[derive(Debug, Clone)]
pub(crate) struct ChargeRequest {
    pub(crate) order_id: Uuid,
    pub(crate) customer_id: Uuid,
    pub(crate) amount: Money,
    pub(crate) payment_method: String,
    pub(crate) idempotency_key: String,
    pub(crate) request_hash: Vec<u8>,
}

/// What to refund.
#[derive(Debug, Clone)]
pub(crate) enum RefundTarget {
    Payment(Uuid),
    ChargeKey(String),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ProcessError {
    #[error("the idempotency key was used before with a different request")]
    KeyReused,
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RefundError {
    #[error("no such payment")]
    NotFound,
    #[error("the payment was declined; there is nothing to refund")]
    NothingToRefund,
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// Money moved for one order.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct Ledger {
    pub(crate) currency: String,
    pub(crate) captured_minor: i64,
    pub(crate) refunded_minor: i64,
}

#[derive(Clone)]
pub(crate) struct Payments {
    pool: PgPool,
    provider: Arc<dyn PaymentProvider>,
    topics: Topics,
}

impl std::fmt::Debug for Payments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Payments").finish_non_exhaustive()
    }
}

impl Payments {
    pub(crate) fn new(pool: PgPool, provider: Arc<dyn PaymentProvider>, topics: Topics) -> Self {
        Self {
            pool,
            provider,
            topics,
        }
    }

    /// Charges once per idempotency key; a decline is a result.
    pub(crate) async fn process(
        &self,
        request: &ChargeRequest,
    ) -> Result<PaymentRow, ProcessError> {
        let mut tx = self.pool.begin().await.context("starting a transaction")?;
        lock_key(&mut tx, &request.idempotency_key).await?;
        if let Some(existing) = find_by_key(&mut tx, &request.idempotency_key).await? {
            if existing.status != "voided"
                && existing.request_hash.as_deref() != Some(&request.request_hash)
            {
                return Err(ProcessError::KeyReused);
            }
            return Ok(existing);
        }
        // The lock is held while the provider answers: a duplicate waits
        // here and then finds this payment instead of charging again.
        let charge = Charge {
            idempotency_key: request.idempotency_key.clone(),
            amount: request.amount,
            payment_method: request.payment_method.clone(),
        };
        let outcome = self.provider.charge(&charge).await?;
        let (status, decline_reason, reference) = match &outcome {
            ChargeOutcome::Captured { reference } => ("captured", None, Some(reference.clone())),
            ChargeOutcome::Declined(reason) => ("declined", Some(reason.as_str()), None),
        };
        let row: PaymentRow = sqlx::query_as(concat!(
            "INSERT INTO payments (payment_id, idempotency_key, status, request_hash, order_id, customer_id,
                                   amount_minor, currency, decline_reason, provider_reference)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING ",
            payment_columns!()
        ))
        .bind(Uuid::now_v7())
        .bind(&request.idempotency_key)
        .bind(status)
        .bind(&request.request_hash)
        .bind(request.order_id)
        .bind(request.customer_id)
        .bind(request.amount.amount_minor())
        .bind(request.amount.currency().code())
        .bind(decline_reason)
        .bind(&reference)
        .fetch_one(&mut *tx)
        .await
        .context("recording the payment")?;
        let amount = Some(request.amount.to_proto());
        let (payment_id, order_id, customer_id) = (
            row.payment_id.to_string(),
            request.order_id.to_string(),
            request.customer_id.to_string(),
        );
        match outcome {
            ChargeOutcome::Captured { reference } => {
                let event = pb::PaymentCaptured {
                    payment_id,
                    order_id,
                    customer_id,
                    amount,
                    provider_reference: reference,
                };
                self.publish(&mut tx, &row, &event).await?;
            }
            ChargeOutcome::Declined(reason) => {
                let event = pb::PaymentDeclined {
                    payment_id,
                    order_id,
                    customer_id,
                    amount,
                    decline_reason: reason.as_str().to_owned(),
                };
                self.publish(&mut tx, &row, &event).await?;
            }
        }
        tx.commit().await.context("committing the payment")?;
        Ok(row)
    }

    /// Refunds a captured payment in full; by charge key, undoes whatever
    /// the charge came to (see the proto).
    pub(crate) async fn refund(
        &self,
        target: &RefundTarget,
        refund_key: &str,
        reason: &str,
    ) -> Result<PaymentRow, RefundError> {
        let mut tx = self.pool.begin().await.context("starting a transaction")?;
        let row = match target {
            RefundTarget::Payment(payment_id) => {
                let row: Option<PaymentRow> = sqlx::query_as(concat!(
                    "SELECT ",
                    payment_columns!(),
                    " FROM payments WHERE payment_id = $1 FOR UPDATE"
                ))
                .bind(payment_id)
                .fetch_optional(&mut *tx)
                .await
                .context("reading the payment")?;
                let row = row.ok_or(RefundError::NotFound)?;
                if row.status == "declined" {
                    return Err(RefundError::NothingToRefund);
                }
                row
            }
            RefundTarget::ChargeKey(key) => {
                lock_key(&mut tx, key).await?;
                match find_by_key(&mut tx, key).await? {
                    Some(row) => row,
                    None => {
                        // No charge was made: make sure none ever is.
                        let voided: PaymentRow = sqlx::query_as(concat!(
                            "INSERT INTO payments (payment_id, idempotency_key, status, refund_idempotency_key, refund_reason)
                             VALUES ($1, $2, 'voided', $3, $4) RETURNING ",
                            payment_columns!()
                        ))
                        .bind(Uuid::now_v7())
                        .bind(key)
                        .bind(refund_key)
                        .bind(reason)
                        .fetch_one(&mut *tx)
                        .await
                        .context("voiding the charge")?;
                        tx.commit().await.context("committing the void")?;
                        return Ok(voided);
                    }
                }
            }
        };
        if row.status != "captured" {
            // Refunded (with this or another key), declined or voided:
            // nothing more to do; the earlier result stands.
            return Ok(row);
        }
        self.provider.refund(&row.idempotency_key).await?;
        let refunded: PaymentRow = sqlx::query_as(concat!(
            "UPDATE payments SET status = 'refunded', refunded_at = now(), refund_idempotency_key = $2, refund_reason = $3
             WHERE payment_id = $1 RETURNING ",
            payment_columns!()
        ))
        .bind(row.payment_id)
        .bind(refund_key)
        .bind(reason)
        .fetch_one(&mut *tx)
        .await
        .context("recording the refund")?;
        let event = pb::PaymentRefunded {
            payment_id: refunded.payment_id.to_string(),
            order_id: refunded
                .order_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
            customer_id: refunded
                .customer_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
            amount: money_of(&refunded),
            reason: reason.to_owned(),
        };
        self.publish(&mut tx, &refunded, &event).await?;
        tx.commit().await.context("committing the refund")?;
        Ok(refunded)
    }

    pub(crate) async fn get(&self, payment_id: Uuid) -> anyhow::Result<Option<PaymentRow>> {
        sqlx::query_as(concat!(
            "SELECT ",
            payment_columns!(),
            " FROM payments WHERE payment_id = $1"
        ))
        .bind(payment_id)
        .fetch_optional(&self.pool)
        .await
        .context("reading a payment")
    }

    /// An order's payments, oldest first, and its ledger.
    pub(crate) async fn by_order(
        &self,
        order_id: Uuid,
    ) -> anyhow::Result<(Vec<PaymentRow>, Option<Ledger>)> {
        let payments = sqlx::query_as(concat!(
            "SELECT ",
            payment_columns!(),
            " FROM payments WHERE order_id = $1 ORDER BY created_at, payment_id"
        ))
        .bind(order_id)
        .fetch_all(&self.pool)
        .await
        .context("reading an order's payments")?;
        let ledger = sqlx::query_as(
            "SELECT currency, captured_minor, refunded_minor FROM order_ledger WHERE order_id = $1",
        )
        .bind(order_id)
        .fetch_optional(&self.pool)
        .await
        .context("reading an order's ledger")?;
        Ok((payments, ledger))
    }

    async fn publish<M: Message + Name>(
        &self,
        conn: &mut PgConnection,
        row: &PaymentRow,
        event: &M,
    ) -> anyhow::Result<()> {
        let envelope: EventEnvelope = messaging::envelope::seal(
            EventMeta {
                producer: NAME,
                aggregate_type: "payment",
                aggregate_id: row.payment_id.to_string(),
                aggregate_version: 0,
                correlation_id: telemetry::correlation::current()
                    .unwrap_or_else(CorrelationId::generate),
                causation_id: None,
            },
            1,
            event,
        );
        messaging::outbox::enqueue(conn, &self.topics.payment_events(), &envelope).await
    }
}

/// Serialises every write for one charge key, until the transaction ends.
async fn lock_key(conn: &mut PgConnection, key: &str) -> anyhow::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('payment:' || $1, 0))")
        .bind(key)
        .execute(conn)
        .await
        .context("locking the idempotency key")?;
    Ok(())
}

async fn find_by_key(conn: &mut PgConnection, key: &str) -> anyhow::Result<Option<PaymentRow>> {
    sqlx::query_as(concat!(
        "SELECT ",
        payment_columns!(),
        " FROM payments WHERE idempotency_key = $1 FOR UPDATE"
    ))
    .bind(key)
    .fetch_optional(conn)
    .await
    .context("reading the payment for a key")
}

/// The amount of a stored payment, for the wire.
pub(crate) fn money_of(row: &PaymentRow) -> Option<api_common::v1::Money> {
    Some(api_common::v1::Money {
        amount_minor: row.amount_minor?,
        currency: row.currency.clone()?,
    })
}
