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
//! | `tok_capture_answer_lost` | captures (or authorizes) on the first attempt of a key, but that answer and every later one under the key is lost: each fails transiently, and the capture (or hold) stays until the key is voided |
//! | `tok_capture_fails_once` | authorizes; the first capture attempt of the authorization fails transiently |
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
//!
//! Authorizations: asked to authorize, it decides as for a charge but only
//! holds the amount, for `AUTHORIZATION_LIFETIME` (by its own clock, the
//! database's). A capture takes the amount in full (once, however often it
//! is asked); a void releases it; after the lifetime it holds nothing and
//! refuses a capture (expired). A release is a void that never refunds: of
//! a key it captured under, it only says so.

use std::time::Duration;

use anyhow::Context as _;
use futures::future::BoxFuture;
use money::{Currency, Money};
use sqlx::PgPool;
use uuid::Uuid;

use chrono::{DateTime, Utc};

use crate::domain::{ChargeDetails, CustomerId, OrderId, PaymentKind};

/// A charge (or an authorization) to make, with the metadata the provider
/// keeps with it.
#[derive(Debug, Clone)]
pub(crate) struct Charge {
    pub(crate) idempotency_key: String,
    pub(crate) kind: PaymentKind,
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
    Captured {
        reference: String,
    },
    /// The amount is held, until `expires_at` at the latest.
    Authorized {
        reference: String,
        expires_at: DateTime<Utc>,
    },
    Declined(DeclineReason),
}

/// The provider's answer to a capture of an authorization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CaptureOutcome {
    /// Taken in full (now, or by an earlier capture).
    Captured,
    /// It lapsed first: nothing is held, nothing was taken.
    Expired,
    /// It was voided first.
    Voided,
    /// The provider holds no authorization under the key.
    NotAuthorized,
}

/// The provider's answer to a void by key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum VoidOutcome {
    /// It had captured under the key; that capture is refunded in full
    /// (now, or by an earlier void).
    Refunded {
        reference: String,
        charge: ChargeDetails,
        kind: PaymentKind,
    },
    /// It had captured under the key, and was asked to release, not to
    /// refund: the capture stands.
    Captured {
        reference: String,
        charge: ChargeDetails,
        kind: PaymentKind,
    },
    /// It had declined the charge under the key: nothing to undo.
    Declined {
        reason: DeclineReason,
        charge: ChargeDetails,
        kind: PaymentKind,
    },
    /// It held an authorization under the key; now released (now, or by an
    /// earlier void).
    Released {
        reference: String,
        charge: ChargeDetails,
        expires_at: DateTime<Utc>,
    },
    /// It held an authorization under the key, which lapsed: nothing held.
    Expired {
        reference: String,
        charge: ChargeDetails,
        expires_at: DateTime<Utc>,
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

    /// As `void`, but never refunds: releases an authorization, voids a key
    /// under which nothing was charged, and of a capture only says so.
    fn release<'a>(
        &'a self,
        charge_key: &'a str,
    ) -> BoxFuture<'a, Result<VoidOutcome, ProviderError>>;

    /// Captures the authorization with `charge_key` in full, idempotently.
    fn capture<'a>(
        &'a self,
        charge_key: &'a str,
    ) -> BoxFuture<'a, Result<CaptureOutcome, ProviderError>>;
}

