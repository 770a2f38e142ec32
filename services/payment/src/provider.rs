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
//! | anything else | approves |
//!
//! Any amount over `PAYMENT_AMOUNT_LIMIT` is declined (`amount_over_limit`).
//!
//! Like a real provider, it is idempotent by key: asking again with a key
//! it has answered returns the same answer and never charges twice. Its
//! memory is its own table, written outside our transactions.

use std::time::Duration;

use anyhow::Context as _;
use futures::future::BoxFuture;
use money::Money;
use sqlx::PgPool;

/// A charge to make.
#[derive(Debug, Clone)]
pub(crate) struct Charge {
    pub(crate) idempotency_key: String,
    pub(crate) amount: Money,
    pub(crate) payment_method: String,
}

/// Why the provider refused a charge. A decline is an answer, not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeclineReason {
    CardDeclined,
    InsufficientFunds,
    AmountOverLimit,
}

impl DeclineReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::CardDeclined => "card_declined",
            Self::InsufficientFunds => "insufficient_funds",
            Self::AmountOverLimit => "amount_over_limit",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [
            Self::CardDeclined,
            Self::InsufficientFunds,
            Self::AmountOverLimit,
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

    /// Refunds in full the charge made with `charge_key`.
    fn refund<'a>(&'a self, charge_key: &'a str) -> BoxFuture<'a, Result<(), ProviderError>>;
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
            reference: format!("sim_ch_{}", uuid::Uuid::new_v4().simple()),
        })
    }
}

impl PaymentProvider for SimulatedProvider {
    fn charge<'a>(
        &'a self,
        charge: &'a Charge,
    ) -> BoxFuture<'a, Result<ChargeOutcome, ProviderError>> {
        Box::pin(async move {
            let (attempts, outcome, reference): (i32, Option<String>, Option<String>) = sqlx::query_as(
                "INSERT INTO simulated_provider_charges (idempotency_key, payment_method, attempts) VALUES ($1, $2, 1)
                 ON CONFLICT (idempotency_key) DO UPDATE SET attempts = simulated_provider_charges.attempts + 1
                 RETURNING attempts, outcome, reference",
            )
            .bind(&charge.idempotency_key)
            .bind(&charge.payment_method)
            .fetch_one(&self.pool)
            .await
            .context("simulated provider")?;
            // Answered before under this key: the same answer, no new charge.
            if let Some(outcome) = outcome {
                return Ok(match (DeclineReason::parse(&outcome), reference) {
                    (Some(reason), _) => ChargeOutcome::Declined(reason),
                    (None, Some(reference)) => ChargeOutcome::Captured { reference },
                    (None, None) => {
                        return Err(anyhow::anyhow!("simulated charge without a reference").into());
                    }
                });
            }
            let decided = self
                .decide(charge, u32::try_from(attempts).unwrap_or(u32::MAX))
                .await?;
            let (outcome, reference) = match &decided {
                ChargeOutcome::Captured { reference } => ("captured", Some(reference.as_str())),
                ChargeOutcome::Declined(reason) => (reason.as_str(), None),
            };
            sqlx::query("UPDATE simulated_provider_charges SET outcome = $2, reference = $3 WHERE idempotency_key = $1")
                .bind(&charge.idempotency_key)
                .bind(outcome)
                .bind(reference)
                .execute(&self.pool)
                .await
                .context("simulated provider")?;
            Ok(decided)
        })
    }

    fn refund<'a>(&'a self, charge_key: &'a str) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            let (payment_method, attempts, refunded): (String, i32, bool) = sqlx::query_as(
                "UPDATE simulated_provider_charges SET refund_attempts = refund_attempts + 1
                 WHERE idempotency_key = $1 AND outcome = 'captured'
                 RETURNING payment_method, refund_attempts, refunded_at IS NOT NULL",
            )
            .bind(charge_key)
            .fetch_optional(&self.pool)
            .await
            .context("simulated provider")?
            .context("refund of a charge the simulated provider never captured")?;
            if refunded {
                return Ok(());
            }
            if payment_method == "tok_refund_fails_once" && attempts == 1 {
                return Err(ProviderError::Transient("refund failed; try again".into()));
            }
            sqlx::query("UPDATE simulated_provider_charges SET refunded_at = now() WHERE idempotency_key = $1")
                .bind(charge_key)
                .execute(&self.pool)
                .await
                .context("simulated provider")?;
            Ok(())
        })
    }
}
