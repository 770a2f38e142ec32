//! A payment, and what a provider's answer makes of one.

use chrono::{DateTime, Utc};
use money::Money;

use super::values::{
    ChargeKey, CustomerId, OrderId, PaymentId, PaymentMethodToken, RefundKey, RefundReason,
    RequestHash,
};
use crate::provider::{ChargeOutcome, VoidOutcome};

/// Where a payment stands. An authorization moves on to a capture, a void
/// or its expiry; a capture (of a charge or an authorization) to a refund;
/// the rest are final. `crate::domain::authorization` has the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum PaymentStatus {
    /// The amount is held on the payment method, not taken.
    Authorized,
    /// The amount was charged.
    Captured,
    /// The provider refused; nothing was charged.
    Declined,
    /// The charge was paid back in full.
    Refunded,
    /// Nothing was charged and nothing is held: the key was voided before
    /// anything was charged under it, or the authorization was released.
    Voided,
    /// The authorization lapsed uncaptured: nothing is held.
    Expired,
}

impl PaymentStatus {
    pub(crate) const ALL: [Self; 6] = [
        Self::Authorized,
        Self::Captured,
        Self::Declined,
        Self::Refunded,
        Self::Voided,
        Self::Expired,
    ];

    /// The stored form (the `payments.status` column).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Authorized => "authorized",
            Self::Captured => "captured",
            Self::Declined => "declined",
            Self::Refunded => "refunded",
            Self::Voided => "voided",
            Self::Expired => "expired",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == text)
    }
}

impl std::fmt::Display for PaymentStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a payment is: a charge (ProcessPayment), authorized and captured at
/// once, or an authorization (AuthorizePayment), captured or voided later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum PaymentKind {
    Charge,
    Authorization,
}

impl PaymentKind {
    /// The stored form (the `kind` columns).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Charge => "charge",
            Self::Authorization => "authorization",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Self> {
        [Self::Charge, Self::Authorization]
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }
}

/// What a charge is for: the amount, the order and the customer. What we
/// record of a payment, and what the provider remembers of a charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChargeDetails {
    pub(crate) order_id: OrderId,
    pub(crate) customer_id: CustomerId,
    pub(crate) amount: Money,
}

/// A charge or an authorization as asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChargeRequest {
    pub(crate) key: ChargeKey,
    pub(crate) kind: PaymentKind,
    pub(crate) details: ChargeDetails,
    pub(crate) payment_method: PaymentMethodToken,
    pub(crate) request_hash: RequestHash,
}

/// A refund as asked for: undo a capture, or void a charge not made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refund {
    pub(crate) key: RefundKey,
    pub(crate) reason: RefundReason,
}

/// A payment as recorded: the settled outcome of one charge key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Payment {
    pub(crate) id: PaymentId,
    pub(crate) charge_key: ChargeKey,
    pub(crate) kind: PaymentKind,
    /// As recorded; [`Payment::status_at`] is what it is at a given moment
    /// (an authorization past its expiry has lapsed, recorded or not).
    pub(crate) status: PaymentStatus,
    /// Empty when the payment was settled by a void of its key before any
    /// request was seen: what the provider said then stands, whatever a
    /// later request is.
    pub(crate) request_hash: Option<RequestHash>,
    /// Empty only for a voided key.
    pub(crate) charge: Option<ChargeDetails>,
    pub(crate) decline_reason: Option<String>,
    pub(crate) provider_reference: Option<String>,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) refunded_at: Option<DateTime<Utc>>,
    /// When an authorization lapses unless captured.
    pub(crate) authorization_expires_at: Option<DateTime<Utc>>,
    pub(crate) captured_at: Option<DateTime<Utc>>,
    pub(crate) voided_at: Option<DateTime<Utc>>,
}

/// A charge key was used before with another request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", service_runtime::status::KEY_REUSED)]
pub(crate) struct KeyReused;

/// A refund of a payment that took no money: declined, or only authorized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NothingToRefund {
    #[error("the payment was declined; there is nothing to refund")]
    Declined,
    #[error("the payment is authorized, not captured: there is nothing to refund; void it instead")]
    OnlyAuthorized,
}