/// How the simulation behaves.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SimulationSettings {
    pub(crate) amount_limit_minor: i64,
    pub(crate) slow_delay: Duration,
    pub(crate) flaky_failures: u32,
    /// How long an authorization holds its amount.
    pub(crate) authorization_lifetime: Duration,
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
         refund_attempts, refunded_at IS NOT NULL AS refunded, voided_at IS NOT NULL AS voided, \
         kind, authorized_until, coalesce(authorized_until <= now(), false) AS lapsed, capture_attempts"
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
    kind: String,
    authorized_until: Option<DateTime<Utc>>,
    /// An authorization past its lifetime, by the database's clock.
    lapsed: bool,
    capture_attempts: i32,
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
                (None, Some(reference)) if outcome == "authorized" => ChargeOutcome::Authorized {
                    reference: reference.clone(),
                    expires_at: self
                        .authorized_until
                        .context("simulated authorization without its expiry")?,
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
    /// every answer that says it captured (or, asked to authorize, that it
    /// holds the amount).
    fn deliver(&self, answer: ChargeOutcome) -> Result<ChargeOutcome, ProviderError> {
        if self.payment_method.as_deref() == Some("tok_capture_answer_lost")
            && matches!(
                answer,
                ChargeOutcome::Captured { .. } | ChargeOutcome::Authorized { .. }
            )
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

    fn kind(&self) -> anyhow::Result<PaymentKind> {
        PaymentKind::parse(&self.kind)
            .with_context(|| format!("simulated charge of kind {:?}", self.kind))
    }

    /// An authorization under the key, held or not: its reference and
    /// expiry.
    fn authorization(&self) -> Option<(String, DateTime<Utc>)> {
        match (
            self.outcome.as_deref(),
            &self.reference,
            self.authorized_until,
        ) {
            (Some("authorized"), Some(reference), Some(until)) => Some((reference.clone(), until)),
            _ => None,
        }
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
                     (idempotency_key, payment_method, attempts, amount_minor, currency, order_id, customer_id, kind)
                 VALUES ($1, $2, 1, $3, $4, $5, $6, $7)
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
            .bind(charge.kind.as_str())
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
            // An approved authorization holds the amount instead of taking it.
            let (outcome, reference) = match (&decided, charge.kind) {
                (ChargeOutcome::Captured { reference }, PaymentKind::Charge) => {
                    ("captured", Some(reference.clone()))
                }
                (ChargeOutcome::Captured { reference }, PaymentKind::Authorization) => (
                    "authorized",
                    Some(reference.replacen("sim_ch_", "sim_au_", 1)),
                ),
                (ChargeOutcome::Authorized { reference, .. }, _) => {
                    ("authorized", Some(reference.clone()))
                }
                (ChargeOutcome::Declined(reason), _) => (reason.as_str(), None),
            };
            let lifetime_millis =
                i64::try_from(self.settings.authorization_lifetime.as_millis()).unwrap_or(i64::MAX);
            // Only if nothing answered or voided the key meanwhile: the
            // first answer stands, and a void wins over a charge still
            // being decided. An authorization is done with when it lapses
            // (unless captured first): its `settled_at` is set ahead.
            let written: Option<Stored> = sqlx::query_as(concat!(
                "UPDATE simulated_provider_charges
                 SET outcome = $2, reference = $3,
                     authorized_until = CASE WHEN $2 = 'authorized'
                                             THEN now() + $4 * interval '1 millisecond' END,
                     settled_at = CASE WHEN $2 = 'captured' THEN NULL
                                       WHEN $2 = 'authorized' THEN now() + $4 * interval '1 millisecond'
                                       ELSE now() END
                 WHERE idempotency_key = $1 AND outcome IS NULL AND voided_at IS NULL RETURNING ",
                stored_columns!()
            ))
            .bind(&charge.idempotency_key)
            .bind(outcome)
            .bind(reference)
            .bind(lifetime_millis)
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
        Box::pin(self.undo(charge_key, true))
    }

    fn release<'a>(
        &'a self,
        charge_key: &'a str,
    ) -> BoxFuture<'a, Result<VoidOutcome, ProviderError>> {
        Box::pin(self.undo(charge_key, false))
    }

    fn capture<'a>(
        &'a self,
        charge_key: &'a str,
    ) -> BoxFuture<'a, Result<CaptureOutcome, ProviderError>> {
        Box::pin(async move {
            // Holding the key's row, like a void: a capture and a void of
            // one authorization happen one after the other.
            let mut tx = self.pool.begin().await.context("simulated provider")?;
            let stored: Option<Stored> = sqlx::query_as(concat!(
                "SELECT ",
                stored_columns!(),
                " FROM simulated_provider_charges WHERE idempotency_key = $1 FOR UPDATE"
            ))
            .bind(charge_key)
            .fetch_optional(&mut *tx)
            .await
            .context("simulated provider")?;
            let Some(stored) = stored else {
                return Ok(CaptureOutcome::NotAuthorized);
            };
            let outcome = match stored.outcome.as_deref() {
                Some("captured") if stored.authorized_until.is_some() => CaptureOutcome::Captured,
                _ if stored.voided => CaptureOutcome::Voided,
                Some("authorized") if stored.lapsed => CaptureOutcome::Expired,
                Some("authorized") => {
                    sqlx::query(
                        "UPDATE simulated_provider_charges SET capture_attempts = capture_attempts + 1
                         WHERE idempotency_key = $1",
                    )
                    .bind(charge_key)
                    .execute(&mut *tx)
                    .await
                    .context("simulated provider")?;
                    if stored.is("tok_capture_fails_once") && stored.capture_attempts == 0 {
                        tx.commit().await.context("simulated provider")?;
                        return Err(ProviderError::Transient("capture failed; try again".into()));
                    }
                    // Taken: held as a charge's capture from now on.
                    sqlx::query(
                        "UPDATE simulated_provider_charges
                         SET outcome = 'captured', captured_at = now(), settled_at = NULL
                         WHERE idempotency_key = $1",
                    )
                    .bind(charge_key)
                    .execute(&mut *tx)
                    .await
                    .context("simulated provider")?;
                    CaptureOutcome::Captured
                }
                // A charge's capture, a decline, or no answer yet.
                _ => CaptureOutcome::NotAuthorized,
            };
            tx.commit().await.context("simulated provider")?;
            Ok(outcome)
        })
    }
}

