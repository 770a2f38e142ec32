//! The payment service's use cases, independent of gRPC.
//!
//! Every write takes a per-key advisory lock first (the charge's
//! idempotency key), so a charge, its retries, its racing duplicates and
//! its voiding are serialised by the database: one key, one charge.
//!
//! Undoing a charge by its key when we have no record of it asks the
//! provider to void the key, because only the provider knows whether the
//! charge was captured and its answer lost (a crash, a cancelled call, a
//! lost reply). What it says is recorded as the payment, so our ledger and
//! the provider's books agree.

use std::sync::Arc;

use anyhow::Context as _;
use api_payment::v1 as pb;
use chrono::{DateTime, Utc};
use messaging::envelope::EventMeta;
use messaging::{EventEnvelope, Topics};
use money::Money;
use prost::{Message, Name};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use telemetry::CorrelationId;
use uuid::Uuid;

use crate::NAME;
use crate::provider::{
    Charge, ChargeOutcome, ChargeRecord, PaymentProvider, ProviderError, VoidOutcome,
};

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
            // A payment without a request hash was settled by a void of its
            // key (see `refund`) before any request was seen here: what the
            // provider said then stands, whatever this request is.
            if existing
                .request_hash
                .as_ref()
                .is_some_and(|hash| *hash != request.request_hash)
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
            order_id: request.order_id,
            customer_id: request.customer_id,
        };
        let outcome = self.provider.charge(&charge).await?;
        let (status, decline_reason, reference) = match &outcome {
            ChargeOutcome::Captured { reference } => ("captured", None, Some(reference.as_str())),
            ChargeOutcome::Declined(reason) => ("declined", Some(reason.as_str()), None),
        };
        let row = insert(
            &mut tx,
            &NewPayment {
                idempotency_key: &request.idempotency_key,
                status,
                request_hash: Some(&request.request_hash),
                charge: Some(&ChargeRecord {
                    amount: request.amount,
                    order_id: request.order_id,
                    customer_id: request.customer_id,
                }),
                decline_reason,
                provider_reference: reference,
                refund: None,
            },
        )
        .await
        .context("recording the payment")?;
        match outcome {
            ChargeOutcome::Captured { .. } => {
                self.publish(&mut tx, &row, &captured_event(&row)).await?
            }
            ChargeOutcome::Declined(_) => {
                self.publish(&mut tx, &row, &declined_event(&row)).await?
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
                    None => return self.void(tx, key, refund_key, reason).await,
                }
            }
        };
        if row.status != "captured" {
            // Refunded (with this or another key), declined or voided:
            // nothing more to do; the earlier result stands.
            return Ok(row);
        }
        match self.provider.void(&row.idempotency_key).await? {
            VoidOutcome::Refunded { .. } => {}
            other => {
                return Err(anyhow::anyhow!(
                    "the provider holds no capture for captured payment {}: {other:?}",
                    row.payment_id
                )
                .into());
            }
        }
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
        self.publish(&mut tx, &refunded, &refunded_event(&refunded, reason))
            .await?;
        tx.commit().await.context("committing the refund")?;
        Ok(refunded)
    }

    /// Undoes a charge we have no record of, with the key's lock held in
    /// `tx`: the charge never reached the provider, or its answer was lost
    /// after the provider captured. The provider, asked by key, tells which,
    /// and what it says is recorded, with its events, in one transaction.
    async fn void(
        &self,
        mut tx: Transaction<'_, Postgres>,
        key: &str,
        refund_key: &str,
        reason: &str,
    ) -> Result<PaymentRow, RefundError> {
        let refund = Some((refund_key, reason));
        let row = match self.provider.void(key).await? {
            // No charge was made, and none ever will be.
            VoidOutcome::Voided => insert(
                &mut tx,
                &NewPayment {
                    idempotency_key: key,
                    status: "voided",
                    request_hash: None,
                    charge: None,
                    decline_reason: None,
                    provider_reference: None,
                    refund,
                },
            )
            .await
            .context("voiding the charge")?,
            VoidOutcome::Declined {
                reason: decline,
                charge,
            } => {
                let row = insert(
                    &mut tx,
                    &NewPayment {
                        idempotency_key: key,
                        status: "declined",
                        request_hash: None,
                        charge: Some(&charge),
                        decline_reason: Some(decline.as_str()),
                        provider_reference: None,
                        refund: None,
                    },
                )
                .await
                .context("recording the declined charge")?;
                self.publish(&mut tx, &row, &declined_event(&row)).await?;
                row
            }
            // Captured and its answer lost: now refunded. Recorded as both,
            // so the ledger shows the money that moved and came back.
            VoidOutcome::Refunded { reference, charge } => {
                let row = insert(
                    &mut tx,
                    &NewPayment {
                        idempotency_key: key,
                        status: "refunded",
                        request_hash: None,
                        charge: Some(&charge),
                        decline_reason: None,
                        provider_reference: Some(&reference),
                        refund,
                    },
                )
                .await
                .context("recording the refunded charge")?;
                self.publish(&mut tx, &row, &captured_event(&row)).await?;
                self.publish(&mut tx, &row, &refunded_event(&row, reason))
                    .await?;
                row
            }
        };
        tx.commit().await.context("committing the void")?;
        Ok(row)
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

/// A payment to record.
struct NewPayment<'a> {
    idempotency_key: &'a str,
    status: &'a str,
    /// Empty when the payment was settled by a void of its key.
    request_hash: Option<&'a [u8]>,
    /// Empty only for a voided key.
    charge: Option<&'a ChargeRecord>,
    decline_reason: Option<&'a str>,
    provider_reference: Option<&'a str>,
    /// The refund's idempotency key and reason, when it is refunded or voided.
    refund: Option<(&'a str, &'a str)>,
}

