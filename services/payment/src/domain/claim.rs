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
}

/// A provider call, made while holding the key's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Call {
    /// Charge, by key.
    Charge,
    /// Void the key: refund what it captured, or make sure it never
    /// charges. Done for this refund (the first one asked for the key).
    Void(Refund),
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
    match (payment, command) {
        (Some(payment), KeyCommand::Charge(hash)) => {
            payment.answer_charge(hash)?;
            Ok(Step::Answer)
        }
        (Some(payment), KeyCommand::Undo(refund)) => Ok(match payment.status {
            PaymentStatus::Captured => undo(claim, refund),
            PaymentStatus::Declined | PaymentStatus::Refunded | PaymentStatus::Voided => {
                Step::Answer
            }
        }),
        (None, KeyCommand::Charge(hash)) => match claim {
            None => Ok(Step::Call(Call::Charge)),
            Some(claim) => match &claim.intent {
                Intent::Undo(first) => Ok(match claim.lease {
                    Lease::Live => Step::Wait,
                    Lease::Free | Lease::Expired => Step::Call(Call::Void(first.clone())),
                }),
                Intent::Charge => {
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
    }
}

/// An undo of a key whose payment is captured or missing.
fn undo(claim: Option<&Claim>, refund: &Refund) -> Step {
    match claim.map(|claim| (&claim.intent, claim.lease)) {
        Some((Intent::Undo(_), Lease::Live)) => Step::Wait,
        // An undo asked for before, left unfinished: finished as it was
        // asked (its refund key and reason are recorded).
        Some((Intent::Undo(first), Lease::Free | Lease::Expired)) => {
            Step::Call(Call::Void(first.clone()))
        }
        None | Some((Intent::Charge, _)) => Step::Call(Call::Void(refund.clone())),
    }
}

#[cfg(test)]
mod tests {
    //! Given a key's payment and claim, when a charge or an undo comes,
    //! then this is what it does.

    use super::super::fixtures::{claim, hash, payment, refund};
    use super::*;

    const ALL_LEASES: [Lease; 3] = [Lease::Free, Lease::Live, Lease::Expired];
    const FINAL: [PaymentStatus; 3] = [
        PaymentStatus::Declined,
        PaymentStatus::Refunded,
        PaymentStatus::Voided,
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
}
