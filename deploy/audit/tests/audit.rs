//! The audit against a real PostgreSQL: a small consistent world (the
//! services' own migrations, a confirmed, a rejected and a cancelled
//! order with their events, read model, payments, provider charges and
//! sagas) passes every invariant; each test then breaks one on purpose,
//! as a bug or a lost message would, and the audit must name exactly the
//! invariants that broke.

use std::collections::BTreeSet;

use audit::record::Entry;
use audit::{FenceWatch, Inputs, Record, Report};
use dev_stack::TestEnv;
use money::{Currency, Money};
use order_service::domain::{
    CustomerId, LineItem, Order, OrderEvent, OrderId, OrderLines, PaymentId, PaymentMethodToken,
    Placed, Quantity, Reason, Sku,
};
use order_service::event_store::{Stream, Writer, append};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Executor as _, PgPool};
use uuid::Uuid;

/// One order of the world, and everything the system wrote for it.
#[derive(Debug, Clone)]
struct Fixture {
    order_id: Uuid,
    saga_id: Uuid,
    key: String,
    payment_key: String,
}

#[derive(Debug)]
struct World {
    admin: PgPool,
    customer: Uuid,
    record: String,
    confirmed: Fixture,
    rejected: Fixture,
    cancelled: Fixture,
}

/// How each order of the world ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Confirmed,
    Rejected,
    Cancelled,
}

/// A pool on `admin_url` whose connections work in `schema`.
async fn in_schema(admin_url: &str, schema: &'static str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(1)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                conn.execute(sqlx::AssertSqlSafe(format!("SET search_path TO {schema}")))
                    .await?;
                Ok(())
            })
        })
        .connect(admin_url)
        .await
        .unwrap()
}

impl World {
    /// A fresh database with the order, payment and saga schemas, as the
    /// services migrate them, and three orders that went right.
    async fn new() -> Self {
        let env = TestEnv::get().await;
        let database = env.database().await.unwrap();
        let admin = PgPool::connect(&database.admin_url()).await.unwrap();
        for manifest in [
            &order_service::MANIFEST,
            &payment_service::MANIFEST,
            &saga_orchestrator::MANIFEST,
        ] {
            let account = manifest.account("x");
            let mut migrations = vec![messaging::MIGRATIONS];
            migrations.extend_from_slice(manifest.migrations);
            database::provision(&admin, &account).await.unwrap();
            let pool = in_schema(&database.admin_url(), account.schema).await;
            database::migrate(&pool, &migrations).await.unwrap();
            pool.close().await;
        }
        let customer = Uuid::now_v7();
        let mut world = Self {
            admin,
            customer,
            record: String::new(),
            confirmed: placeholder(),
            rejected: placeholder(),
            cancelled: placeholder(),
        };
        world.confirmed = world.order("k-confirmed", Ending::Confirmed).await;
        world.rejected = world.order("k-rejected", Ending::Rejected).await;
        world.cancelled = world.order("k-cancelled", Ending::Cancelled).await;
        world
    }

    /// An order of two books and a pen (27.99 EUR) that ended as `ending`:
    /// its events and read model row, its idempotency key, its payment and
    /// the provider's charge, its saga and step log, and the load client's
    /// record of it.
    async fn order(&mut self, key: &str, ending: Ending) -> Fixture {
        self.reviewed_order(key, ending, None).await
    }

