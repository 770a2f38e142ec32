//! The correlation id: one id for every request and event of one business
//! flow, from the first gRPC call to the last event it causes.
//!
//! A client may send one in `x-correlation-id`; otherwise the first service
//! makes one. Inside a service the current id lives in a task-local
//! [`scope`], which the gRPC server layer and the event consumer open, and
//! which outgoing calls and outbox writes read with [`current`].

use std::fmt;
use std::future::Future;

/// Metadata key and Kafka header name of the correlation id.
pub const HEADER: &str = "x-correlation-id";

/// Longest accepted correlation id; longer ones are replaced, not truncated.
const MAX_LEN: usize = 128;

/// An opaque id shared by every request and event of one flow.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CorrelationId(String);

impl CorrelationId {
    /// A fresh id (a random UUID).
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }

    /// Accepts an id from outside if it is 1 to 128 visible ASCII
    /// characters without spaces, so it is safe in logs and headers.
    pub fn parse(value: &str) -> Option<Self> {
        let acceptable = !value.is_empty()
            && value.len() <= MAX_LEN
            && value.bytes().all(|b| b.is_ascii_graphic());
        acceptable.then(|| Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CorrelationId({})", self.0)
    }
}

/// Header of W3C baggage, which also carries the correlation id (for tools
/// that follow the standard rather than our header).
pub const BAGGAGE_HEADER: &str = "baggage";
const BAGGAGE_KEY: &str = "correlation_id";

impl CorrelationId {
    /// The id as a W3C baggage list entry, `correlation_id=<percent-encoded>`.
    pub fn to_baggage(&self) -> String {
        let mut encoded = String::with_capacity(self.0.len() + BAGGAGE_KEY.len() + 1);
        encoded.push_str(BAGGAGE_KEY);
        encoded.push('=');
        for byte in self.0.bytes() {
            if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
                encoded.push(char::from(byte));
            } else {
                encoded.push_str(&format!("%{byte:02X}"));
            }
        }
        encoded
    }

    /// The correlation id in a W3C baggage header, if it carries one.
    pub fn from_baggage(header: &str) -> Option<Self> {
        let value = header.split(',').find_map(|member| {
            let (key, value) = member.split_once('=')?;
            (key.trim() == BAGGAGE_KEY).then(|| value.split(';').next().unwrap_or_default().trim())
        })?;
        let mut decoded = Vec::with_capacity(value.len());
        let mut bytes = value.bytes();
        while let Some(byte) = bytes.next() {
            if byte == b'%' {
                let hex = [bytes.next()?, bytes.next()?];
                decoded.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            } else {
                decoded.push(byte);
            }
        }
        Self::parse(std::str::from_utf8(&decoded).ok()?)
    }
}

tokio::task_local! {
    static CURRENT: CorrelationId;
}

/// Runs `future` with `id` as the current correlation id.
pub async fn scope<F: Future>(id: CorrelationId, future: F) -> F::Output {
    CURRENT.scope(id, future).await
}

/// The correlation id of the flow being handled, if inside a [`scope`].
pub fn current() -> Option<CorrelationId> {
    CURRENT.try_with(Clone::clone).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_round_trips_through_baggage() {
        for text in [
            "flow-42",
            "a,b;c=d%e",
            "7f3e2c1a-0000-4000-8000-000000000000",
        ] {
            let id = CorrelationId::parse(text).unwrap();
            let baggage = format!("other=1, {}; prop, more=2", id.to_baggage());
            assert_eq!(CorrelationId::from_baggage(&baggage), Some(id));
        }
        assert_eq!(CorrelationId::from_baggage("other=1"), None);
        assert_eq!(CorrelationId::from_baggage("correlation_id=%zz"), None);
    }
}
