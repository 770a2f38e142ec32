//! The payment domain: pure, synchronous, no I/O.
//!
//! - `values`: ids, idempotency keys, the payment method token and the
//!   refund reason, each valid by construction (what the gRPC edge parses
//!   requests into).
//! - `payment`: a payment and its [`PaymentStatus`]; what a provider's
//!   answer to a charge or to a void is recorded as ([`charged`],
//!   [`voided`]), with the events it publishes.
//! - `authorization`: an authorization's states and transitions
//!   (authorized → captured | voided | expired; captured → refunded): when
//!   a capture or a void goes to the provider, and what its answer is
//!   recorded as.
//! - `claim`: the per-key protocol: given a key's payment and claim as
//!   read, what a charge or a refund does next ([`decide`]): answer, wait,
//!   or take the key's lease and call the provider.
//!
//! `crate::app` reads the key's state, asks these functions, and does what
//! they say.

mod authorization;
mod claim;
mod payment;
mod values;

pub(crate) use authorization::{
    CaptureRefused, Next, VoidRefused, captured, check_capture, check_void,
};
pub(crate) use claim::{Call, Claim, Intent, KeyCommand, Lease, Step, decide};
pub(crate) use payment::{
    ChargeDetails, ChargeRequest, KeyReused, NewPayment, NothingToRefund, Payment, PaymentEvent,
    PaymentKind, PaymentStatus, Refund, Settlement, charged, voided,
};
pub(crate) use values::{
    ChargeKey, CustomerId, OrderId, PaymentId, PaymentMethodToken, RefundKey, RefundReason,
    RequestHash,
};

/// What the domain's tests build their scenarios from.
#[cfg(test)]
mod fixtures {
    use chrono::{TimeZone as _, Utc};
    use money::{Currency, Money};
    use uuid::Uuid;

    use super::*;

    pub(crate) fn hash(n: u8) -> RequestHash {
        RequestHash::new(vec![n; 32])
    }

    pub(crate) fn key() -> ChargeKey {
        ChargeKey::parse("saga-1:process-payment").unwrap()
    }

    pub(crate) fn refund(n: u8) -> Refund {
        Refund {
            key: RefundKey::parse(&format!("refund-{n}")).unwrap(),
            reason: RefundReason::parse(&format!("reason {n}")).unwrap(),
        }
    }

    pub(crate) fn details() -> ChargeDetails {
        ChargeDetails {
            order_id: OrderId::new(Uuid::from_u128(1)),
            customer_id: CustomerId::new(Uuid::from_u128(2)),
            amount: Money::positive(1500, Currency::parse("EUR").unwrap()).unwrap(),
        }
    }

    pub(crate) fn request(n: u8) -> ChargeRequest {
        ChargeRequest {
            key: key(),
            kind: PaymentKind::Charge,
            details: details(),
            payment_method: PaymentMethodToken::parse("tok_visa").unwrap(),
            request_hash: hash(n),
        }
    }

    /// A payment of `key()` in `status`, charged with request `hash(n)`
    /// (`None`: settled by a void before any request was seen).
    pub(crate) fn payment(status: PaymentStatus, request: Option<u8>) -> Payment {
        Payment {
            id: PaymentId::new(Uuid::from_u128(3)),
            charge_key: key(),
            kind: PaymentKind::Charge,
            status,
            request_hash: request.map(hash),
            charge: (status != PaymentStatus::Voided).then(details),
            decline_reason: (status == PaymentStatus::Declined).then(|| "card_declined".into()),
            provider_reference: matches!(status, PaymentStatus::Captured | PaymentStatus::Refunded)
                .then(|| "sim_ch_1".into()),
            created_at: Utc.timestamp_opt(1_700_000_000, 0).unwrap(),
            refunded_at: (status == PaymentStatus::Refunded)
                .then(|| Utc.timestamp_opt(1_700_000_100, 0).unwrap()),
            authorization_expires_at: None,
            captured_at: None,
            voided_at: None,
        }
    }

    /// An authorization of `key()` in `status`, made with request `hash(1)`,
    /// lapsing a week after it was made.
    pub(crate) fn authorization(status: PaymentStatus) -> Payment {
        let at = |seconds| Some(Utc.timestamp_opt(seconds, 0).unwrap());
        Payment {
            kind: PaymentKind::Authorization,
            charge: Some(details()),
            provider_reference: (status != PaymentStatus::Declined).then(|| "sim_au_1".into()),
            authorization_expires_at: at(1_700_000_000 + 7 * 24 * 3600),
            captured_at: matches!(status, PaymentStatus::Captured | PaymentStatus::Refunded)
                .then(|| Utc.timestamp_opt(1_700_000_050, 0).unwrap()),
            voided_at: (status == PaymentStatus::Voided)
                .then(|| Utc.timestamp_opt(1_700_000_050, 0).unwrap()),
            ..payment(status, Some(1))
        }
    }

    pub(crate) fn claim(intent: Intent, lease: Lease, request: Option<u8>) -> Claim {
        Claim {
            intent,
            request_hash: request.map(hash),
            lease,
        }
    }
}