impl Payment {
    /// What a charge request with this payment's key gets: this payment,
    /// unless the key was used with another request.
    pub(crate) fn answer_charge(&self, request_hash: &RequestHash) -> Result<(), KeyReused> {
        match &self.request_hash {
            Some(hash) if hash != request_hash => Err(KeyReused),
            _ => Ok(()),
        }
    }

    /// Whether a refund by payment id may go ahead: a declined payment has
    /// nothing to refund, nor has an authorization not captured (a void
    /// releases it); a refunded, voided or expired one answers with itself.
    pub(crate) fn check_refundable(&self) -> Result<(), NothingToRefund> {
        match self.status {
            PaymentStatus::Declined => Err(NothingToRefund::Declined),
            PaymentStatus::Authorized => Err(NothingToRefund::OnlyAuthorized),
            PaymentStatus::Captured
            | PaymentStatus::Refunded
            | PaymentStatus::Voided
            | PaymentStatus::Expired => Ok(()),
        }
    }

    /// The status at `now`: an authorization past its expiry has lapsed at
    /// the provider, even before anyone recorded it.
    pub(crate) fn status_at(&self, now: DateTime<Utc>) -> PaymentStatus {
        match (self.status, self.authorization_expires_at) {
            (PaymentStatus::Authorized, Some(expires_at)) if expires_at <= now => {
                PaymentStatus::Expired
            }
            (status, _) => status,
        }
    }
}

/// A payment to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NewPayment {
    pub(crate) charge_key: ChargeKey,
    pub(crate) kind: PaymentKind,
    pub(crate) status: PaymentStatus,
    pub(crate) request_hash: Option<RequestHash>,
    pub(crate) charge: Option<ChargeDetails>,
    pub(crate) decline_reason: Option<String>,
    pub(crate) provider_reference: Option<String>,
    /// The refund (or void) that settled it, when it is refunded or voided.
    pub(crate) refund: Option<Refund>,
    pub(crate) authorization_expires_at: Option<DateTime<Utc>>,
}

/// What happened to a payment, for the payment events topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PaymentEvent {
    Authorized,
    Captured,
    Declined,
    Refunded {
        reason: RefundReason,
    },
    /// An authorization was released.
    Voided {
        reason: RefundReason,
    },
    /// An authorization lapsed uncaptured.
    Expired,
}

/// What the provider's answer to a charge is recorded as.
pub(crate) fn charged(
    request: &ChargeRequest,
    outcome: &ChargeOutcome,
) -> (NewPayment, Vec<PaymentEvent>) {
    let (status, decline_reason, provider_reference, expires_at, event) = match outcome {
        ChargeOutcome::Captured { reference } => (
            PaymentStatus::Captured,
            None,
            Some(reference.clone()),
            None,
            PaymentEvent::Captured,
        ),
        ChargeOutcome::Authorized {
            reference,
            expires_at,
        } => (
            PaymentStatus::Authorized,
            None,
            Some(reference.clone()),
            Some(*expires_at),
            PaymentEvent::Authorized,
        ),
        ChargeOutcome::Declined(reason) => (
            PaymentStatus::Declined,
            Some(reason.as_str().to_owned()),
            None,
            None,
            PaymentEvent::Declined,
        ),
    };
    let payment = NewPayment {
        charge_key: request.key.clone(),
        kind: request.kind,
        status,
        request_hash: Some(request.request_hash.clone()),
        charge: Some(request.details.clone()),
        decline_reason,
        provider_reference,
        refund: None,
        authorization_expires_at: expires_at,
    };
    (payment, vec![event])
}

/// What the provider's answer to a void (or a release, or a capture) of a
/// key means for the key's payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settlement {
    /// We had no payment for the key: record this one.
    Record(NewPayment, Vec<PaymentEvent>),
    /// Our payment moves on to `to` (from the status it was read in), by
    /// `refund` when it is refunded or voided.
    Moved {
        to: PaymentStatus,
        refund: Option<Refund>,
        events: Vec<PaymentEvent>,
    },
    /// The payment is final already (or the provider agrees with it); it
    /// stands.
    Stands,
}

/// The provider's books and ours disagree: it holds no capture for a
/// payment we recorded as captured, or no authorization for one we
/// recorded as authorized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the provider disagrees with {status} payment {payment_id}: {outcome}")]
pub(crate) struct ProviderDisagrees {
    pub(crate) payment_id: PaymentId,
    pub(crate) status: PaymentStatus,
    pub(crate) outcome: String,
}

