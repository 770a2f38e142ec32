//! The read model: one row per order, what every query reads.
//!
//! The row is a pure function of the order's stream ([`view_of`]). It is
//! written in the same transaction as each append, so a client that gets a
//! command's reply reads its own write at once; each row records the stream
//! version it reflects (its checkpoint) and is only ever replaced by a
//! later one. [`rebuild`] replays the whole event store into it.

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use service_runtime::paging::Cursor;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::domain::{Order, OrderStatus};
use crate::event_store::{Projection, Stream, replay};

/// An order as queries see it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct OrderView {
    pub(crate) order_id: Uuid,
    pub(crate) customer_id: Uuid,
    pub(crate) status: String,
    pub(crate) items: Json<Vec<ViewItem>>,
    pub(crate) total_minor: i64,
    pub(crate) currency: String,
    pub(crate) payment_id: Option<Uuid>,
    pub(crate) status_reason: Option<String>,
    pub(crate) correlation_id: String,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
    pub(crate) version: i64,
}

/// A line as the read model keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ViewItem {
    pub(crate) sku: String,
    pub(crate) quantity: u32,
    pub(crate) unit_price_minor: i64,
}

/// The columns of [`OrderView`], for queries that read whole rows.
macro_rules! view_columns {
    () => {
        "order_id, customer_id, status, items, total_minor, currency, payment_id, status_reason, \
         correlation_id, created_at, updated_at, version"
    };
}

/// The row of an order's stream; `None` for an empty stream.
pub(crate) fn view_of(stream: &Stream<Order>) -> Option<OrderView> {
    let placed = stream.state.placed()?;
    let status = stream.state.status()?;
    let first = &stream.history.first()?.envelope;
    let last = &stream.history.last()?.envelope;
    let (payment_id, status_reason) = match &stream.state {
        Order::Confirmed { payment_id, .. } => (Some(payment_id.as_uuid()), None),
        Order::ReturnRequested {
            payment_id, reason, ..
        }
        | Order::Returned {
            payment_id, reason, ..
        } => (Some(payment_id.as_uuid()), Some(reason.as_str().to_owned())),
        Order::Rejected { reason, .. }
        | Order::Cancelled { reason, .. }
        | Order::ReviewDeclined { reason, .. } => (None, Some(reason.as_str().to_owned())),
        Order::CancellationRequested { reason, .. } => {
            (None, reason.as_ref().map(|r| r.as_str().to_owned()))
        }
        Order::Initial | Order::Pending(_) | Order::PendingReview(_) | Order::ReviewApproved(_) => {
            (None, None)
        }
    };
    let total = placed.lines.total();
    Some(OrderView {
        order_id: stream.id,
        customer_id: placed.customer_id.as_uuid(),
        status: status.as_str().to_owned(),
        items: Json(
            placed
                .lines
                .items()
                .iter()
                .map(|item| ViewItem {
                    sku: item.sku.as_str().to_owned(),
                    quantity: item.quantity.get(),
                    unit_price_minor: item.unit_price.amount_minor(),
                })
                .collect(),
        ),
        total_minor: total.amount_minor(),
        currency: total.currency().code().to_owned(),
        payment_id,
        status_reason,
        correlation_id: first.correlation_id.clone(),
        created_at: timestamp(first.occurred_at.as_ref()),
        updated_at: timestamp(last.occurred_at.as_ref()),
        version: i64::try_from(stream.version()).unwrap_or(i64::MAX),
    })
}

/// An envelope's time at the precision PostgreSQL keeps (microseconds), so
/// a row built here equals the same row read back.
fn timestamp(at: Option<&prost_types::Timestamp>) -> DateTime<Utc> {
    at.and_then(|at| {
        let micros = u32::try_from(at.nanos).unwrap_or(0) / 1000;
        DateTime::from_timestamp(at.seconds, micros * 1000)
    })
    .unwrap_or_default()
}

