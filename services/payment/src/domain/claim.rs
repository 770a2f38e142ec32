//! Who may call the provider for a charge key, and what a request for the
//! key does next: the rules of the protocol described in `crate::app`.
//!
//! Each charge key has at most one payment (its settled outcome) and one
//! claim: what is being done under the key (a charge, or undoing it) and
//! whether someone holds the key's lease, the right to call the provider
//! for it. [`decide`] looks at both, as read, and says what a request does:
//! answer with the payment, wait for the lease holder, or take the lease
//! and call the provider. Taking the lease is conditional on the claim
//! being as it was read, so a decision on a stale read is never acted on.

use super::payment::{KeyReused, Payment, PaymentStatus, Refund};
use super::values::RequestHash;

/// What is being done under a charge key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Intent {
    /// A charge was asked for.
    Charge,
    /// The key is being undone, for good: its capture refunded or, if
    /// nothing was charged, the key voided at the provider. Once a key is
    /// being undone it is never charged again: a request to charge it
    /// completes the undo instead.
    Undo(Refund),
    /// An authorization is being captured.
    Capture,
    /// The key's authorization is being released, for good, like an undo,
    /// but nothing captured under it is refunded (VoidPayment). Done for
    /// this void (the first one asked for the key).
    Release(Refund),
}

/// The lease on a key: the right to call the provider for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lease {
    /// Nobody is calling the provider for the key.
    Free,
    /// Someone is, and may still be.
    Live,
    /// Someone was, and stopped answering (crashed, or lost the database)
    /// longer ago than any provider call may take: they no longer call, and
    /// whatever they did, the provider remembers by key.
    Expired,
}

/// A key's claim, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Claim {
    pub(crate) intent: Intent,
    /// The charge request the key was first claimed with, if any: the key
    /// charges that request or none.
    pub(crate) request_hash: Option<RequestHash>,
    pub(crate) lease: Lease,
}

/// A request for a key.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KeyCommand<'a> {
    /// ProcessPayment.
    Charge(&'a RequestHash),
    /// RefundPayment, by charge key or by payment id.
    Undo(&'a Refund),
    /// CapturePayment.
    Capture,
    /// VoidPayment, by authorization key or by payment id.
    Release(&'a Refund),
}

/// A provider call, made while holding the key's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Call {
    /// Charge, by key.
    Charge,
    /// Void the key: refund what it captured, or make sure it never
    /// charges. Done for this refund (the first one asked for the key).
    Void(Refund),
    /// Capture the key's authorization.
    Capture,
    /// Release the key's authorization, or make sure it never holds
    /// anything; never refund.
    Release(Refund),
}

/// What a request does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// The key is settled: answer with its payment.
    Answer,
    /// Someone holds the key's lease: wait until it is freed, taken over
    /// or runs out, then read the key again.
    Wait,
    /// Take the key's lease (if the claim is still as read), then call.
    Call(Call),
}

