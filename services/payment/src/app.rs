//! The payment service's use cases: the I/O around `crate::domain`'s rules.
//!
//! # One key, one charge, and nothing held while the provider answers
//!
//! A provider call can take long (`tok_slow` takes longer than callers
//! wait), so no transaction, lock or pooled connection is held across it.
//! Instead each charge key has a claim row (`charge_claims`) next to its
//! payment, and a request goes through three steps:
//!
//! 1. **Claim.** It reads the key's claim and payment, and
//!    `domain::decide` says what to do: answer with the payment, wait, or
//!    call the provider. To call, it takes the key's *lease*: for a key
//!    never seen, by inserting the claim with itself as the holder (one
//!    statement, the common case; the primary key lets one insert win);
//!    otherwise by an UPDATE that succeeds only if the claim's `version` is
//!    still the one it read. Either commits at once.
//! 2. **Call** the provider, with no transaction open, for at most
//!    [`Leases::call_limit`], which is shorter than the lease.
//! 3. **Record**, in one short transaction: free the lease
//!    `WHERE lease_holder = <us>`; if no row matches, someone took the
//!    lease over (a void, or a retry after the lease expired), so this
//!    request records nothing, reads the key again and answers with what
//!    the new holder records. Otherwise insert the payment (or mark it
//!    refunded) with its events in the outbox, and commit.
//!
//! A provider error frees the lease, and the caller gets UNAVAILABLE (retry
//! with the same key). A request that goes away (cancelled, timed out)
//! frees it from a drop guard. A process that crashes leaves its lease to
//! expire ([`Leases::lease`]). Requests that find a live lease wait,
//! holding no connection, until it is freed or taken over (a notification:
//! [`crate::lease_watch`]) or runs out, then read the key again.
//!
//! Why no one is charged twice, and a refund happens once, however the
//! requests interleave:
//!
//! - **Duplicates racing.** One takes the lease; the others see it live and
//!   wait until the payment is recorded, then answer with it. The holder
//!   stops calling after `call_limit`, before its lease can expire, so no
//!   two requests call the provider for one key at a time.
//! - **A crash after the provider charged, before the outcome was
//!   recorded.** The claim keeps a holder that is gone. A retry waits for
//!   the lease to expire, takes it over and asks the provider again under
//!   the same key; the provider is idempotent by key and answers with the
//!   first charge (or decline) instead of charging again, and that answer
//!   is recorded. A crash after recording leaves nothing to resolve.
//! - **A void (refund by charge key) while a charge is in flight.** The
//!   void takes the lease even from a live charge, and the key's intent
//!   becomes `undo`, for good. It asks the provider to void the key, and the
//!   provider settles the race: a charge it has not decided yet is declined
//!   (`charge_voided`) and the key can never charge; a charge it captured
//!   is refunded. Either way it holds nothing afterwards. The charge, when
//!   its answer comes, no longer holds the lease: it records nothing and
//!   answers with what the void recorded. A charge that comes after a void
//!   started waits for it or, if the void was left unfinished, finishes it;
//!   it never calls the provider to charge.
//! - **A refund racing a charge or another refund.** A refund of a captured
//!   payment takes the lease like a void does (refunds of one key wait for
//!   each other); the provider refunds a key at most once however often it
//!   is asked, and the one lease holder records the refund with an update
//!   from `captured`, so its event is published once.
//! - **A stale read.** A lease is taken only from the claim as it was read,
//!   and an outcome is recorded only by the lease's holder: a decision made
//!   on what another request has since changed is never acted on.
//!
//! Authorizations go through the same three steps. AuthorizePayment is a
//! charge whose request says so (its kind is in the request hash, so a key
//! is a charge's or an authorization's). CapturePayment and VoidPayment
//! take the key's lease like a refund (intents `capture` and `release`),
//! one at a time per key; each judges the payment before it calls and
//! again once it is recorded (`domain::check_capture`,
//! `domain::check_void`), so whichever of a capture and a void came second
//! is refused (or answered, if it asked for what the first did). A release
//! never refunds: a key the provider captured under is recorded captured
//! and the void refused.
//!
//! When we have no record of a charge, undoing it by its key asks the
//! provider to void the key, because only the provider knows whether the
//! charge was captured and its answer lost (a crash, a cancelled call, a
//! lost reply). What it says is recorded as the payment, so our ledger and
//! the provider's books agree.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use api_payment::v1 as pb;
use chrono::{DateTime, Utc};
use messaging::envelope::{Origin, Subject};
use messaging::{EventEnvelope, Publisher, Topics};
use money::{Currency, Money};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::NAME;
use crate::domain::{
    self, Call, CaptureRefused, ChargeDetails, ChargeKey, ChargeRequest, Claim, CustomerId, Intent,
    KeyCommand, KeyReused, Lease, NewPayment, Next, NothingToRefund, OrderId, Payment,
    PaymentEvent, PaymentId, PaymentKind, PaymentStatus, Refund, RefundKey, RefundReason,
    RequestHash, Settlement, Step, VoidRefused,
};
use crate::lease_watch::LeaseWatch;
use crate::provider::{Charge, PaymentProvider, ProviderError};

/// How long a provider call may take, and how long a lease on a key lasts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Leases {
    /// A provider call is given up after this; the caller gets UNAVAILABLE
    /// and may retry with the same key.
    pub(crate) call_limit: Duration,
    /// How long a lease lasts, from its claim's commit: longer than
    /// `call_limit`, so that its holder has stopped calling the provider
    /// before anyone may take the lease over.
    pub(crate) lease: Duration,
}

impl Leases {
    /// For a server that ends every request after `request_timeout`: no
    /// call outlives its request, and the margin covers the time between
    /// the claim's commit and the start of the call.
    pub(crate) fn for_request_timeout(request_timeout: Duration) -> Self {
        Self {
            call_limit: request_timeout,
            lease: request_timeout + Duration::from_secs(5),
        }
    }
}

