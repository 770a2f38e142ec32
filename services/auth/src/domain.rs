//! The inputs of the auth service, parsed once at the edge into types that
//! cannot hold a bad value.

use std::fmt;

/// A normalised email address: trimmed, lower-cased, syntactically plausible.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct Email(String);

/// Longest email address accepted (RFC 5321's path limit).
const MAX_EMAIL_BYTES: usize = 254;

impl Email {
    /// Normalises and checks `raw`. Deliberately simple: one `@`, a local
    /// part of 1 to 64 bytes, a domain with a dot and only letters, digits,
    /// hyphens and dots, nothing invisible. Whether it receives mail is not
    /// our question.
    pub(crate) fn parse(raw: &str) -> Result<Self, &'static str> {
        if raw.contains('\0') {
            return Err(NUL_REFUSED);
        }
        let email = raw.trim().to_lowercase();
        if email.is_empty() {
            return Err("must not be empty");
        }
        if email.len() > MAX_EMAIL_BYTES {
            return Err("must be at most 254 bytes");
        }
        let (local, domain) = email.split_once('@').ok_or("must contain @")?;
        if local.is_empty() || local.len() > 64 {
            return Err("the part before @ must be 1 to 64 bytes");
        }
        if domain.contains('@') {
            return Err("must contain exactly one @");
        }
        if local.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("must not contain spaces or control characters");
        }
        let labels_ok = domain.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_alphanumeric() || c == '-')
        });
        if !domain.contains('.') || !labels_ok {
            return Err("the domain after @ is not valid");
        }
        Ok(Self(email))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Email({})", self.0)
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A password of acceptable length. Never printed.
#[derive(Clone)]
pub(crate) struct Password(String);

impl Password {
    /// A new password: at least 12 bytes, and at most 128 so a huge
    /// password cannot turn hashing into a CPU sink; no NUL byte.
    pub(crate) fn parse(raw: &str) -> Result<Self, &'static str> {
        match raw.len() {
            0 => Err("must not be empty"),
            1..12 => Err("must be at least 12 bytes"),
            12..=128 => Self::presented(raw),
            _ => Err("must be at most 128 bytes"),
        }
    }

    /// A password presented to be checked: only bounded, since old accounts
    /// may predate today's length rules and an attempt must still cost the
    /// same. A NUL byte is refused here too: no client sends one by
    /// accident, and C-string handling anywhere along the way would
    /// silently cut the password there.
    pub(crate) fn presented(raw: &str) -> Result<Self, &'static str> {
        match raw.len() {
            0 => Err("must not be empty"),
            129.. => Err("must be at most 128 bytes"),
            _ if raw.contains('\0') => Err(NUL_REFUSED),
            _ => Ok(Self(raw.to_owned())),
        }
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// Why a string with a NUL character is refused: PostgreSQL's text cannot
/// hold one, so it would otherwise fail deep inside a query. (The wording
/// of `service_runtime::fields`, which the other services' edges use.)
pub(crate) const NUL_REFUSED: &str = "must not contain NUL characters";

/// A name shown to people: 1 to 100 characters after trimming, nothing
/// invisible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DisplayName(String);

impl DisplayName {
    pub(crate) fn parse(raw: &str) -> Result<Self, &'static str> {
        if raw.contains('\0') {
            return Err(NUL_REFUSED);
        }
        let name = raw.trim();
        if name.is_empty() {
            return Err("must not be empty");
        }
        if name.chars().count() > 100 {
            return Err("must be at most 100 characters");
        }
        if name.chars().any(char::is_control) {
            return Err("must not contain control characters");
        }
        Ok(Self(name.to_owned()))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised() {
        assert_eq!(
            Email::parse("  Ada.Lovelace@Example.COM ")
                .unwrap()
                .as_str(),
            "ada.lovelace@example.com"
        );
    }

    #[test]
    fn malformed_emails_are_refused() {
        for bad in [
            "",
            "   ",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a@b@example.com",
            "ada lovelace@example.com",
            "ada@exa mple.com",
            "ada@-example.com",
            "ada@example..com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let long = format!("{}@example.com", "a".repeat(250));
        assert_eq!(
            Email::parse(&long).unwrap_err(),
            "must be at most 254 bytes"
        );
    }

    #[test]
    fn password_length_is_bounded_both_ways() {
        assert_eq!(
            Password::parse("short").unwrap_err(),
            "must be at least 12 bytes"
        );
        assert!(Password::parse(&"p".repeat(12)).is_ok());
        assert!(Password::parse(&"p".repeat(128)).is_ok());
        assert_eq!(
            Password::parse(&"p".repeat(129)).unwrap_err(),
            "must be at most 128 bytes"
        );
        assert_eq!(
            Password::presented(&"p".repeat(129)).unwrap_err(),
            "must be at most 128 bytes"
        );
        assert_eq!(
            Password::parse("correct horse\0battery").unwrap_err(),
            NUL_REFUSED
        );
        assert_eq!(Password::presented("a\0").unwrap_err(), NUL_REFUSED);
        assert_eq!(
            format!("{:?}", Password::parse("correct horse battery").unwrap()),
            "Password(<redacted>)"
        );
    }

    #[test]
    fn display_names_are_trimmed_and_bounded() {
        assert_eq!(DisplayName::parse("  Ada ").unwrap().as_str(), "Ada");
        assert!(DisplayName::parse("   ").is_err());
        assert!(DisplayName::parse(&"é".repeat(100)).is_ok());
        assert!(DisplayName::parse(&"é".repeat(101)).is_err());
        assert_eq!(DisplayName::parse("Ada\u{0}").unwrap_err(), NUL_REFUSED);
    }

    #[test]
    fn nul_bytes_are_named_as_such() {
        assert_eq!(Email::parse("ada\0@example.com").unwrap_err(), NUL_REFUSED);
        assert_eq!(
            NUL_REFUSED,
            service_runtime::fields::TextError::Nul.to_string(),
            "the same words as the other services"
        );
    }
}
