//! Money as the services handle it: an integer count of a currency's minor
//! unit (cents, yen), never a float, with every sum checked for overflow.
//!
//! [`Currency`] accepts only codes from a known list (ISO 4217), so a typo
//! like "EUD" is refused at the edge rather than charged. [`Money`] can be
//! built only through [`Money::new`], which checks the amount's range.

use std::fmt;

/// Largest amount accepted, in minor units (10^12: ten billion euros).
/// Far below `i64::MAX`, so no sum of a bounded number of amounts overflows
/// unnoticed, and far above any real order.
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000;

/// A known ISO 4217 currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency {
    code: &'static str,
    minor_digits: u8,
}

/// The currencies the system accepts, with their minor-unit digits.
const KNOWN: &[(&str, u8)] = &[
    ("AUD", 2),
    ("BHD", 3),
    ("BRL", 2),
    ("CAD", 2),
    ("CHF", 2),
    ("CLP", 0),
    ("CNY", 2),
    ("CZK", 2),
    ("DKK", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("HKD", 2),
    ("HUF", 2),
    ("INR", 2),
    ("ISK", 0),
    ("JPY", 0),
    ("KRW", 0),
    ("KWD", 3),
    ("MXN", 2),
    ("NOK", 2),
    ("NZD", 2),
    ("PLN", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("TND", 3),
    ("TRY", 2),
    ("USD", 2),
    ("ZAR", 2),
];

impl Currency {
    /// The currency with upper-case code `code`, if it is known.
    pub fn parse(code: &str) -> Result<Self, MoneyError> {
        KNOWN
            .iter()
            .find(|(known, _)| *known == code)
            .map(|&(code, minor_digits)| Self { code, minor_digits })
            .ok_or_else(|| MoneyError::UnknownCurrency(code.chars().take(8).collect()))
    }

    pub fn code(self) -> &'static str {
        self.code
    }

    /// Digits after the decimal point of the major unit (2 for EUR, 0 for JPY).
    pub fn minor_digits(self) -> u8 {
        self.minor_digits
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code)
    }
}

/// Why an amount or currency was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("unknown currency {0:?} (expected an ISO 4217 code such as EUR)")]
    UnknownCurrency(String),
    #[error("must not be negative")]
    Negative,
    #[error("must be greater than zero")]
    Zero,
    #[error("must be at most {MAX_AMOUNT_MINOR} minor units")]
    TooLarge,
    #[error("currencies differ: {0} and {1}")]
    CurrencyMismatch(Currency, Currency),
}

/// An amount of a currency, in minor units, between 0 and
/// [`MAX_AMOUNT_MINOR`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Money {
    amount_minor: i64,
    currency: Currency,
}

impl Money {
    /// An amount in `0..=MAX_AMOUNT_MINOR`.
    pub fn new(amount_minor: i64, currency: Currency) -> Result<Self, MoneyError> {
        if amount_minor < 0 {
            return Err(MoneyError::Negative);
        }
        if amount_minor > MAX_AMOUNT_MINOR {
            return Err(MoneyError::TooLarge);
        }
        Ok(Self {
            amount_minor,
            currency,
        })
    }

    /// A strictly positive amount: what a price or a charge must be.
    pub fn positive(amount_minor: i64, currency: Currency) -> Result<Self, MoneyError> {
        if amount_minor == 0 {
            return Err(MoneyError::Zero);
        }
        Self::new(amount_minor, currency)
    }

    /// Nothing, in `currency`.
    pub fn zero(currency: Currency) -> Self {
        Self {
            amount_minor: 0,
            currency,
        }
    }

    pub fn amount_minor(self) -> i64 {
        self.amount_minor
    }

    pub fn currency(self) -> Currency {
        self.currency
    }

    /// `self + other`, if the currencies match and the sum stays in range.
    pub fn checked_add(self, other: Self) -> Result<Self, MoneyError> {
        if self.currency != other.currency {
            return Err(MoneyError::CurrencyMismatch(self.currency, other.currency));
        }
        let sum = self
            .amount_minor
            .checked_add(other.amount_minor)
            .ok_or(MoneyError::TooLarge)?;
        Self::new(sum, self.currency)
    }

