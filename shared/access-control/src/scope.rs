//! Scopes: which internal RPCs a service token opens.
//!
//! The role `service` says only that the caller is a configured client of
//! the auth service, not what it may do. Each internal RPC requires one
//! [`Scope`]; the operator grants scopes per client (`AUTH_SERVICE_CLIENTS`)
//! and the auth service puts them into the token's `scope` claim, space
//! separated as in OAuth 2.0 (RFC 6749, section 3.3). This enum is the one
//! list of scope names: the auth service parses its configuration with it
//! and every policy names its members.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// One permission a service client can be granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// `payments:charge`: ProcessPayment, taking a customer's money.
    PaymentsCharge,
    /// `payments:refund`: RefundPayment, giving a capture back or voiding a
    /// key for good.
    PaymentsRefund,
    /// `payments:read`: GetPayment and ListPaymentsByOrder for any customer.
    PaymentsRead,
    /// `orders:settle`: ConfirmOrder, RejectOrder and CancelOrder, the
    /// saga's verdicts on an order.
    OrdersSettle,
    /// `sagas:signal`: SignalSaga, a decision a waiting saga step takes
    /// (a review's, say).
    SagasSignal,
}

impl Scope {
    /// Every scope, in the order the documentation lists them.
    pub const ALL: [Self; 5] = [
        Self::PaymentsCharge,
        Self::PaymentsRefund,
        Self::PaymentsRead,
        Self::OrdersSettle,
        Self::SagasSignal,
    ];

    /// The scope's name, as configured and as carried in tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PaymentsCharge => "payments:charge",
            Self::PaymentsRefund => "payments:refund",
            Self::PaymentsRead => "payments:read",
            Self::OrdersSettle => "orders:settle",
            Self::SagasSignal => "sagas:signal",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A scope name that is not one of [`Scope::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope {name:?}; the scopes are {}", known_scopes())]
pub struct UnknownScope {
    pub name: String,
}

fn known_scopes() -> String {
    Scope::ALL.map(Scope::as_str).join(", ")
}

impl FromStr for Scope {
    type Err = UnknownScope;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|scope| scope.as_str() == name)
            .ok_or_else(|| UnknownScope {
                name: name.to_owned(),
            })
    }
}

/// A set of scopes: what a client was granted, or what a token carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes(BTreeSet<Scope>);

impl Scopes {
    /// Parses space-separated scope names, refusing any unknown one: for
    /// configuration and requests, where a typo must not pass silently.
    pub fn parse(names: &str) -> Result<Self, UnknownScope> {
        names.split_whitespace().map(str::parse).collect()
    }

    /// Reads a token's `scope` claim. Unknown names are ignored rather than
    /// refused: a scope that a newer auth service grants means nothing to
    /// this verifier, and must not make it reject the rest of the token.
    fn from_claim(names: &str) -> Self {
        names
            .split_whitespace()
            .filter_map(|name| name.parse().ok())
            .collect()
    }

    pub fn contains(&self, scope: Scope) -> bool {
        self.0.contains(&scope)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether every scope of `self` is also in `other`.
    pub fn is_subset(&self, other: &Self) -> bool {
        self.0.is_subset(&other.0)
    }

    /// The scopes of `self` that `other` lacks.
    pub fn missing_from<'a>(&'a self, other: &'a Self) -> impl Iterator<Item = Scope> + 'a {
        self.0.difference(&other.0).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = Scope> + '_ {
        self.0.iter().copied()
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// Space-separated, as in the `scope` claim.
impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, scope) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(scope.as_str())?;
        }
        Ok(())
    }
}

impl serde::Serialize for Scopes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Scopes {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let names = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Ok(Self::from_claim(&names))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scope_parses_from_its_own_name() {
        for scope in Scope::ALL {
            assert_eq!(scope.as_str().parse::<Scope>(), Ok(scope));
        }
    }

    #[test]
    fn configuration_refuses_an_unknown_name_and_lists_the_known_ones() {
        let error = Scopes::parse("payments:charge payment:refund").unwrap_err();
        assert_eq!(error.name, "payment:refund");
        let message = error.to_string();
        for scope in Scope::ALL {
            assert!(message.contains(scope.as_str()), "{message}");
        }
        // Names are exact: no case folding, no prefixes.
        assert!(Scopes::parse("PAYMENTS:CHARGE").is_err());
        assert!(Scopes::parse("payments").is_err());
    }

    #[test]
    fn a_claim_round_trips_space_separated_and_ignores_names_it_does_not_know() {
        let scopes = Scopes::parse("  orders:settle\tpayments:charge  payments:charge ").unwrap();
        assert_eq!(scopes.to_string(), "payments:charge orders:settle");

        let json = serde_json::to_string(&scopes).unwrap();
        assert_eq!(json, r#""payments:charge orders:settle""#);
        let read: Scopes = serde_json::from_str(&json).unwrap();
        assert_eq!(read, scopes);

        let from_a_newer_issuer: Scopes =
            serde_json::from_str(r#""payments:read ledgers:audit""#).unwrap();
        assert_eq!(
            from_a_newer_issuer,
            [Scope::PaymentsRead].into_iter().collect()
        );
    }

    #[test]
    fn subsets_and_what_is_missing() {
        let granted = Scopes::parse("payments:charge payments:refund orders:settle").unwrap();
        let asked = Scopes::parse("payments:charge").unwrap();
        assert!(asked.is_subset(&granted));
        let too_much = Scopes::parse("payments:charge payments:read").unwrap();
        assert!(!too_much.is_subset(&granted));
        assert_eq!(
            too_much.missing_from(&granted).collect::<Vec<_>>(),
            [Scope::PaymentsRead]
        );
    }
}