/// What to refund, capture or void: a payment, or the payment of a key.
#[derive(Debug, Clone)]
pub(crate) enum RefundTarget {
    Payment(PaymentId),
    ChargeKey(ChargeKey),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CaptureError {
    #[error("no such authorization")]
    NotFound,
    #[error(transparent)]
    Refused(#[from] CaptureRefused),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum VoidError {
    #[error("no such payment")]
    NotFound,
    #[error(transparent)]
    Refused(#[from] VoidRefused),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ProcessError {
    #[error(transparent)]
    KeyReused(#[from] KeyReused),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RefundError {
    #[error("no such payment")]
    NotFound,
    #[error(transparent)]
    NothingToRefund(#[from] NothingToRefund),
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
    payment_events: Publisher,
    leases: Leases,
    watch: Arc<LeaseWatch>,
}

impl std::fmt::Debug for Payments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Payments")
            .field("leases", &self.leases)
            .finish_non_exhaustive()
    }
}

/// Why settling a key stopped.
#[derive(Debug, thiserror::Error)]
enum SettleError {
    #[error(transparent)]
    KeyReused(#[from] KeyReused),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl Payments {
    pub(crate) fn new(
        pool: PgPool,
        provider: Arc<dyn PaymentProvider>,
        topics: &Topics,
        leases: Leases,
    ) -> Self {
        Self {
            pool,
            provider,
            payment_events: Publisher::new(NAME, topics.payment_events()),
            leases,
            watch: Arc::default(),
        }
    }

    /// Charges (or authorizes, by the request's kind) once per idempotency
    /// key; a decline is a result.
    pub(crate) async fn process(&self, request: &ChargeRequest) -> Result<Payment, ProcessError> {
        // A key never seen, the common case: claimed in one statement.
        let lease = self
            .claim_new(&request.key, &Intent::Charge, Some(&request.request_hash))
            .await?
            .map(|held| (Call::Charge, held));
        let command = KeyCommand::Charge(&request.request_hash);
        self.settle(&request.key, command, Some(request), lease)
            .await
            .map_err(|error| match error {
                SettleError::KeyReused(error) => error.into(),
                SettleError::Provider(error) => error.into(),
                SettleError::Unexpected(error) => error.into(),
            })
    }

    /// Refunds a captured payment in full; by charge key, undoes whatever
    /// the charge came to (see the proto).
    pub(crate) async fn refund(
        &self,
        target: &RefundTarget,
        refund: &Refund,
    ) -> Result<Payment, RefundError> {
        let (key, lease) = match target {
            RefundTarget::Payment(payment_id) => {
                let payment = self.get(*payment_id).await?.ok_or(RefundError::NotFound)?;
                payment.check_refundable()?;
                (payment.charge_key, None)
            }
            RefundTarget::ChargeKey(key) => {
                let lease = self
                    .claim_new(key, &Intent::Undo(refund.clone()), None)
                    .await?
                    .map(|held| (Call::Void(refund.clone()), held));
                (key.clone(), lease)
            }
        };
        self.settle(&key, KeyCommand::Undo(refund), None, lease)
            .await
            .map_err(|error| match error {
                SettleError::Provider(error) => error.into(),
                SettleError::Unexpected(error) => error.into(),
                SettleError::KeyReused(error) => anyhow::Error::new(error)
                    .context("a refund was refused as a charge")
                    .into(),
            })
    }

    /// Captures an authorization in full, once.
    pub(crate) async fn capture(&self, target: &RefundTarget) -> Result<Payment, CaptureError> {
        let payment = self.find(target).await?.ok_or(CaptureError::NotFound)?;
        if domain::check_capture(&payment)? == Next::Answer {
            return Ok(payment);
        }
        let captured = self
            .settle(&payment.charge_key, KeyCommand::Capture, None, None)
            .await
            .map_err(|error| match error {
                SettleError::Provider(error) => CaptureError::from(error),
                SettleError::Unexpected(error) => error.into(),
                SettleError::KeyReused(error) => anyhow::Error::new(error)
                    .context("a capture was refused as a charge")
                    .into(),
            })?;
        // What it came to, judged again: a void or an expiry that came
        // first is refused as if the capture had come after it.
        match domain::check_capture(&captured)? {
            Next::Answer => Ok(captured),
            Next::Call => Err(anyhow::anyhow!("a capture left its authorization held").into()),
        }
    }

    /// Releases an authorization not captured; by key, also one whose
    /// answer was lost, or a key never seen (for good).
    pub(crate) async fn void(
        &self,
        target: &RefundTarget,
        void: &Refund,
    ) -> Result<Payment, VoidError> {
        let (key, lease) = match self.find(target).await? {
            Some(payment) => {
                if domain::check_void(&payment)? == Next::Answer {
                    return Ok(payment);
                }
                (payment.charge_key, None)
            }
            None => match target {
                RefundTarget::Payment(_) => return Err(VoidError::NotFound),
                RefundTarget::ChargeKey(key) => {
                    let lease = self
                        .claim_new(key, &Intent::Release(void.clone()), None)
                        .await?
                        .map(|held| (Call::Release(void.clone()), held));
                    (key.clone(), lease)
                }
            },
        };
        let voided = self
            .settle(&key, KeyCommand::Release(void), None, lease)
            .await
            .map_err(|error| match error {
                SettleError::Provider(error) => VoidError::from(error),
                SettleError::Unexpected(error) => error.into(),
                SettleError::KeyReused(error) => anyhow::Error::new(error)
                    .context("a void was refused as a charge")
                    .into(),
            })?;
        // A capture that came first is refused: only a refund undoes it.
        match domain::check_void(&voided)? {
            Next::Answer => Ok(voided),
            Next::Call => Err(anyhow::anyhow!("a void left its authorization held").into()),
        }
    }

    /// The payment `target` names, if there is one.
    async fn find(&self, target: &RefundTarget) -> anyhow::Result<Option<Payment>> {
        match target {
            RefundTarget::Payment(payment_id) => self.get(*payment_id).await,
            RefundTarget::ChargeKey(key) => find_by_key(&self.pool, key, false).await,
        }
    }

    /// Drives `command` on `key` to a payment: reads the key, does what the
    /// domain decides, and again, until the key is settled. `lease`, when
    /// given, is already held (a new key's claim) for that call.
    async fn settle(
        &self,
        key: &ChargeKey,
        command: KeyCommand<'_>,
        charge: Option<&ChargeRequest>,
        mut lease: Option<(Call, HeldLease)>,
    ) -> Result<Payment, SettleError> {
        // Before the first read, so that no change after it goes unheard.
        let mut waiter = self.watch.waiter();
        loop {
            let (call, held) = match lease.take() {
                Some(leased) => leased,
                None => {
                    let (payment, claim) = self.read_key(key).await?;
                    let step = domain::decide(
                        payment.as_ref(),
                        claim.as_ref().map(|c| &c.claim),
                        command,
                    )?;
                    match step {
                        Step::Answer => {
                            return payment
                                .context("the domain answered without a payment")
                                .map_err(SettleError::from);
                        }
                        Step::Wait => {
                            let left = claim.map(|c| c.lease_left).unwrap_or_default();
                            waiter.changed(key.as_str(), left).await;
                            continue;
                        }
                        Step::Call(call) => {
                            let version = claim.map(|c| c.version);
                            match self.take_lease(key, version, &call, charge).await? {
                                Some(held) => (call, held),
                                // The claim changed since we read it: read again.
                                None => continue,
                            }
                        }
                    }
                }
            };
            let recorded = match &call {
                Call::Charge => {
                    let charge = charge.context("a refund decided to charge")?;
                    self.charge(charge, held).await?
                }
                Call::Void(refund) => self.undo(key, refund, held, Undo::Void).await?,
                Call::Release(refund) => self.undo(key, refund, held, Undo::Release).await?,
                Call::Capture => self.capture_call(key, held).await?,
            };
            // `None`: our lease was taken over before we recorded, and what
            // its new holder records stands: read the key again (and wait
            // for that holder).
            if let Some(payment) = recorded {
                if let (KeyCommand::Charge(hash), Call::Charge) = (command, &call) {
                    payment.answer_charge(hash)?;
                }
                return Ok(payment);
            }
        }
    }

    /// Charges at the provider, holding the key's lease, and records the
    /// answer if we still hold it (`None` if we do not).
    async fn charge(
        &self,
        request: &ChargeRequest,
        held: HeldLease,
    ) -> Result<Option<Payment>, SettleError> {
        let charge = Charge {
            idempotency_key: request.key.as_str().to_owned(),
            kind: request.kind,
            amount: request.details.amount,
            payment_method: request.payment_method.as_str().to_owned(),
            order_id: request.details.order_id,
            customer_id: request.details.customer_id,
        };
        let outcome = match self.call(self.provider.charge(&charge)).await {
            Ok(outcome) => outcome,
            Err(error) => {
                held.release().await;
                return Err(error.into());
            }
        };
        let mut tx = self.pool.begin().await.context("starting a transaction")?;
        if !free_lease(&mut tx, &request.key, held.holder).await? {
            held.lost();
            return Ok(None);
        }
        let (new, events) = domain::charged(request, &outcome);
        let payment = match insert(&mut tx, &new).await? {
            Some(payment) => {
                self.publish(&mut tx, &payment, &events).await?;
                payment
            }
            // Recorded meanwhile by a replica of the version before claims
            // (during an upgrade): that record stands.
            None => find_by_key(&mut *tx, &request.key, false)
                .await?
                .context("the payment that conflicted is gone")?,
        };
        tx.commit().await.context("committing the payment")?;
        held.lost();
        Ok(Some(payment))
    }

    /// Voids (or releases) the key at the provider for `refund`, holding
    /// the key's lease, and records what that settles if we still hold it
    /// (`None` if not).
    async fn undo(
        &self,
        key: &ChargeKey,
        refund: &Refund,
        held: HeldLease,
        how: Undo,
    ) -> Result<Option<Payment>, SettleError> {
        let (asked, kind) = match how {
            Undo::Void => (self.provider.void(key.as_str()), PaymentKind::Charge),
            Undo::Release => (
                self.provider.release(key.as_str()),
                PaymentKind::Authorization,
            ),
        };
        let outcome = match self.call(asked).await {
            Ok(outcome) => outcome,
            Err(error) => {
                held.release().await;
                return Err(error.into());
            }
        };
        let mut tx = self.pool.begin().await.context("starting a transaction")?;
        if !free_lease(&mut tx, key, held.holder).await? {
            held.lost();
            return Ok(None);
        }
        let existing = find_by_key(&mut *tx, key, true).await?;
        let settlement = domain::voided(key, kind, existing.as_ref(), refund, outcome)
            .map_err(anyhow::Error::new)?;
        let payment = self.apply(&mut tx, existing, settlement).await?;
        tx.commit().await.context("committing the refund")?;
        held.lost();
        Ok(Some(payment))
    }

    /// Captures the key's authorization at the provider, holding the key's
    /// lease, and records what that settles if we still hold it.
    async fn capture_call(
        &self,
        key: &ChargeKey,
        held: HeldLease,
    ) -> Result<Option<Payment>, SettleError> {
        let outcome = match self.call(self.provider.capture(key.as_str())).await {
            Ok(outcome) => outcome,
            Err(error) => {
                held.release().await;
                return Err(error.into());
            }
        };
        let mut tx = self.pool.begin().await.context("starting a transaction")?;
        if !free_lease(&mut tx, key, held.holder).await? {
            held.lost();
            return Ok(None);
        }
        let existing = find_by_key(&mut *tx, key, true)
            .await?
            .context("captured an authorization without a payment")?;
        let settlement = domain::captured(&existing, outcome).map_err(anyhow::Error::new)?;
        let payment = self.apply(&mut tx, Some(existing), settlement).await?;
        tx.commit().await.context("committing the capture")?;
        held.lost();
        Ok(Some(payment))
    }

    /// Records `settlement` of the key whose payment (locked) is `existing`,
    /// with its events.
    async fn apply(
        &self,
        tx: &mut PgConnection,
        existing: Option<Payment>,
        settlement: Settlement,
    ) -> anyhow::Result<Payment> {
        Ok(match settlement {
            Settlement::Record(new, events) => {
                let payment = insert(tx, &new)
                    .await?
                    .context("a payment appeared under a locked key")?;
                self.publish(tx, &payment, &events).await?;
                payment
            }
            Settlement::Moved { to, refund, events } => {
                let from = existing.context("moved on without a payment")?;
                let payment = mark(tx, &from, to, refund.as_ref()).await?;
                self.publish(tx, &payment, &events).await?;
                payment
            }
            Settlement::Stands => existing.context("a payment stands without a payment")?,
        })
    }

    /// A provider call, given up after the call limit: by then the lease
    /// may be about to expire.
    async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        let limit = self.leases.call_limit;
        tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
            Err(ProviderError::Transient(format!(
                "no answer within {}",
                humantime::format_duration(limit)
            )))
        })
    }

    /// Claims a key no request has claimed before, holding its lease:
    /// `None` if the key has a claim already.
    async fn claim_new(
        &self,
        key: &ChargeKey,
        intent: &Intent,
        request_hash: Option<&RequestHash>,
    ) -> anyhow::Result<Option<HeldLease>> {
        let holder = Uuid::new_v4();
        let refund = intent_refund(intent);
        // A settled key's claim may have been purged (`charge_claim_purge`):
        // its payment then stands for it, and a charge must not reach the
        // provider again, nor an undo, capture or release of a key with
        // nothing left to do (only a capture can be undone, and only an
        // authorization captured, released or undone). Such a request
        // inserts nothing and goes on to read the payment.
        let inserted = sqlx::query(
            "INSERT INTO charge_claims (charge_key, intent, request_hash, refund_idempotency_key, refund_reason,
                                        lease_holder, lease_expires_at, provider_calls)
             SELECT $1, $2, $3, $4, $5, $6, now() + $7 * interval '1 millisecond', 1
             WHERE NOT EXISTS (SELECT 1 FROM payments
                               WHERE idempotency_key = $1
                                 AND ($2 = 'charge' OR status NOT IN ('captured', 'authorized')))
             ON CONFLICT (charge_key) DO NOTHING",
        )
        .bind(key.as_str())
        .bind(intent_text(intent))
        .bind(request_hash.map(RequestHash::as_bytes))
        .bind(refund.map(|refund| refund.key.as_str()))
        .bind(refund.map(|refund| refund.reason.as_str()))
        .bind(holder)
        .bind(self.lease_millis())
        .execute(&self.pool)
        .await
        .context("claiming the idempotency key")?
        .rows_affected()
            == 1;
        Ok(inserted.then(|| self.held(key, holder)))
    }