    /// `self - other`, if the currencies match and the result is not negative.
    pub fn checked_sub(self, other: Self) -> Result<Self, MoneyError> {
        if self.currency != other.currency {
            return Err(MoneyError::CurrencyMismatch(self.currency, other.currency));
        }
        Self::new(self.amount_minor - other.amount_minor, self.currency)
    }

    /// `self * quantity`, if it stays in range.
    pub fn checked_mul(self, quantity: u32) -> Result<Self, MoneyError> {
        let product = self
            .amount_minor
            .checked_mul(i64::from(quantity))
            .ok_or(MoneyError::TooLarge)?;
        Self::new(product, self.currency)
    }

    /// From the wire; `Err` names what is wrong.
    pub fn from_proto(proto: &api_common::v1::Money) -> Result<Self, MoneyError> {
        Self::new(proto.amount_minor, Currency::parse(&proto.currency)?)
    }

    pub fn to_proto(self) -> api_common::v1::Money {
        api_common::v1::Money {
            amount_minor: self.amount_minor,
            currency: self.currency.code.to_owned(),
        }
    }
}

impl fmt::Display for Money {
    /// `25.00 EUR`, `1500 JPY`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = u32::from(self.currency.minor_digits);
        if digits == 0 {
            return write!(f, "{} {}", self.amount_minor, self.currency);
        }
        let scale = 10_i64.pow(digits);
        write!(
            f,
            "{}.{:0width$} {}",
            self.amount_minor / scale,
            self.amount_minor % scale,
            self.currency,
            width = digits as usize
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eur(amount: i64) -> Money {
        Money::new(amount, Currency::parse("EUR").unwrap()).unwrap()
    }

    #[test]
    fn only_known_upper_case_codes_are_currencies() {
        assert_eq!(Currency::parse("EUR").unwrap().minor_digits(), 2);
        assert_eq!(Currency::parse("JPY").unwrap().minor_digits(), 0);
        for bad in ["eur", "EUD", "", "EURO", "XXX"] {
            assert!(
                matches!(Currency::parse(bad), Err(MoneyError::UnknownCurrency(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn amounts_are_bounded() {
        let eur = Currency::parse("EUR").unwrap();
        assert_eq!(Money::new(-1, eur), Err(MoneyError::Negative));
        assert_eq!(Money::positive(0, eur), Err(MoneyError::Zero));
        assert_eq!(
            Money::new(MAX_AMOUNT_MINOR + 1, eur),
            Err(MoneyError::TooLarge)
        );
        assert!(Money::new(MAX_AMOUNT_MINOR, eur).is_ok());
    }

    #[test]
    fn arithmetic_is_checked() {
        assert_eq!(eur(250).checked_mul(4).unwrap(), eur(1000));
        assert_eq!(
            eur(MAX_AMOUNT_MINOR).checked_mul(2),
            Err(MoneyError::TooLarge)
        );
        assert_eq!(
            eur(MAX_AMOUNT_MINOR).checked_mul(u32::MAX),
            Err(MoneyError::TooLarge)
        );
        assert_eq!(
            eur(MAX_AMOUNT_MINOR).checked_add(eur(1)),
            Err(MoneyError::TooLarge)
        );
        assert_eq!(eur(5).checked_sub(eur(6)), Err(MoneyError::Negative));
        let usd = Money::new(1, Currency::parse("USD").unwrap()).unwrap();
        assert!(matches!(
            eur(1).checked_add(usd),
            Err(MoneyError::CurrencyMismatch(..))
        ));
    }

    #[test]
    fn amounts_display_in_major_units() {
        assert_eq!(eur(2500).to_string(), "25.00 EUR");
        assert_eq!(eur(7).to_string(), "0.07 EUR");
        assert_eq!(
            Money::new(1500, Currency::parse("JPY").unwrap())
                .unwrap()
                .to_string(),
            "1500 JPY"
        );
        assert_eq!(
            Money::new(1234, Currency::parse("KWD").unwrap())
                .unwrap()
                .to_string(),
            "1.234 KWD"
        );
    }
}