impl ProviderDisagrees {
    pub(crate) fn new(payment: &Payment, outcome: &impl std::fmt::Debug) -> Self {
        Self {
            payment_id: payment.id,
            status: payment.status,
            outcome: format!("{outcome:?}"),
        }
    }
}

/// What a void of `key`, asked for by `refund` (a RefundPayment's, or a
/// VoidPayment's, which asks the provider to release and never to refund)
/// settles, given the payment we have for the key (if any). `kind` is what
/// the asker took the key for.
///
/// Without a payment, what the provider says is recorded: nothing charged
/// (voided for good), a decline, a capture whose answer was lost, now
/// refunded (recorded as both, so the ledger shows the money that moved and
/// came back), or an authorization whose answer was lost, now released or
/// lapsed (recorded as authorized and then so). With a payment, the
/// provider's answer must be one its status can move to.
pub(crate) fn voided(
    key: &ChargeKey,
    kind: PaymentKind,
    existing: Option<&Payment>,
    refund: &Refund,
    outcome: VoidOutcome,
) -> Result<Settlement, ProviderDisagrees> {
    let Some(payment) = existing else {
        return Ok(first_record(key, kind, refund, outcome));
    };
    let moved = |to, refund: Option<&Refund>, events| {
        Ok(Settlement::Moved {
            to,
            refund: refund.cloned(),
            events,
        })
    };
    let refunded = || PaymentEvent::Refunded {
        reason: refund.reason.clone(),
    };
    match (payment.status, outcome) {
        (PaymentStatus::Captured, VoidOutcome::Refunded { .. }) => {
            moved(PaymentStatus::Refunded, Some(refund), vec![refunded()])
        }
        // A release finds the capture we know of: nothing to change.
        (PaymentStatus::Captured, VoidOutcome::Captured { .. }) => Ok(Settlement::Stands),
        (PaymentStatus::Authorized, VoidOutcome::Released { .. }) => moved(
            PaymentStatus::Voided,
            Some(refund),
            vec![PaymentEvent::Voided {
                reason: refund.reason.clone(),
            }],
        ),
        (PaymentStatus::Authorized, VoidOutcome::Expired { .. }) => {
            moved(PaymentStatus::Expired, None, vec![PaymentEvent::Expired])
        }
        // A capture whose answer was lost: recorded now, and refunded if a
        // refund asked.
        (PaymentStatus::Authorized, VoidOutcome::Captured { .. }) => {
            moved(PaymentStatus::Captured, None, vec![PaymentEvent::Captured])
        }
        (PaymentStatus::Authorized, VoidOutcome::Refunded { .. }) => moved(
            PaymentStatus::Refunded,
            Some(refund),
            vec![PaymentEvent::Captured, refunded()],
        ),
        (PaymentStatus::Captured | PaymentStatus::Authorized, outcome) => {
            Err(ProviderDisagrees::new(payment, &outcome))
        }
        (
            PaymentStatus::Declined
            | PaymentStatus::Refunded
            | PaymentStatus::Voided
            | PaymentStatus::Expired,
            _,
        ) => Ok(Settlement::Stands),
    }
}

