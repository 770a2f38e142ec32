//! A payment, and what a provider's answer makes of one.

use chrono::{DateTime, Utc};
use money::Money;

use super::values::{
    ChargeKey, CustomerId, OrderId, PaymentId, PaymentMethodToken, RefundKey, RefundReason,
    RequestHash,
};
use crate::provider::{ChargeOutcome, VoidOutcome};

/// Where a payment stands. Only a capture moves on, to a refund; the rest
/// are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum PaymentStatus {
    /// The amount was charged.
    Captured,
    /// The provider refused; nothing was charged.
    Declined,
    /// The charge was paid back in full.
    Refunded,
    /// The key was voided before anything was charged under it.
    Voided,
}

impl PaymentStatus {
    const ALL: [Self; 4] = [Self::Captured, Self::Declined, Self::Refunded, Self::Voided];

    /// The stored form (the `payments.status` column).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Captured => "captured",
            Self::Declined => "declined",
            Self::Refunded => "refunded",
            Self::Voided => "voided",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == text)
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

/// A charge as asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChargeRequest {
    pub(crate) key: ChargeKey,
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
}

/// A charge key was used before with another request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", service_runtime::status::KEY_REUSED)]
pub(crate) struct KeyReused;

/// A refund of a declined payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the payment was declined; there is nothing to refund")]
pub(crate) struct NothingToRefund;

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
    /// nothing to refund; a refunded or voided one answers with itself.
    pub(crate) fn check_refundable(&self) -> Result<(), NothingToRefund> {
        match self.status {
            PaymentStatus::Declined => Err(NothingToRefund),
            PaymentStatus::Captured | PaymentStatus::Refunded | PaymentStatus::Voided => Ok(()),
        }
    }
}

/// A payment to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NewPayment {
    pub(crate) charge_key: ChargeKey,
    pub(crate) status: PaymentStatus,
    pub(crate) request_hash: Option<RequestHash>,
    pub(crate) charge: Option<ChargeDetails>,
    pub(crate) decline_reason: Option<String>,
    pub(crate) provider_reference: Option<String>,
    /// The refund that settled it, when it is refunded or voided.
    pub(crate) refund: Option<Refund>,
}

/// What happened to a payment, for the payment events topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PaymentEvent {
    Captured,
    Declined,
    Refunded { reason: RefundReason },
}

/// What the provider's answer to a charge is recorded as.
pub(crate) fn charged(
    request: &ChargeRequest,
    outcome: &ChargeOutcome,
) -> (NewPayment, Vec<PaymentEvent>) {
    let (status, decline_reason, provider_reference, event) = match outcome {
        ChargeOutcome::Captured { reference } => (
            PaymentStatus::Captured,
            None,
            Some(reference.clone()),
            PaymentEvent::Captured,
        ),
        ChargeOutcome::Declined(reason) => (
            PaymentStatus::Declined,
            Some(reason.as_str().to_owned()),
            None,
            PaymentEvent::Declined,
        ),
    };
    let payment = NewPayment {
        charge_key: request.key.clone(),
        status,
        request_hash: Some(request.request_hash.clone()),
        charge: Some(request.details.clone()),
        decline_reason,
        provider_reference,
        refund: None,
    };
    (payment, vec![event])
}

/// What the provider's answer to a void by key means for the key's payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settlement {
    /// We had no payment for the key: record this one.
    Record(NewPayment, Vec<PaymentEvent>),
    /// Our captured payment is now refunded.
    Refunded {
        refund: Refund,
        events: Vec<PaymentEvent>,
    },
    /// The payment is final already; it stands.
    Stands,
}

/// The provider's books and ours disagree: it holds no capture for a
/// payment we recorded as captured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the provider holds no capture for captured payment {payment_id}: {outcome:?}")]
pub(crate) struct ProviderDisagrees {
    pub(crate) payment_id: PaymentId,
    pub(crate) outcome: VoidOutcome,
}

