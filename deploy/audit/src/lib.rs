//! The money-conservation audit of an ordersaga deployment.
//!
//! [`audit`] reads every service's tables through one administrative
//! connection, in one read-only `REPEATABLE READ` transaction (one
//! consistent snapshot, even of a system that is running), and checks the
//! invariants that together say no money was lost, made up or left behind:
//!
//! | name | invariant |
//! |---|---|
//! | `accepted` | every CreateOrder the load client saw accepted exists exactly once, with the lines and total it asked for (needs the client's [`record`]) |
//! | `sagas-final` | every saga is completed or compensated, or failed with a reason an operator sees |
//! | `steps-settled` | a final saga's step log is settled: every action succeeded if it completed; if it compensated, every compensation succeeded, and an action left waiting or in flight had no effect or was undone by its compensation |
//! | `saga-per-order` | exactly one order saga per order, and at most one return saga, there exactly if a return was asked for; none without an order; each ended as its order did (an order left RETURN_REQUESTED only with its return saga failed or terminated, for an operator); every `payment-refund` child belongs to a return saga |
//! | `reviews` | an order an admin declined was rejected; one an admin approved was confirmed (then maybe returned) or cancelled, and rejected only when its saga says the review had timed out first or the authorization would lapse before the capture |
//! | `ledger` | per order, captured − refunded = total if confirmed, 0 if rejected, cancelled or returned; a returned order's payment is refunded (or an authorization that took nothing) |
//! | `provider` | the provider holds each confirmed order's total, nothing of any other, and in all the confirmed totals; no authorization of a final order still reserves money |
//! | `charges` | no charge at the provider without a payment row that says so, nor a payment without its charge |
//! | `outboxes` | every service's outbox is drained |
//! | `dead-letters` | events dead-lettered, by schema and consumer (shown, not judged) |
//! | `read-model` | the order read model equals a replay of the event store |
//! | `fences` | a saga's fence never went backwards (needs a [`FenceWatch`] for more than a sanity check) |
//!
//! `provider` and `charges` need the simulated provider's own tables
//! (`payments.simulated_provider_charges` and its view of holdings); with a
//! real provider they are skipped, and the provider's statement is what to
//! reconcile against instead.
//!
//! - `record`: the load client's record of what it asked for;
//! - `fences`: fences sampled over a run;
//! - `report`: the verdicts, printed as a table.

pub mod fences;
pub mod record;
mod report;

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::Context as _;
use order_service::domain::{Order, OrderEvent, OrderStatus};
use serde::Deserialize;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

pub use fences::FenceWatch;
pub use record::Record;
use report::CheckBuilder;
pub use report::{Check, Report, Totals, Verdict};

/// The saga every order gets.
const ORDER_SAGA: &str = saga_orchestrator::order_saga::SAGA_TYPE;
/// The saga of an order's return, at most one per order.
const RETURN_SAGA: &str = saga_orchestrator::return_saga::SAGA_TYPE;
/// The return saga's child that refunds the payment.
const REFUND_SAGA: &str = saga_orchestrator::return_saga::REFUND_SAGA_TYPE;

/// What the audit may use besides the database.
#[derive(Debug, Default, Clone)]
pub struct Inputs {
    /// The load client's record of the CreateOrder requests it made.
    pub record: Option<Record>,
    /// Fences sampled while the system ran.
    pub fences: Option<FenceWatch>,
}

/// Checks every invariant against the database `pool` reaches (an
/// administrative connection that can read every service's schema).
pub async fn audit(pool: &PgPool, inputs: &Inputs) -> anyhow::Result<Report> {
    let mut tx = pool.begin().await.context("starting the audit")?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await
        .context("taking one snapshot for the audit")?;
    let world = World::read(&mut tx).await?;
    tx.rollback().await.ok();

    let checks = vec![
        match &inputs.record {
            Some(record) => accepted(&world, record),
            None => CheckBuilder::new("accepted", ACCEPTED).skipped(
                "no load record given (--record): which requests were accepted is the client's to say",
            ),
        },
        sagas_final(&world),
        steps_settled(&world),
        saga_per_order(&world),
        reviews(&world),
        ledger(&world),
        provider(&world),
        charges(&world),
        outboxes(&world),
        dead_letters(&world),
        read_model(&world),
        fences(&world, inputs.fences.as_ref()),
    ];
    Ok(Report {
        totals: world.totals(),
        checks,
    })
}

/// Events waiting in every service's outbox, now: zero once the relays
/// have caught up.
pub async fn outbox_backlog(pool: &PgPool) -> anyhow::Result<i64> {
    let mut conn = pool.acquire().await.context("connecting for the backlog")?;
    let (outboxes, _) = World::read_messaging(&mut conn).await?;
    Ok(outboxes.iter().map(|outbox| outbox.rows).sum())
}

const ACCEPTED: &str =
    "every accepted CreateOrder exists exactly once, with the lines and total asked for";

/// A line of an order as the read model keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct ViewItem {
    sku: String,
    quantity: u32,
    unit_price_minor: i64,
}

#[derive(Debug, sqlx::FromRow)]
struct ViewRow {
    order_id: Uuid,
    customer_id: Uuid,
    status: String,
    items: Json<Vec<ViewItem>>,
    total_minor: i64,
    currency: String,
    payment_id: Option<Uuid>,
    status_reason: Option<String>,
    version: i64,
}

/// An order as its events make it.
#[derive(Debug)]
struct Replayed {
    /// The order, or why its stream does not replay.
    state: Result<Order, String>,
    /// The stream's versions, in order.
    versions: Vec<i64>,
    /// What its history went through that its state no longer shows.
    marks: Marks,
}

/// Events of an order's history that the checks ask about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Marks {
    /// An admin approved its review (OrderReviewApproved).
    review_approved: bool,
    /// An admin declined its review (OrderReviewDeclined).
    review_declined: bool,
    /// A return was asked for (OrderReturnRequested).
    return_requested: bool,
}

impl Marks {
    fn of<'a>(events: impl IntoIterator<Item = &'a OrderEvent>) -> Self {
        let mut marks = Self::default();
        for event in events {
            match event {
                OrderEvent::ReviewApproved => marks.review_approved = true,
                OrderEvent::ReviewDeclined { .. } => marks.review_declined = true,
                OrderEvent::ReturnRequested { .. } => marks.return_requested = true,
                _ => {}
            }
        }
        marks
    }
}

#[derive(Debug, sqlx::FromRow)]
struct SagaRow {
    saga_id: Uuid,
    saga_type: String,
    business_key: String,
    /// A child saga's parent.
    parent_saga_id: Option<Uuid>,
    state: String,
    failure_reason: Option<String>,
    fence: i64,
    overdue_step: Option<String>,
    /// Terminated by an operator: the steps it left in effect.
    left_in_effect: Option<Vec<String>>,
}