    /// An order as [`World::order`] makes it, held for review first and
    /// approved (`Some(true)`) or declined (`Some(false)`) by an admin.
    async fn reviewed_order(
        &mut self,
        key: &str,
        ending: Ending,
        approved: Option<bool>,
    ) -> Fixture {
        let order_id = Uuid::now_v7();
        let saga_id = Uuid::now_v7();
        let payment_id = Uuid::now_v7();
        let payment_key = format!("{saga_id}:process-payment");
        let eur = Currency::parse("EUR").unwrap();
        let line = |sku: &str, quantity, price| LineItem {
            sku: Sku::parse(sku).unwrap(),
            quantity: Quantity::new(quantity).unwrap(),
            unit_price: Money::positive(price, eur).unwrap(),
        };
        let token = match ending {
            Ending::Rejected => "tok_declined",
            _ => "tok_visa",
        };
        let placed = Placed {
            order_id: OrderId::new(order_id),
            customer_id: CustomerId::new(self.customer),
            lines: OrderLines::new(vec![line("BOOK-42", 2, 1300), line("PEN-1", 1, 199)]).unwrap(),
            payment_method: PaymentMethodToken::parse(token).unwrap(),
        };
        let reason = |text: &str| Reason::parse(text).unwrap();
        let mut events = vec![OrderEvent::Placed(placed)];
        if let Some(approved) = approved {
            events.push(OrderEvent::HeldForReview);
            events.push(if approved {
                OrderEvent::ReviewApproved
            } else {
                OrderEvent::ReviewDeclined {
                    reason: reason("fraud suspected"),
                }
            });
        }
        let (status, status_reason, view_payment) = match ending {
            Ending::Confirmed => {
                events.push(OrderEvent::Confirmed {
                    payment_id: PaymentId::new(payment_id),
                });
                ("confirmed", None, Some(payment_id))
            }
            Ending::Rejected => {
                events.push(OrderEvent::Rejected {
                    reason: reason("card_declined"),
                });
                ("rejected", Some("card_declined"), None)
            }
            Ending::Cancelled => {
                events.push(OrderEvent::CancellationRequested {
                    reason: Some(reason("changed my mind")),
                });
                events.push(OrderEvent::Cancelled {
                    reason: reason("refunded"),
                });
                ("cancelled", Some("refunded"), None)
            }
        };
        let version = events.len() as i64;
        let mut tx = self.admin.begin().await.unwrap();
        sqlx::query("SET LOCAL search_path TO orders")
            .execute(&mut *tx)
            .await
            .unwrap();
        let mut stream = Stream::<Order>::new(order_id);
        // Stored history only: appended without publishing.
        let writer = Writer {
            publisher: messaging::Publisher::new("order", "order.events"),
            origin: messaging::envelope::Origin {
                correlation_id: telemetry::CorrelationId::generate(),
                causation_id: None,
            },
        };
        append(&mut tx, &mut stream, events, &writer).await.unwrap();
        sqlx::query(
            "INSERT INTO order_view (order_id, customer_id, status, items, total_minor, currency,
                                     payment_id, status_reason, correlation_id, created_at, updated_at, version)
             VALUES ($1, $2, $3, '[{\"sku\": \"BOOK-42\", \"quantity\": 2, \"unit_price_minor\": 1300},
                                   {\"sku\": \"PEN-1\", \"quantity\": 1, \"unit_price_minor\": 199}]',
                     2799, 'EUR', $4, $5, 'corr', now(), now(), $6)",
        )
        .bind(order_id)
        .bind(self.customer)
        .bind(status)
        .bind(view_payment)
        .bind(status_reason)
        .bind(version)
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO idempotency_keys (customer_id, key, request_hash, order_id) VALUES ($1, $2, '\\x00', $3)",
        )
        .bind(self.customer)
        .bind(key)
        .bind(order_id)
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();

