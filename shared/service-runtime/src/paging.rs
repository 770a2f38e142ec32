//! Keyset paging at the edge: every list RPC takes a `page_size` and a
//! `page_token` and answers with a `next_page_token`, the same way.
//!
//! A page token is opaque to clients: the position of the last row of the
//! page, a (timestamp, UUID) pair that the list's `ORDER BY` and its index
//! share, so the next page starts with a seek, not an offset whose cost
//! grows with every page. Tokens are checked before any query runs: one
//! this service did not issue (too long, not ours, or a timestamp
//! PostgreSQL cannot compare with) is INVALID_ARGUMENT naming `page_token`.
//!
//! ```
//! use service_runtime::paging::{Cursor, PageRequest};
//! use service_runtime::status::FieldViolations;
//!
//! let mut violations = FieldViolations::new();
//! let page = PageRequest::parse(&mut violations, 2, "");
//! violations.into_result().unwrap();
//! // Fetch `page.limit()` rows after `page.after`, then:
//! let at = chrono::DateTime::from_timestamp_micros(1_700_000_000_000_000).unwrap();
//! let mut rows: Vec<Cursor> = (0..3)
//!     .map(|_| Cursor { at, id: uuid::Uuid::now_v7() })
//!     .collect();
//! let next = page.finish(&mut rows, |row| *row);
//! assert_eq!(rows.len(), 2);
//! assert_eq!(Cursor::decode(&next), Some(rows[1]));
//! ```

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::fields;
use crate::status::FieldViolations;

/// Rows per page unless the request asks otherwise.
pub const DEFAULT_PAGE_SIZE: u32 = 20;
/// Most rows per page: a bigger `page_size` is refused, not cut down, so a
/// client learns the bound instead of mistaking a short page for the end.
pub const MAX_PAGE_SIZE: u32 = 100;
/// Longest page token accepted; the ones issued are about 70 characters.
const MAX_PAGE_TOKEN_CHARS: usize = 256;

/// A position in a list ordered by (time, id): where the next page starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub at: DateTime<Utc>,
    pub id: Uuid,
}

impl Cursor {
    /// The token for this position: `<microseconds since the epoch>:<id>`,
    /// base64url.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("{}:{}", self.at.timestamp_micros(), self.id))
    }

    /// The position a token names; `None` for anything [`encode`](Self::encode)
    /// did not make, including a timestamp PostgreSQL could not hold.
    pub fn decode(token: &str) -> Option<Self> {
        if token.len() > MAX_PAGE_TOKEN_CHARS {
            return None;
        }
        let text = String::from_utf8(URL_SAFE_NO_PAD.decode(token).ok()?).ok()?;
        let (micros, id) = text.split_once(':')?;
        let micros = micros
            .parse()
            .ok()
            .filter(|micros| fields::TIMESTAMP_MICROS.contains(micros))?;
        Some(Self {
            at: DateTime::from_timestamp_micros(micros)?,
            id: Uuid::parse_str(id).ok()?,
        })
    }
}

/// What a list request asked for: how many rows, and after which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    pub size: u32,
    pub after: Option<Cursor>,
}

impl PageRequest {
    /// The request's `page_size` (0 is [`DEFAULT_PAGE_SIZE`]) and
    /// `page_token` (empty is the first page), each bad one recorded in
    /// `violations` against its field.
    pub fn parse(violations: &mut FieldViolations, page_size: u32, page_token: &str) -> Self {
        let size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            1..=MAX_PAGE_SIZE => page_size,
            _ => {
                violations.add("page_size", format!("must be at most {MAX_PAGE_SIZE}"));
                DEFAULT_PAGE_SIZE
            }
        };
        let after = if page_token.is_empty() {
            None
        } else {
            let cursor = Cursor::decode(page_token);
            if cursor.is_none() {
                violations.add("page_token", "is not a token this service issued");
            }
            cursor
        };
        Self { size, after }
    }

    /// How many rows to fetch: one more than the page, which tells whether
    /// there is a next one.
    pub fn limit(&self) -> i64 {
        i64::from(self.size) + 1
    }

    /// Cuts `rows` (fetched with [`limit`](Self::limit)) to the page and
    /// returns the next page's token: empty after the last page.
    pub fn finish<T>(&self, rows: &mut Vec<T>, cursor_of: impl Fn(&T) -> Cursor) -> String {
        let size = self.size as usize;
        if rows.len() <= size {
            return String::new();
        }
        rows.truncate(size);
        rows.last()
            .map(|last| cursor_of(last).encode())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(page_size: u32, page_token: &str) -> (PageRequest, Result<(), tonic::Status>) {
        let mut violations = FieldViolations::new();
        let page = PageRequest::parse(&mut violations, page_size, page_token);
        (page, violations.into_result())
    }

    #[test]
    fn sizes_default_and_are_bounded() {
        assert_eq!(parse(0, "").0.size, DEFAULT_PAGE_SIZE);
        assert_eq!(parse(7, "").0.size, 7);
        assert_eq!(parse(MAX_PAGE_SIZE, "").0.size, MAX_PAGE_SIZE);
        let (_, refused) = parse(MAX_PAGE_SIZE + 1, "");
        let status = refused.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("page_size: must be at most 100"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn tokens_round_trip_and_foreign_ones_are_refused() {
        let cursor = Cursor {
            at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            id: Uuid::now_v7(),
        };
        let (page, accepted) = parse(0, &cursor.encode());
        assert!(accepted.is_ok());
        assert_eq!(page.after, Some(cursor));
        let out_of_range = URL_SAFE_NO_PAD.encode(format!("{}:{}", i64::MAX, cursor.id));
        for token in [
            "not base64!".to_owned(),
            URL_SAFE_NO_PAD.encode("no colon"),
            URL_SAFE_NO_PAD.encode("12:not-a-uuid"),
            out_of_range,
            "A".repeat(MAX_PAGE_TOKEN_CHARS + 1),
        ] {
            let (page, refused) = parse(0, &token);
            assert_eq!(page.after, None, "{token}");
            let status = refused.unwrap_err();
            assert!(
                status
                    .message()
                    .contains("page_token: is not a token this service issued"),
                "{}",
                status.message()
            );
        }
    }

    #[test]
    fn finish_cuts_to_the_page_and_names_its_last_row() {
        let rows: Vec<Cursor> = (0..5)
            .map(|n| Cursor {
                at: DateTime::from_timestamp_micros(n).unwrap(),
                id: Uuid::now_v7(),
            })
            .collect();
        let page = PageRequest {
            size: 3,
            after: None,
        };
        let mut fetched = rows[..4].to_vec();
        assert_eq!(page.finish(&mut fetched, |row| *row), rows[2].encode());
        assert_eq!(fetched, rows[..3]);
        let mut last = rows[..3].to_vec();
        assert_eq!(page.finish(&mut last, |row| *row), "");
        assert_eq!(last.len(), 3);
    }
}