impl SagaRow {
    /// Terminated by an operator who acknowledged steps left in effect (a
    /// charge on an order neither confirmed nor cancelled): the money is
    /// the operator's to settle, not the system's mistake.
    fn operator_owned(&self) -> bool {
        self.state == "terminated" && self.left_in_effect.as_ref().is_some_and(|l| !l.is_empty())
    }
}

#[derive(Debug, sqlx::FromRow)]
struct StepRow {
    saga_id: Uuid,
    step: String,
    kind: String,
    status: String,
    attempts: i32,
    /// The last attempt's answer was lost.
    outcome_unknown: bool,
}

#[derive(Debug, sqlx::FromRow)]
struct LedgerRow {
    order_id: Uuid,
    currency: String,
    captured_minor: i64,
    refunded_minor: i64,
}

#[derive(Debug, sqlx::FromRow)]
struct PaymentRow {
    payment_id: Uuid,
    idempotency_key: String,
    status: String,
    order_id: Option<Uuid>,
    amount_minor: Option<i64>,
    currency: Option<String>,
}

#[derive(Debug, sqlx::FromRow)]
struct ChargeRow {
    idempotency_key: String,
    outcome: Option<String>,
    amount_minor: Option<i64>,
    currency: Option<String>,
    order_id: Option<Uuid>,
    refunded: bool,
}

/// The simulated provider's side of the world.
#[derive(Debug)]
struct Provider {
    charges: Vec<ChargeRow>,
    /// What it holds, by order.
    held: HashMap<Uuid, (String, i64)>,
    /// What live authorizations reserve, by order: money neither taken
    /// nor released.
    authorized: HashMap<Uuid, i64>,
}

/// Everything the checks look at, read in one snapshot.
#[derive(Debug)]
struct World {
    views: HashMap<Uuid, ViewRow>,
    streams: HashMap<Uuid, Replayed>,
    /// (customer, key) → order.
    keys: HashMap<(Uuid, String), Uuid>,
    sagas: Vec<SagaRow>,
    /// Each saga's step log.
    steps: HashMap<Uuid, Vec<StepRow>>,
    ledger: Vec<LedgerRow>,
    payments: Vec<PaymentRow>,
    provider: Option<Provider>,
    outboxes: Vec<Outbox>,
    /// (schema, consumer, dead letters).
    dead_letters: Vec<(String, String, i64)>,
}

/// One schema's outbox backlog.
#[derive(Debug)]
struct Outbox {
    schema: String,
    rows: i64,
    /// The oldest event's topic, and its age in seconds.
    oldest: Option<(String, f64)>,
}

impl World {
    async fn read(conn: &mut PgConnection) -> anyhow::Result<Self> {
        let views = sqlx::query_as::<_, ViewRow>(
            "SELECT order_id, customer_id, status, items, total_minor, currency, payment_id,
                    status_reason, version
             FROM orders.order_view",
        )
        .fetch_all(&mut *conn)
        .await
        .context("reading orders.order_view")?
        .into_iter()
        .map(|row| (row.order_id, row))
        .collect();
        let events: Vec<(Uuid, i64, Vec<u8>)> = sqlx::query_as(
            "SELECT stream_id, version, envelope FROM orders.events ORDER BY stream_id, version",
        )
        .fetch_all(&mut *conn)
        .await
        .context("reading orders.events")?;
        let mut streams = HashMap::new();
        for chunk in events.chunk_by(|a, b| a.0 == b.0) {
            let id = chunk[0].0;
            let replayed = order_service::event_store::replay::<Order>(
                id,
                chunk.iter().map(|(_, _, envelope)| envelope.clone()),
            );
            let marks = replayed.as_ref().map_or_else(
                |_| Marks::default(),
                |stream| Marks::of(stream.history.iter().map(|recorded| &recorded.event)),
            );
            let state = replayed
                .map(|stream| stream.state)
                .map_err(|error| format!("{error:#}"));
            let versions = chunk.iter().map(|(_, version, _)| *version).collect();
            streams.insert(
                id,
                Replayed {
                    state,
                    versions,
                    marks,
                },
            );
        }
        let keys = sqlx::query_as::<_, (Uuid, String, Uuid)>(
            "SELECT customer_id, key, order_id FROM orders.idempotency_keys",
        )
        .fetch_all(&mut *conn)
        .await
        .context("reading orders.idempotency_keys")?
        .into_iter()
        .map(|(customer, key, order)| ((customer, key), order))
        .collect();
        let sagas = sqlx::query_as::<_, SagaRow>(
            "SELECT saga_id, saga_type, business_key, parent_saga_id, state, failure_reason, fence,
                    overdue_step, left_in_effect
             FROM saga.saga_instances",
        )
        .fetch_all(&mut *conn)
        .await
        .context("reading saga.saga_instances")?;
        let mut steps: HashMap<Uuid, Vec<StepRow>> = HashMap::new();
        let rows: Vec<StepRow> = sqlx::query_as(
            "SELECT saga_id, step, kind, status, attempts, outcome_unknown FROM saga.saga_steps",
        )
        .fetch_all(&mut *conn)
        .await
        .context("reading saga.saga_steps")?;
        for row in rows {
            steps.entry(row.saga_id).or_default().push(row);
        }
        let ledger = sqlx::query_as(
            "SELECT order_id, currency, captured_minor, refunded_minor FROM payments.order_ledger",
        )
        .fetch_all(&mut *conn)
        .await
        .context("reading payments.order_ledger")?;
        let payments = sqlx::query_as(
            "SELECT payment_id, idempotency_key, status, order_id, amount_minor, currency
             FROM payments.payments",
        )
        .fetch_all(&mut *conn)
        .await
        .context("reading payments.payments")?;
        let provider = Self::read_provider(conn).await?;
        let (outboxes, dead_letters) = Self::read_messaging(conn).await?;
        Ok(Self {
            views,
            streams,
            keys,
            sagas,
            steps,
            ledger,
            payments,
            provider,
            outboxes,
            dead_letters,
        })
    }