/// What a request for a key does next, given the key's payment and claim.
///
/// - A charge answers with the key's payment (unless its request differs);
///   without one, it waits for a live lease, completes an unfinished undo,
///   and otherwise charges.
/// - An undo answers with a payment that is final (declined, refunded,
///   voided); otherwise it waits for another live undo, and otherwise voids
///   the key: also over a charge whose lease is live, because a void must
///   win. The provider settles that race (a void before the charge decides
///   makes it decline; after, refunds it) and the charge, no longer holding
///   the lease, records nothing.
pub(crate) fn decide(
    payment: Option<&Payment>,
    claim: Option<&Claim>,
    command: KeyCommand<'_>,
) -> Result<Step, KeyReused> {
    let live = claim.is_some_and(|claim| claim.lease == Lease::Live);
    match (payment, command) {
        (Some(payment), KeyCommand::Charge(hash)) => {
            payment.answer_charge(hash)?;
            Ok(Step::Answer)
        }
        (Some(payment), KeyCommand::Undo(refund)) => Ok(match payment.status {
            PaymentStatus::Captured | PaymentStatus::Authorized => undo(claim, refund),
            PaymentStatus::Declined
            | PaymentStatus::Refunded
            | PaymentStatus::Voided
            | PaymentStatus::Expired => Step::Answer,
        }),
        // An authorization is captured or released by one request at a
        // time: whoever holds its lease (a capture, a void, a refund)
        // finishes first, and the next reads what it recorded. Any other
        // status answers; the caller judges it (`check_capture`,
        // `check_void`).
        (Some(payment), KeyCommand::Capture) => Ok(match payment.status {
            PaymentStatus::Authorized if live => Step::Wait,
            PaymentStatus::Authorized => Step::Call(Call::Capture),
            _ => Step::Answer,
        }),
        (Some(payment), KeyCommand::Release(refund)) => Ok(match payment.status {
            PaymentStatus::Authorized if live => Step::Wait,
            PaymentStatus::Authorized => Step::Call(Call::Release(refund.clone())),
            _ => Step::Answer,
        }),
        // Nothing to capture without an authorization; the caller has
        // found none, and says so.
        (None, KeyCommand::Capture) => Ok(Step::Answer),
        (None, KeyCommand::Charge(hash)) => match claim {
            None => Ok(Step::Call(Call::Charge)),
            Some(claim) => match &claim.intent {
                Intent::Undo(_) | Intent::Release(_) if claim.lease == Lease::Live => {
                    Ok(Step::Wait)
                }
                Intent::Undo(first) => Ok(Step::Call(Call::Void(first.clone()))),
                Intent::Release(first) => Ok(Step::Call(Call::Release(first.clone()))),
                Intent::Charge | Intent::Capture => {
                    if claim
                        .request_hash
                        .as_ref()
                        .is_some_and(|first| first != hash)
                    {
                        return Err(KeyReused);
                    }
                    Ok(match claim.lease {
                        Lease::Live => Step::Wait,
                        Lease::Free | Lease::Expired => Step::Call(Call::Charge),
                    })
                }
            },
        },
        (None, KeyCommand::Undo(refund)) => Ok(undo(claim, refund)),
        (None, KeyCommand::Release(refund)) => Ok(release(claim, refund)),
    }
}

/// An undo of a key whose payment is captured, authorized or missing.
fn undo(claim: Option<&Claim>, refund: &Refund) -> Step {
    match claim.map(|claim| (&claim.intent, claim.lease)) {
        Some((Intent::Undo(_) | Intent::Release(_), Lease::Live)) => Step::Wait,
        // An undo asked for before, left unfinished: finished as it was
        // asked (its refund key and reason are recorded).
        Some((Intent::Undo(first), Lease::Free | Lease::Expired)) => {
            Step::Call(Call::Void(first.clone()))
        }
        // A release left unfinished, a charge or a capture (even in
        // flight: a void must win): voided, which also refunds.
        None
        | Some((Intent::Release(_), Lease::Free | Lease::Expired))
        | Some((Intent::Charge | Intent::Capture, _)) => Step::Call(Call::Void(refund.clone())),
    }
}