async fn insert(conn: &mut PgConnection, payment: &NewPayment<'_>) -> anyhow::Result<PaymentRow> {
    let charge = payment.charge;
    let refunded = payment.status == "refunded";
    let row = sqlx::query_as(concat!(
        "INSERT INTO payments (payment_id, idempotency_key, status, request_hash, order_id, customer_id,
                               amount_minor, currency, decline_reason, provider_reference,
                               refunded_at, refund_idempotency_key, refund_reason)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, CASE WHEN $11 THEN now() END, $12, $13)
         RETURNING ",
        payment_columns!()
    ))
    .bind(Uuid::now_v7())
    .bind(payment.idempotency_key)
    .bind(payment.status)
    .bind(payment.request_hash)
    .bind(charge.map(|charge| charge.order_id))
    .bind(charge.map(|charge| charge.customer_id))
    .bind(charge.map(|charge| charge.amount.amount_minor()))
    .bind(charge.map(|charge| charge.amount.currency().code()))
    .bind(payment.decline_reason)
    .bind(payment.provider_reference)
    .bind(refunded)
    .bind(payment.refund.map(|(key, _)| key))
    .bind(payment.refund.map(|(_, reason)| reason))
    .fetch_one(conn)
    .await?;
    Ok(row)
}

fn id_text(id: Option<Uuid>) -> String {
    id.map(|id| id.to_string()).unwrap_or_default()
}

fn captured_event(row: &PaymentRow) -> pb::PaymentCaptured {
    pb::PaymentCaptured {
        payment_id: row.payment_id.to_string(),
        order_id: id_text(row.order_id),
        customer_id: id_text(row.customer_id),
        amount: money_of(row),
        provider_reference: row.provider_reference.clone().unwrap_or_default(),
    }
}

fn declined_event(row: &PaymentRow) -> pb::PaymentDeclined {
    pb::PaymentDeclined {
        payment_id: row.payment_id.to_string(),
        order_id: id_text(row.order_id),
        customer_id: id_text(row.customer_id),
        amount: money_of(row),
        decline_reason: row.decline_reason.clone().unwrap_or_default(),
    }
}

fn refunded_event(row: &PaymentRow, reason: &str) -> pb::PaymentRefunded {
    pb::PaymentRefunded {
        payment_id: row.payment_id.to_string(),
        order_id: id_text(row.order_id),
        customer_id: id_text(row.customer_id),
        amount: money_of(row),
        reason: reason.to_owned(),
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