        // The payment, and the provider's memory of the charge.
        let (payment_status, outcome, refunded) = match ending {
            Ending::Confirmed => ("captured", "captured", false),
            Ending::Rejected => ("declined", "card_declined", false),
            Ending::Cancelled => ("refunded", "captured", true),
        };
        sqlx::query(
            "INSERT INTO payments.payments (payment_id, idempotency_key, status, request_hash, order_id,
                                            customer_id, amount_minor, currency, refunded_at)
             VALUES ($1, $2, $3, '\\x00', $4, $5, 2799, 'EUR', CASE WHEN $6 THEN now() END)",
        )
        .bind(payment_id)
        .bind(&payment_key)
        .bind(payment_status)
        .bind(order_id)
        .bind(self.customer)
        .bind(refunded)
        .execute(&self.admin)
        .await
        .unwrap();
        self.charge(&payment_key, order_id, outcome, refunded).await;

        // The saga, final, and its step log.
        let saga_state = match ending {
            Ending::Confirmed => "completed",
            _ => "compensated",
        };
        sqlx::query(
            "INSERT INTO saga.saga_instances (saga_id, saga_type, business_key, state, data, correlation_id,
                                              fence, finished_at)
             VALUES ($1, 'order-processing', $2, $3, '{}', 'corr', 2, now())",
        )
        .bind(saga_id)
        .bind(order_id.to_string())
        .bind(saga_state)
        .execute(&self.admin)
        .await
        .unwrap();
        let steps: &[(&str, &str, &str)] = match ending {
            Ending::Confirmed => &[
                ("process-payment", "action", "succeeded"),
                ("confirm-order", "action", "succeeded"),
            ],
            Ending::Rejected => &[
                ("process-payment", "action", "failed"),
                ("process-payment", "compensation", "succeeded"),
                ("open-order", "compensation", "succeeded"),
            ],
            Ending::Cancelled => &[
                ("process-payment", "action", "succeeded"),
                ("process-payment", "compensation", "succeeded"),
                ("open-order", "compensation", "succeeded"),
            ],
        };
        for (step, kind, status) in steps {
            sqlx::query(
                "INSERT INTO saga.saga_steps (saga_id, step, kind, status, attempts, finished_at)
                 VALUES ($1, $2, $3, $4, 1, now())",
            )
            .bind(saga_id)
            .bind(step)
            .bind(kind)
            .bind(status)
            .execute(&self.admin)
            .await
            .unwrap();
        }

        // What the load client wrote down.
        for entry in [
            Entry::Intent {
                key: key.to_owned(),
                customer_id: self.customer,
                total_minor: 2799,
                currency: "EUR".into(),
                payment_method: token.into(),
                lines: vec![("BOOK-42".into(), 2, 1300), ("PEN-1".into(), 1, 199)],
                at_ms: 1,
            },
            Entry::Accepted {
                key: key.to_owned(),
                order_id,
                total_minor: 2799,
                currency: "EUR".into(),
                at_ms: 2,
                attempts: 1,
            },
        ] {
            self.record
                .push_str(&serde_json::to_string(&entry).unwrap());
            self.record.push('\n');
        }
        Fixture {
            order_id,
            saga_id,
            key: key.to_owned(),
            payment_key,
        }
    }

    /// Appends `events` to the order's stream, and sets its read model row
    /// to what they make of it.
    async fn append(
        &self,
        order_id: Uuid,
        events: Vec<OrderEvent>,
        status: &str,
        reason: Option<&str>,
    ) {
        let mut tx = self.admin.begin().await.unwrap();
        sqlx::query("SET LOCAL search_path TO orders")
            .execute(&mut *tx)
            .await
            .unwrap();
        let mut stream = order_service::event_store::load::<Order>(&mut tx, order_id)
            .await
            .unwrap();
        let writer = Writer {
            publisher: messaging::Publisher::new("order", "order.events"),
            origin: messaging::envelope::Origin {
                correlation_id: telemetry::CorrelationId::generate(),
                causation_id: None,
            },
        };
        append(&mut tx, &mut stream, events, &writer).await.unwrap();
        sqlx::query(
            "UPDATE order_view SET status = $2, status_reason = $3, version = $4 WHERE order_id = $1",
        )
        .bind(order_id)
        .bind(status)
        .bind(reason)
        .bind(i64::try_from(stream.history.len()).unwrap())
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }

    /// The payment the order was confirmed with.
    async fn payment_of(&self, order_id: Uuid) -> PaymentId {
        let id: Uuid =
            sqlx::query_scalar("SELECT payment_id FROM orders.order_view WHERE order_id = $1")
                .bind(order_id)
                .fetch_one(&self.admin)
                .await
                .unwrap();
        PaymentId::new(id)
    }

    /// A saga of `saga_type` in `state`, about `business_key`, child of
    /// `parent` if given.
    async fn saga(
        &self,
        saga_type: &str,
        business_key: &str,
        state: &str,
        parent: Option<Uuid>,
    ) -> Uuid {
        let saga_id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO saga.saga_instances (saga_id, saga_type, business_key, state, data, correlation_id,
                                              fence, finished_at, parent_saga_id, parent_step)
             VALUES ($1, $2, $3, $4, '{}', 'corr', 2, now(), $5, CASE WHEN $5 IS NOT NULL THEN 'refund-payment' END)",
        )
        .bind(saga_id)
        .bind(saga_type)
        .bind(business_key)
        .bind(state)
        .bind(parent)
        .execute(&self.admin)
        .await
        .unwrap();
        saga_id
    }

    /// A charge in the simulated provider's memory.
    async fn charge(&self, key: &str, order_id: Uuid, outcome: &str, refunded: bool) {
        sqlx::query(
            "INSERT INTO payments.simulated_provider_charges
                 (idempotency_key, payment_method, attempts, outcome, reference, amount_minor, currency,
                  order_id, customer_id, refunded_at)
             VALUES ($1, 'tok_visa', 1, $2, CASE WHEN $2 = 'captured' THEN 'sim_ch_1' END, 2799, 'EUR', $3, $4,
                     CASE WHEN $5 THEN now() END)",
        )
        .bind(key)
        .bind(outcome)
        .bind(order_id)
        .bind(self.customer)
        .bind(refunded)
        .execute(&self.admin)
        .await
        .unwrap();
    }

    async fn run(&self, sql: &str) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&self.admin)
            .await
            .unwrap_or_else(|error| panic!("{sql}: {error}"));
    }

    async fn audit(&self) -> Report {
        self.audit_with(FenceWatch::new()).await
    }

    async fn audit_with(&self, fences: FenceWatch) -> Report {
        let inputs = Inputs {
            record: Some(Record::parse(&self.record)),
            fences: Some(fences),
        };
        audit::audit(&self.admin, &inputs).await.unwrap()
    }
}