/// What a void of `key`, asked for by `refund`, settles, given the payment
/// we have for the key (if any).
///
/// Without a payment, what the provider says is recorded: nothing charged
/// (voided for good), a decline, or a capture whose answer was lost, now
/// refunded (recorded as both, so the ledger shows the money that moved and
/// came back). With a captured payment, the provider must have refunded it.
pub(crate) fn voided(
    key: &ChargeKey,
    existing: Option<&Payment>,
    refund: &Refund,
    outcome: VoidOutcome,
) -> Result<Settlement, ProviderDisagrees> {
    let Some(payment) = existing else {
        return Ok(match outcome {
            VoidOutcome::Voided => Settlement::Record(
                NewPayment {
                    charge_key: key.clone(),
                    status: PaymentStatus::Voided,
                    request_hash: None,
                    charge: None,
                    decline_reason: None,
                    provider_reference: None,
                    refund: Some(refund.clone()),
                },
                vec![],
            ),
            VoidOutcome::Declined { reason, charge } => Settlement::Record(
                NewPayment {
                    charge_key: key.clone(),
                    status: PaymentStatus::Declined,
                    request_hash: None,
                    charge: Some(charge),
                    decline_reason: Some(reason.as_str().to_owned()),
                    provider_reference: None,
                    refund: None,
                },
                vec![PaymentEvent::Declined],
            ),
            VoidOutcome::Refunded { reference, charge } => Settlement::Record(
                NewPayment {
                    charge_key: key.clone(),
                    status: PaymentStatus::Refunded,
                    request_hash: None,
                    charge: Some(charge),
                    decline_reason: None,
                    provider_reference: Some(reference),
                    refund: Some(refund.clone()),
                },
                vec![
                    PaymentEvent::Captured,
                    PaymentEvent::Refunded {
                        reason: refund.reason.clone(),
                    },
                ],
            ),
        });
    };
    match (payment.status, outcome) {
        (PaymentStatus::Captured, VoidOutcome::Refunded { .. }) => Ok(Settlement::Refunded {
            refund: refund.clone(),
            events: vec![PaymentEvent::Refunded {
                reason: refund.reason.clone(),
            }],
        }),
        (PaymentStatus::Captured, outcome) => Err(ProviderDisagrees {
            payment_id: payment.id,
            outcome,
        }),
        (PaymentStatus::Declined | PaymentStatus::Refunded | PaymentStatus::Voided, _) => {
            Ok(Settlement::Stands)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{details, key, payment, refund, request};
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
                status: PaymentStatus::Captured,
                request_hash: Some(request(1).request_hash),
                charge: Some(details()),
                decline_reason: None,
                provider_reference: Some("sim_ch_1".into()),
                refund: None,
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
        let Ok(Settlement::Record(payment, events)) =
            voided(&key(), None, &refund(1), VoidOutcome::Voided)
        else {
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
        };
        let Ok(Settlement::Record(payment, events)) = voided(&key(), None, &refund(1), outcome)
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
        };
        let Ok(Settlement::Record(payment, events)) = voided(&key(), None, &refund(1), outcome)
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
        };
        assert_eq!(
            voided(&key(), Some(&captured), &refund(1), outcome.clone()),
            Ok(Settlement::Refunded {
                refund: refund(1),
                events: vec![PaymentEvent::Refunded {
                    reason: refund(1).reason
                }],
            })
        );
        // Asked again, once it is refunded: it stands, nothing is announced.
        let refunded = payment(PaymentStatus::Refunded, Some(1));
        assert_eq!(
            voided(&key(), Some(&refunded), &refund(2), outcome),
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
            voided(&key(), Some(&captured), &refund(1), VoidOutcome::Voided),
            Err(ProviderDisagrees {
                payment_id: captured.id,
                outcome: VoidOutcome::Voided,
            })
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
            Err(NothingToRefund)
        );
        for status in [
            PaymentStatus::Captured,
            PaymentStatus::Refunded,
            PaymentStatus::Voided,
        ] {
            assert_eq!(payment(status, Some(1)).check_refundable(), Ok(()));
        }
    }
}
