//! Checks of request fields at the edge, for what reaches PostgreSQL.
//!
//! A value PostgreSQL cannot store or compute with fails the statement,
//! and the caller got INTERNAL where the fault was theirs: a text with a
//! NUL character ("invalid byte sequence for encoding UTF8: 0x00"), a
//! timestamp outside its range ("timestamp out of range"), a duration whose
//! subtraction from now overflows (a panic, before PostgreSQL even sees
//! it). These checks turn each into INVALID_ARGUMENT naming the field,
//! through [`FieldViolations`], before any query runs:
//!
//! ```
//! use std::time::Duration;
//! use service_runtime::status::FieldViolations;
//!
//! let mut violations = FieldViolations::new();
//! let reason = violations.text("reason", "why\0not", 500);
//! let age = violations.duration(
//!     "older_than",
//!     &prost_types::Duration { seconds: -1, nanos: 0 },
//!     Duration::from_secs(3600),
//! );
//! assert_eq!((reason, age), (None, None));
//! assert!(violations.into_result().is_err());
//! ```

use std::fmt;
use std::ops::RangeInclusive;
use std::time::Duration;

use telemetry::CorrelationId;
use uuid::Uuid;

use crate::status::FieldViolations;

/// Timestamps a request may carry (in page tokens), in microseconds since
/// the Unix epoch: from 0001-01-01 to 9999-12-31, which every timestamp
/// type on the way (chrono's, PostgreSQL's, RFC 3339 text) can hold.
pub const TIMESTAMP_MICROS: RangeInclusive<i64> = -62_135_596_800_000_000..=253_402_300_799_999_999;

/// Why a text field was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextError {
    /// PostgreSQL's text cannot hold a NUL character.
    Nul,
    TooLong {
        max_chars: usize,
    },
}

impl fmt::Display for TextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Nul => f.write_str("must not contain NUL characters"),
            Self::TooLong { max_chars } => write!(f, "must be at most {max_chars} characters"),
        }
    }
}

impl std::error::Error for TextError {}

/// `value` if it can be stored as text: no NUL character, at most
/// `max_chars` characters.
pub fn text(value: &str, max_chars: usize) -> Result<&str, TextError> {
    // A character is at most four bytes: a long text is refused without
    // counting its characters.
    if value.len() > max_chars.saturating_mul(4) || value.chars().count() > max_chars {
        return Err(TextError::TooLong { max_chars });
    }
    without_nul(value)
}

/// `value` if it has no NUL character, whatever its length (for a field
/// whose own rule bounds it).
pub fn without_nul(value: &str) -> Result<&str, TextError> {
    if value.contains('\0') {
        return Err(TextError::Nul);
    }
    Ok(value)
}

/// Why a duration field was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurationError {
    Negative,
    /// Not a protobuf duration: nanoseconds beyond a second, or of another
    /// sign than the seconds.
    Malformed,
    TooLong {
        max: Duration,
    },
}

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Negative => f.write_str("must not be negative"),
            Self::Malformed => f.write_str(
                "must have nanos from -999,999,999 to 999,999,999, of the sign of its seconds",
            ),
            Self::TooLong { max } => {
                write!(f, "must be at most {}", humantime::format_duration(*max))
            }
        }
    }
}

impl std::error::Error for DurationError {}

/// `value` as a [`Duration`] if it is a well-formed protobuf duration from
/// zero to `max`.
///
/// Not through prost's `TryFrom`: it negates the seconds of a negative
/// duration, which overflows (a panic in debug builds) for `i64::MIN`.
pub fn duration(value: &prost_types::Duration, max: Duration) -> Result<Duration, DurationError> {
    const NANOS: RangeInclusive<i32> = -999_999_999..=999_999_999;
    let prost_types::Duration { seconds, nanos } = *value;
    if !NANOS.contains(&nanos) || (seconds > 0 && nanos < 0) || (seconds < 0 && nanos > 0) {
        return Err(DurationError::Malformed);
    }
    let (Ok(seconds), Ok(nanos)) = (u64::try_from(seconds), u32::try_from(nanos)) else {
        return Err(DurationError::Negative);
    };
    let duration = Duration::new(seconds, nanos);
    if duration > max {
        return Err(DurationError::TooLong { max });
    }
    Ok(duration)
}

/// An id in a request: the text form of a UUID.
pub fn uuid(text: &str) -> Result<Uuid, &'static str> {
    if text.is_empty() {
        return Err("must not be empty");
    }
    Uuid::parse_str(text).map_err(|_| "must be a UUID")
}

/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 128;

/// A client's idempotency key: 1 to 128 visible ASCII characters, so it is
/// safe in logs and as text in PostgreSQL.
pub fn idempotency_key(text: &str) -> Result<&str, &'static str> {
    match text.len() {
        0 => Err("must not be empty"),
        1..=MAX_IDEMPOTENCY_KEY_CHARS if text.bytes().all(|b| b.is_ascii_graphic()) => Ok(text),
        1..=MAX_IDEMPOTENCY_KEY_CHARS => Err("must be visible ASCII without spaces"),
        _ => Err("must be at most 128 characters"),
    }
}