fn placeholder() -> Fixture {
    Fixture {
        order_id: Uuid::nil(),
        saga_id: Uuid::nil(),
        key: String::new(),
        payment_key: String::new(),
    }
}

/// The report fails exactly `expected`.
#[track_caller]
fn assert_fails(report: &Report, expected: &[&str]) {
    let failed: BTreeSet<&str> = report.failures().into_iter().collect();
    let expected: BTreeSet<&str> = expected.iter().copied().collect();
    assert_eq!(failed, expected, "\n{}", report.render());
}

#[tokio::test]
async fn a_consistent_world_passes_every_invariant() {
    let world = World::new().await;
    let report = world.audit().await;
    assert_fails(&report, &[]);
    assert_eq!(report.totals.orders, 3);
    assert_eq!(report.totals.confirmed_minor, 2799);
    assert_eq!(report.totals.provider_held_minor, Some(2799));
    assert_eq!(
        report.check("dead-letters").unwrap().verdict,
        audit::Verdict::Info
    );
}

#[tokio::test]
async fn a_corrupted_ledger_row_is_caught() {
    let world = World::new().await;
    world
        .run(&format!(
            "UPDATE payments.payments SET amount_minor = 2700 WHERE idempotency_key = '{}'",
            world.confirmed.payment_key
        ))
        .await;
    // The provider charged 2799: the payment row disagrees with it too.
    assert_fails(&world.audit().await, &["ledger", "charges"]);
}