    /// Takes the lease of `key` for `call`, if its claim is still at
    /// `version` as read (or, with no claim read, if there still is none).
    async fn take_lease(
        &self,
        key: &ChargeKey,
        version: Option<i64>,
        call: &Call,
        charge: Option<&ChargeRequest>,
    ) -> anyhow::Result<Option<HeldLease>> {
        let intent = match call {
            Call::Charge => Intent::Charge,
            Call::Void(refund) => Intent::Undo(refund.clone()),
            Call::Capture => Intent::Capture,
            Call::Release(refund) => Intent::Release(refund.clone()),
        };
        // Only a charge binds the key to its request.
        let request_hash = match call {
            Call::Charge => charge.map(|charge| &charge.request_hash),
            Call::Void(_) | Call::Capture | Call::Release(_) => None,
        };
        let Some(version) = version else {
            return self.claim_new(key, &intent, request_hash).await;
        };
        let holder = Uuid::new_v4();
        let refund = intent_refund(&intent);
        let taken = sqlx::query(
            "UPDATE charge_claims
             SET intent = $3, refund_idempotency_key = $4, refund_reason = $5,
                 request_hash = coalesce(request_hash, $6),
                 lease_holder = $7, lease_expires_at = now() + $8 * interval '1 millisecond',
                 provider_calls = provider_calls + 1, version = version + 1, updated_at = now()
             WHERE charge_key = $1 AND version = $2",
        )
        .bind(key.as_str())
        .bind(version)
        .bind(intent_text(&intent))
        .bind(refund.map(|refund| refund.key.as_str()))
        .bind(refund.map(|refund| refund.reason.as_str()))
        .bind(request_hash.map(RequestHash::as_bytes))
        .bind(holder)
        .bind(self.lease_millis())
        .execute(&self.pool)
        .await
        .context("taking the idempotency key's lease")?
        .rows_affected()
            == 1;
        Ok(taken.then(|| self.held(key, holder)))
    }

