//! The rules of authorizations: an amount held on a payment method, then
//! captured in full, voided, or lapsed at the provider.
//!
//! ```text
//! authorized ──capture──▶ captured ──refund──▶ refunded
//!     │ ──void──▶ voided
//!     └ ──its expiry passes──▶ expired
//! ```
//!
//! Each request first asks [`check_capture`] or [`check_void`] of the
//! payment as read: answer with it, refuse, or go to the provider (through
//! the key's claim, as a charge does). What the provider says of a capture
//! becomes a [`Settlement`] in [`captured`]; of a void, in
//! [`super::voided`]. The request then asks again of the payment as
//! recorded, so that a race it lost (a void before its capture) is refused
//! or answered as if it had come second.

use chrono::{DateTime, Utc};

use super::payment::{
    Payment, PaymentEvent, PaymentKind, PaymentStatus, ProviderDisagrees, Settlement,
};
use super::values::RefundReason;
use crate::provider::CaptureOutcome;

/// What a capture or a void does with the payment as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// It is done already: answer with the payment.
    Answer,
    /// Ask the provider.
    Call,
}

/// Why an authorization cannot be captured: each definite, so retrying does
/// not help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CaptureRefused {
    #[error(
        "the payment is a charge (ProcessPayment), not an authorization; it was captured when made"
    )]
    NotAnAuthorization,
    #[error("the authorization expired at {0}; nothing was captured")]
    Expired(DateTime<Utc>),
    #[error("the authorization was voided; nothing was captured")]
    Voided,
    #[error("the authorization was declined ({0}); there is nothing to capture")]
    Declined(String),
}

/// Why a payment cannot be voided.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum VoidRefused {
    #[error("the payment is {0}: its money was taken; refund it instead")]
    Taken(PaymentStatus),
}

/// Whether a capture of `payment` goes to the provider, at `now`.
///
/// An authorization is captured once: a captured one (refunded since, or
/// not) answers with itself. One that our clock says has lapsed still goes
/// to the provider, whose clock decides; its answer records the expiry.
pub(crate) fn check_capture(payment: &Payment) -> Result<Next, CaptureRefused> {
    if payment.kind == PaymentKind::Charge {
        return Err(CaptureRefused::NotAnAuthorization);
    }
    match payment.status {
        PaymentStatus::Authorized => Ok(Next::Call),
        PaymentStatus::Captured | PaymentStatus::Refunded => Ok(Next::Answer),
        PaymentStatus::Voided => Err(CaptureRefused::Voided),
        PaymentStatus::Expired => Err(CaptureRefused::Expired(
            payment
                .authorization_expires_at
                .unwrap_or(payment.created_at),
        )),
        PaymentStatus::Declined => Err(CaptureRefused::Declined(
            payment.decline_reason.clone().unwrap_or_default(),
        )),
    }
}

/// Whether a void of `payment` goes to the provider.
///
/// A void only ever releases: a payment whose money was taken (captured,
/// or refunded since) is refused, for a refund is what undoes it. One that
/// holds nothing (voided, expired, declined) answers with itself.
pub(crate) fn check_void(payment: &Payment) -> Result<Next, VoidRefused> {
    match payment.status {
        PaymentStatus::Authorized => Ok(Next::Call),
        PaymentStatus::Voided | PaymentStatus::Expired | PaymentStatus::Declined => {
            Ok(Next::Answer)
        }
        status @ (PaymentStatus::Captured | PaymentStatus::Refunded) => {
            Err(VoidRefused::Taken(status))
        }
    }
}

/// What the provider's answer to a capture of `existing` settles.
pub(crate) fn captured(
    existing: &Payment,
    outcome: CaptureOutcome,
) -> Result<Settlement, ProviderDisagrees> {
    if existing.status != PaymentStatus::Authorized {
        return Ok(Settlement::Stands);
    }
    let moved = |to, events| Settlement::Moved {
        to,
        refund: None,
        events,
    };
    Ok(match outcome {
        CaptureOutcome::Captured => moved(PaymentStatus::Captured, vec![PaymentEvent::Captured]),
        CaptureOutcome::Expired => moved(PaymentStatus::Expired, vec![PaymentEvent::Expired]),
        // Released at the provider by a void whose answer we lost: it holds
        // nothing, and says so.
        CaptureOutcome::Voided => moved(
            PaymentStatus::Voided,
            vec![PaymentEvent::Voided {
                reason: RefundReason::parse("voided at the provider").expect("a valid reason"),
            }],
        ),
        CaptureOutcome::NotAuthorized => {
            return Err(ProviderDisagrees::new(existing, &outcome));
        }
    })
}

