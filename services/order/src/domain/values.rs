//! The values an order is made of, each valid by construction.

use std::fmt;

use money::{Money, MoneyError};
use service_runtime::fields;
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            pub fn new(id: Uuid) -> Self {
                Self(id)
            }

            /// Parses the text form of a UUID.
            pub fn parse(text: &str) -> Result<Self, &'static str> {
                fields::uuid(text).map(Self)
            }

            pub fn as_uuid(self) -> Uuid {
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
    /// Identifies an order (and its event stream).
    OrderId
);
uuid_id!(
    /// Identifies a customer: the `sub` of their access token.
    CustomerId
);
uuid_id!(
    /// Identifies a payment of the payment service.
    PaymentId
);

/// A stock keeping unit: 1 to 64 characters from A-Z, a-z, 0-9, '-', '_'.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sku(String);

impl Sku {
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        if text.is_empty() {
            return Err("must not be empty");
        }
        if text.len() > 64 {
            return Err("must be at most 64 characters");
        }
        if !text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err("may contain only letters, digits, '-' and '_'");
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Units of one line: 1 to 1000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quantity(u32);

impl Quantity {
    pub const MAX: u32 = 1000;

    pub fn new(units: u32) -> Result<Self, &'static str> {
        match units {
            0 => Err("must be at least 1"),
            1..=Self::MAX => Ok(Self(units)),
            _ => Err("must be at most 1000"),
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineItem {
    pub sku: Sku,
    pub quantity: Quantity,
    /// Positive.
    pub unit_price: Money,
}

/// Why lines do not make an order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinesError {
    #[error("an order needs at least one line")]
    Empty,
    #[error("an order has at most {} lines", OrderLines::MAX_LINES)]
    TooMany,
    #[error("every line must be in the same currency")]
    MixedCurrencies,
    #[error("the total is too large")]
    TotalTooLarge,
}

/// The lines of an order with their total: 1 to 50 lines, one currency,
/// and a total that did not overflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderLines {
    items: Vec<LineItem>,
    total: Money,
}

impl OrderLines {
    pub const MAX_LINES: usize = 50;

    pub fn new(items: Vec<LineItem>) -> Result<Self, LinesError> {
        let first = items.first().ok_or(LinesError::Empty)?;
        if items.len() > Self::MAX_LINES {
            return Err(LinesError::TooMany);
        }
        let currency = first.unit_price.currency();
        let mut total = Money::zero(currency);
        for item in &items {
            if item.unit_price.currency() != currency {
                return Err(LinesError::MixedCurrencies);
            }
            let line = item
                .unit_price
                .checked_mul(item.quantity.get())
                .map_err(|_| LinesError::TotalTooLarge)?;
            total = total.checked_add(line).map_err(|error| match error {
                MoneyError::CurrencyMismatch(..) => LinesError::MixedCurrencies,
                _ => LinesError::TotalTooLarge,
            })?;
        }
        Ok(Self { items, total })
    }

    pub fn items(&self) -> &[LineItem] {
        &self.items
    }

    pub fn total(&self) -> Money {
        self.total
    }
}

/// The token of the payment method to charge: 1 to 128 visible ASCII
/// characters.
#[derive(Clone, PartialEq, Eq)]
pub struct PaymentMethodToken(String);

impl PaymentMethodToken {
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        if text.is_empty() {
            return Err("must not be empty");
        }
        if text.len() > 128 {
            return Err("must be at most 128 characters");
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be visible ASCII without spaces");
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
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

/// Why something happened to an order: 1 to 500 characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason(String);

impl Reason {
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        let text = text.trim();
        if text.is_empty() {
            return Err("must not be empty");
        }
        if text.chars().count() > 500 {
            return Err("must be at most 500 characters");
        }
        Ok(Self(text.to_owned()))
    }

    /// An optional reason: empty text is none.
    pub fn parse_optional(text: &str) -> Result<Option<Self>, &'static str> {
        if text.trim().is_empty() {
            Ok(None)
        } else {
            Self::parse(text).map(Some)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use money::Currency;

    use super::*;

    fn line(sku: &str, quantity: u32, cents: i64, currency: &str) -> LineItem {
        LineItem {
            sku: Sku::parse(sku).unwrap(),
            quantity: Quantity::new(quantity).unwrap(),
            unit_price: Money::positive(cents, Currency::parse(currency).unwrap()).unwrap(),
        }
    }

    #[test]
    fn the_total_is_the_sum_of_quantity_times_price() {
        let lines =
            OrderLines::new(vec![line("A", 2, 1250, "EUR"), line("B", 1, 99, "EUR")]).unwrap();
        assert_eq!(lines.total().amount_minor(), 2599);
    }

    #[test]
    fn lines_are_bounded_and_share_a_currency() {
        assert_eq!(OrderLines::new(vec![]), Err(LinesError::Empty));
        assert_eq!(
            OrderLines::new(vec![line("A", 1, 1, "EUR"); 51]),
            Err(LinesError::TooMany)
        );
        assert!(OrderLines::new(vec![line("A", 1, 1, "EUR"); 50]).is_ok());
        assert_eq!(
            OrderLines::new(vec![line("A", 1, 100, "EUR"), line("B", 1, 100, "USD")]),
            Err(LinesError::MixedCurrencies)
        );
        let dear = line("A", 1000, money::MAX_AMOUNT_MINOR, "EUR");
        assert_eq!(OrderLines::new(vec![dear]), Err(LinesError::TotalTooLarge));
        let half = line("A", 1, money::MAX_AMOUNT_MINOR / 2 + 1, "EUR");
        assert_eq!(
            OrderLines::new(vec![half.clone(), half]),
            Err(LinesError::TotalTooLarge)
        );
    }

    #[test]
    fn values_refuse_what_they_cannot_hold() {
        assert!(Sku::parse("SKU-1_a").is_ok());
        assert!(Sku::parse("").is_err());
        assert!(Sku::parse("has space").is_err());
        assert!(Sku::parse(&"x".repeat(65)).is_err());
        assert!(Quantity::new(0).is_err());
        assert!(Quantity::new(1001).is_err());
        assert!(PaymentMethodToken::parse("tok visa").is_err());
        assert!(Reason::parse("   ").is_err());
        assert_eq!(Reason::parse_optional(" ").unwrap(), None);
        assert_eq!(
            format!("{:?}", PaymentMethodToken::parse("tok_visa_4242").unwrap()),
            "PaymentMethodToken(tok_vi…)"
        );
        assert_eq!(OrderId::parse("nope"), Err("must be a UUID"));
    }
}
