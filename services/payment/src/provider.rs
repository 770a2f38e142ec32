//! The payment provider: a trait, so a real provider can take the
//! simulation's place, and the simulation, which is the default.
//!
//! The simulation is deterministic by payment method token, like a real
//! provider's test card numbers (see the README):
//!
//! | token | behaviour |
//! |---|---|
//! | `tok_declined` | declined: `card_declined` |
//! | `tok_insufficient_funds` | declined: `insufficient_funds` |
//! | `tok_slow` | approves, but only after `PROVIDER_SLOW_DELAY`, longer than a typical deadline |
//! | `tok_flaky` | fails transiently for the first `PROVIDER_FLAKY_FAILURES` attempts of an idempotency key, then approves |
//! | `tok_refund_fails_once` | approves; the first refund attempt fails transiently |
//! | `tok_capture_answer_lost` | captures on the first attempt of a key, but that answer and every later one under the key is lost: each fails transiently, and the capture stays until the key is voided |
//! | anything else | approves |
//!
//! Any amount over `PAYMENT_AMOUNT_LIMIT` is declined (`amount_over_limit`).
//!
//! Like a real provider, it is idempotent by key: asking again with a key
//! it has answered returns the same answer and never charges twice. And like
//! a real provider it can be told to void a key, by a caller that does not
//! know what its charge came to: it refunds what it captured under the key
//! and says what that was (amount, order, customer, reference), reports a
//! decline, or, when it charged nothing, remembers the key as voided and
//! declines any later charge under it (`charge_voided`). Its memory is its
//! own table, written outside our transactions, with a view of what it
//! holds per order (`simulated_provider_holdings`).

use std::time::Duration;

use anyhow::Context as _;
use futures::future::BoxFuture;
use money::{Currency, Money};
use sqlx::PgPool;
use uuid::Uuid;

use crate::domain::{ChargeDetails, CustomerId, OrderId};

/// A charge to make, with the metadata the provider keeps with it.
#[derive(Debug, Clone)]
pub(crate) struct Charge {
    pub(crate) idempotency_key: String,
    pub(crate) amount: Money,
    pub(crate) payment_method: String,
    pub(crate) order_id: OrderId,
    pub(crate) customer_id: CustomerId,
}

/// Why the provider refused a charge. A decline is an answer, not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeclineReason {
    CardDeclined,
    InsufficientFunds,
    AmountOverLimit,
    /// The key was voided before any charge under it was made.
    ChargeVoided,
}

impl DeclineReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::CardDeclined => "card_declined",
            Self::InsufficientFunds => "insufficient_funds",
            Self::AmountOverLimit => "amount_over_limit",
            Self::ChargeVoided => "charge_voided",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [
            Self::CardDeclined,
            Self::InsufficientFunds,
            Self::AmountOverLimit,
            Self::ChargeVoided,
        ]
        .into_iter()
        .find(|reason| reason.as_str() == text)
    }
}

/// The provider's answer to a charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ChargeOutcome {
    Captured { reference: String },
    Declined(DeclineReason),
}

/// The provider's answer to a void by key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum VoidOutcome {
    /// It had captured under the key; that capture is refunded in full
    /// (now, or by an earlier void).
    Refunded {
        reference: String,
        charge: ChargeDetails,
    },
    /// It had declined the charge under the key: nothing to undo.
    Declined {
        reason: DeclineReason,
        charge: ChargeDetails,
    },
    /// It had charged nothing under the key, and never will: a later
    /// charge with the key is declined (`charge_voided`).
    Voided,
}

/// The provider could not answer now; asking again (same key) is safe.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProviderError {
    #[error("the provider failed transiently: {0}")]
    Transient(String),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// A payment provider.
pub(crate) trait PaymentProvider: Send + Sync + 'static {
    /// Charges, idempotently by `charge.idempotency_key`.
    fn charge<'a>(
        &'a self,
        charge: &'a Charge,
    ) -> BoxFuture<'a, Result<ChargeOutcome, ProviderError>>;

    /// Undoes, idempotently, whatever the charge with `charge_key` came to:
    /// refunds a capture in full, reports a decline, and voids a key under
    /// which nothing was charged. Only the provider can tell these apart
    /// when the charge's answer was lost, so a refund of a payment we know
    /// was captured asks the same way.
    fn void<'a>(&'a self, charge_key: &'a str)
    -> BoxFuture<'a, Result<VoidOutcome, ProviderError>>;
}