    /// The key's payment and claim (with its version), as read now. The
    /// claim is read first: a payment recorded after it changes the claim's
    /// version, so a decision to call on this read cannot take the lease.
    async fn read_key(
        &self,
        key: &ChargeKey,
    ) -> anyhow::Result<(Option<Payment>, Option<ReadClaim>)> {
        let claim: Option<ClaimRow> = sqlx::query_as(
            "SELECT intent, request_hash, refund_idempotency_key, refund_reason, version,
                    extract(epoch FROM lease_expires_at - now())::float8 AS lease_left_secs,
                    CASE WHEN lease_holder IS NULL THEN 'free'
                         WHEN lease_expires_at > now() THEN 'live'
                         ELSE 'expired' END AS lease
             FROM charge_claims WHERE charge_key = $1",
        )
        .bind(key.as_str())
        .fetch_optional(&self.pool)
        .await
        .context("reading the idempotency key's claim")?;
        let claim = claim.map(ClaimRow::into_claim).transpose()?;
        let payment = find_by_key(&self.pool, key, false).await?;
        Ok((payment, claim))
    }

    /// What wakes this service's waiting requests; it runs beside the
    /// server.
    pub(crate) fn lease_watch(&self) -> Arc<LeaseWatch> {
        self.watch.clone()
    }

    fn held(&self, key: &ChargeKey, holder: Uuid) -> HeldLease {
        HeldLease {
            pool: self.pool.clone(),
            key: key.clone(),
            holder,
            held: true,
        }
    }

    fn lease_millis(&self) -> i64 {
        i64::try_from(self.leases.lease.as_millis()).unwrap_or(i64::MAX)
    }

    pub(crate) async fn get(&self, payment_id: PaymentId) -> anyhow::Result<Option<Payment>> {
        let row: Option<PaymentRow> = sqlx::query_as(concat!(
            "SELECT ",
            payment_columns!(),
            " FROM payments WHERE payment_id = $1"
        ))
        .bind(payment_id.as_uuid())
        .fetch_optional(&self.pool)
        .await
        .context("reading a payment")?;
        row.map(Payment::try_from).transpose()
    }

    /// An order's payments, oldest first, and its ledger.
    pub(crate) async fn by_order(
        &self,
        order_id: OrderId,
    ) -> anyhow::Result<(Vec<Payment>, Option<Ledger>)> {
        let rows: Vec<PaymentRow> = sqlx::query_as(concat!(
            "SELECT ",
            payment_columns!(),
            " FROM payments WHERE order_id = $1 ORDER BY created_at, payment_id"
        ))
        .bind(order_id.as_uuid())
        .fetch_all(&self.pool)
        .await
        .context("reading an order's payments")?;
        let ledger = sqlx::query_as(
            "SELECT currency, captured_minor, refunded_minor FROM order_ledger WHERE order_id = $1",
        )
        .bind(order_id.as_uuid())
        .fetch_optional(&self.pool)
        .await
        .context("reading an order's ledger")?;
        let payments = rows
            .into_iter()
            .map(Payment::try_from)
            .collect::<anyhow::Result<_>>()?;
        Ok((payments, ledger))
    }

    /// Enqueues `events` of `payment`, in order, in one statement.
    async fn publish(
        &self,
        conn: &mut PgConnection,
        payment: &Payment,
        events: &[PaymentEvent],
    ) -> anyhow::Result<()> {
        let origin = Origin::current();
        let subject = || Subject::unversioned("payment", &payment.id);
        let envelopes: Vec<EventEnvelope> = events
            .iter()
            .map(|event| {
                let (subject, origin) = (subject(), origin.clone());
                match event {
                    PaymentEvent::Captured => {
                        self.payment_events
                            .seal(subject, origin, 1, &captured_event(payment))
                    }
                    PaymentEvent::Declined => {
                        self.payment_events
                            .seal(subject, origin, 1, &declined_event(payment))
                    }
                    PaymentEvent::Refunded { reason } => self.payment_events.seal(
                        subject,
                        origin,
                        1,
                        &refunded_event(payment, reason),
                    ),
                    PaymentEvent::Authorized => {
                        self.payment_events
                            .seal(subject, origin, 1, &authorized_event(payment))
                    }
                    PaymentEvent::Voided { reason } => {
                        self.payment_events
                            .seal(subject, origin, 1, &voided_event(payment, reason))
                    }
                    PaymentEvent::Expired => {
                        self.payment_events
                            .seal(subject, origin, 1, &expired_event(payment))
                    }
                }
            })
            .collect();
        self.payment_events.enqueue(conn, &envelopes).await
    }
}