/// A correlation id to look up: stored ones are all [`CorrelationId`]s, so
/// anything else (a NUL, a space, 129 characters) is a mistake.
pub fn correlation_id(value: &str) -> Result<CorrelationId, &'static str> {
    CorrelationId::parse(value).ok_or("must be 1 to 128 visible ASCII characters, without spaces")
}

impl FieldViolations {
    /// [`text`], recording a violation of `field` if it fails.
    pub fn text<'a>(&mut self, field: &str, value: &'a str, max_chars: usize) -> Option<&'a str> {
        text(value, max_chars)
            .map_err(|error| self.add(field, error.to_string()))
            .ok()
    }

    /// [`duration`], recording a violation of `field` if it fails.
    pub fn duration(
        &mut self,
        field: &str,
        value: &prost_types::Duration,
        max: Duration,
    ) -> Option<Duration> {
        duration(value, max)
            .map_err(|error| self.add(field, error.to_string()))
            .ok()
    }

    /// [`correlation_id`], recording a violation of `field` if it fails.
    pub fn correlation_id(&mut self, field: &str, value: &str) -> Option<CorrelationId> {
        correlation_id(value)
            .map_err(|reason| self.add(field, reason))
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_refuses_nul_and_length_in_characters() {
        assert_eq!(text("fine", 4), Ok("fine"));
        assert_eq!(text("", 4), Ok(""));
        assert_eq!(text("a\0b", 10), Err(TextError::Nul));
        assert_eq!(without_nul(&"x".repeat(1000)).map(str::len), Ok(1000));
        assert_eq!(without_nul("\0"), Err(TextError::Nul));
        assert_eq!(text("fives", 4), Err(TextError::TooLong { max_chars: 4 }));
        assert_eq!(text("éééé", 4), Ok("éééé"), "characters, not bytes");
        assert_eq!(
            text(&"x".repeat(4 << 20), 500),
            Err(TextError::TooLong { max_chars: 500 })
        );
        assert_eq!(
            TextError::Nul.to_string(),
            "must not contain NUL characters"
        );
    }

    #[test]
    fn durations_are_from_zero_to_the_maximum_and_never_overflow() {
        let max = Duration::from_secs(3600);
        let of = |seconds, nanos| prost_types::Duration { seconds, nanos };
        assert_eq!(duration(&of(60, 5), max), Ok(Duration::new(60, 5)));
        assert_eq!(duration(&of(0, 0), max), Ok(Duration::ZERO));
        assert_eq!(duration(&of(-1, 0), max), Err(DurationError::Negative));
        assert_eq!(duration(&of(0, -1), max), Err(DurationError::Negative));
        assert_eq!(duration(&of(5, -1), max), Err(DurationError::Malformed));
        assert_eq!(duration(&of(-5, 1), max), Err(DurationError::Malformed));
        assert_eq!(
            duration(&of(0, 1_000_000_000), max),
            Err(DurationError::Malformed)
        );
        assert_eq!(
            duration(&of(3601, 0), max),
            Err(DurationError::TooLong { max })
        );
        for extreme in [
            of(i64::MAX, i32::MAX),
            of(i64::MAX, 999_999_999),
            of(i64::MIN, i32::MIN),
            of(i64::MIN, 0),
            of(0, i32::MAX),
        ] {
            assert!(duration(&extreme, max).is_err(), "{extreme:?}");
        }
        assert_eq!(
            DurationError::TooLong { max }.to_string(),
            "must be at most 1h"
        );
    }

    #[test]
    fn ids_and_keys() {
        let id = Uuid::now_v7();
        assert_eq!(uuid(&id.to_string()), Ok(id));
        assert_eq!(uuid(""), Err("must not be empty"));
        assert_eq!(uuid("order-1"), Err("must be a UUID"));
        assert_eq!(idempotency_key("k-1"), Ok("k-1"));
        assert_eq!(idempotency_key(""), Err("must not be empty"));
        assert_eq!(
            idempotency_key("a b"),
            Err("must be visible ASCII without spaces")
        );
        assert_eq!(idempotency_key(&"k".repeat(128)).map(str::len), Ok(128));
        assert_eq!(
            idempotency_key(&"k".repeat(129)),
            Err("must be at most 128 characters")
        );
    }

    #[test]
    fn the_timestamp_range_is_years_1_to_9999() {
        assert_eq!(
            *TIMESTAMP_MICROS.start(),
            -62_135_596_800 * 1_000_000,
            "0001-01-01T00:00:00Z"
        );
        assert_eq!(
            *TIMESTAMP_MICROS.end(),
            253_402_300_799 * 1_000_000 + 999_999,
            "9999-12-31T23:59:59.999999Z"
        );
    }

    #[test]
    fn violations_name_the_field() {
        let mut violations = FieldViolations::new();
        assert_eq!(violations.text("ok", "fine", 10), Some("fine"));
        assert!(violations.is_empty());
        assert_eq!(violations.text("reason", "a\0", 10), None);
        assert_eq!(violations.correlation_id("correlation_id", "a b"), None);
        assert!(violations.correlation_id("other", "flow-1").is_some());
        let status = violations.into_status();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("reason: must not contain NUL")
                && status
                    .message()
                    .contains("correlation_id: must be 1 to 128"),
            "{}",
            status.message()
        );
    }
}