/// A release of a key with no payment: it wins over an authorization in
/// flight, as an undo does over a charge (the provider settles the race),
/// and finishes an undo or a release left unfinished as it was asked.
fn release(claim: Option<&Claim>, refund: &Refund) -> Step {
    match claim.map(|claim| (&claim.intent, claim.lease)) {
        Some((Intent::Undo(_) | Intent::Release(_), Lease::Live)) => Step::Wait,
        Some((Intent::Undo(first), Lease::Free | Lease::Expired)) => {
            Step::Call(Call::Void(first.clone()))
        }
        Some((Intent::Release(first), Lease::Free | Lease::Expired)) => {
            Step::Call(Call::Release(first.clone()))
        }
        None | Some((Intent::Charge | Intent::Capture, _)) => {
            Step::Call(Call::Release(refund.clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    //! Given a key's payment and claim, when a charge or an undo comes,
    //! then this is what it does.

    use super::super::fixtures::{authorization, claim, hash, payment, refund};
    use super::*;

    const ALL_LEASES: [Lease; 3] = [Lease::Free, Lease::Live, Lease::Expired];
    const FINAL: [PaymentStatus; 4] = [
        PaymentStatus::Declined,
        PaymentStatus::Refunded,
        PaymentStatus::Voided,
        PaymentStatus::Expired,
    ];

    fn charge(
        payment: Option<&Payment>,
        claim: Option<&Claim>,
        request: u8,
    ) -> Result<Step, KeyReused> {
        decide(payment, claim, KeyCommand::Charge(&hash(request)))
    }

    fn undo(payment: Option<&Payment>, claim: Option<&Claim>, refund: &Refund) -> Step {
        decide(payment, claim, KeyCommand::Undo(refund)).unwrap()
    }

    #[test]
    fn a_key_never_seen_is_charged() {
        assert_eq!(charge(None, None, 1), Ok(Step::Call(Call::Charge)));
    }

    #[test]
    fn a_settled_key_answers_a_charge_with_its_payment_and_charges_nothing() {
        for status in [PaymentStatus::Captured].into_iter().chain(FINAL) {
            let paid = payment(status, Some(1));
            for lease in ALL_LEASES {
                let claimed = claim(Intent::Charge, lease, Some(1));
                assert_eq!(
                    charge(Some(&paid), Some(&claimed), 1),
                    Ok(Step::Answer),
                    "{status:?} {lease:?}"
                );
            }
            assert_eq!(charge(Some(&paid), None, 1), Ok(Step::Answer));
        }
    }

    #[test]
    fn the_same_key_with_another_request_is_refused() {
        let paid = payment(PaymentStatus::Captured, Some(1));
        assert_eq!(charge(Some(&paid), None, 2), Err(KeyReused));
        // Also while the first request is in flight, or after it failed:
        // the key charges its first request or none.
        for lease in ALL_LEASES {
            let claimed = claim(Intent::Charge, lease, Some(1));
            assert_eq!(charge(None, Some(&claimed), 2), Err(KeyReused));
        }
    }

    #[test]
    fn a_key_settled_by_a_void_answers_any_charge_with_what_the_provider_said() {
        for status in FINAL {
            let voided = payment(status, None);
            assert_eq!(charge(Some(&voided), None, 7), Ok(Step::Answer));
        }
    }

    #[test]
    fn a_duplicate_waits_while_a_charge_is_in_flight() {
        let in_flight = claim(Intent::Charge, Lease::Live, Some(1));
        assert_eq!(charge(None, Some(&in_flight), 1), Ok(Step::Wait));
    }

    #[test]
    fn a_retry_charges_again_once_the_lease_is_freed_or_expired() {
        // Freed: the last attempt failed transiently. Expired: its holder
        // crashed, perhaps after the provider charged; asking again under
        // the key finds that charge.
        for lease in [Lease::Free, Lease::Expired] {
            let left = claim(Intent::Charge, lease, Some(1));
            assert_eq!(charge(None, Some(&left), 1), Ok(Step::Call(Call::Charge)));
        }
    }

    #[test]
    fn a_void_wins_over_a_charge_in_flight() {
        for lease in ALL_LEASES {
            let charging = claim(Intent::Charge, lease, Some(1));
            assert_eq!(
                undo(None, Some(&charging), &refund(1)),
                Step::Call(Call::Void(refund(1))),
                "{lease:?}"
            );
        }
    }

    #[test]
    fn a_key_never_seen_is_voided_for_good() {
        assert_eq!(
            undo(None, None, &refund(1)),
            Step::Call(Call::Void(refund(1)))
        );
    }

    #[test]
    fn a_charge_after_a_void_never_charges_it_waits_for_the_void_or_finishes_it() {
        let voiding = claim(Intent::Undo(refund(1)), Lease::Live, None);
        assert_eq!(charge(None, Some(&voiding), 1), Ok(Step::Wait));
        for lease in [Lease::Free, Lease::Expired] {
            // Also for a request the key was claimed with before the void.
            for request in [None, Some(1)] {
                let unfinished = claim(Intent::Undo(refund(1)), lease, request);
                assert_eq!(
                    charge(None, Some(&unfinished), 1),
                    Ok(Step::Call(Call::Void(refund(1))))
                );
            }
        }
    }

    #[test]
    fn refunds_of_a_key_wait_for_each_other_and_finish_the_first() {
        let captured = payment(PaymentStatus::Captured, Some(1));
        let refunding = claim(Intent::Undo(refund(1)), Lease::Live, Some(1));
        assert_eq!(
            undo(Some(&captured), Some(&refunding), &refund(2)),
            Step::Wait
        );
        assert_eq!(undo(None, Some(&refunding), &refund(2)), Step::Wait);
        for lease in [Lease::Free, Lease::Expired] {
            let unfinished = claim(Intent::Undo(refund(1)), lease, Some(1));
            assert_eq!(
                undo(Some(&captured), Some(&unfinished), &refund(2)),
                Step::Call(Call::Void(refund(1)))
            );
        }
    }

    #[test]
    fn a_captured_payment_is_refunded_by_voiding_its_key() {
        let captured = payment(PaymentStatus::Captured, Some(1));
        let charged = claim(Intent::Charge, Lease::Free, Some(1));
        for claimed in [None, Some(&charged)] {
            assert_eq!(
                undo(Some(&captured), claimed, &refund(1)),
                Step::Call(Call::Void(refund(1)))
            );
        }
    }

    #[test]
    fn an_undo_of_a_final_payment_answers_with_it() {
        for status in FINAL {
            let settled = payment(status, Some(1));
            for claimed in [
                None,
                Some(claim(Intent::Undo(refund(1)), Lease::Free, Some(1))),
                Some(claim(Intent::Charge, Lease::Free, Some(1))),
            ] {
                assert_eq!(
                    undo(Some(&settled), claimed.as_ref(), &refund(2)),
                    Step::Answer,
                    "{status:?}"
                );
            }
        }
    }

    fn capture(payment: Option<&Payment>, claim: Option<&Claim>) -> Step {
        decide(payment, claim, KeyCommand::Capture).unwrap()
    }

    fn release(payment: Option<&Payment>, claim: Option<&Claim>, refund: &Refund) -> Step {
        decide(payment, claim, KeyCommand::Release(refund)).unwrap()
    }

    #[test]
    fn an_authorization_is_captured_or_released_by_one_request_at_a_time() {
        let held = authorization(PaymentStatus::Authorized);
        for intent in [
            Intent::Capture,
            Intent::Release(refund(1)),
            Intent::Undo(refund(1)),
        ] {
            let busy = claim(intent.clone(), Lease::Live, Some(1));
            assert_eq!(capture(Some(&held), Some(&busy)), Step::Wait, "{intent:?}");
            assert_eq!(
                release(Some(&held), Some(&busy), &refund(2)),
                Step::Wait,
                "{intent:?}"
            );
            for lease in [Lease::Free, Lease::Expired] {
                let left = claim(intent.clone(), lease, Some(1));
                assert_eq!(capture(Some(&held), Some(&left)), Step::Call(Call::Capture));
                assert_eq!(
                    release(Some(&held), Some(&left), &refund(2)),
                    Step::Call(Call::Release(refund(2)))
                );
            }
        }
        assert_eq!(capture(Some(&held), None), Step::Call(Call::Capture));
    }

    #[test]
    fn a_capture_or_a_release_of_an_authorization_no_longer_held_answers_for_the_caller_to_judge() {
        for status in [
            PaymentStatus::Captured,
            PaymentStatus::Refunded,
            PaymentStatus::Voided,
            PaymentStatus::Expired,
            PaymentStatus::Declined,
        ] {
            let settled = authorization(status);
            let claimed = claim(Intent::Capture, Lease::Free, Some(1));
            assert_eq!(capture(Some(&settled), Some(&claimed)), Step::Answer);
            assert_eq!(release(Some(&settled), None, &refund(1)), Step::Answer);
        }
        // A release never refunds: a captured payment answers, the caller
        // refuses it.
        let taken = payment(PaymentStatus::Captured, Some(1));
        assert_eq!(release(Some(&taken), None, &refund(1)), Step::Answer);
    }

    #[test]
    fn a_release_of_a_key_with_no_record_wins_over_an_authorization_in_flight() {
        assert_eq!(
            release(None, None, &refund(1)),
            Step::Call(Call::Release(refund(1)))
        );
        for lease in ALL_LEASES {
            let authorizing = claim(Intent::Charge, lease, Some(1));
            assert_eq!(
                release(None, Some(&authorizing), &refund(1)),
                Step::Call(Call::Release(refund(1)))
            );
        }
        let releasing = claim(Intent::Release(refund(1)), Lease::Live, None);
        assert_eq!(release(None, Some(&releasing), &refund(2)), Step::Wait);
    }

    #[test]
    fn an_authorization_after_a_release_never_holds_it_finishes_the_release() {
        let releasing = claim(Intent::Release(refund(1)), Lease::Live, None);
        assert_eq!(charge(None, Some(&releasing), 1), Ok(Step::Wait));
        for lease in [Lease::Free, Lease::Expired] {
            let unfinished = claim(Intent::Release(refund(1)), lease, None);
            assert_eq!(
                charge(None, Some(&unfinished), 1),
                Ok(Step::Call(Call::Release(refund(1))))
            );
            assert_eq!(
                release(None, Some(&unfinished), &refund(2)),
                Step::Call(Call::Release(refund(1)))
            );
        }
    }

    #[test]
    fn a_refund_by_key_of_an_authorization_voids_it_which_releases_or_refunds() {
        let held = authorization(PaymentStatus::Authorized);
        assert_eq!(
            undo(Some(&held), None, &refund(1)),
            Step::Call(Call::Void(refund(1)))
        );
        let releasing = claim(Intent::Release(refund(2)), Lease::Live, Some(1));
        assert_eq!(undo(Some(&held), Some(&releasing), &refund(1)), Step::Wait);
    }
}