/// A lease this request holds on a key. Dropped while still held (the
/// request was cancelled, or failed on the database), it frees the lease in
/// the background, so that a retry need not wait for it to expire.
/// The purge of settled charge keys' claims whose last change is older
/// than `retention`.
///
/// What makes this safe for money: only the claim of a key whose payment is
/// recorded goes, and only while nobody holds its lease. The payment row
/// (never purged; its key is unique) is the key's lasting record: a later
/// charge under the key answers with it and never calls the provider (the
/// insert in `claim_new` refuses to claim a key with a payment), and a
/// refund of a captured payment claims the key afresh. A key with no
/// payment yet (in flight, or its outcome unknown) keeps its claim forever.
pub(crate) fn charge_claim_purge(retention: Duration) -> database::PurgeTarget {
    database::PurgeTarget {
        table: "charge_claims",
        retention,
        // Oldest change first through `charge_claims_free_by_age`; each
        // candidate's payment is found through its unique key.
        statement: "DELETE FROM charge_claims WHERE ctid = ANY(ARRAY(
                        SELECT claim.ctid FROM charge_claims AS claim
                        WHERE claim.lease_holder IS NULL AND claim.updated_at < now() - $1
                          AND EXISTS (SELECT 1 FROM payments WHERE idempotency_key = claim.charge_key)
                        ORDER BY claim.updated_at LIMIT $2 FOR UPDATE OF claim SKIP LOCKED))",
    }
}

#[derive(Debug)]
struct HeldLease {
    pool: PgPool,
    key: ChargeKey,
    holder: Uuid,
    held: bool,
}

impl HeldLease {
    /// Frees the lease now (after a provider error: a retry may call again).
    async fn release(mut self) {
        self.held = false;
        release(&self.pool, &self.key, self.holder).await;
    }

    /// The lease is no longer ours to free: our record freed it, or someone
    /// took it over.
    fn lost(mut self) {
        self.held = false;
    }
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        let (pool, key, holder) = (self.pool.clone(), self.key.clone(), self.holder);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { release(&pool, &key, holder).await });
        }
    }
}

/// Frees the lease of `key` if `holder` still holds it. A failure only
/// means the lease expires instead.
async fn release(pool: &PgPool, key: &ChargeKey, holder: Uuid) {
    let freed = sqlx::query(
        "UPDATE charge_claims
         SET lease_holder = NULL, lease_expires_at = NULL, version = version + 1, updated_at = now()
         WHERE charge_key = $1 AND lease_holder = $2",
    )
    .bind(key.as_str())
    .bind(holder)
    .execute(pool)
    .await;
    if let Err(error) = freed {
        tracing::warn!(
            key = key.as_str(),
            error = format!("{error:#}"),
            "could not free an idempotency key's lease; it will expire"
        );
    }
}

/// In the transaction that records an outcome: frees the lease of `key`
/// if `holder` still holds it, and says whether it did. Until the
/// transaction ends, the claim's row lock keeps others from taking the
/// lease (or reading the key as free with no payment).
async fn free_lease(
    conn: &mut PgConnection,
    key: &ChargeKey,
    holder: Uuid,
) -> anyhow::Result<bool> {
    let freed = sqlx::query(
        "UPDATE charge_claims
         SET lease_holder = NULL, lease_expires_at = NULL, version = version + 1, updated_at = now()
         WHERE charge_key = $1 AND lease_holder = $2",
    )
    .bind(key.as_str())
    .bind(holder)
    .execute(conn)
    .await
    .context("freeing the idempotency key's lease")?;
    Ok(freed.rows_affected() == 1)
}

fn intent_text(intent: &Intent) -> &'static str {
    match intent {
        Intent::Charge => "charge",
        Intent::Undo(_) => "undo",
        Intent::Capture => "capture",
        Intent::Release(_) => "release",
    }
}

/// The refund (or void) a claim records, for an undo or a release.
fn intent_refund(intent: &Intent) -> Option<&Refund> {
    match intent {
        Intent::Charge | Intent::Capture => None,
        Intent::Undo(refund) | Intent::Release(refund) => Some(refund),
    }
}

/// How a key is undone at the provider.
#[derive(Debug, Clone, Copy)]
enum Undo {
    /// RefundPayment: refund a capture, release or void the rest.
    Void,
    /// VoidPayment: release or void; never refund.
    Release,
}

/// A claim as stored.
#[derive(Debug, sqlx::FromRow)]
struct ClaimRow {
    intent: String,
    request_hash: Option<Vec<u8>>,
    refund_idempotency_key: Option<String>,
    refund_reason: Option<String>,
    lease: String,
    version: i64,
    /// By the database's clock, which decides whether a lease is live.
    lease_left_secs: Option<f64>,
}

/// A key's claim as read: what the domain decides on, the version a lease
/// may be taken from, and how long the present lease (if any) has left.
#[derive(Debug)]
struct ReadClaim {
    claim: Claim,
    version: i64,
    lease_left: Duration,
}

impl ClaimRow {
    fn into_claim(self) -> anyhow::Result<ReadClaim> {
        let refund = |key: String, reason: String| -> anyhow::Result<Refund> {
            Ok(Refund {
                key: RefundKey::parse(&key)
                    .map_err(|problem| anyhow::anyhow!("stored refund key {key:?} {problem}"))?,
                reason: RefundReason::parse(&reason)
                    .map_err(|problem| anyhow::anyhow!("stored refund reason {problem}"))?,
            })
        };
        let intent = match (
            self.intent.as_str(),
            self.refund_idempotency_key,
            self.refund_reason,
        ) {
            ("charge", _, _) => Intent::Charge,
            ("capture", _, _) => Intent::Capture,
            ("undo", Some(key), Some(reason)) => Intent::Undo(refund(key, reason)?),
            ("release", Some(key), Some(reason)) => Intent::Release(refund(key, reason)?),
            (intent, _, _) => anyhow::bail!("stored claim with intent {intent:?}"),
        };
        let lease = match self.lease.as_str() {
            "free" => Lease::Free,
            "live" => Lease::Live,
            _ => Lease::Expired,
        };
        let claim = Claim {
            intent,
            request_hash: self.request_hash.map(RequestHash::new),
            lease,
        };
        Ok(ReadClaim {
            claim,
            version: self.version,
            lease_left: Duration::from_secs_f64(self.lease_left_secs.unwrap_or(0.0).max(0.0)),
        })
    }
}

/// A payment as stored.
#[derive(Debug, sqlx::FromRow)]
struct PaymentRow {
    payment_id: Uuid,
    idempotency_key: String,
    status: String,
    request_hash: Option<Vec<u8>>,
    order_id: Option<Uuid>,
    customer_id: Option<Uuid>,
    amount_minor: Option<i64>,
    currency: Option<String>,
    decline_reason: Option<String>,
    provider_reference: Option<String>,
    created_at: DateTime<Utc>,
    refunded_at: Option<DateTime<Utc>>,
    kind: String,
    authorization_expires_at: Option<DateTime<Utc>>,
    captured_at: Option<DateTime<Utc>>,
    voided_at: Option<DateTime<Utc>>,
}

/// Columns of [`PaymentRow`], for queries that read whole rows.
macro_rules! payment_columns {
    () => {
        "payment_id, idempotency_key, status, request_hash, order_id, customer_id, amount_minor, currency, \
         decline_reason, provider_reference, created_at, refunded_at, kind, authorization_expires_at, \
         captured_at, voided_at"
    };
}
use payment_columns;

impl TryFrom<PaymentRow> for Payment {
    type Error = anyhow::Error;