#[tokio::test]
async fn a_doubled_capture_is_caught() {
    let world = World::new().await;
    world
        .run(&format!(
            "INSERT INTO payments.payments (payment_id, idempotency_key, status, request_hash, order_id,
                                            customer_id, amount_minor, currency)
             SELECT gen_random_uuid(), idempotency_key || ':again', 'captured', request_hash, order_id,
                    customer_id, amount_minor, currency
             FROM payments.payments WHERE idempotency_key = '{}'",
            world.confirmed.payment_key
        ))
        .await;
    // Our ledger says twice the money; the provider captured it once.
    assert_fails(&world.audit().await, &["ledger", "charges"]);
}

#[tokio::test]
async fn a_charge_without_a_payment_row_is_caught() {
    let world = World::new().await;
    world
        .charge("lost-key", world.rejected.order_id, "captured", false)
        .await;
    // The provider now holds money of a rejected order, and in all more
    // than the confirmed orders' total.
    assert_fails(&world.audit().await, &["charges", "provider"]);
}

#[tokio::test]
async fn money_the_provider_kept_after_a_refund_is_caught() {
    let world = World::new().await;
    world
        .run(&format!(
            "UPDATE payments.simulated_provider_charges SET refunded_at = NULL WHERE idempotency_key = '{}'",
            world.cancelled.payment_key
        ))
        .await;
    assert_fails(&world.audit().await, &["provider", "charges"]);
}

#[tokio::test]
async fn an_undelivered_outbox_row_is_caught() {
    let world = World::new().await;
    world
        .run(
            "INSERT INTO orders.outbox (event_id, topic, message_key, envelope)
             VALUES (gen_random_uuid(), 'order.events', 'k', '\\x00')",
        )
        .await;
    let report = world.audit().await;
    assert_fails(&report, &["outboxes"]);
    let detail = format!("{:?}", report.check("outboxes").unwrap().verdict);
    assert!(detail.contains("orders.outbox holds 1"), "{detail}");
}

#[tokio::test]
async fn a_saga_left_running_is_caught() {
    let world = World::new().await;
    world
        .run(&format!(
            "UPDATE saga.saga_instances SET state = 'running', finished_at = NULL WHERE saga_id = '{}'",
            world.rejected.saga_id
        ))
        .await;
    assert_fails(&world.audit().await, &["sagas-final"]);
}

#[tokio::test]
async fn a_saga_failed_without_a_reason_is_caught_and_with_one_passes() {
    let world = World::new().await;
    world
        .run(&format!(
            "UPDATE saga.saga_instances SET state = 'failed', failure_reason = 'refund-payment: provider down'
             WHERE saga_id = '{}'",
            world.rejected.saga_id
        ))
        .await;
    assert_fails(&world.audit().await, &[]);
    world
        .run(&format!(
            "UPDATE saga.saga_instances SET failure_reason = NULL WHERE saga_id = '{}'",
            world.rejected.saga_id
        ))
        .await;
    assert_fails(&world.audit().await, &["sagas-final"]);
}

#[tokio::test]
async fn a_step_left_in_flight_in_a_final_saga_is_caught() {
    let world = World::new().await;
    world
        .run(&format!(
            "UPDATE saga.saga_steps SET status = 'running' WHERE saga_id = '{}' AND step = 'confirm-order'",
            world.confirmed.saga_id
        ))
        .await;
    assert_fails(&world.audit().await, &["steps-settled"]);
}

#[tokio::test]
async fn an_action_left_waiting_when_its_saga_turned_back_is_settled_by_its_compensation() {
    let world = World::new().await;
    // The customer cancelled while the charge waited for a retry: the
    // refund by its key settled it.
    world
        .run(&format!(
            "UPDATE saga.saga_steps SET status = 'waiting', outcome_unknown = true
             WHERE saga_id = '{}' AND step = 'process-payment' AND kind = 'action'",
            world.cancelled.saga_id
        ))
        .await;
    assert_fails(&world.audit().await, &[]);
    // Not if the compensation did not succeed.
    world
        .run(&format!(
            "UPDATE saga.saga_steps SET status = 'failed'
             WHERE saga_id = '{}' AND step = 'process-payment' AND kind = 'compensation'",
            world.cancelled.saga_id
        ))
        .await;
    assert_fails(&world.audit().await, &["steps-settled"]);
}