impl SimulatedProvider {
    /// A void of `charge_key`: refunds a capture if `refund_captures`, else
    /// only reports it.
    async fn undo(
        &self,
        charge_key: &str,
        refund_captures: bool,
    ) -> Result<VoidOutcome, ProviderError> {
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
        // An authorization not captured: released, unless it lapsed (or
        // was released before).
        if let Some((reference, expires_at)) = stored.authorization() {
            let charge = stored.record()?;
            if stored.lapsed && !stored.voided {
                return Ok(VoidOutcome::Expired {
                    reference,
                    charge,
                    expires_at,
                });
            }
            sqlx::query(
                "UPDATE simulated_provider_charges
                 SET voided_at = coalesce(voided_at, now()), settled_at = least(settled_at, now())
                 WHERE idempotency_key = $1",
            )
            .bind(charge_key)
            .execute(&mut *tx)
            .await
            .context("simulated provider")?;
            tx.commit().await.context("simulated provider")?;
            return Ok(VoidOutcome::Released {
                reference,
                charge,
                expires_at,
            });
        }
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
                kind: stored.kind()?,
            },
            Some(ChargeOutcome::Authorized { .. }) => {
                return Err(anyhow::anyhow!("simulated authorization read as not one").into());
            }
            Some(ChargeOutcome::Captured { reference }) if !refund_captures && !stored.refunded => {
                VoidOutcome::Captured {
                    reference,
                    charge: stored.record()?,
                    kind: stored.kind()?,
                }
            }
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
                        return Err(ProviderError::Transient("refund failed; try again".into()));
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
                    kind: stored.kind()?,
                }
            }
        };
        tx.commit().await.context("simulated provider")?;
        Ok(outcome)
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
        provider_with(slow_delay, Duration::from_secs(3600)).await
    }

    async fn provider_with(
        slow_delay: Duration,
        authorization_lifetime: Duration,
    ) -> (SimulatedProvider, PgPool) {
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
                authorization_lifetime,
            },
        );
        (provider, pool)
    }

    fn charge(key: &str, token: &str) -> Charge {
        Charge {
            idempotency_key: key.to_owned(),
            kind: PaymentKind::Charge,
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
        let VoidOutcome::Refunded {
            reference, charge, ..
        } = provider.void("k").await.unwrap()
        else {
            panic!("the capture was not found");
        };
        assert!(reference.starts_with("sim_ch_"));
        assert_eq!(charge, record(&lost));
        assert_eq!(held(&pool, lost.order_id).await, 0);
        assert_eq!(
            provider.void("k").await.unwrap(),
            VoidOutcome::Refunded {
                reference,
                charge,
                kind: PaymentKind::Charge
            },
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
                kind: PaymentKind::Charge,
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
                kind: PaymentKind::Charge,
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

    fn authorization(key: &str, token: &str) -> Charge {
        Charge {
            kind: PaymentKind::Authorization,
            ..charge(key, token)
        }
    }

    /// What the provider has reserved (authorized, held) and taken
    /// (captured, not refunded) of the order.
    async fn holdings(pool: &PgPool, order_id: OrderId) -> (i64, i64) {
        sqlx::query_as(
            "SELECT authorized_minor, held_minor FROM simulated_provider_holdings WHERE order_id = $1",
        )
        .bind(order_id.as_uuid())
        .fetch_optional(pool)
        .await
        .unwrap()
        .unwrap_or((0, 0))
    }

    #[tokio::test]
    async fn an_authorization_holds_the_amount_until_captured_once() {
        let (provider, pool) = provider(Duration::ZERO).await;
        let asked = authorization("a", "tok_visa");
        let ChargeOutcome::Authorized { reference, .. } = provider.charge(&asked).await.unwrap()
        else {
            panic!("not authorized");
        };
        assert!(reference.starts_with("sim_au_"));
        assert_eq!(holdings(&pool, asked.order_id).await, (1500, 0));
        for _ in 0..2 {
            assert_eq!(
                provider.capture("a").await.unwrap(),
                CaptureOutcome::Captured
            );
            assert_eq!(
                holdings(&pool, asked.order_id).await,
                (0, 1500),
                "taken once"
            );
        }
        // A release of a capture refunds nothing; a void refunds it.
        assert!(matches!(
            provider.release("a").await.unwrap(),
            VoidOutcome::Captured { .. }
        ));
        assert_eq!(holdings(&pool, asked.order_id).await, (0, 1500));
        assert!(matches!(
            provider.void("a").await.unwrap(),
            VoidOutcome::Refunded {
                kind: PaymentKind::Authorization,
                ..
            }
        ));
        assert_eq!(holdings(&pool, asked.order_id).await, (0, 0));
    }

    #[tokio::test]
    async fn a_released_authorization_holds_nothing_and_cannot_be_captured() {
        let (provider, pool) = provider(Duration::ZERO).await;
        let asked = authorization("a", "tok_visa");
        provider.charge(&asked).await.unwrap();
        for _ in 0..2 {
            assert!(matches!(
                provider.release("a").await.unwrap(),
                VoidOutcome::Released { .. }
            ));
        }
        assert_eq!(holdings(&pool, asked.order_id).await, (0, 0));
        assert_eq!(provider.capture("a").await.unwrap(), CaptureOutcome::Voided);
        assert_eq!(holdings(&pool, asked.order_id).await, (0, 0));
    }

    #[tokio::test]
    async fn an_authorization_lapses_after_its_lifetime_holding_nothing() {
        let (provider, pool) = provider_with(Duration::ZERO, Duration::from_millis(300)).await;
        let asked = authorization("a", "tok_visa");
        provider.charge(&asked).await.unwrap();
        assert_eq!(holdings(&pool, asked.order_id).await, (1500, 0));
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(holdings(&pool, asked.order_id).await, (0, 0));
        assert_eq!(
            provider.capture("a").await.unwrap(),
            CaptureOutcome::Expired
        );
        assert!(matches!(
            provider.release("a").await.unwrap(),
            VoidOutcome::Expired { .. }
        ));
        assert_eq!(holdings(&pool, asked.order_id).await, (0, 0));
        // Done with: forgotten after its retention like any settled key.
        let settled: bool = sqlx::query_scalar(
            "SELECT settled_at <= now() FROM simulated_provider_charges WHERE idempotency_key = 'a'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert!(settled);
    }

    #[tokio::test]
    async fn a_capture_that_fails_transiently_captures_on_the_next_attempt() {
        let (provider, pool) = provider(Duration::ZERO).await;
        let asked = authorization("a", "tok_capture_fails_once");
        provider.charge(&asked).await.unwrap();
        assert!(matches!(
            provider.capture("a").await,
            Err(ProviderError::Transient(_))
        ));
        assert_eq!(holdings(&pool, asked.order_id).await, (1500, 0));
        assert_eq!(
            provider.capture("a").await.unwrap(),
            CaptureOutcome::Captured
        );
        assert_eq!(holdings(&pool, asked.order_id).await, (0, 1500));
    }

    #[tokio::test]
    async fn a_charge_is_no_authorization_to_capture() {
        let (provider, _pool) = provider(Duration::ZERO).await;
        provider.charge(&charge("c", "tok_visa")).await.unwrap();
        assert_eq!(
            provider.capture("c").await.unwrap(),
            CaptureOutcome::NotAuthorized
        );
        assert_eq!(
            provider.capture("never").await.unwrap(),
            CaptureOutcome::NotAuthorized
        );
    }
}