    async fn read_provider(conn: &mut PgConnection) -> anyhow::Result<Option<Provider>> {
        let present: bool = sqlx::query_scalar(
            "SELECT to_regclass('payments.simulated_provider_charges') IS NOT NULL
                AND to_regclass('payments.simulated_provider_holdings') IS NOT NULL",
        )
        .fetch_one(&mut *conn)
        .await?;
        if !present {
            return Ok(None);
        }
        let charges = sqlx::query_as(
            "SELECT idempotency_key, outcome, amount_minor, currency, order_id,
                    refunded_at IS NOT NULL AS refunded
             FROM payments.simulated_provider_charges",
        )
        .fetch_all(&mut *conn)
        .await
        .context("reading payments.simulated_provider_charges")?;
        let holdings = sqlx::query_as::<_, (Uuid, String, i64, i64)>(
            "SELECT order_id, currency, held_minor, authorized_minor
             FROM payments.simulated_provider_holdings",
        )
        .fetch_all(&mut *conn)
        .await
        .context("reading payments.simulated_provider_holdings")?;
        let authorized = holdings
            .iter()
            .map(|(order, _, _, authorized)| (*order, *authorized))
            .collect();
        let held = holdings
            .into_iter()
            .map(|(order, currency, held, _)| (order, (currency, held)))
            .collect();
        Ok(Some(Provider {
            charges,
            held,
            authorized,
        }))
    }

    /// Every schema's outbox backlog and dead letters, wherever the
    /// messaging tables are.
    async fn read_messaging(
        conn: &mut PgConnection,
    ) -> anyhow::Result<(Vec<Outbox>, Vec<(String, String, i64)>)> {
        let tables: Vec<(String, String)> = sqlx::query_as(
            "SELECT table_schema::text, table_name::text FROM information_schema.tables
             WHERE table_name IN ('outbox', 'inbox') AND table_type = 'BASE TABLE'
               AND table_schema NOT IN ('pg_catalog', 'information_schema')
             ORDER BY 1, 2",
        )
        .fetch_all(&mut *conn)
        .await
        .context("finding the outboxes and inboxes")?;
        let mut outboxes = Vec::new();
        let mut dead_letters = Vec::new();
        for (schema, table) in tables {
            let qualified = format!("{}.{table}", quote_identifier(&schema));
            if table == "outbox" {
                // The schema name comes from the catalog, quoted.
                let (rows, oldest): (i64, Option<(String, f64)>) = {
                    let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                        "SELECT count(*) FROM {qualified}"
                    )))
                    .fetch_one(&mut *conn)
                    .await
                    .with_context(|| format!("counting {qualified}"))?;
                    let oldest = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT topic, extract(epoch FROM now() - created_at)::float8
                         FROM {qualified} ORDER BY id LIMIT 1"
                    )))
                    .fetch_optional(&mut *conn)
                    .await
                    .with_context(|| format!("reading {qualified}"))?;
                    (rows, oldest)
                };
                outboxes.push(Outbox {
                    schema,
                    rows,
                    oldest,
                });
            } else {
                let rows: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT consumer, count(*) FROM {qualified}
                     WHERE outcome = 'dead_lettered' GROUP BY consumer ORDER BY consumer"
                )))
                .fetch_all(&mut *conn)
                .await
                .with_context(|| format!("reading {qualified}"))?;
                dead_letters.extend(
                    rows.into_iter()
                        .map(|(consumer, n)| (schema.clone(), consumer, n)),
                );
            }
        }
        Ok((outboxes, dead_letters))
    }

    /// The order sagas, by order.
    fn order_sagas(&self) -> HashMap<Uuid, Vec<&SagaRow>> {
        self.sagas_of(ORDER_SAGA)
    }

    /// The sagas of `saga_type` (one keyed by its order id), by order.
    fn sagas_of(&self, saga_type: &str) -> HashMap<Uuid, Vec<&SagaRow>> {
        let mut by_order: HashMap<Uuid, Vec<&SagaRow>> = HashMap::new();
        for saga in self.sagas.iter().filter(|saga| saga.saga_type == saga_type) {
            if let Ok(order) = Uuid::parse_str(&saga.business_key) {
                by_order.entry(order).or_default().push(saga);
            }
        }
        by_order
    }

    /// Orders whose saga an operator terminated, leaving effects in place.
    fn operator_owned_orders(&self) -> HashSet<Uuid> {
        self.order_sagas()
            .into_iter()
            .filter(|(_, sagas)| sagas.iter().any(|saga| saga.operator_owned()))
            .map(|(order, _)| order)
            .collect()
    }

    /// Every order id either side of the read model knows.
    fn order_ids(&self) -> HashSet<Uuid> {
        self.views
            .keys()
            .chain(self.streams.keys())
            .copied()
            .collect()
    }

    /// The marks of `order`'s history (none if it does not replay).
    fn marks(&self, order: &Uuid) -> Marks {
        self.streams
            .get(order)
            .map(|stream| stream.marks)
            .unwrap_or_default()
    }

    fn totals(&self) -> Totals {
        let marked = |mark: fn(&Marks) -> bool| {
            self.streams
                .values()
                .filter(|stream| mark(&stream.marks))
                .count()
        };
        let reviews_timed_out = self
            .sagas
            .iter()
            .filter(|saga| saga.saga_type == ORDER_SAGA)
            .filter(|saga| {
                saga.failure_reason
                    .as_deref()
                    .is_some_and(|reason| review_refusal(reason) == Some(LateReview::TimedOut))
            })
            .count();
        let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
        for view in self.views.values() {
            *by_status.entry(view.status.clone()).or_default() += 1;
        }
        let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
        for saga in &self.sagas {
            *by_state.entry(saga.state.clone()).or_default() += 1;
        }
        Totals {
            orders: self.order_ids().len(),
            by_status: by_status.into_iter().collect(),
            sagas_by_state: by_state.into_iter().collect(),
            confirmed_minor: self
                .views
                .values()
                .filter(|view| view.status == OrderStatus::Confirmed.as_str())
                .map(|view| view.total_minor)
                .sum(),
            captured_minor: self.ledger.iter().map(|row| row.captured_minor).sum(),
            refunded_minor: self.ledger.iter().map(|row| row.refunded_minor).sum(),
            provider_held_minor: self
                .provider
                .as_ref()
                .map(|provider| provider.held.values().map(|(_, held)| held).sum()),
            reviews_approved: marked(|marks| marks.review_approved),
            reviews_declined: marked(|marks| marks.review_declined),
            reviews_timed_out,
            returns_requested: marked(|marks| marks.return_requested),
            returned: self
                .views
                .values()
                .filter(|view| view.status == OrderStatus::Returned.as_str())
                .count(),
        }
    }
}

/// `"name"`, with any `"` doubled.
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn is_final_order(status: &str) -> bool {
    [
        OrderStatus::Confirmed,
        OrderStatus::Rejected,
        OrderStatus::Cancelled,
        OrderStatus::Returned,
    ]
    .iter()
    .any(|final_status| final_status.as_str() == status)
}