#[tokio::test]
async fn an_order_without_its_saga_and_a_saga_that_disagrees_are_caught() {
    let world = World::new().await;
    world
        .run(&format!(
            "DELETE FROM saga.saga_instances WHERE saga_id = '{}'",
            world.rejected.saga_id
        ))
        .await;
    let report = world.audit().await;
    assert_fails(&report, &["saga-per-order"]);

    // A saga that completed for an order that was cancelled.
    world
        .run(&format!(
            "UPDATE saga.saga_instances SET state = 'completed' WHERE saga_id = '{}'",
            world.cancelled.saga_id
        ))
        .await;
    let report = world.audit().await;
    assert_fails(&report, &["saga-per-order"]);
    let Some(audit::Check {
        verdict: audit::Verdict::Fail { count, .. },
        ..
    }) = report.check("saga-per-order")
    else {
        panic!("{}", report.render())
    };
    assert_eq!(*count, 2, "{}", report.render());
}

#[tokio::test]
async fn a_read_model_that_is_not_the_events_replayed_is_caught() {
    let world = World::new().await;
    world
        .run(&format!(
            "UPDATE orders.order_view SET status_reason = 'insufficient_funds' WHERE order_id = '{}'",
            world.rejected.order_id
        ))
        .await;
    assert_fails(&world.audit().await, &["read-model"]);
}

#[tokio::test]
async fn an_accepted_order_that_is_missing_or_doubled_is_caught() {
    let mut world = World::new().await;
    // An acceptance the service has no trace of.
    let ghost = Uuid::now_v7();
    for entry in [
        Entry::Intent {
            key: "k-ghost".into(),
            customer_id: world.customer,
            total_minor: 500,
            currency: "EUR".into(),
            payment_method: "tok_visa".into(),
            lines: vec![("MUG".into(), 1, 500)],
            at_ms: 3,
        },
        Entry::Accepted {
            key: "k-ghost".into(),
            order_id: ghost,
            total_minor: 500,
            currency: "EUR".into(),
            at_ms: 4,
            attempts: 1,
        },
    ] {
        world
            .record
            .push_str(&serde_json::to_string(&entry).unwrap());
        world.record.push('\n');
    }
    let report = world.audit().await;
    assert_fails(&report, &["accepted"]);
    let World { record, .. } = &world;
    let without_ghost: String = record
        .lines()
        .filter(|line| !line.contains("k-ghost"))
        .map(|line| format!("{line}\n"))
        .collect();
    world.record = without_ghost;
    assert_fails(&world.audit().await, &[]);

    // The same request placed twice, the second time under another key the
    // client never used: an order nobody asked for.
    let twin = world.order("k-twin", Ending::Confirmed).await;
    world.record = world
        .record
        .lines()
        .filter(|line| !line.contains(&twin.key))
        .map(|line| format!("{line}\n"))
        .collect();
    assert_fails(&world.audit().await, &["accepted"]);
}

#[tokio::test]
async fn a_fence_that_went_back_is_caught() {
    let world = World::new().await;
    let mut watch = FenceWatch::new();
    // Seen at fence 5 while running; the table now says 2.
    watch.observe([(world.confirmed.saga_id, 5, Some("replica-a".to_owned()))]);
    assert_fails(&world.audit_with(watch).await, &["fences"]);

    // A step log written at fence 0, without a claim.
    world
        .run(&format!(
            "UPDATE saga.saga_instances SET fence = 0 WHERE saga_id = '{}'",
            world.cancelled.saga_id
        ))
        .await;
    assert_fails(&world.audit().await, &["fences"]);
}