/// How the simulation behaves.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SimulationSettings {
    pub(crate) amount_limit_minor: i64,
    pub(crate) slow_delay: Duration,
    pub(crate) flaky_failures: u32,
}

/// The simulated provider; see the module documentation.
#[derive(Debug, Clone)]
pub(crate) struct SimulatedProvider {
    pool: PgPool,
    settings: SimulationSettings,
}

/// Columns of [`Stored`].
macro_rules! stored_columns {
    () => {
        "payment_method, attempts, outcome, reference, amount_minor, currency, order_id, customer_id, \
         refund_attempts, refunded_at IS NOT NULL AS refunded, voided_at IS NOT NULL AS voided"
    };
}

/// What the simulated provider remembers of one key.
#[derive(Debug, sqlx::FromRow)]
struct Stored {
    /// Empty for a key voided before any charge.
    payment_method: Option<String>,
    attempts: i32,
    /// `captured`, or the decline reason; empty until the provider answered.
    outcome: Option<String>,
    reference: Option<String>,
    amount_minor: Option<i64>,
    currency: Option<String>,
    order_id: Option<Uuid>,
    customer_id: Option<Uuid>,
    refund_attempts: i32,
    refunded: bool,
    voided: bool,
}

impl Stored {
    /// The answer given for this key, if there is one.
    fn answer(&self) -> Result<Option<ChargeOutcome>, ProviderError> {
        if self.voided {
            return Ok(Some(ChargeOutcome::Declined(DeclineReason::ChargeVoided)));
        }
        let Some(outcome) = &self.outcome else {
            return Ok(None);
        };
        Ok(Some(
            match (DeclineReason::parse(outcome), &self.reference) {
                (Some(reason), _) => ChargeOutcome::Declined(reason),
                (None, Some(reference)) if outcome == "captured" => ChargeOutcome::Captured {
                    reference: reference.clone(),
                },
                _ => {
                    return Err(anyhow::anyhow!(
                        "simulated charge with outcome {outcome:?} and no reference"
                    )
                    .into());
                }
            },
        ))
    }

    /// The answer as the caller gets it: `tok_capture_answer_lost` loses
    /// every answer that says it captured.
    fn deliver(&self, answer: ChargeOutcome) -> Result<ChargeOutcome, ProviderError> {
        if self.payment_method.as_deref() == Some("tok_capture_answer_lost")
            && matches!(answer, ChargeOutcome::Captured { .. })
        {
            return Err(ProviderError::Transient(
                "the answer was lost on the way; try again".into(),
            ));
        }
        Ok(answer)
    }

    fn is(&self, payment_method: &str) -> bool {
        self.payment_method.as_deref() == Some(payment_method)
    }

    fn record(&self) -> anyhow::Result<ChargeDetails> {
        let (Some(amount_minor), Some(currency), Some(order_id), Some(customer_id)) = (
            self.amount_minor,
            self.currency.as_deref(),
            self.order_id,
            self.customer_id,
        ) else {
            anyhow::bail!("simulated charge without its amount and metadata");
        };
        let currency = Currency::parse(currency).context("simulated charge currency")?;
        Ok(ChargeDetails {
            amount: Money::positive(amount_minor, currency).context("simulated charge amount")?,
            order_id: OrderId::new(order_id),
            customer_id: CustomerId::new(customer_id),
        })
    }
}

impl SimulatedProvider {
    pub(crate) fn new(pool: PgPool, settings: SimulationSettings) -> Self {
        Self { pool, settings }
    }