#[cfg(test)]
mod tests {
    //! Given an authorization in each state, when a capture or a void
    //! comes, then this is what it does.

    use chrono::{Duration, TimeZone as _};

    use super::super::fixtures::{authorization, payment};
    use super::*;

    #[test]
    fn an_authorization_is_captured_by_the_provider_once_then_answers_with_itself() {
        assert_eq!(
            check_capture(&authorization(PaymentStatus::Authorized)),
            Ok(Next::Call)
        );
        for status in [PaymentStatus::Captured, PaymentStatus::Refunded] {
            assert_eq!(check_capture(&authorization(status)), Ok(Next::Answer));
        }
    }

    #[test]
    fn a_capture_of_a_voided_expired_or_declined_authorization_is_refused_saying_why() {
        let expired = authorization(PaymentStatus::Expired);
        assert_eq!(
            check_capture(&expired),
            Err(CaptureRefused::Expired(
                expired.authorization_expires_at.unwrap()
            ))
        );
        assert!(
            check_capture(&expired)
                .unwrap_err()
                .to_string()
                .contains("expired at")
        );
        assert_eq!(
            check_capture(&authorization(PaymentStatus::Voided)),
            Err(CaptureRefused::Voided)
        );
        let mut declined = authorization(PaymentStatus::Declined);
        declined.decline_reason = Some("card_declined".into());
        assert_eq!(
            check_capture(&declined),
            Err(CaptureRefused::Declined("card_declined".into()))
        );
    }

    #[test]
    fn a_charge_is_no_authorization_to_capture() {
        for status in PaymentStatus::ALL {
            assert_eq!(
                check_capture(&payment(status, Some(1))),
                Err(CaptureRefused::NotAnAuthorization),
                "{status:?}"
            );
        }
    }

    #[test]
    fn a_void_releases_an_authorization_and_answers_one_that_holds_nothing() {
        assert_eq!(
            check_void(&authorization(PaymentStatus::Authorized)),
            Ok(Next::Call)
        );
        for status in [
            PaymentStatus::Voided,
            PaymentStatus::Expired,
            PaymentStatus::Declined,
        ] {
            assert_eq!(check_void(&authorization(status)), Ok(Next::Answer));
        }
    }

    #[test]
    fn a_void_of_a_captured_payment_is_refused_it_needs_a_refund() {
        for status in [PaymentStatus::Captured, PaymentStatus::Refunded] {
            for payment in [authorization(status), payment(status, Some(1))] {
                let refused = check_void(&payment).unwrap_err();
                assert_eq!(refused, VoidRefused::Taken(status));
                assert!(refused.to_string().contains("refund it"));
            }
        }
    }

    #[test]
    fn the_providers_answer_to_a_capture_moves_the_authorization_on_and_announces_it() {
        let held = authorization(PaymentStatus::Authorized);
        let cases = [
            (
                CaptureOutcome::Captured,
                PaymentStatus::Captured,
                PaymentEvent::Captured,
            ),
            (
                CaptureOutcome::Expired,
                PaymentStatus::Expired,
                PaymentEvent::Expired,
            ),
        ];
        for (outcome, to, event) in cases {
            assert_eq!(
                captured(&held, outcome),
                Ok(Settlement::Moved {
                    to,
                    refund: None,
                    events: vec![event],
                })
            );
        }
        let Ok(Settlement::Moved { to, events, .. }) = captured(&held, CaptureOutcome::Voided)
        else {
            panic!("not moved");
        };
        assert_eq!(to, PaymentStatus::Voided);
        assert!(matches!(events[..], [PaymentEvent::Voided { .. }]));
        assert!(captured(&held, CaptureOutcome::NotAuthorized).is_err());
    }

    #[test]
    fn an_authorization_already_settled_stands_whatever_the_capture_says() {
        for status in [PaymentStatus::Captured, PaymentStatus::Voided] {
            assert_eq!(
                captured(&authorization(status), CaptureOutcome::Captured),
                Ok(Settlement::Stands)
            );
        }
    }

    #[test]
    fn an_authorization_past_its_expiry_reads_as_expired_before_anyone_records_it() {
        let held = authorization(PaymentStatus::Authorized);
        let expires_at = held.authorization_expires_at.unwrap();
        assert_eq!(
            held.status_at(expires_at - Duration::seconds(1)),
            PaymentStatus::Authorized
        );
        assert_eq!(held.status_at(expires_at), PaymentStatus::Expired);
        // Once captured, the expiry no longer matters.
        let taken = authorization(PaymentStatus::Captured);
        assert_eq!(
            taken.status_at(Utc.timestamp_opt(2_000_000_000, 0).unwrap()),
            PaymentStatus::Captured
        );
    }
}