/// The first record of a key that a void found at the provider.
fn first_record(
    key: &ChargeKey,
    kind: PaymentKind,
    refund: &Refund,
    outcome: VoidOutcome,
) -> Settlement {
    let record =
        |kind, status, charge, reference, expires_at, refund: Option<&Refund>| NewPayment {
            charge_key: key.clone(),
            kind,
            status,
            request_hash: None,
            charge,
            decline_reason: None,
            provider_reference: reference,
            refund: refund.cloned(),
            authorization_expires_at: expires_at,
        };
    match outcome {
        VoidOutcome::Voided => Settlement::Record(
            record(kind, PaymentStatus::Voided, None, None, None, Some(refund)),
            vec![],
        ),
        VoidOutcome::Declined {
            reason,
            charge,
            kind,
        } => Settlement::Record(
            NewPayment {
                decline_reason: Some(reason.as_str().to_owned()),
                ..record(
                    kind,
                    PaymentStatus::Declined,
                    Some(charge),
                    None,
                    None,
                    None,
                )
            },
            vec![PaymentEvent::Declined],
        ),
        VoidOutcome::Refunded {
            reference,
            charge,
            kind,
        } => Settlement::Record(
            record(
                kind,
                PaymentStatus::Refunded,
                Some(charge),
                Some(reference),
                None,
                Some(refund),
            ),
            vec![
                PaymentEvent::Captured,
                PaymentEvent::Refunded {
                    reason: refund.reason.clone(),
                },
            ],
        ),
        VoidOutcome::Captured {
            reference,
            charge,
            kind,
        } => Settlement::Record(
            record(
                kind,
                PaymentStatus::Captured,
                Some(charge),
                Some(reference),
                None,
                None,
            ),
            vec![PaymentEvent::Captured],
        ),
        VoidOutcome::Released {
            reference,
            charge,
            expires_at,
        } => Settlement::Record(
            record(
                PaymentKind::Authorization,
                PaymentStatus::Voided,
                Some(charge),
                Some(reference),
                Some(expires_at),
                Some(refund),
            ),
            vec![
                PaymentEvent::Authorized,
                PaymentEvent::Voided {
                    reason: refund.reason.clone(),
                },
            ],
        ),
        VoidOutcome::Expired {
            reference,
            charge,
            expires_at,
        } => Settlement::Record(
            record(
                PaymentKind::Authorization,
                PaymentStatus::Expired,
                Some(charge),
                Some(reference),
                Some(expires_at),
                None,
            ),
            vec![PaymentEvent::Authorized, PaymentEvent::Expired],
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{authorization, details, key, payment, refund, request};
    use super::*;
    use crate::provider::DeclineReason;

    #[test]
    fn a_status_is_stored_by_name() {
        for status in PaymentStatus::ALL {
            assert_eq!(PaymentStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(PaymentStatus::parse("pending"), None);
    }

    #[test]
    fn a_capture_is_recorded_with_its_reference_and_announced() {
        let (payment, events) = charged(
            &request(1),
            &ChargeOutcome::Captured {
                reference: "sim_ch_1".into(),
            },
        );
        assert_eq!(
            payment,
            NewPayment {
                charge_key: key(),
                kind: PaymentKind::Charge,
                status: PaymentStatus::Captured,
                request_hash: Some(request(1).request_hash),
                charge: Some(details()),
                decline_reason: None,
                provider_reference: Some("sim_ch_1".into()),
                refund: None,
                authorization_expires_at: None,
            }
        );
        assert_eq!(events, vec![PaymentEvent::Captured]);
    }

    #[test]
    fn a_decline_is_a_result_recorded_with_its_reason() {
        let (payment, events) = charged(
            &request(1),
            &ChargeOutcome::Declined(DeclineReason::InsufficientFunds),
        );
        assert_eq!(payment.status, PaymentStatus::Declined);
        assert_eq!(
            payment.decline_reason.as_deref(),
            Some("insufficient_funds")
        );
        assert_eq!(payment.charge, Some(details()));
        assert_eq!(events, vec![PaymentEvent::Declined]);
    }

    #[test]
    fn a_void_of_a_key_never_charged_records_it_voided_for_good() {
        let Ok(Settlement::Record(payment, events)) = voided(
            &key(),
            PaymentKind::Charge,
            None,
            &refund(1),
            VoidOutcome::Voided,
        ) else {
            panic!("not recorded");
        };
        assert_eq!(
            (
                payment.status,
                payment.charge,
                payment.refund,
                payment.request_hash
            ),
            (PaymentStatus::Voided, None, Some(refund(1)), None)
        );
        assert!(events.is_empty(), "no money moved: nothing to announce");
    }

    #[test]
    fn a_void_that_finds_a_lost_capture_records_it_captured_and_refunded() {
        let outcome = VoidOutcome::Refunded {
            reference: "sim_ch_9".into(),
            charge: details(),
            kind: PaymentKind::Charge,
        };
        let Ok(Settlement::Record(payment, events)) =
            voided(&key(), PaymentKind::Charge, None, &refund(1), outcome)
        else {
            panic!("not recorded");
        };
        assert_eq!(payment.status, PaymentStatus::Refunded);
        assert_eq!(payment.charge, Some(details()));
        assert_eq!(payment.provider_reference.as_deref(), Some("sim_ch_9"));
        assert_eq!(
            events,
            vec![
                PaymentEvent::Captured,
                PaymentEvent::Refunded {
                    reason: refund(1).reason
                }
            ]
        );
    }

    #[test]
    fn a_void_that_finds_a_decline_records_the_decline() {
        let outcome = VoidOutcome::Declined {
            reason: DeclineReason::CardDeclined,
            charge: details(),
            kind: PaymentKind::Charge,
        };
        let Ok(Settlement::Record(payment, events)) =
            voided(&key(), PaymentKind::Charge, None, &refund(1), outcome)
        else {
            panic!("not recorded");
        };
        assert_eq!(
            (
                payment.status,
                payment.decline_reason.as_deref(),
                payment.refund
            ),
            (PaymentStatus::Declined, Some("card_declined"), None)
        );
        assert_eq!(events, vec![PaymentEvent::Declined]);
    }

    #[test]
    fn a_captured_payment_is_refunded_once_and_announced_once() {
        let captured = payment(PaymentStatus::Captured, Some(1));
        let outcome = VoidOutcome::Refunded {
            reference: "sim_ch_1".into(),
            charge: details(),
            kind: PaymentKind::Charge,
        };
        assert_eq!(
            voided(
                &key(),
                PaymentKind::Charge,
                Some(&captured),
                &refund(1),
                outcome.clone()
            ),
            Ok(Settlement::Moved {
                to: PaymentStatus::Refunded,
                refund: Some(refund(1)),
                events: vec![PaymentEvent::Refunded {
                    reason: refund(1).reason
                }],
            })
        );
        // Asked again, once it is refunded: it stands, nothing is announced.
        let refunded = payment(PaymentStatus::Refunded, Some(1));
        assert_eq!(
            voided(
                &key(),
                PaymentKind::Charge,
                Some(&refunded),
                &refund(2),
                outcome
            ),
            Ok(Settlement::Stands)
        );
    }

    #[test]
    fn a_final_payment_stands_whatever_the_provider_says() {
        for status in [
            PaymentStatus::Declined,
            PaymentStatus::Refunded,
            PaymentStatus::Voided,
        ] {
            assert_eq!(
                voided(
                    &key(),
                    PaymentKind::Charge,
                    Some(&payment(status, None)),
                    &refund(1),
                    VoidOutcome::Voided
                ),
                Ok(Settlement::Stands)
            );
        }
    }

    #[test]
    fn a_captured_payment_the_provider_does_not_hold_is_an_error_not_a_guess() {
        let captured = payment(PaymentStatus::Captured, Some(1));
        assert_eq!(
            voided(
                &key(),
                PaymentKind::Charge,
                Some(&captured),
                &refund(1),
                VoidOutcome::Voided
            ),
            Err(ProviderDisagrees::new(&captured, &VoidOutcome::Voided))
        );
    }

    #[test]
    fn a_repeat_charge_gets_the_payment_unless_its_request_differs() {
        let paid = payment(PaymentStatus::Captured, Some(1));
        assert_eq!(paid.answer_charge(&request(1).request_hash), Ok(()));
        assert_eq!(paid.answer_charge(&request(2).request_hash), Err(KeyReused));
        let voided = payment(PaymentStatus::Voided, None);
        assert_eq!(voided.answer_charge(&request(2).request_hash), Ok(()));
    }

    #[test]
    fn only_a_declined_payment_has_nothing_to_refund() {
        assert_eq!(
            payment(PaymentStatus::Declined, Some(1)).check_refundable(),
            Err(NothingToRefund::Declined)
        );
        assert_eq!(
            authorization(PaymentStatus::Authorized).check_refundable(),
            Err(NothingToRefund::OnlyAuthorized)
        );
        for status in [
            PaymentStatus::Captured,
            PaymentStatus::Refunded,
            PaymentStatus::Voided,
            PaymentStatus::Expired,
        ] {
            assert_eq!(payment(status, Some(1)).check_refundable(), Ok(()));
        }
    }

    fn released() -> VoidOutcome {
        VoidOutcome::Released {
            reference: "sim_au_1".into(),
            charge: details(),
            expires_at: authorization(PaymentStatus::Authorized)
                .authorization_expires_at
                .unwrap(),
        }
    }

    #[test]
    fn an_approved_authorization_is_recorded_held_until_its_expiry_and_announced() {
        let expires_at = authorization(PaymentStatus::Authorized)
            .authorization_expires_at
            .unwrap();
        let asked = ChargeRequest {
            kind: PaymentKind::Authorization,
            ..request(1)
        };
        let (payment, events) = charged(
            &asked,
            &ChargeOutcome::Authorized {
                reference: "sim_au_1".into(),
                expires_at,
            },
        );
        assert_eq!(
            (
                payment.kind,
                payment.status,
                payment.authorization_expires_at
            ),
            (
                PaymentKind::Authorization,
                PaymentStatus::Authorized,
                Some(expires_at)
            )
        );
        assert_eq!(events, vec![PaymentEvent::Authorized]);
    }

    #[test]
    fn a_void_releases_an_authorization_once_and_announces_it() {
        let held = authorization(PaymentStatus::Authorized);
        assert_eq!(
            voided(
                &key(),
                PaymentKind::Authorization,
                Some(&held),
                &refund(1),
                released()
            ),
            Ok(Settlement::Moved {
                to: PaymentStatus::Voided,
                refund: Some(refund(1)),
                events: vec![PaymentEvent::Voided {
                    reason: refund(1).reason
                }],
            })
        );
        let voided_once = authorization(PaymentStatus::Voided);
        assert_eq!(
            voided(
                &key(),
                PaymentKind::Authorization,
                Some(&voided_once),
                &refund(2),
                released()
            ),
            Ok(Settlement::Stands)
        );
    }

    #[test]
    fn a_void_that_finds_an_authorization_lost_or_lapsed_records_it_with_both_events() {
        let Ok(Settlement::Record(payment, events)) = voided(
            &key(),
            PaymentKind::Authorization,
            None,
            &refund(1),
            released(),
        ) else {
            panic!("not recorded");
        };
        assert_eq!(
            (payment.kind, payment.status, payment.charge),
            (
                PaymentKind::Authorization,
                PaymentStatus::Voided,
                Some(details())
            )
        );
        assert_eq!(
            events,
            vec![
                PaymentEvent::Authorized,
                PaymentEvent::Voided {
                    reason: refund(1).reason
                }
            ]
        );
        let lapsed = VoidOutcome::Expired {
            reference: "sim_au_1".into(),
            charge: details(),
            expires_at: authorization(PaymentStatus::Authorized)
                .authorization_expires_at
                .unwrap(),
        };
        let Ok(Settlement::Record(payment, events)) = voided(
            &key(),
            PaymentKind::Authorization,
            None,
            &refund(1),
            lapsed.clone(),
        ) else {
            panic!("not recorded");
        };
        assert_eq!(payment.status, PaymentStatus::Expired);
        assert_eq!(
            events,
            vec![PaymentEvent::Authorized, PaymentEvent::Expired]
        );
        // Held as we know it, lapsed at the provider: recorded expired.
        let held = authorization(PaymentStatus::Authorized);
        assert_eq!(
            voided(
                &key(),
                PaymentKind::Authorization,
                Some(&held),
                &refund(1),
                lapsed
            ),
            Ok(Settlement::Moved {
                to: PaymentStatus::Expired,
                refund: None,
                events: vec![PaymentEvent::Expired],
            })
        );
    }

    #[test]
    fn a_release_that_finds_a_capture_records_it_and_refunds_nothing() {
        let taken = VoidOutcome::Captured {
            reference: "sim_au_1".into(),
            charge: details(),
            kind: PaymentKind::Authorization,
        };
        let held = authorization(PaymentStatus::Authorized);
        assert_eq!(
            voided(
                &key(),
                PaymentKind::Authorization,
                Some(&held),
                &refund(1),
                taken.clone()
            ),
            Ok(Settlement::Moved {
                to: PaymentStatus::Captured,
                refund: None,
                events: vec![PaymentEvent::Captured],
            })
        );
        let captured = authorization(PaymentStatus::Captured);
        assert_eq!(
            voided(
                &key(),
                PaymentKind::Authorization,
                Some(&captured),
                &refund(1),
                taken
            ),
            Ok(Settlement::Stands)
        );
    }

    #[test]
    fn an_authorization_the_provider_does_not_hold_is_an_error_not_a_guess() {
        let held = authorization(PaymentStatus::Authorized);
        assert!(
            voided(
                &key(),
                PaymentKind::Authorization,
                Some(&held),
                &refund(1),
                VoidOutcome::Voided
            )
            .is_err()
        );
    }
}