    async fn decide(&self, charge: &Charge, attempt: u32) -> Result<ChargeOutcome, ProviderError> {
        if charge.amount.amount_minor() > self.settings.amount_limit_minor {
            return Ok(ChargeOutcome::Declined(DeclineReason::AmountOverLimit));
        }
        match charge.payment_method.as_str() {
            "tok_declined" => return Ok(ChargeOutcome::Declined(DeclineReason::CardDeclined)),
            "tok_insufficient_funds" => {
                return Ok(ChargeOutcome::Declined(DeclineReason::InsufficientFunds));
            }
            "tok_slow" => tokio::time::sleep(self.settings.slow_delay).await,
            "tok_flaky" if attempt <= self.settings.flaky_failures => {
                return Err(ProviderError::Transient(format!(
                    "attempt {attempt} failed; try again"
                )));
            }
            _ => {}
        }
        Ok(ChargeOutcome::Captured {
            reference: format!("sim_ch_{}", Uuid::new_v4().simple()),
        })
    }

    async fn stored(&self, key: &str) -> anyhow::Result<Stored> {
        sqlx::query_as(concat!(
            "SELECT ",
            stored_columns!(),
            " FROM simulated_provider_charges WHERE idempotency_key = $1"
        ))
        .bind(key)
        .fetch_one(&self.pool)
        .await
        .context("simulated provider")
    }
}

impl PaymentProvider for SimulatedProvider {
    fn charge<'a>(
        &'a self,
        charge: &'a Charge,
    ) -> BoxFuture<'a, Result<ChargeOutcome, ProviderError>> {
        Box::pin(async move {
            let stored: Stored = sqlx::query_as(concat!(
                "INSERT INTO simulated_provider_charges
                     (idempotency_key, payment_method, attempts, amount_minor, currency, order_id, customer_id)
                 VALUES ($1, $2, 1, $3, $4, $5, $6)
                 ON CONFLICT (idempotency_key) DO UPDATE SET attempts = simulated_provider_charges.attempts + 1
                 RETURNING ",
                stored_columns!()
            ))
            .bind(&charge.idempotency_key)
            .bind(&charge.payment_method)
            .bind(charge.amount.amount_minor())
            .bind(charge.amount.currency().code())
            .bind(charge.order_id.as_uuid())
            .bind(charge.customer_id.as_uuid())
            .fetch_one(&self.pool)
            .await
            .context("simulated provider")?;
            // Answered before under this key, or voided: the same answer,
            // no new charge.
            if let Some(answer) = stored.answer()? {
                return stored.deliver(answer);
            }
            let decided = self
                .decide(charge, u32::try_from(stored.attempts).unwrap_or(u32::MAX))
                .await?;
            let (outcome, reference) = match &decided {
                ChargeOutcome::Captured { reference } => ("captured", Some(reference.as_str())),
                ChargeOutcome::Declined(reason) => (reason.as_str(), None),
            };
            // Only if nothing answered or voided the key meanwhile: the
            // first answer stands, and a void wins over a charge still
            // being decided.
            let written: Option<Stored> = sqlx::query_as(concat!(
                "UPDATE simulated_provider_charges
                 SET outcome = $2, reference = $3,
                     settled_at = CASE WHEN $2 = 'captured' THEN NULL ELSE now() END
                 WHERE idempotency_key = $1 AND outcome IS NULL AND voided_at IS NULL RETURNING ",
                stored_columns!()
            ))
            .bind(&charge.idempotency_key)
            .bind(outcome)
            .bind(reference)
            .fetch_optional(&self.pool)
            .await
            .context("simulated provider")?;
            let stored = match written {
                Some(stored) => stored,
                None => self.stored(&charge.idempotency_key).await?,
            };
            let answer = stored
                .answer()?
                .context("simulated charge left without an answer")?;
            stored.deliver(answer)
        })
    }

    fn void<'a>(
        &'a self,
        charge_key: &'a str,
    ) -> BoxFuture<'a, Result<VoidOutcome, ProviderError>> {
        Box::pin(async move {
            // One transaction holding the key's row: a charge being decided
            // under the key waits for it, then finds the key voided.
            let mut tx = self.pool.begin().await.context("simulated provider")?;
            sqlx::query(
                "INSERT INTO simulated_provider_charges (idempotency_key, attempts) VALUES ($1, 0)
                 ON CONFLICT (idempotency_key) DO NOTHING",
            )
            .bind(charge_key)
            .execute(&mut *tx)
            .await
            .context("simulated provider")?;
            let stored: Stored = sqlx::query_as(concat!(
                "SELECT ",
                stored_columns!(),
                " FROM simulated_provider_charges WHERE idempotency_key = $1 FOR UPDATE"
            ))
            .bind(charge_key)
            .fetch_one(&mut *tx)
            .await
            .context("simulated provider")?;
            let outcome = match stored.answer()? {
                None | Some(ChargeOutcome::Declined(DeclineReason::ChargeVoided)) => {
                    sqlx::query(
                        "UPDATE simulated_provider_charges
                         SET voided_at = coalesce(voided_at, now()), settled_at = coalesce(settled_at, now())
                         WHERE idempotency_key = $1",
                    )
                    .bind(charge_key)
                    .execute(&mut *tx)
                    .await
                    .context("simulated provider")?;
                    VoidOutcome::Voided
                }
                Some(ChargeOutcome::Declined(reason)) => VoidOutcome::Declined {
                    reason,
                    charge: stored.record()?,
                },
                Some(ChargeOutcome::Captured { reference }) => {
                    if !stored.refunded {
                        sqlx::query(
                            "UPDATE simulated_provider_charges SET refund_attempts = refund_attempts + 1
                             WHERE idempotency_key = $1",
                        )
                        .bind(charge_key)
                        .execute(&mut *tx)
                        .await
                        .context("simulated provider")?;
                        if stored.is("tok_refund_fails_once") && stored.refund_attempts == 0 {
                            tx.commit().await.context("simulated provider")?;
                            return Err(ProviderError::Transient(
                                "refund failed; try again".into(),
                            ));
                        }
                        sqlx::query(
                            "UPDATE simulated_provider_charges SET refunded_at = now(), settled_at = now()
                             WHERE idempotency_key = $1",
                        )
                        .bind(charge_key)
                        .execute(&mut *tx)
                        .await
                        .context("simulated provider")?;
                    }
                    VoidOutcome::Refunded {
                        reference,
                        charge: stored.record()?,
                    }
                }
            };
            tx.commit().await.context("simulated provider")?;
            Ok(outcome)
        })
    }
}