fn accepted(world: &World, record: &Record) -> Check {
    let mut check = CheckBuilder::new("accepted", ACCEPTED);
    let mut accepted = 0;
    let mut answer_lost = 0;
    let mut never_arrived = 0;
    let mut explained: HashSet<Uuid> = HashSet::new();
    for intent in record.intents.values() {
        let stored = world
            .keys
            .get(&(intent.customer_id, intent.key.clone()))
            .copied();
        if let Some(order) = stored {
            explained.insert(order);
        }
        let answers = record.accepted.get(&intent.key);
        let Some(first) = answers.and_then(|answers| answers.first()) else {
            match (stored, record.refused.get(&intent.key)) {
                (Some(order), Some(code)) => check.violation(format!(
                    "key {}: refused ({code}), yet order {order} exists for it",
                    intent.key
                )),
                (Some(order), None) => {
                    answer_lost += 1;
                    expect_order(&mut check, world, intent, order);
                }
                (None, _) => never_arrived += 1,
            }
            continue;
        };
        accepted += 1;
        for answer in answers.into_iter().flatten() {
            if answer.order_id != first.order_id {
                check.violation(format!(
                    "key {}: accepted as order {} and as order {}",
                    intent.key, first.order_id, answer.order_id
                ));
            }
            if (answer.total_minor, answer.currency.as_str())
                != (intent.total_minor, intent.currency.as_str())
            {
                check.violation(format!(
                    "key {}: asked for {} {}, answered {} {}",
                    intent.key,
                    intent.total_minor,
                    intent.currency,
                    answer.total_minor,
                    answer.currency
                ));
            }
        }
        match stored {
            Some(order) if order == first.order_id => {}
            Some(order) => check.violation(format!(
                "key {}: accepted as order {}, but the key is stored for order {order}",
                intent.key, first.order_id
            )),
            None => check.violation(format!(
                "key {}: accepted as order {}, but the order service has no such key",
                intent.key, first.order_id
            )),
        }
        explained.insert(first.order_id);
        expect_order(&mut check, world, intent, first.order_id);
    }
    // Exactly once: the record's customers have no order it did not ask for.
    let customers = record.customers();
    for view in world.views.values() {
        if customers.contains(&view.customer_id) && !explained.contains(&view.order_id) {
            check.violation(format!(
                "order {} of customer {} was never asked for (a duplicate?)",
                view.order_id, view.customer_id
            ));
        }
    }
    check.finish(format!(
        "{} keys: {accepted} accepted, {answer_lost} accepted with the answer lost, {} refused, \
         {never_arrived} never reached the service{}",
        record.intents.len(),
        record.refused.len(),
        if record.torn_lines > 0 {
            format!("; {} torn lines skipped", record.torn_lines)
        } else {
            String::new()
        }
    ))
}

/// The order `order_id` exists, on both sides of the read model, with the
/// customer, lines and total of `intent`.
fn expect_order(check: &mut CheckBuilder, world: &World, intent: &record::Intent, order_id: Uuid) {
    let key = &intent.key;
    match world.views.get(&order_id) {
        None => check.violation(format!(
            "key {key}: order {order_id} is not in the read model"
        )),
        Some(view) => {
            if (view.total_minor, view.currency.as_str())
                != (intent.total_minor, intent.currency.as_str())
                || view.customer_id != intent.customer_id
            {
                check.violation(format!(
                    "key {key}: order {order_id} is {} {} of customer {}, asked {} {} of {}",
                    view.total_minor,
                    view.currency,
                    view.customer_id,
                    intent.total_minor,
                    intent.currency,
                    intent.customer_id
                ));
            }
        }
    }
    let placed = world
        .streams
        .get(&order_id)
        .and_then(|stream| stream.state.as_ref().ok())
        .and_then(Order::placed);
    match placed {
        None => check.violation(format!(
            "key {key}: order {order_id} has no placed event in the event store"
        )),
        Some(placed) => {
            let lines: Vec<(String, u32, i64)> = placed
                .lines
                .items()
                .iter()
                .map(|item| {
                    (
                        item.sku.as_str().to_owned(),
                        item.quantity.get(),
                        item.unit_price.amount_minor(),
                    )
                })
                .collect();
            if lines != intent.lines
                || placed.lines.total().amount_minor() != intent.total_minor
                || placed.payment_method.as_str() != intent.payment_method
            {
                check.violation(format!(
                    "key {key}: order {order_id} was placed as {lines:?} with {}, asked {:?} with {}",
                    placed.payment_method.as_str(),
                    intent.lines,
                    intent.payment_method
                ));
            }
        }
    }
}

fn sagas_final(world: &World) -> Check {
    let mut check = CheckBuilder::new(
        "sagas-final",
        "every saga is final, or failed with a reason an operator sees",
    );
    let mut failed = 0;
    let mut terminated = 0;
    let mut operator_owned = Vec::new();
    for saga in &world.sagas {
        let reason = saga
            .failure_reason
            .as_deref()
            .map(str::trim)
            .filter(|reason| !reason.is_empty());
        match saga.state.as_str() {
            "completed" | "compensated" => {}
            "failed" => match reason {
                Some(_) => failed += 1,
                _ => check.violation(format!("saga {} failed without a reason", saga.saga_id)),
            },
            "terminated" => match reason {
                Some(_) if saga.operator_owned() => {
                    terminated += 1;
                    operator_owned.push(format!(
                        "{} (order {}: {} left in effect)",
                        saga.saga_id,
                        saga.business_key,
                        saga.left_in_effect
                            .as_deref()
                            .unwrap_or_default()
                            .join(", ")
                    ));
                }
                Some(_) => terminated += 1,
                None => check.violation(format!(
                    "saga {} was terminated without a reason",
                    saga.saga_id
                )),
            },
            state => check.violation(format!(
                "saga {} of {} is still {state}{}",
                saga.saga_id,
                saga.business_key,
                saga.overdue_step
                    .as_ref()
                    .map(|step| format!(" (overdue in {step})"))
                    .unwrap_or_default()
            )),
        }
    }
    let owned = if operator_owned.is_empty() {
        String::new()
    } else {
        format!(
            "; operator-owned, not judged: {}",
            operator_owned.join("; ")
        )
    };
    check.finish(format!(
        "{} sagas, {failed} failed with a reason (awaiting an operator), {terminated} terminated by an operator{owned}",
        world.sagas.len()
    ))
}

