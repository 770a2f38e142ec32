//! The values a payment is made of, each valid by construction: what the
//! gRPC edge parses a request into, so that nothing unchecked reaches the
//! database (PostgreSQL refuses text with NUL characters, and every string
//! here is bounded).

use std::fmt;

use service_runtime::fields;
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub(crate) struct $name(Uuid);

        impl $name {
            pub(crate) fn new(id: Uuid) -> Self {
                Self(id)
            }

            /// Parses the text form of a UUID.
            pub(crate) fn parse(text: &str) -> Result<Self, &'static str> {
                fields::uuid(text).map(Self)
            }

            pub(crate) fn as_uuid(self) -> Uuid {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

uuid_id!(
    /// Identifies a payment: one per charge key that was settled.
    PaymentId
);
uuid_id!(
    /// Identifies the order a payment is for.
    OrderId
);
uuid_id!(
    /// Identifies the customer charged: the `sub` of their access token.
    CustomerId
);

impl PaymentId {
    /// A new id, ordered by creation time.
    pub(crate) fn generate() -> Self {
        Self(Uuid::now_v7())
    }
}

macro_rules! idempotency_key {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub(crate) struct $name(String);

        impl $name {
            /// 1 to 128 visible ASCII characters.
            pub(crate) fn parse(text: &str) -> Result<Self, &'static str> {
                fields::idempotency_key(text).map(|key| Self(key.to_owned()))
            }

            pub(crate) fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

idempotency_key!(
    /// The idempotency key of a charge: one key, one charge, and the key the
    /// provider is asked by (to charge, and to void).
    ChargeKey
);
idempotency_key!(
    /// The idempotency key of a refund, recorded with it.
    RefundKey
);

/// The token of the payment method to charge: 1 to 128 visible ASCII
/// characters.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct PaymentMethodToken(String);

impl PaymentMethodToken {
    pub(crate) fn parse(text: &str) -> Result<Self, &'static str> {
        if text.is_empty() {
            return Err("must not be empty");
        }
        if text.len() > 128 || !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be 1 to 128 visible ASCII characters");
        }
        Ok(Self(text.to_owned()))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PaymentMethodToken {
    // Tokens stand for cards: keep them out of logs beyond a hint.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hint: String = self.0.chars().take(6).collect();
        write!(f, "PaymentMethodToken({hint}…)")
    }
}

/// Why a payment is refunded: at most 500 characters, trimmed, possibly
/// empty. Any text but NUL, which PostgreSQL cannot store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RefundReason(String);

impl RefundReason {
    pub(crate) const MAX_CHARS: usize = 500;

    pub(crate) fn parse(text: &str) -> Result<Self, &'static str> {
        // A character is at most four bytes: a long text is refused
        // without counting its characters.
        if text.len() > Self::MAX_CHARS * 4 || text.chars().count() > Self::MAX_CHARS {
            return Err("must be at most 500 characters");
        }
        if text.contains('\0') {
            return Err("must not contain NUL characters");
        }
        Ok(Self(text.trim().to_owned()))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// A digest of a charge request, without its key: the same key with
/// another request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestHash(Vec<u8>);

impl RequestHash {
    pub(crate) fn new(digest: Vec<u8>) -> Self {
        Self(digest)
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_uuids() {
        let id = Uuid::new_v4();
        assert_eq!(OrderId::parse(&id.to_string()), Ok(OrderId::new(id)));
        assert_eq!(CustomerId::parse(""), Err("must not be empty"));
        assert_eq!(PaymentId::parse("order-1"), Err("must be a UUID"));
        assert_eq!(
            PaymentId::parse(&format!("{id}\0")),
            Err("must be a UUID"),
            "a NUL never passes"
        );
        assert_eq!(OrderId::parse(&"a".repeat(100_000)), Err("must be a UUID"));
    }

    #[test]
    fn keys_are_bounded_visible_ascii() {
        assert_eq!(
            ChargeKey::parse("saga-1:process-payment").unwrap().as_str(),
            "saga-1:process-payment"
        );
        assert!(RefundKey::parse(&"k".repeat(128)).is_ok());
        assert_eq!(ChargeKey::parse(""), Err("must not be empty"));
        assert_eq!(
            ChargeKey::parse(&"k".repeat(129)),
            Err("must be at most 128 characters")
        );
        for bad in ["with space", "nul\0", "tab\t", "é"] {
            assert_eq!(
                RefundKey::parse(bad),
                Err("must be visible ASCII without spaces"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn tokens_are_bounded_visible_ascii_and_stay_out_of_logs() {
        let token = PaymentMethodToken::parse("tok_visa_4242").unwrap();
        assert_eq!(token.as_str(), "tok_visa_4242");
        assert_eq!(format!("{token:?}"), "PaymentMethodToken(tok_vi…)");
        assert_eq!(PaymentMethodToken::parse(""), Err("must not be empty"));
        for bad in ["tok\0".to_owned(), "t".repeat(129), "tok visa".to_owned()] {
            assert_eq!(
                PaymentMethodToken::parse(&bad),
                Err("must be 1 to 128 visible ASCII characters")
            );
        }
    }

    #[test]
    fn a_reason_is_trimmed_bounded_and_free_of_nul() {
        assert_eq!(
            RefundReason::parse("  order cancelled\n").unwrap().as_str(),
            "order cancelled"
        );
        assert_eq!(RefundReason::parse("").unwrap().as_str(), "");
        assert!(RefundReason::parse(&"é".repeat(500)).is_ok());
        assert_eq!(
            RefundReason::parse(&"é".repeat(501)),
            Err("must be at most 500 characters")
        );
        assert_eq!(
            RefundReason::parse("cancel\0led"),
            Err("must not contain NUL characters")
        );
    }
}