    fn try_from(row: PaymentRow) -> anyhow::Result<Self> {
        let status = PaymentStatus::parse(&row.status)
            .with_context(|| format!("stored payment status {:?}", row.status))?;
        let charge = match (
            row.order_id,
            row.customer_id,
            row.amount_minor,
            row.currency,
        ) {
            (Some(order_id), Some(customer_id), Some(amount_minor), Some(currency)) => {
                let currency = Currency::parse(&currency).context("stored payment currency")?;
                Some(ChargeDetails {
                    order_id: OrderId::new(order_id),
                    customer_id: CustomerId::new(customer_id),
                    amount: Money::positive(amount_minor, currency)
                        .context("stored payment amount")?,
                })
            }
            _ => None,
        };
        Ok(Self {
            id: PaymentId::new(row.payment_id),
            charge_key: ChargeKey::parse(&row.idempotency_key).map_err(|problem| {
                anyhow::anyhow!("stored idempotency key {:?} {problem}", row.idempotency_key)
            })?,
            kind: PaymentKind::parse(&row.kind)
                .with_context(|| format!("stored payment kind {:?}", row.kind))?,
            status,
            request_hash: row.request_hash.map(RequestHash::new),
            charge,
            decline_reason: row.decline_reason,
            provider_reference: row.provider_reference,
            created_at: row.created_at,
            refunded_at: row.refunded_at,
            authorization_expires_at: row.authorization_expires_at,
            captured_at: row.captured_at,
            voided_at: row.voided_at,
        })
    }
}

/// Records a new payment: `None` if the key has one already.
async fn insert(conn: &mut PgConnection, payment: &NewPayment) -> anyhow::Result<Option<Payment>> {
    let charge = payment.charge.as_ref();
    let refund = payment.refund.as_ref();
    let row: Option<PaymentRow> = sqlx::query_as(concat!(
        "INSERT INTO payments (payment_id, idempotency_key, status, request_hash, order_id, customer_id,
                               amount_minor, currency, decline_reason, provider_reference,
                               refunded_at, refund_idempotency_key, refund_reason, kind,
                               authorization_expires_at, captured_at, voided_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, CASE WHEN $3 = 'refunded' THEN now() END, $11, $12,
                 $13, $14, CASE WHEN $13 = 'authorization' AND $3 IN ('captured', 'refunded') THEN now() END,
                 CASE WHEN $3 = 'voided' THEN now() END)
         ON CONFLICT (idempotency_key) DO NOTHING
         RETURNING ",
        payment_columns!()
    ))
    .bind(PaymentId::generate().as_uuid())
    .bind(payment.charge_key.as_str())
    .bind(payment.status.as_str())
    .bind(payment.request_hash.as_ref().map(RequestHash::as_bytes))
    .bind(charge.map(|charge| charge.order_id.as_uuid()))
    .bind(charge.map(|charge| charge.customer_id.as_uuid()))
    .bind(charge.map(|charge| charge.amount.amount_minor()))
    .bind(charge.map(|charge| charge.amount.currency().code()))
    .bind(payment.decline_reason.as_deref())
    .bind(payment.provider_reference.as_deref())
    .bind(refund.map(|refund| refund.key.as_str()))
    .bind(refund.map(|refund| refund.reason.as_str()))
    .bind(payment.kind.as_str())
    .bind(payment.authorization_expires_at)
    .fetch_optional(conn)
    .await
    .context("recording the payment")?;
    row.map(Payment::try_from).transpose()
}

/// Moves `from` on to `to`, by `refund` (the refund or void that settles
/// it), stamping the moment of the move; only from the status it was read
/// in (under its row lock).
async fn mark(
    conn: &mut PgConnection,
    from: &Payment,
    to: PaymentStatus,
    refund: Option<&Refund>,
) -> anyhow::Result<Payment> {
    let row: PaymentRow = sqlx::query_as(concat!(
        "UPDATE payments
         SET status = $3,
             refunded_at = CASE WHEN $3 = 'refunded' THEN now() ELSE refunded_at END,
             captured_at = CASE WHEN kind = 'authorization' AND $3 IN ('captured', 'refunded')
                                THEN coalesce(captured_at, now()) ELSE captured_at END,
             voided_at = CASE WHEN $3 = 'voided' THEN now() ELSE voided_at END,
             refund_idempotency_key = coalesce($4, refund_idempotency_key),
             refund_reason = coalesce($5, refund_reason)
         WHERE payment_id = $1 AND status = $2 RETURNING ",
        payment_columns!()
    ))
    .bind(from.id.as_uuid())
    .bind(from.status.as_str())
    .bind(to.as_str())
    .bind(refund.map(|refund| refund.key.as_str()))
    .bind(refund.map(|refund| refund.reason.as_str()))
    .fetch_one(conn)
    .await
    .with_context(|| format!("recording the payment {}", to.as_str()))?;
    row.try_into()
}

async fn find_by_key(
    conn: impl sqlx::PgExecutor<'_>,
    key: &ChargeKey,
    for_update: bool,
) -> anyhow::Result<Option<Payment>> {
    let query = if for_update {
        concat!(
            "SELECT ",
            payment_columns!(),
            " FROM payments WHERE idempotency_key = $1 FOR UPDATE"
        )
    } else {
        concat!(
            "SELECT ",
            payment_columns!(),
            " FROM payments WHERE idempotency_key = $1"
        )
    };
    let row: Option<PaymentRow> = sqlx::query_as(query)
        .bind(key.as_str())
        .fetch_optional(conn)
        .await
        .context("reading the payment for a key")?;
    row.map(Payment::try_from).transpose()
}

fn order_id_text(payment: &Payment) -> String {
    payment
        .charge
        .as_ref()
        .map(|charge| charge.order_id.to_string())
        .unwrap_or_default()
}

fn customer_id_text(payment: &Payment) -> String {
    payment
        .charge
        .as_ref()
        .map(|charge| charge.customer_id.to_string())
        .unwrap_or_default()
}

fn captured_event(payment: &Payment) -> pb::PaymentCaptured {
    pb::PaymentCaptured {
        payment_id: payment.id.to_string(),
        order_id: order_id_text(payment),
        customer_id: customer_id_text(payment),
        amount: money_of(payment),
        provider_reference: payment.provider_reference.clone().unwrap_or_default(),
    }
}

fn declined_event(payment: &Payment) -> pb::PaymentDeclined {
    pb::PaymentDeclined {
        payment_id: payment.id.to_string(),
        order_id: order_id_text(payment),
        customer_id: customer_id_text(payment),
        amount: money_of(payment),
        decline_reason: payment.decline_reason.clone().unwrap_or_default(),
    }
}

fn refunded_event(payment: &Payment, reason: &RefundReason) -> pb::PaymentRefunded {
    pb::PaymentRefunded {
        payment_id: payment.id.to_string(),
        order_id: order_id_text(payment),
        customer_id: customer_id_text(payment),
        amount: money_of(payment),
        reason: reason.as_str().to_owned(),
    }
}