fn steps_settled(world: &World) -> Check {
    let mut check = CheckBuilder::new(
        "steps-settled",
        "a final saga's step log is settled: no call of it may still have taken effect unnoticed",
    );
    let mut finals = 0;
    let mut superseded = 0;
    for saga in &world.sagas {
        let completed = match saga.state.as_str() {
            "completed" => true,
            "compensated" => false,
            _ => continue,
        };
        finals += 1;
        let log = world
            .steps
            .get(&saga.saga_id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for row in log {
            let compensated = || {
                log.iter().any(|other| {
                    other.step == row.step
                        && other.kind == "compensation"
                        && other.status == "succeeded"
                })
            };
            let settled = match (completed, row.kind.as_str(), row.status.as_str()) {
                (_, _, "succeeded") => true,
                // Its condition did not hold: it never ran.
                (_, "action", "skipped") => row.attempts == 0,
                // A compensated saga's action may have failed, or have been
                // left waiting for a retry or in flight when the saga
                // turned back. Then either no call of it can have taken
                // effect (none was made, or the last was refused for
                // certain), or its compensation, which settles whatever it
                // did (a refund by the charge's key), succeeded.
                (false, "action", "failed") => true,
                (false, "action", "waiting" | "running") => {
                    let settled = (row.status == "waiting"
                        && (row.attempts == 0 || !row.outcome_unknown))
                        || compensated();
                    superseded += usize::from(settled);
                    settled
                }
                _ => false,
            };
            if !settled {
                check.violation(format!(
                    "saga {} is {}, but its {} {} is {} after {} attempts{}",
                    saga.saga_id,
                    saga.state,
                    row.kind,
                    row.step,
                    row.status,
                    row.attempts,
                    if row.outcome_unknown {
                        ", the last one's outcome unknown"
                    } else {
                        ""
                    }
                ));
            }
        }
    }
    check.finish(format!(
        "{finals} final sagas' step logs{}",
        if superseded > 0 {
            format!(
                "; {superseded} actions were left waiting or in flight when their saga turned back, \
                 none with an effect left unsettled"
            )
        } else {
            String::new()
        }
    ))
}

fn saga_per_order(world: &World) -> Check {
    let mut check = CheckBuilder::new(
        "saga-per-order",
        "exactly one order saga per order and at most one return saga, there exactly if a return \
         was asked for; none without an order; each ended as its order did (an order left \
         RETURN_REQUESTED only with its return saga failed or terminated, for an operator); \
         every payment-refund child belongs to a return saga",
    );
    let by_order = world.order_sagas();
    let returns = world.sagas_of(RETURN_SAGA);
    let orders = world.order_ids();
    for order in &orders {
        let status = world.views.get(order).map(|view| view.status.as_str());
        let is = |wanted: OrderStatus| status == Some(wanted.as_str());
        let sagas = by_order.get(order).map(Vec::as_slice).unwrap_or_default();
        match sagas {
            [] => check.violation(format!("order {order} has no saga")),
            [saga] => {
                let agrees = match saga.state.as_str() {
                    // Confirmed, and maybe returned since.
                    "completed" => {
                        is(OrderStatus::Confirmed)
                            || is(OrderStatus::ReturnRequested)
                            || is(OrderStatus::Returned)
                    }
                    "compensated" => is(OrderStatus::Rejected) || is(OrderStatus::Cancelled),
                    // Not over yet: `sagas-final` judges it.
                    _ => true,
                };
                if !agrees {
                    check.violation(format!(
                        "order {order} is {}, but its saga {} {}",
                        status.unwrap_or("missing from the read model"),
                        saga.saga_id,
                        saga.state
                    ));
                }
            }
            more => check.violation(format!("order {order} has {} sagas", more.len())),
        }
        let asked = world.marks(order).return_requested;
        match returns.get(order).map(Vec::as_slice).unwrap_or_default() {
            [] if asked => check.violation(format!(
                "order {order} is {}: its return was asked for, and no return saga started",
                status.unwrap_or("missing from the read model")
            )),
            [] => {}
            [saga] if !asked => check.violation(format!(
                "return saga {} is about order {order}, whose return was never asked for",
                saga.saga_id
            )),
            [saga] => {
                let agrees = match saga.state.as_str() {
                    "completed" => is(OrderStatus::Returned),
                    // Waiting for an operator, who sees why: the order stays
                    // RETURN_REQUESTED until then.
                    "failed" | "terminated" => is(OrderStatus::ReturnRequested),
                    // Turned back: the order stays RETURN_REQUESTED, and no
                    // operator is asked to act.
                    "compensated" => false,
                    _ => true,
                };
                if !agrees {
                    check.violation(format!(
                        "order {order} is {}, but its return saga {} {}{}",
                        status.unwrap_or("missing from the read model"),
                        saga.saga_id,
                        saga.state,
                        saga.failure_reason
                            .as_deref()
                            .map(|reason| format!(" ({reason})"))
                            .unwrap_or_default()
                    ));
                }
            }
            more => check.violation(format!("order {order} has {} return sagas", more.len())),
        }
        if is(OrderStatus::Returned) && !asked {
            check.violation(format!(
                "order {order} is returned, but its history has no return asked for"
            ));
        }
    }
    for (order, sagas) in by_order.iter().chain(&returns) {
        if !orders.contains(order) {
            for saga in sagas {
                check.violation(format!(
                    "saga {} ({}) is about order {order}, which does not exist",
                    saga.saga_id, saga.saga_type
                ));
            }
        }
    }
    // Children belong to their parent, whose order they serve: a refund
    // belongs to a return, once per step of it.
    let by_id: HashMap<Uuid, &SagaRow> = world
        .sagas
        .iter()
        .map(|saga| (saga.saga_id, saga))
        .collect();
    let mut children: HashMap<(Uuid, &str), usize> = HashMap::new();
    let mut refunds = 0;
    for saga in &world.sagas {
        if (saga.saga_type == ORDER_SAGA || saga.saga_type == RETURN_SAGA)
            && Uuid::parse_str(&saga.business_key).is_err()
        {
            check.violation(format!(
                "saga {} is about {:?}, not an order id",
                saga.saga_id, saga.business_key
            ));
        }
        let parent = saga.parent_saga_id.map(|id| (id, by_id.get(&id)));
        match (saga.saga_type.as_str(), parent) {
            (REFUND_SAGA, Some((_, Some(parent)))) if parent.saga_type == RETURN_SAGA => {
                refunds += 1;
                *children.entry((parent.saga_id, REFUND_SAGA)).or_default() += 1;
            }
            (REFUND_SAGA, Some((_, Some(parent)))) => check.violation(format!(
                "refund saga {} is a child of saga {}, a {}, not a return",
                saga.saga_id, parent.saga_id, parent.saga_type
            )),
            (_, Some((parent, None))) => check.violation(format!(
                "saga {} ({}) is a child of saga {parent}, which does not exist",
                saga.saga_id, saga.saga_type
            )),
            (REFUND_SAGA, None) => {
                check.violation(format!("refund saga {} has no parent", saga.saga_id))
            }
            _ => {}
        }
    }
    for ((parent, saga_type), n) in children {
        if n > 1 {
            check.violation(format!("saga {parent} has {n} {saga_type} children"));
        }
    }
    check.finish(format!(
        "{} orders: {} order sagas, {} return sagas, {refunds} refund children; {} sagas in all",
        orders.len(),
        by_order.values().map(Vec::len).sum::<usize>(),
        returns.values().map(Vec::len).sum::<usize>(),
        world.sagas.len()
    ))
}

/// Why a review that an admin approved may still have ended in a
/// rejection: the saga had taken the review's timeout first (the approval
/// came after it, and the order took it since its RejectOrder had not
/// landed yet), or the approval came so late that the authorization would
/// lapse before the capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LateReview {
    TimedOut,
    AuthorizationLapses,
}