/// Writes rows, each only over an older version of itself.
pub(crate) async fn upsert(conn: &mut PgConnection, views: &[OrderView]) -> anyhow::Result<()> {
    if views.is_empty() {
        return Ok(());
    }
    fn column<T>(views: &[OrderView], field: impl Fn(&OrderView) -> T) -> Vec<T> {
        views.iter().map(field).collect()
    }
    sqlx::query(
        "INSERT INTO order_view (order_id, customer_id, status, items, total_minor, currency, payment_id,
                                 status_reason, correlation_id, created_at, updated_at, version)
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::jsonb[], $5::bigint[], $6::text[],
                              $7::uuid[], $8::text[], $9::text[], $10::timestamptz[], $11::timestamptz[], $12::bigint[])
         ON CONFLICT (order_id) DO UPDATE SET
             status = EXCLUDED.status, items = EXCLUDED.items, total_minor = EXCLUDED.total_minor,
             currency = EXCLUDED.currency, payment_id = EXCLUDED.payment_id,
             status_reason = EXCLUDED.status_reason, updated_at = EXCLUDED.updated_at, version = EXCLUDED.version
         WHERE order_view.version < EXCLUDED.version",
    )
    .bind(column(views, |v| v.order_id))
    .bind(column(views, |v| v.customer_id))
    .bind(column(views, |v| v.status.clone()))
    .bind(column(views, |v| v.items.clone()))
    .bind(column(views, |v| v.total_minor))
    .bind(column(views, |v| v.currency.clone()))
    .bind(column(views, |v| v.payment_id))
    .bind(column(views, |v| v.status_reason.clone()))
    .bind(column(views, |v| v.correlation_id.clone()))
    .bind(column(views, |v| v.created_at))
    .bind(column(views, |v| v.updated_at))
    .bind(column(views, |v| v.version))
    .execute(conn)
    .await
    .context("writing the read model")?;
    Ok(())
}

/// One order.
pub(crate) async fn get(pool: &PgPool, order_id: Uuid) -> anyhow::Result<Option<OrderView>> {
    sqlx::query_as(concat!(
        "SELECT ",
        view_columns!(),
        " FROM order_view WHERE order_id = $1"
    ))
    .bind(order_id)
    .fetch_optional(pool)
    .await
    .context("reading an order")
}

/// A customer's orders, newest first, after the (created_at, order_id)
/// `after`, at most `limit`.
pub(crate) async fn list(
    pool: &PgPool,
    customer_id: Uuid,
    status: Option<OrderStatus>,
    after: Option<Cursor>,
    limit: i64,
) -> anyhow::Result<Vec<OrderView>> {
    sqlx::query_as(concat!(
        "SELECT ",
        view_columns!(),
        " FROM order_view
         WHERE customer_id = $1
           AND ($2::text IS NULL OR status = $2)
           AND ($3::timestamptz IS NULL OR (created_at, order_id) < ($3, $4))
         ORDER BY created_at DESC, order_id DESC
         LIMIT $5"
    ))
    .bind(customer_id)
    .bind(status.map(OrderStatus::as_str))
    .bind(after.map(|c| c.at))
    .bind(after.map(|c| c.id))
    .bind(limit)
    .fetch_all(pool)
    .await
    .context("listing orders")
}

/// What a rebuild did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rebuilt {
    pub(crate) events: u64,
    pub(crate) orders: u64,
}

/// Streams replayed per batch during a rebuild.
const REBUILD_BATCH: i64 = 500;

/// Replaces the read model with one replayed from every stored event.
///
/// Runs in one transaction holding a SHARE lock on the events: appends wait
/// for it (so nothing is missed), queries go on reading the old rows until
/// the new ones commit.
pub(crate) async fn rebuild(pool: &PgPool) -> anyhow::Result<Rebuilt> {
    let mut tx = pool.begin().await?;
    sqlx::query("LOCK TABLE events IN SHARE MODE")
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM order_view")
        .execute(&mut *tx)
        .await?;
    let mut rebuilt = Rebuilt {
        events: 0,
        orders: 0,
    };
    let mut after: Option<Uuid> = None;
    loop {
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "SELECT DISTINCT stream_id FROM events WHERE $1::uuid IS NULL OR stream_id > $1
             ORDER BY stream_id LIMIT $2",
        )
        .bind(after)
        .bind(REBUILD_BATCH)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = ids.last() else { break };
        after = Some(*last);
        let rows: Vec<(Uuid, Vec<u8>)> = sqlx::query_as(
            "SELECT stream_id, envelope FROM events WHERE stream_id = ANY($1) ORDER BY stream_id, version",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        rebuilt.events += rows.len() as u64;
        let mut views = Vec::with_capacity(ids.len());
        for chunk in rows.chunk_by(|a, b| a.0 == b.0) {
            let stream = replay::<Order>(
                chunk[0].0,
                chunk.iter().map(|(_, envelope)| envelope.clone()),
            )?;
            views.extend(view_of(&stream));
        }
        rebuilt.orders += views.len() as u64;
        upsert(&mut tx, &views).await?;
    }
    tx.commit().await?;
    tracing::info!(
        events = rebuilt.events,
        orders = rebuilt.orders,
        "rebuilt the read model"
    );
    Ok(rebuilt)
}

/// The read model as a projection of every append: the order's row is
/// replaced by the view of its stream.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OrderProjection;

impl Projection<Order> for OrderProjection {
    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        stream: &'a Stream<Order>,
        _appended: usize,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(
            async move { upsert(conn, &view_of(stream).into_iter().collect::<Vec<_>>()).await },
        )
    }
}