fn authorized_event(payment: &Payment) -> pb::PaymentAuthorized {
    pb::PaymentAuthorized {
        payment_id: payment.id.to_string(),
        order_id: order_id_text(payment),
        customer_id: customer_id_text(payment),
        amount: money_of(payment),
        provider_reference: payment.provider_reference.clone().unwrap_or_default(),
        expires_at: payment
            .authorization_expires_at
            .map(|at| std::time::SystemTime::from(at).into()),
    }
}

fn voided_event(payment: &Payment, reason: &RefundReason) -> pb::PaymentVoided {
    pb::PaymentVoided {
        payment_id: payment.id.to_string(),
        order_id: order_id_text(payment),
        customer_id: customer_id_text(payment),
        amount: money_of(payment),
        reason: reason.as_str().to_owned(),
    }
}

fn expired_event(payment: &Payment) -> pb::PaymentAuthorizationExpired {
    pb::PaymentAuthorizationExpired {
        payment_id: payment.id.to_string(),
        order_id: order_id_text(payment),
        customer_id: customer_id_text(payment),
        amount: money_of(payment),
        expired_at: payment
            .authorization_expires_at
            .map(|at| std::time::SystemTime::from(at).into()),
    }
}

/// The amount of a payment, for the wire.
pub(crate) fn money_of(payment: &Payment) -> Option<api_common::v1::Money> {
    payment.charge.as_ref().map(|charge| api_common::v1::Money {
        amount_minor: charge.amount.amount_minor(),
        currency: charge.amount.currency().code().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    //! The protocol's hard cases against a real PostgreSQL, with a provider
    //! that can hold its answer back: a crash between the provider's answer
    //! and its record, a void in that very gap, a cancelled request.

    use std::str::FromStr as _;
    use std::sync::Mutex;

    use database::DatabaseSettings;
    use dev_stack::TestEnv;
    use futures::future::BoxFuture;
    use tokio::sync::oneshot;

    use super::*;
    use crate::domain::PaymentMethodToken;
    use crate::provider::{
        CaptureOutcome, ChargeOutcome, SimulatedProvider, SimulationSettings, VoidOutcome,
    };

    /// One answer held back: the provider has answered (`answered` fires),
    /// and the caller gets the answer once `release` does.
    struct Gate {
        answered: oneshot::Sender<()>,
        release: oneshot::Receiver<()>,
    }

    /// The simulation, with the next answer (of a charge or a void) held
    /// back on request.
    struct Gated {
        inner: SimulatedProvider,
        gate: Mutex<Option<Gate>>,
    }

    impl Gated {
        fn hold_next_answer(&self) -> (oneshot::Receiver<()>, oneshot::Sender<()>) {
            let (answered, on_answer) = oneshot::channel();
            let (release, on_release) = oneshot::channel();
            *self.gate.lock().unwrap() = Some(Gate {
                answered,
                release: on_release,
            });
            (on_answer, release)
        }

        async fn hold<T>(&self, answer: T) -> T {
            let gate = self.gate.lock().unwrap().take();
            if let Some(gate) = gate {
                let _ = gate.answered.send(());
                let _ = gate.release.await;
            }
            answer
        }
    }

    impl PaymentProvider for Gated {
        fn charge<'a>(
            &'a self,
            charge: &'a Charge,
        ) -> BoxFuture<'a, Result<ChargeOutcome, ProviderError>> {
            Box::pin(async move { self.hold(self.inner.charge(charge).await).await })
        }

        fn void<'a>(
            &'a self,
            charge_key: &'a str,
        ) -> BoxFuture<'a, Result<VoidOutcome, ProviderError>> {
            Box::pin(async move { self.hold(self.inner.void(charge_key).await).await })
        }

        fn release<'a>(
            &'a self,
            charge_key: &'a str,
        ) -> BoxFuture<'a, Result<VoidOutcome, ProviderError>> {
            Box::pin(async move { self.hold(self.inner.release(charge_key).await).await })
        }

        fn capture<'a>(
            &'a self,
            charge_key: &'a str,
        ) -> BoxFuture<'a, Result<CaptureOutcome, ProviderError>> {
            Box::pin(async move { self.hold(self.inner.capture(charge_key).await).await })
        }
    }

    struct Setup {
        payments: Payments,
        provider: Arc<Gated>,
        pool: PgPool,
    }

    async fn setup(leases: Leases, slow_delay: Duration) -> Setup {
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
        database::migrate(&pool, &[messaging::MIGRATIONS, crate::MIGRATIONS])
            .await
            .unwrap();
        let provider = Arc::new(Gated {
            inner: SimulatedProvider::new(
                pool.clone(),
                SimulationSettings {
                    amount_limit_minor: 1_000_000,
                    slow_delay,
                    flaky_failures: 2,
                    authorization_lifetime: Duration::from_secs(3600),
                },
            ),
            gate: Mutex::new(None),
        });
        let payments = Payments::new(
            pool.clone(),
            provider.clone(),
            &Topics::new("test.".to_owned()),
            leases,
        );
        tokio::spawn(
            payments
                .lease_watch()
                .run(pool.clone(), tokio_util::sync::CancellationToken::new()),
        );
        Setup {
            payments,
            provider,
            pool,
        }
    }

    const SHORT: Leases = Leases {
        call_limit: Duration::from_millis(300),
        lease: Duration::from_millis(600),
    };
    const LONG: Leases = Leases {
        call_limit: Duration::from_secs(20),
        lease: Duration::from_secs(30),
    };

    fn request(key: &str, token: &str) -> ChargeRequest {
        ChargeRequest {
            key: ChargeKey::parse(key).unwrap(),
            kind: PaymentKind::Charge,
            details: ChargeDetails {
                order_id: OrderId::new(Uuid::new_v4()),
                customer_id: CustomerId::new(Uuid::new_v4()),
                amount: Money::positive(1500, Currency::parse("EUR").unwrap()).unwrap(),
            },
            payment_method: PaymentMethodToken::parse(token).unwrap(),
            request_hash: RequestHash::new(key.as_bytes().to_vec()),
        }
    }

    fn by_key(key: &str) -> (RefundTarget, Refund) {
        (
            RefundTarget::ChargeKey(ChargeKey::parse(key).unwrap()),
            Refund {
                key: RefundKey::parse(&format!("undo-{key}")).unwrap(),
                reason: RefundReason::parse("saga compensation").unwrap(),
            },
        )
    }

    /// What the provider holds of the order's money, and how often it was
    /// asked to charge under the key.
    async fn at_provider(pool: &PgPool, request: &ChargeRequest) -> (i64, i32) {
        let held: Option<i64> = sqlx::query_scalar(
            "SELECT held_minor FROM simulated_provider_holdings WHERE order_id = $1",
        )
        .bind(request.details.order_id.as_uuid())
        .fetch_optional(pool)
        .await
        .unwrap();
        let attempts: Option<i32> = sqlx::query_scalar(
            "SELECT attempts FROM simulated_provider_charges WHERE idempotency_key = $1",
        )
        .bind(request.key.as_str())
        .fetch_optional(pool)
        .await
        .unwrap();
        (held.unwrap_or(0), attempts.unwrap_or(0))
    }

    async fn count(pool: &PgPool, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(pool)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_crash_after_the_provider_charged_is_resolved_by_a_retry_without_a_second_charge() {
        let Setup {
            payments,
            provider,
            pool,
        } = setup(SHORT, Duration::ZERO).await;
        let charge = request("crash", "tok_visa");

        // The provider captures; before we record it, the process "dies":
        // the request's future is leaked, so not even its drop guard runs,
        // and its lease stays until it expires.
        let (answered, _release) = provider.hold_next_answer();
        let mut first = Box::pin(payments.process(&charge));
        tokio::select! {
            _ = &mut first => panic!("the held answer was recorded"),
            _ = answered => {}
        }
        std::mem::forget(first);
        assert_eq!(at_provider(&pool, &charge).await, (1500, 1));
        assert_eq!(count(&pool, "SELECT count(*) FROM payments").await, 0);

        // The retry waits out the lease, asks the provider again under the
        // key, and records the first capture: the provider charged once.
        let started = std::time::Instant::now();
        let retried = payments.process(&charge).await.unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "it waited for the lease"
        );
        assert_eq!(retried.status, PaymentStatus::Captured);
        assert_eq!(at_provider(&pool, &charge).await, (1500, 2));
        assert_eq!(count(&pool, "SELECT count(*) FROM payments").await, 1);
        assert_eq!(payments.process(&charge).await.unwrap(), retried);
        assert_eq!(
            at_provider(&pool, &charge).await,
            (1500, 2),
            "answered from our record"
        );
        assert_eq!(count(&pool, "SELECT count(*) FROM outbox").await, 1);
    }

    #[tokio::test]
    async fn a_void_between_the_capture_and_its_record_refunds_it_and_the_charge_answers_with_that()
    {
        let Setup {
            payments,
            provider,
            pool,
        } = setup(LONG, Duration::ZERO).await;
        let charge = request("gap", "tok_visa");
        let (answered, release) = provider.hold_next_answer();
        let charging = {
            let (payments, charge) = (payments.clone(), charge.clone());
            tokio::spawn(async move { payments.process(&charge).await })
        };
        answered.await.unwrap();
        assert_eq!(at_provider(&pool, &charge).await.0, 1500);

        // The void takes the lease from the charge in flight and finds the
        // capture: refunded, and recorded as captured and refunded.
        let (target, refund) = by_key("gap");
        let undone = payments.refund(&target, &refund).await.unwrap();
        assert_eq!(undone.status, PaymentStatus::Refunded);
        assert_eq!(at_provider(&pool, &charge).await.0, 0);

        // The charge's answer arrives late: it records nothing and answers
        // with the refund.
        release.send(()).unwrap();
        let answer = charging.await.unwrap().unwrap();
        assert_eq!(answer, undone);
        assert_eq!(count(&pool, "SELECT count(*) FROM payments").await, 1);
        assert_eq!(at_provider(&pool, &charge).await, (0, 1));
        // One capture and one refund announced, no more.
        assert_eq!(count(&pool, "SELECT count(*) FROM outbox").await, 2);
        assert_eq!(payments.process(&charge).await.unwrap(), undone);
        assert_eq!(at_provider(&pool, &charge).await, (0, 1));
    }

    #[tokio::test]
    async fn a_void_while_the_provider_decides_wins_and_the_late_charge_holds_nothing() {
        let Setup { payments, pool, .. } = setup(LONG, Duration::from_millis(800)).await;
        let charge = request("slow", "tok_slow");
        let charging = {
            let (payments, charge) = (payments.clone(), charge.clone());
            tokio::spawn(async move { payments.process(&charge).await })
        };
        // The charge is at the provider, deciding.
        while at_provider(&pool, &charge).await.1 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (target, refund) = by_key("slow");
        let voided = payments.refund(&target, &refund).await.unwrap();
        assert_eq!(voided.status, PaymentStatus::Voided);
        let late = charging.await.unwrap().unwrap();
        assert_eq!(late, voided, "the late charge answers with the void");
        assert_eq!(at_provider(&pool, &charge).await, (0, 1));
        assert_eq!(count(&pool, "SELECT count(*) FROM payments").await, 1);
        assert_eq!(count(&pool, "SELECT count(*) FROM outbox").await, 0);
    }

    #[tokio::test]
    async fn a_void_left_unfinished_by_a_crash_is_finished_by_the_next_charge_which_charges_nothing()
     {
        let Setup {
            payments,
            provider,
            pool,
        } = setup(SHORT, Duration::ZERO).await;
        let charge = request("void-crash", "tok_visa");
        let (answered, _release) = provider.hold_next_answer();
        let (target, refund) = by_key("void-crash");
        let mut voiding = Box::pin(payments.refund(&target, &refund));
        tokio::select! {
            _ = &mut voiding => panic!("the held answer was recorded"),
            _ = answered => {}
        }
        std::mem::forget(voiding);

        let answer = payments.process(&charge).await.unwrap();
        assert_eq!(answer.status, PaymentStatus::Voided);
        assert_eq!(
            at_provider(&pool, &charge).await,
            (0, 0),
            "never asked to charge"
        );
        assert_eq!(payments.refund(&target, &refund).await.unwrap(), answer);
    }

    #[tokio::test]
    async fn a_cancelled_charge_frees_its_lease_so_a_retry_need_not_wait_for_it() {
        let Setup {
            payments,
            pool,
            provider,
        } = setup(LONG, Duration::from_millis(50)).await;
        let charge = request("cancelled", "tok_slow");
        let (answered, _release) = provider.hold_next_answer();
        {
            let first = payments.process(&charge);
            tokio::pin!(first);
            tokio::select! {
                _ = &mut first => panic!("a held answer was recorded"),
                // The provider charged; its answer is held back.
                _ = answered => {}
            }
        } // The request goes away holding the lease, its answer unrecorded.
        let started = std::time::Instant::now();
        let retried = payments.process(&charge).await.unwrap();
        assert_eq!(retried.status, PaymentStatus::Captured);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "waited {:?} for a lease of 30 s",
            started.elapsed()
        );
        assert_eq!(at_provider(&pool, &charge).await, (1500, 2));
    }

    #[tokio::test]
    async fn a_provider_that_does_not_answer_in_time_frees_the_lease_and_fails_retryably() {
        let Setup { payments, pool, .. } = setup(SHORT, Duration::from_secs(2)).await;
        let charge = request("too-slow", "tok_slow");
        let error = payments.process(&charge).await.unwrap_err();
        assert!(
            matches!(error, ProcessError::Provider(ProviderError::Transient(_))),
            "{error:?}"
        );
        assert_eq!(
            count(
                &pool,
                "SELECT count(*) FROM charge_claims WHERE lease_holder IS NOT NULL"
            )
            .await,
            0
        );
    }
}