/// What `check-review`'s refusal in an order saga's failure reason says,
/// when it says one of [`LateReview`]: the reason is exactly
/// `check-review: review declined: the review timed out after …` or
/// `check-review: the payment authorization lapses at …`.
fn review_refusal(reason: &str) -> Option<LateReview> {
    use saga_orchestrator::order_saga::v2;
    let refusal = reason.strip_prefix(v2::CHECK_REVIEW)?.strip_prefix(": ")?;
    if refusal
        .strip_prefix(v2::REVIEW_DECLINED)
        .and_then(|rest| rest.strip_prefix(": "))
        .is_some_and(|why| why.starts_with(v2::REVIEW_TIMED_OUT))
    {
        Some(LateReview::TimedOut)
    } else if refusal.starts_with(v2::AUTHORIZATION_LAPSES) {
        Some(LateReview::AuthorizationLapses)
    } else {
        None
    }
}

const REVIEWS: &str = "an order an admin declined was rejected; one an admin approved was confirmed \
     (then maybe returned) or cancelled, or rejected only when its saga's failure reason is \
     check-review's refusal because the review had timed out before the approval reached the saga, \
     or because the authorization would lapse before the capture";

fn reviews(world: &World) -> Check {
    let mut check = CheckBuilder::new("reviews", REVIEWS);
    let sagas = world.order_sagas();
    let (mut approved, mut declined, mut late) = (0, 0, 0);
    for (order, stream) in &world.streams {
        let marks = stream.marks;
        if !marks.review_approved && !marks.review_declined {
            continue;
        }
        let Some(view) = world.views.get(order) else {
            // `read-model` reports it.
            continue;
        };
        if !is_final_order(&view.status) && view.status != OrderStatus::ReturnRequested.as_str() {
            // Not over: `sagas-final` and `saga-per-order` judge it.
            continue;
        }
        let is = |wanted: OrderStatus| view.status == wanted.as_str();
        if marks.review_approved && marks.review_declined {
            check.violation(format!("order {order} was both approved and declined"));
            continue;
        }
        if marks.review_declined {
            declined += 1;
            if !is(OrderStatus::Rejected) {
                check.violation(format!(
                    "order {order} was declined on review, yet it is {}",
                    view.status
                ));
            }
            continue;
        }
        approved += 1;
        if is(OrderStatus::Rejected) {
            let saga = sagas.get(order).and_then(|sagas| sagas.first());
            let reason = saga.and_then(|saga| saga.failure_reason.as_deref());
            if reason.and_then(review_refusal).is_some() {
                late += 1;
            } else {
                check.violation(format!(
                    "order {order} was approved on review, yet rejected{}",
                    match (saga, reason) {
                        (Some(saga), Some(reason)) =>
                            format!(": its saga {} says {reason:?}", saga.saga_id),
                        (Some(saga), None) =>
                            format!(", and its saga {} says nothing", saga.saga_id),
                        (None, _) => " without a saga".to_owned(),
                    }
                ));
            }
        }
    }
    check.finish(format!(
        "{approved} approved ({late} rejected after all: the approval came after the review's \
         timeout, or too late to capture), {declined} declined"
    ))
}