#[tokio::test]
async fn dead_letters_are_counted_and_shown() {
    let world = World::new().await;
    world
        .run(
            "INSERT INTO saga.inbox (consumer, event_id, outcome)
             VALUES ('saga-orchestrator', gen_random_uuid(), 'dead_lettered'),
                    ('saga-orchestrator', gen_random_uuid(), 'dead_lettered')",
        )
        .await;
    let report = world.audit().await;
    assert_fails(&report, &[]);
    let check = report.check("dead-letters").unwrap();
    assert_eq!(check.verdict, audit::Verdict::Info);
    assert!(
        check.detail.contains("2 by saga-orchestrator (saga)"),
        "{}",
        check.detail
    );
}

#[tokio::test]
async fn a_saga_terminated_with_effects_left_is_the_operators_and_without_a_reason_is_caught() {
    let world = World::new().await;
    // An operator terminated the saga with its charge acknowledged as left
    // in effect: the provider holds money of an order neither confirmed
    // nor cancelled, which is the operator's to settle, not a violation.
    world
        .run(&format!(
            "UPDATE saga.saga_instances SET state = 'terminated',
                 failure_reason = 'terminated by an operator: fraud', left_in_effect = '{{process-payment}}'
             WHERE saga_id = '{}'",
            world.rejected.saga_id
        ))
        .await;
    world
        .charge("kept-key", world.rejected.order_id, "captured", false)
        .await;
    let report = world.audit().await;
    // The charge still has no payment row; the provider's holding is owned.
    assert_fails(&report, &["charges"]);
    let sagas = &report.check("sagas-final").unwrap().detail;
    assert!(sagas.contains("operator-owned"), "{sagas}");
    assert!(sagas.contains("process-payment left in effect"), "{sagas}");
    let provider = &report.check("provider").unwrap().detail;
    assert!(provider.contains("1 operator-owned orders"), "{provider}");

    world
        .run(&format!(
            "UPDATE saga.saga_instances SET failure_reason = NULL, left_in_effect = NULL WHERE saga_id = '{}'",
            world.rejected.saga_id
        ))
        .await;
    assert_fails(
        &world.audit().await,
        &["sagas-final", "charges", "provider"],
    );
}