/// The purge of keys the simulated provider settled (declined, refunded or
/// voided) longer than `retention` ago, as a real provider forgets old
/// idempotency keys. A key whose money it holds is never forgotten, so a
/// refund can always find its capture; the payment service answers a
/// settled key from its own record and never asks again.
pub(crate) fn simulated_provider_purge(retention: Duration) -> database::PurgeTarget {
    database::PurgeTarget {
        table: "simulated_provider_charges",
        retention,
        // Oldest first through `simulated_provider_charges_settled_at`.
        statement: "DELETE FROM simulated_provider_charges WHERE ctid = ANY(ARRAY(
                        SELECT ctid FROM simulated_provider_charges
                        WHERE settled_at < now() - $1
                        ORDER BY settled_at LIMIT $2 FOR UPDATE SKIP LOCKED))",
    }
}

#[cfg(test)]
mod tests {
    //! The simulation's charges and voids against a real PostgreSQL: what
    //! the payment service relies on when an answer was lost.

    use std::str::FromStr as _;

    use database::DatabaseSettings;
    use dev_stack::TestEnv;
    use money::Currency;

    use super::*;

    async fn provider(slow_delay: Duration) -> (SimulatedProvider, PgPool) {
        let db = TestEnv::get().await.database().await.unwrap();
        let url = db
            .provision(&crate::MANIFEST.account("payment-test-password"))
            .await
            .unwrap();
        let settings = DatabaseSettings {
            url: sqlx::postgres::PgConnectOptions::from_str(&url).unwrap(),
            max_connections: 8,
            connect_timeout: Duration::from_secs(10),
        };
        let pool = database::connect(&settings, crate::SCHEMA).await.unwrap();
        database::migrate(&pool, &[crate::MIGRATIONS])
            .await
            .unwrap();
        let provider = SimulatedProvider::new(
            pool.clone(),
            SimulationSettings {
                amount_limit_minor: 1_000_000,
                slow_delay,
                flaky_failures: 2,
            },
        );
        (provider, pool)
    }