fn ledger(world: &World) -> Check {
    let mut check = CheckBuilder::new(
        "ledger",
        "captured − refunded = total if confirmed, 0 if rejected, cancelled or returned; \
         a returned order's payment is refunded, or is an authorization that took nothing",
    );
    let payments: HashMap<Uuid, &PaymentRow> = world
        .payments
        .iter()
        .map(|payment| (payment.payment_id, payment))
        .collect();
    let mut net: HashMap<Uuid, Vec<(&str, i64)>> = HashMap::new();
    for row in &world.ledger {
        net.entry(row.order_id).or_default().push((
            row.currency.as_str(),
            row.captured_minor - row.refunded_minor,
        ));
        if row.refunded_minor > row.captured_minor || row.refunded_minor < 0 {
            check.violation(format!(
                "order {}: refunded {} of {} captured",
                row.order_id, row.refunded_minor, row.captured_minor
            ));
        }
    }
    let mut judged = 0;
    let mut not_final = 0;
    for view in world.views.values() {
        if !is_final_order(&view.status) {
            not_final += 1;
            continue;
        }
        judged += 1;
        if view.status == OrderStatus::Returned.as_str() {
            // Refunded; or, if the authorization lapsed or was released
            // before anyone captured it, never taken.
            let payment = view.payment_id.and_then(|id| payments.get(&id));
            match payment.map(|payment| payment.status.as_str()) {
                Some("refunded" | "voided" | "expired") => {}
                Some(status) => check.violation(format!(
                    "order {} is returned, but its payment {} is {status}",
                    view.order_id,
                    view.payment_id.unwrap_or_default()
                )),
                None => check.violation(format!(
                    "order {} is returned, but its payment {:?} does not exist",
                    view.order_id, view.payment_id
                )),
            }
        }
        // A returned order's payment was refunded: it keeps nothing.
        let expected = if view.status == OrderStatus::Confirmed.as_str() {
            view.total_minor
        } else {
            0
        };
        let moved = net
            .get(&view.order_id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for (currency, amount) in moved {
            if *currency != view.currency && *amount != 0 {
                check.violation(format!(
                    "order {} ({} {}): {amount} {currency} kept in another currency",
                    view.order_id, view.total_minor, view.currency
                ));
            }
        }
        let kept: i64 = moved
            .iter()
            .filter(|(currency, _)| *currency == view.currency)
            .map(|(_, amount)| amount)
            .sum();
        if kept != expected {
            check.violation(format!(
                "order {} is {} ({} {}), but captured − refunded = {kept}",
                view.order_id, view.status, view.total_minor, view.currency
            ));
        }
    }
    for order in net.keys() {
        if !world.views.contains_key(order) {
            check.violation(format!(
                "payments exist for order {order}, which does not exist"
            ));
        }
    }
    check.finish(format!(
        "{judged} final orders{}",
        if not_final > 0 {
            format!("; {not_final} not final, not judged")
        } else {
            String::new()
        }
    ))
}

fn provider(world: &World) -> Check {
    let mut check = CheckBuilder::new(
        "provider",
        "the provider holds each confirmed order's total and nothing of any other order, \
         and no authorization of a final order still reserves money",
    );
    let Some(provider) = &world.provider else {
        return check
            .skipped("no simulated provider here: reconcile with the provider's statement");
    };
    let mut confirmed_total = 0;
    // An order whose saga an operator terminated with a charge in effect
    // may hold money until the operator settles it: reported, not judged.
    let operator_owned = world.operator_owned_orders();
    let mut owned_held = 0;
    let mut returning_held = 0;
    for view in world.views.values() {
        // Taken or released, never left reserved, once the order is final
        // (a confirmed order's authorization is captured).
        let reserved = provider
            .authorized
            .get(&view.order_id)
            .copied()
            .unwrap_or(0);
        if reserved != 0 && is_final_order(&view.status) && !operator_owned.contains(&view.order_id)
        {
            check.violation(format!(
                "order {} is {}, yet an authorization still reserves {reserved} {} of it",
                view.order_id, view.status, view.currency
            ));
        }
        // A return under way: its refund may or may not have happened yet.
        if view.status == OrderStatus::ReturnRequested.as_str() {
            returning_held += provider
                .held
                .get(&view.order_id)
                .map_or(0, |(_, held)| *held);
            continue;
        }
        if operator_owned.contains(&view.order_id) {
            owned_held += provider
                .held
                .get(&view.order_id)
                .map_or(0, |(_, held)| *held);
            continue;
        }
        let held = provider.held.get(&view.order_id);
        let held_minor = held.map_or(0, |(_, held)| *held);
        if let Some((currency, held)) = held
            && *currency != view.currency
            && *held != 0
        {
            check.violation(format!(
                "order {} ({}): the provider holds {held} {currency}",
                view.order_id, view.currency
            ));
        }
        if view.status == OrderStatus::Confirmed.as_str() {
            confirmed_total += view.total_minor;
            if held_minor != view.total_minor {
                check.violation(format!(
                    "order {} is confirmed ({} {}), the provider holds {held_minor}",
                    view.order_id, view.total_minor, view.currency
                ));
            }
        } else if held_minor != 0 {
            check.violation(format!(
                "order {} is {}, yet the provider holds {held_minor} {} of it",
                view.order_id, view.status, view.currency
            ));
        }
    }
    for (order, (currency, held)) in &provider.held {
        if !world.views.contains_key(order) && *held != 0 {
            check.violation(format!(
                "the provider holds {held} {currency} for order {order}, which does not exist"
            ));
        }
    }
    let held_total: i64 =
        provider.held.values().map(|(_, held)| held).sum::<i64>() - owned_held - returning_held;
    if held_total != confirmed_total {
        check.violation(format!(
            "the provider holds {held_total} in all, the confirmed orders total {confirmed_total}"
        ));
    }
    let owned = if operator_owned.is_empty() {
        String::new()
    } else {
        format!(
            "; {} operator-owned orders (terminated with effects left) hold {owned_held}, not judged",
            operator_owned.len()
        )
    };
    let returning = if returning_held == 0 {
        String::new()
    } else {
        format!("; orders being returned hold {returning_held}, not judged")
    };
    check.finish(format!(
        "holds {held_total}, confirmed orders total {confirmed_total}{owned}{returning}"
    ))
}

fn charges(world: &World) -> Check {
    let mut check = CheckBuilder::new(
        "charges",
        "no charge without a payment row that says so, nor a payment without its charge",
    );
    let Some(provider) = &world.provider else {
        return check
            .skipped("no simulated provider here: reconcile with the provider's statement");
    };
    let payments: HashMap<&str, &PaymentRow> = world
        .payments
        .iter()
        .map(|payment| (payment.idempotency_key.as_str(), payment))
        .collect();
    let charges: HashMap<&str, &ChargeRow> = provider
        .charges
        .iter()
        .map(|charge| (charge.idempotency_key.as_str(), charge))
        .collect();
    let mut captured = 0;
    for charge in &provider.charges {
        if charge.outcome.as_deref() != Some("captured") {
            continue;
        }
        captured += 1;
        let key = &charge.idempotency_key;
        let Some(payment) = payments.get(key.as_str()) else {
            check.violation(format!(
                "charge {key} ({:?} {:?} for order {:?}) has no payment row",
                charge.amount_minor, charge.currency, charge.order_id
            ));
            continue;
        };
        let expected = if charge.refunded {
            "refunded"
        } else {
            "captured"
        };
        if payment.status != expected {
            check.violation(format!(
                "charge {key} is {} at the provider, but its payment is {}",
                if charge.refunded { "refunded" } else { "held" },
                payment.status
            ));
        }
        if (
            payment.order_id,
            payment.amount_minor,
            payment.currency.as_deref(),
        ) != (
            charge.order_id,
            charge.amount_minor,
            charge.currency.as_deref(),
        ) {
            check.violation(format!(
                "charge {key}: the provider charged {:?} {:?} for order {:?}, the payment says {:?} {:?} for {:?}",
                charge.amount_minor,
                charge.currency,
                charge.order_id,
                payment.amount_minor,
                payment.currency,
                payment.order_id
            ));
        }
    }
    for payment in &world.payments {
        if !matches!(payment.status.as_str(), "captured" | "refunded") {
            continue;
        }
        let key = payment.idempotency_key.as_str();
        if charges
            .get(key)
            .is_none_or(|charge| charge.outcome.as_deref() != Some("captured"))
        {
            check.violation(format!(
                "payment {key} is {}, but the provider captured nothing under its key",
                payment.status
            ));
        }
    }
    check.finish(format!(
        "{captured} captures at the provider, {} payment rows",
        world.payments.len()
    ))
}

fn outboxes(world: &World) -> Check {
    let mut check = CheckBuilder::new("outboxes", "every outbox is drained");
    for Outbox {
        schema,
        rows,
        oldest,
    } in &world.outboxes
    {
        if *rows > 0 {
            let (topic, age) = oldest.clone().unwrap_or_default();
            check.violation(format!(
                "{schema}.outbox holds {rows} events, the oldest for {topic} since {age:.1} s"
            ));
        }
    }
    let schemas: Vec<&str> = world
        .outboxes
        .iter()
        .map(|outbox| outbox.schema.as_str())
        .collect();
    check.finish(format!(
        "{} outboxes ({})",
        schemas.len(),
        schemas.join(", ")
    ))
}

fn dead_letters(world: &World) -> Check {
    let check = CheckBuilder::new("dead-letters", "dead letters, counted and shown");
    if world.dead_letters.is_empty() {
        return check.info("none");
    }
    let shown: Vec<String> = world
        .dead_letters
        .iter()
        .map(|(schema, consumer, n)| format!("{n} by {consumer} ({schema})"))
        .collect();
    check.info(shown.join(", "))
}

fn read_model(world: &World) -> Check {
    let mut check = CheckBuilder::new(
        "read-model",
        "the order read model equals a replay of the event store",
    );
    for (id, stream) in &world.streams {
        let expected_versions: Vec<i64> = (1..=stream.versions.len() as i64).collect();
        if stream.versions != expected_versions {
            check.violation(format!(
                "stream {id} has versions {:?}, not 1..{}",
                stream.versions,
                stream.versions.len()
            ));
        }
        let order = match &stream.state {
            Ok(order) => order,
            Err(error) => {
                check.violation(format!("stream {id} does not replay: {error}"));
                continue;
            }
        };
        let Some(view) = world.views.get(id) else {
            check.violation(format!("order {id} has events but no read model row"));
            continue;
        };
        let mut differences = Vec::new();
        let (Some(placed), Some(status)) = (order.placed(), order.status()) else {
            check.violation(format!("stream {id} replays to no order"));
            continue;
        };
        if view.status != status.as_str() {
            differences.push(format!("status {} vs {}", view.status, status.as_str()));
        }
        let total = placed.lines.total();
        if (view.total_minor, view.currency.as_str())
            != (total.amount_minor(), total.currency().code())
        {
            differences.push(format!(
                "total {} {} vs {} {}",
                view.total_minor,
                view.currency,
                total.amount_minor(),
                total.currency().code()
            ));
        }
        if view.customer_id != placed.customer_id.as_uuid() {
            differences.push("customer".to_owned());
        }
        let items: Vec<ViewItem> = placed
            .lines
            .items()
            .iter()
            .map(|item| ViewItem {
                sku: item.sku.as_str().to_owned(),
                quantity: item.quantity.get(),
                unit_price_minor: item.unit_price.amount_minor(),
            })
            .collect();
        if view.items.0 != items {
            differences.push("lines".to_owned());
        }
        let (payment_id, reason) = match order {
            Order::Confirmed { payment_id, .. } => (Some(payment_id.as_uuid()), None),
            Order::ReturnRequested {
                payment_id, reason, ..
            }
            | Order::Returned {
                payment_id, reason, ..
            } => (Some(payment_id.as_uuid()), Some(reason.as_str())),
            Order::Rejected { reason, .. }
            | Order::Cancelled { reason, .. }
            | Order::ReviewDeclined { reason, .. } => (None, Some(reason.as_str())),
            Order::CancellationRequested { reason, .. } => {
                (None, reason.as_ref().map(|reason| reason.as_str()))
            }
            Order::Initial
            | Order::Pending(_)
            | Order::PendingReview(_)
            | Order::ReviewApproved(_) => (None, None),
        };
        if view.payment_id != payment_id {
            differences.push(format!("payment {:?} vs {payment_id:?}", view.payment_id));
        }
        if view.status_reason.as_deref() != reason {
            differences.push(format!("reason {:?} vs {reason:?}", view.status_reason));
        }
        if view.version != stream.versions.len() as i64 {
            differences.push(format!(
                "version {} vs {}",
                view.version,
                stream.versions.len()
            ));
        }
        if !differences.is_empty() {
            check.violation(format!(
                "order {id}: read model vs replay: {}",
                differences.join(", ")
            ));
        }
    }
    for id in world.views.keys() {
        if !world.streams.contains_key(id) {
            check.violation(format!("order {id} is in the read model but has no events"));
        }
    }
    check.finish(format!(
        "{} streams replayed, {} rows compared",
        world.streams.len(),
        world.views.len()
    ))
}

fn fences(world: &World, watch: Option<&FenceWatch>) -> Check {
    let mut check = CheckBuilder::new("fences", "a saga's fence never went backwards");
    // What one look at the tables can show: the step log is written only
    // by a replica holding a claim, and every claim raises the fence.
    for saga in &world.sagas {
        if world.steps.contains_key(&saga.saga_id) && saga.fence < 1 {
            check.violation(format!(
                "saga {} has a step log but fence {}: written without a claim",
                saga.saga_id, saga.fence
            ));
        }
    }
    let Some(watch) = watch else {
        return check.finish(
            "only that every saga with a step log has a fence ≥ 1: the tables keep each saga's \
             current fence and no history, and the step log has no owner or fence column, so a \
             fence going back cannot be seen in one look (a chaos run samples them as it goes)",
        );
    };
    for violation in &watch.violations {
        check.violation(violation.clone());
    }
    let current: HashMap<Uuid, i64> = world
        .sagas
        .iter()
        .map(|saga| (saga.saga_id, saga.fence))
        .collect();
    for (saga, highest) in watch.highest() {
        match current.get(saga) {
            Some(fence) if fence < highest => check.violation(format!(
                "saga {saga}: fence {fence} now, {highest} seen before"
            )),
            Some(_) => {}
            None => check.violation(format!("saga {saga} was seen, and is gone")),
        }
    }
    check.finish(format!(
        "{} samples of {} sagas: never lower than before, one owner per fence; \
         the step log itself records no fence",
        watch.samples,
        watch.sagas()
    ))
}

#[cfg(test)]
mod tests {
    use super::{LateReview, review_refusal};

    #[test]
    fn only_check_reviews_refusals_for_a_timeout_or_a_lapse_explain_an_approved_rejection() {
        assert_eq!(
            review_refusal("check-review: review declined: the review timed out after 5s"),
            Some(LateReview::TimedOut)
        );
        assert_eq!(
            review_refusal(
                "check-review: the payment authorization lapses at 2026-12-01T10:00:00+00:00, too soon to capture"
            ),
            Some(LateReview::AuthorizationLapses)
        );
        for other in [
            "check-review: review declined: fraud suspected",
            "check-review: review declined",
            "authorize-payment: payment declined: card_declined",
            "cancelled by the customer: the review timed out after 5s",
            "",
        ] {
            assert_eq!(review_refusal(other), None, "{other:?}");
        }
    }

    #[test]
    fn the_schemas_read_are_the_services_own() {
        assert_eq!(order_service::SCHEMA, "orders");
        assert_eq!(payment_service::SCHEMA, "payments");
        assert_eq!(saga_orchestrator::SCHEMA, "saga");
    }
}