#[tokio::test]
async fn a_return_is_judged_by_its_saga_its_refund_child_and_its_money() {
    let mut world = World::new().await;
    let order = world.confirmed.order_id;
    let payment_id = world.payment_of(order).await;
    let reason = Reason::parse("does not fit").unwrap();
    world
        .append(
            order,
            vec![
                OrderEvent::ReturnRequested {
                    payment_id,
                    reason: reason.clone(),
                },
                OrderEvent::Returned { payment_id },
            ],
            "returned",
            Some("does not fit"),
        )
        .await;
    // Returned with its money kept, and no return saga.
    assert_fails(
        &world.audit().await,
        &["saga-per-order", "ledger", "provider"],
    );

    // Refunded, by a return saga and its refund child.
    world
        .run(&format!(
            "UPDATE payments.payments SET status = 'refunded', refunded_at = now() WHERE idempotency_key = '{key}';
             UPDATE payments.simulated_provider_charges SET refunded_at = now() WHERE idempotency_key = '{key}'",
            key = world.confirmed.payment_key
        ))
        .await;
    let returning = world
        .saga("order-return", &order.to_string(), "completed", None)
        .await;
    let refund = world
        .saga(
            "payment-refund",
            &format!("{returning}/refund-payment"),
            "completed",
            Some(returning),
        )
        .await;
    let report = world.audit().await;
    assert_fails(&report, &[]);
    assert_eq!(
        (report.totals.returns_requested, report.totals.returned),
        (1, 1)
    );

    // A refund that belongs to no return, and a second one.
    world
        .run(&format!(
            "UPDATE saga.saga_instances SET parent_saga_id = NULL WHERE saga_id = '{refund}'"
        ))
        .await;
    assert_fails(&world.audit().await, &["saga-per-order"]);
    world
        .run(&format!(
            "UPDATE saga.saga_instances SET parent_saga_id = '{returning}' WHERE saga_id = '{refund}'"
        ))
        .await;
    world
        .saga(
            "payment-refund",
            &format!("{returning}/again"),
            "completed",
            Some(returning),
        )
        .await;
    assert_fails(&world.audit().await, &["saga-per-order"]);
    world
        .run("DELETE FROM saga.saga_instances WHERE business_key LIKE '%/again'")
        .await;

    // A return left RETURN_REQUESTED: only for an operator, who sees why.
    let left = world.order("k-left", Ending::Confirmed).await;
    let payment_id = world.payment_of(left.order_id).await;
    world
        .append(
            left.order_id,
            vec![OrderEvent::ReturnRequested { payment_id, reason }],
            "return_requested",
            Some("does not fit"),
        )
        .await;
    let stuck = world
        .saga(
            "order-return",
            &left.order_id.to_string(),
            "compensated",
            None,
        )
        .await;
    world
        .run(&format!(
            "UPDATE saga.saga_instances SET failure_reason = 'refund-payment: child saga compensated'
             WHERE saga_id = '{stuck}'"
        ))
        .await;
    assert_fails(&world.audit().await, &["saga-per-order"]);
    world
        .run(&format!(
            "UPDATE saga.saga_instances SET state = 'failed' WHERE saga_id = '{stuck}'"
        ))
        .await;
    assert_fails(&world.audit().await, &[]);
    // And a return saga for an order whose return nobody asked for.
    world
        .saga(
            "order-return",
            &world.cancelled.order_id.to_string(),
            "completed",
            None,
        )
        .await;
    assert_fails(&world.audit().await, &["saga-per-order"]);
}

#[tokio::test]
async fn an_approved_order_is_rejected_only_when_its_review_timed_out_or_its_authorization_lapses()
{
    let mut world = World::new().await;
    let approved = world
        .reviewed_order("k-approved", Ending::Rejected, Some(true))
        .await;
    let declined = world
        .reviewed_order("k-declined", Ending::Rejected, Some(false))
        .await;
    let reason = |reason: &str| {
        format!(
            "UPDATE saga.saga_instances SET failure_reason = '{reason}' WHERE saga_id = '{}'",
            approved.saga_id
        )
    };
    // Rejected for no reason its review explains.
    assert_fails(&world.audit().await, &["reviews"]);
    world
        .run(&reason(
            "authorize-payment: payment declined: card_declined",
        ))
        .await;
    assert_fails(&world.audit().await, &["reviews"]);
    // Also not a decline by the reviewer: the order says approved.
    world
        .run(&reason("check-review: review declined: fraud suspected"))
        .await;
    assert_fails(&world.audit().await, &["reviews"]);

    // The timeout reached the saga before the approval did.
    world
        .run(&reason(
            "check-review: review declined: the review timed out after 5s",
        ))
        .await;
    let report = world.audit().await;
    assert_fails(&report, &[]);
    assert_eq!(
        (
            report.totals.reviews_approved,
            report.totals.reviews_declined,
            report.totals.reviews_timed_out
        ),
        (1, 1, 1)
    );
    // Approved too late to capture before the authorization lapses.
    world
        .run(&reason(
            "check-review: the payment authorization lapses at 2026-12-01T10:00:00+00:00, too soon to capture",
        ))
        .await;
    assert_fails(&world.audit().await, &[]);

    // A declined order that was not rejected.
    world
        .run(&format!(
            "UPDATE orders.order_view SET status = 'cancelled' WHERE order_id = '{}'",
            declined.order_id
        ))
        .await;
    let report = world.audit().await;
    assert!(
        report.failures().contains(&"reviews"),
        "{}",
        report.render()
    );
}