    fn charge(key: &str, token: &str) -> Charge {
        Charge {
            idempotency_key: key.to_owned(),
            amount: Money::positive(1500, Currency::parse("EUR").unwrap()).unwrap(),
            payment_method: token.to_owned(),
            order_id: OrderId::new(Uuid::new_v4()),
            customer_id: CustomerId::new(Uuid::new_v4()),
        }
    }

    fn record(charge: &Charge) -> ChargeDetails {
        ChargeDetails {
            amount: charge.amount,
            order_id: charge.order_id,
            customer_id: charge.customer_id,
        }
    }

    async fn held(pool: &PgPool, order_id: OrderId) -> i64 {
        sqlx::query_scalar("SELECT held_minor FROM simulated_provider_holdings WHERE order_id = $1")
            .bind(order_id.as_uuid())
            .fetch_optional(pool)
            .await
            .unwrap()
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn a_key_voided_first_is_never_charged() {
        let (provider, pool) = provider(Duration::ZERO).await;
        assert_eq!(provider.void("k").await.unwrap(), VoidOutcome::Voided);
        let late = charge("k", "tok_visa");
        assert_eq!(
            provider.charge(&late).await.unwrap(),
            ChargeOutcome::Declined(DeclineReason::ChargeVoided)
        );
        assert_eq!(provider.void("k").await.unwrap(), VoidOutcome::Voided);
        assert_eq!(held(&pool, late.order_id).await, 0);
    }

    #[tokio::test]
    async fn a_capture_whose_answer_was_lost_is_refunded_by_a_void() {
        let (provider, pool) = provider(Duration::ZERO).await;
        let lost = charge("k", "tok_capture_answer_lost");
        for _ in 0..2 {
            assert!(matches!(
                provider.charge(&lost).await,
                Err(ProviderError::Transient(_))
            ));
        }
        assert_eq!(held(&pool, lost.order_id).await, 1500);
        let VoidOutcome::Refunded { reference, charge } = provider.void("k").await.unwrap() else {
            panic!("the capture was not found");
        };
        assert!(reference.starts_with("sim_ch_"));
        assert_eq!(charge, record(&lost));
        assert_eq!(held(&pool, lost.order_id).await, 0);
        assert_eq!(
            provider.void("k").await.unwrap(),
            VoidOutcome::Refunded { reference, charge },
            "a second void refunds nothing more"
        );
    }

    #[tokio::test]
    async fn a_void_reports_a_decline_and_refunds_a_capture_once() {
        let (provider, pool) = provider(Duration::ZERO).await;
        let declined = charge("declined", "tok_declined");
        provider.charge(&declined).await.unwrap();
        assert_eq!(
            provider.void("declined").await.unwrap(),
            VoidOutcome::Declined {
                reason: DeclineReason::CardDeclined,
                charge: record(&declined),
            }
        );

        let fragile = charge("fragile", "tok_refund_fails_once");
        let ChargeOutcome::Captured { reference } = provider.charge(&fragile).await.unwrap() else {
            panic!("not captured");
        };
        assert!(matches!(
            provider.void("fragile").await,
            Err(ProviderError::Transient(_))
        ));
        assert_eq!(held(&pool, fragile.order_id).await, 1500);
        assert_eq!(
            provider.void("fragile").await.unwrap(),
            VoidOutcome::Refunded {
                reference,
                charge: record(&fragile),
            }
        );
        assert_eq!(held(&pool, fragile.order_id).await, 0);
    }

    #[tokio::test]
    async fn a_void_wins_over_a_charge_still_being_decided() {
        let (provider, pool) = provider(Duration::from_millis(500)).await;
        let slow = charge("k", "tok_slow");
        let charging = {
            let (provider, slow) = (provider.clone(), slow.clone());
            tokio::spawn(async move { provider.charge(&slow).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(provider.void("k").await.unwrap(), VoidOutcome::Voided);
        assert_eq!(
            charging.await.unwrap().unwrap(),
            ChargeOutcome::Declined(DeclineReason::ChargeVoided)
        );
        assert_eq!(held(&pool, slow.order_id).await, 0);
    }
}
